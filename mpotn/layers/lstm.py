"""MPO-LSTM: an LSTM whose input-to-hidden and hidden-to-hidden matrices are MPOs (SPEC §4).

[MPOLSTM][mpotn.layers.lstm.MPOLSTM] is a drop-in for ``nn.LSTM`` (same arguments,
inputs and outputs, packed sequences included). Each layer and direction is an
[MPOLSTMCell][mpotn.layers.lstm.MPOLSTMCell] holding two
[MPOLinear][mpotn.layers.mpo.MPOLinear] layers: ``ih`` for ``W_ih^T`` (``I x 4H``, with the
bias ``b_ih + b_hh``) and ``hh`` for ``W_hh^T`` (``H x 4H``), the gate blocks in
``nn.LSTM``'s order (input, forget, cell, output) along the columns. So their central
and auxiliary tensors are what every MPO tool of mpotn works on: LFA, the
parameter counts, truncation and squeezing.

The input projection of a whole sequence is one call of ``ih`` (contracted or
rebuilt, whichever is cheaper for ``T x B`` rows); ``hh`` is rebuilt once per
call and applied at each step.

Examples
--------
>>> import torch
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> lstm = nn.LSTM(8, 6, num_layers=2, batch_first=True)
>>> mpo = MPOLSTM.from_lstm(lstm, n=3)  # full rank: the same function
>>> x = torch.randn(4, 5, 8)
>>> bool(torch.allclose(mpo(x)[0], lstm(x)[0], atol=1e-5))
True
>>> small = MPOLSTM.from_lstm(lstm, n=3, max_bond=2)
>>> sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in lstm.parameters())
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from mpotn.layers.mpo import MPOLinear

State = tuple[torch.Tensor, torch.Tensor]


def _reversed_within(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """``x`` (``T x B x F``) with each sequence's first ``lengths[b]`` steps in reverse
    order (the padding after them stays where it is)."""
    if lengths is None:
        return x.flip(0)
    steps = torch.arange(x.shape[0], device=x.device)[:, None]
    lengths = lengths.to(x.device)[None, :]
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)
    return x.gather(0, index[..., None].expand_as(x))


class MPOLSTMCell(nn.Module):
    """One layer and direction of an [MPOLSTM][mpotn.layers.lstm.MPOLSTM]: the gates
    ``x W_ih^T + h W_hh^T + b`` with both matrices as MPOs.

    Parameters
    ----------
    ih:
        ``W_ih^T`` (``input_size x 4 hidden_size``), with the summed bias or none.
    hh:
        ``W_hh^T`` (``hidden_size x 4 hidden_size``), without a bias.
    """

    def __init__(self, ih: MPOLinear, hh: MPOLinear) -> None:
        super().__init__()
        if hh.bias is not None:
            raise ValueError("the hidden-to-hidden MPO takes no bias: put b_ih + b_hh on ih")
        if hh.in_features * 4 != hh.out_features or ih.out_features != hh.out_features:
            raise ValueError(f"an LSTM cell needs ih: I x 4H and hh: H x 4H, got ih "
                             f"{ih.in_features} x {ih.out_features} and hh "
                             f"{hh.in_features} x {hh.out_features}")
        self.ih, self.hh = ih, hh
        self.hidden_size = hh.in_features

    def forward(self, x: torch.Tensor, state: State, lengths: torch.Tensor | None = None,
                reverse: bool = False) -> tuple[torch.Tensor, State]:
        """Run over ``x`` (``T x B x input_size``) from ``state`` (``h, c``: ``B x H``).

        ``lengths`` (``B``, on any device) makes step ``t`` of sequence ``b`` padding when
        ``t >= lengths[b]``: its state is not updated there and its output is zero.
        ``reverse`` runs each sequence from its last real step back to its first.
        Returns the outputs (``T x B x H``) and the final ``(h, c)``.
        """
        if reverse:
            x = _reversed_within(x, lengths)
        gates_x = self.ih(x)
        w_hh = self.hh.matrix()
        h, c = state
        mask = (None if lengths is None else
                torch.arange(x.shape[0], device=x.device)[:, None] < lengths.to(x.device))
        outputs = []
        for t in range(x.shape[0]):
            i, f, g, o = (gates_x[t] + h @ w_hh).chunk(4, dim=-1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            if mask is not None:
                keep = mask[t, :, None]
                h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
                h_new = h_new * keep
            else:
                h, c = h_new, c_new
            outputs.append(h_new)
        out = torch.stack(outputs)
        return (_reversed_within(out, lengths) if reverse else out), (h, c)


class MPOLSTM(nn.Module):
    """A multi-layer LSTM (``nn.LSTM``'s interface) whose weight matrices are MPOs.

    Parameters
    ----------
    input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional:
        As in ``nn.LSTM`` (``proj_size`` is not supported).
    row_shapes, col_shapes, bond_dims:
        Per matrix, in the order of [matrices][mpotn.layers.lstm.MPOLSTM.matrices]
        (``ih`` then ``hh`` of each layer and direction); ``None`` for every entry: the
        factorizations [MPOLinear][mpotn.layers.mpo.MPOLinear] picks with ``n`` cores,
        at full bonds.
    n:
        Cores per matrix when the shapes are chosen automatically.

    Examples
    --------
    >>> lstm = MPOLSTM(8, 6, bidirectional=True, n=2)
    >>> out, (h, c) = lstm(torch.randn(5, 3, 8))
    >>> tuple(out.shape), tuple(h.shape)
    ((5, 3, 12), (2, 3, 6))
    """

    KIND = "lstm"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        row_shapes: list[list[int] | None] | None = None,
        col_shapes: list[list[int] | None] | None = None,
        bond_dims: list[list[int] | None] | None = None,
        n: int = 5,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1 or not 0 <= dropout <= 1:
            raise ValueError(f"num_layers must be >= 1 and dropout in [0, 1], got "
                             f"{num_layers} and {dropout}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, dropout
        self.bidirectional = bidirectional
        directions = 2 if bidirectional else 1
        count = 2 * num_layers * directions
        shapes = [row_shapes or [None] * count, col_shapes or [None] * count,
                  bond_dims or [None] * count]
        if any(len(s) != count for s in shapes):
            raise ValueError(f"row_shapes, col_shapes and bond_dims need {count} entries, "
                             "ih then hh of each layer and direction (see matrices())")
        cells = []
        for k in range(num_layers * directions):
            inputs = input_size if k < directions else hidden_size * directions
            ih, hh = (MPOLinear(size, 4 * hidden_size, *(s[2 * k + m] for s in shapes), n=n,
                                bias=bias and m == 0, dtype=dtype, device=device)
                      for m, size in enumerate((inputs, hidden_size)))
            cells.append(MPOLSTMCell(ih, hh))
        self.cells = nn.ModuleList(cells)

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def matrices(self) -> list[MPOLinear]:
        """Every MPO of the LSTM: ``ih`` then ``hh`` of each cell, cells ordered by layer,
        then direction (``nn.LSTM``'s ``_l{k}`` and ``_l{k}_reverse``)."""
        return [m for cell in self.cells for m in (cell.ih, cell.hh)]

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, n: int = 5, *, svd: str = "auto",
                  **truncation: Any) -> MPOLSTM:
        """Decompose a trained ``nn.LSTM``: each ``W_ih`` and ``W_hh`` becomes an MPO
        (Algorithm 1), truncated by ``truncation`` (``max_bond``, ``ratio``, ``tol``, ...,
        as in [MPOLinear.from_linear][mpotn.layers.mpo.MPOLinear.from_linear]; full rank,
        the same function, when none). ``b_ih + b_hh`` becomes ``ih``'s bias.

        Raises
        ------
        ValueError
            If ``lstm`` is not an ``nn.LSTM`` or has ``proj_size > 0``.
        """
        if not isinstance(lstm, nn.LSTM):
            raise ValueError(f"from_lstm needs an nn.LSTM, got {type(lstm).__name__}")
        if lstm.proj_size:
            raise ValueError("an LSTM with proj_size > 0 is not supported: its hidden-to-"
                             "hidden matrix is H x 4P; decompose a model without projections")
        matrices = []
        for layer in range(lstm.num_layers):
            for suffix in ("", "_reverse")[: 2 if lstm.bidirectional else 1]:
                w_ih = getattr(lstm, f"weight_ih_l{layer}{suffix}").detach()
                w_hh = getattr(lstm, f"weight_hh_l{layer}{suffix}").detach()
                for m, weight in enumerate((w_ih, w_hh)):
                    linear = nn.Linear(weight.shape[1], weight.shape[0],
                                       bias=lstm.bias and m == 0,
                                       dtype=weight.dtype, device=weight.device)
                    with torch.no_grad():
                        linear.weight.copy_(weight)
                        if linear.bias is not None:
                            linear.bias.copy_(getattr(lstm, f"bias_ih_l{layer}{suffix}")
                                              + getattr(lstm, f"bias_hh_l{layer}{suffix}"))
                    matrices.append(MPOLinear.from_linear(linear, n, svd=svd, **truncation))
        model = cls(**cls._settings(lstm), **cls._structure(matrices),
                    dtype=matrices[0].cores[0].dtype, device=matrices[0].cores[0].device)
        model.load_state_dict({f"cells.{k // 2}.{('ih', 'hh')[k % 2]}.{name}": value
                               for k, m in enumerate(matrices)
                               for name, value in m.state_dict().items()})
        return model

    @staticmethod
    def _settings(lstm: nn.Module) -> dict[str, Any]:
        return {key: getattr(lstm, key) for key in (
            "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
            "bidirectional")}

    @staticmethod
    def _structure(matrices: list[MPOLinear]) -> dict[str, list[list[int]]]:
        specs = [m.spec() for m in matrices]
        return {"row_shapes": [s["row_shape"] for s in specs],
                "col_shapes": [s["col_shape"] for s in specs],
                "bond_dims": [s["bond_dims"] for s in specs]}

    def to_lstm(self) -> nn.LSTM:
        """The dense ``nn.LSTM`` of the current cores (the summed bias in ``bias_ih``,
        ``bias_hh`` zero): the same function."""
        core = self.cells[0].ih.cores[0]
        lstm = nn.LSTM(**self._settings(self), dtype=core.dtype, device=core.device)
        with torch.no_grad():
            for k, cell in enumerate(self.cells):
                suffix = f"l{k // self.directions}{'_reverse' if k % self.directions else ''}"
                getattr(lstm, f"weight_ih_{suffix}").copy_(cell.ih.weight)
                getattr(lstm, f"weight_hh_{suffix}").copy_(cell.hh.weight)
                if self.bias:
                    getattr(lstm, f"bias_ih_{suffix}").copy_(cell.ih.bias)
                    getattr(lstm, f"bias_hh_{suffix}").zero_()
        return lstm

    def spec(self) -> dict[str, Any]:
        """The structure as JSON-ready data: ``nn.LSTM``'s settings and each matrix's
        factorization and bonds; [from_spec][mpotn.layers.lstm.MPOLSTM.from_spec] builds
        it again (then load the ``state_dict``)."""
        return {"kind": self.KIND, **self._settings(self), **self._structure(self.matrices())}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype | None = None) -> MPOLSTM:
        """An untrained MPO-LSTM of the structure ``spec`` describes, in ``dtype``."""
        return cls(**{k: v for k, v in spec.items() if k != "kind"}, dtype=dtype)

    def forward(self, x: torch.Tensor | PackedSequence, state: State | None = None
                ) -> tuple[torch.Tensor | PackedSequence, State]:
        """``nn.LSTM.forward``: ``x`` is ``T x B x input_size`` (``B x T x ...`` with
        ``batch_first``), unbatched ``T x input_size``, or a ``PackedSequence``;
        ``state`` is ``(h_0, c_0)``, each ``num_layers * directions x B x H`` (zeros when
        omitted). Returns the last layer's outputs and ``(h_n, c_n)``."""
        packed = isinstance(x, PackedSequence)
        unbatched = not packed and x.dim() == 2
        lengths = None
        if packed:
            x, lengths = pad_packed_sequence(x)
        elif unbatched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        if unbatched:
            state = None if state is None else (state[0].unsqueeze(1), state[1].unsqueeze(1))
        batch = x.shape[1]
        if state is None:
            zeros = x.new_zeros(self.num_layers * self.directions, batch, self.hidden_size)
            state = (zeros, zeros)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for d in range(self.directions):
                k = layer * self.directions + d
                out, (h, c) = self.cells[k](x, (state[0][k], state[1][k]), lengths,
                                            reverse=d == 1)
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outputs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = nn.functional.dropout(x, self.dropout, training=True)
        final = (torch.stack(h_n), torch.stack(c_n))
        if packed:
            return pack_padded_sequence(x, lengths, enforce_sorted=False), final
        if unbatched:
            return x.squeeze(1), (final[0].squeeze(1), final[1].squeeze(1))
        return (x.transpose(0, 1) if self.batch_first else x), final

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional}, batch_first={self.batch_first}")
