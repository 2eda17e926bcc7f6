"""MPO-LSTM: an LSTM whose input-to-hidden and hidden-to-hidden matrices are MPOs (SPEC §4).

[MPOLSTM][mpotn.layers.lstm.MPOLSTM] takes the place of a trained ``nn.LSTM`` (same
arguments, inputs and outputs, packed sequences included; ``proj_size`` is not
supported, the dense weights are read with
[to_lstm][mpotn.layers.lstm.MPOLSTM.to_lstm], and a new one starts from
``MPOLinear``'s random cores, not ``nn.LSTM``'s initialisation). Each layer and direction is an
[MPOLSTMCell][mpotn.layers.lstm.MPOLSTMCell] holding two
[MPOLinear][mpotn.layers.mpo.MPOLinear] layers: ``ih`` for ``W_ih^T`` (``I x 4H``, with the
bias ``b_ih + b_hh``) and ``hh`` for ``W_hh^T`` (``H x 4H``), the gate blocks in
``nn.LSTM``'s order (input, forget, cell, output) along the columns. So their central
and auxiliary tensors are what every MPO tool of mpotn works on: LFA, the
parameter counts, spectra and truncation.

A forward pass rebuilds each matrix once (cached in eval mode under
``torch.no_grad()`` until a core changes) and runs ``nn.LSTM``'s own fused
recurrence on them (cuDNN on a GPU) through ``torch.func.functional_call``;
gradients flow back to the cores. The recurrence applies ``W_hh`` at every step,
so rebuilding it once is cheaper than contracting the cores at each step.

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

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from mpotn.calibration import DAMP, calibrated_mpo
from mpotn.layers.mpo import MPOLinear
from mpotn.methods.svd import svd_shapes

State = tuple[torch.Tensor, torch.Tensor]


def _suffixes(num_layers: int, bidirectional: bool) -> list[str]:
    """``nn.LSTM``'s parameter-name suffixes per layer and direction, in cell order
    (``l0``, ``l0_reverse``, ``l1``, ...)."""
    return [f"l{layer}{direction}" for layer in range(num_layers)
            for direction in ("", "_reverse")[: 2 if bidirectional else 1]]


def _layer(lstm: nn.LSTM, layer: int) -> nn.LSTM:
    """Layer ``layer`` of ``lstm`` (both directions) as a one-layer ``nn.LSTM``."""
    size = lstm.input_size if layer == 0 else lstm.hidden_size * (1 + lstm.bidirectional)
    single = nn.LSTM(size, lstm.hidden_size, bias=lstm.bias, bidirectional=lstm.bidirectional,
                     dtype=lstm.weight_ih_l0.dtype, device=lstm.weight_ih_l0.device)
    with torch.no_grad():
        for name, param in single.named_parameters():  # weight_ih_l0, ..._l0_reverse
            param.copy_(getattr(lstm, name.replace("_l0", f"_l{layer}")))
    return single


def _padded(lstm: nn.LSTM, x: torch.Tensor | PackedSequence
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as ``T x B x I`` (zero after each sequence's end) and its lengths."""
    if isinstance(x, PackedSequence):
        padded, lengths = pad_packed_sequence(x)
        return padded, lengths.to(padded.device)
    if x.dim() == 2:
        x = x.unsqueeze(1)
    elif lstm.batch_first:
        x = x.transpose(0, 1)
    return x, torch.full((x.shape[1],), x.shape[0], device=x.device)


@torch.no_grad()
def lstm_input_covariances(lstm: nn.LSTM, inputs: Iterable[torch.Tensor | PackedSequence]
                           ) -> list[torch.Tensor]:
    r"""``C = X^T X`` (float64) of every matrix of ``lstm`` on calibration ``inputs``, in the
    order of [MPOLSTM.matrices][mpotn.layers.lstm.MPOLSTM.matrices]: for ``W_ih`` the layer's
    inputs at every real step, for ``W_hh`` the hidden states the recurrence feeds back
    (each step's state but a sequence's last, in the direction's own order; the zero
    initial state adds nothing).

    ``inputs`` are what ``lstm`` takes (tensors in its layout, or packed sequences),
    run with zero initial states and no dropout.

    Raises
    ------
    ValueError
        If ``inputs`` is empty or ``lstm`` has ``proj_size > 0``.
    """
    if lstm.proj_size:
        raise ValueError("an LSTM with proj_size > 0 is not supported")
    directions = 2 if lstm.bidirectional else 1
    layers = [_layer(lstm, layer) for layer in range(lstm.num_layers)]
    sums: list[torch.Tensor | int] = [0] * (2 * lstm.num_layers * directions)
    batches = 0
    for item in inputs:
        batches += 1
        x, lengths = _padded(lstm, item)
        steps = torch.arange(x.shape[0], device=x.device)[:, None]
        real = steps < lengths[None, :]
        fed = (real & (steps < lengths[None, :] - 1), real & (steps > 0))  # forward, reverse
        for layer, single in enumerate(layers):
            packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
            out = pad_packed_sequence(single(packed)[0], total_length=x.shape[0])[0]
            rows = x[real].double()
            for d in range(directions):
                k = 2 * (layer * directions + d)
                sums[k] = sums[k] + rows.T @ rows
                states = out[..., d * lstm.hidden_size:(d + 1) * lstm.hidden_size][fed[d]]
                sums[k + 1] = sums[k + 1] + states.double().T @ states.double()
            x = out
    if not batches:
        raise ValueError("no calibration inputs: give at least one batch of sequences")
    return [torch.as_tensor(c, dtype=torch.float64) for c in sums]


class MPOLSTMCell(nn.Module):
    """The two matrices of one layer and direction of an
    [MPOLSTM][mpotn.layers.lstm.MPOLSTM], whose gates are ``x W_ih^T + h W_hh^T + b``.

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

    def matrices(self) -> list[MPOLinear]:
        """Every MPO of the LSTM: ``ih`` then ``hh`` of each cell, cells ordered by layer,
        then direction (``nn.LSTM``'s ``_l{k}`` and ``_l{k}_reverse``)."""
        return [m for cell in self.cells for m in (cell.ih, cell.hh)]

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, n: int = 5, *, structure: str = "mpo",
                  svd: str = "auto",
                  calibration: Iterable[torch.Tensor | PackedSequence] | None = None,
                  damp: float = DAMP, **truncation: Any) -> MPOLSTM:
        """Decompose a trained ``nn.LSTM``: each ``W_ih`` and ``W_hh`` becomes an MPO
        (Algorithm 1), truncated by ``truncation`` (``max_bond``, ``ratio``, ``tol``, ...,
        as in [MPOLinear.from_linear][mpotn.layers.mpo.MPOLinear.from_linear]; full rank,
        the same function, when none). ``b_ih + b_hh`` becomes ``ih``'s bias.
        ``structure="svd"`` makes each matrix its truncated SVD (two cores, rows
        ``(I, 1)``, columns ``(1, J)``; ``n`` is then not used) instead of an ``n``-core MPO.

        With ``calibration`` (batches of sequences ``lstm`` takes), each matrix is
        truncated to minimise the error of its outputs on the inputs it sees there
        (Eq. 7, [calibrated_mpo][mpotn.calibration.calibrated_mpo] with the covariances of
        [lstm_input_covariances][mpotn.layers.lstm.lstm_input_covariances] and ``damp``)
        instead of the error of its entries.

        Raises
        ------
        ValueError
            If ``lstm`` is not an ``nn.LSTM`` or has ``proj_size > 0``, or ``structure``
            is not ``"mpo"`` or ``"svd"``.
        """
        if structure not in ("mpo", "svd"):
            raise ValueError(f"structure must be 'mpo' or 'svd', got {structure!r}")
        if not isinstance(lstm, nn.LSTM):
            raise ValueError(f"from_lstm needs an nn.LSTM, got {type(lstm).__name__}")
        if lstm.proj_size:
            raise ValueError("an LSTM with proj_size > 0 is not supported: its hidden-to-"
                             "hidden matrix is H x 4P; decompose a model without projections")
        covariances = (None if calibration is None
                       else lstm_input_covariances(lstm, calibration))
        matrices = []
        for suffix in _suffixes(lstm.num_layers, lstm.bidirectional):
            for m, kind in enumerate(("ih", "hh")):
                weight = getattr(lstm, f"weight_{kind}_{suffix}").detach()
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=lstm.bias and m == 0,
                                   dtype=weight.dtype, device=weight.device)
                with torch.no_grad():
                    linear.weight.copy_(weight)
                    if linear.bias is not None:
                        linear.bias.copy_(getattr(lstm, f"bias_ih_{suffix}")
                                          + getattr(lstm, f"bias_hh_{suffix}"))
                cores, rows, cols = (svd_shapes(*weight.T.shape) if structure == "svd"
                                     else (n, None, None))
                if covariances is None:
                    matrices.append(MPOLinear.from_linear(linear, cores, rows, cols, svd=svd,
                                                          **truncation))
                    continue
                fitted = calibrated_mpo(weight.T, covariances[len(matrices)], cores, rows,
                                        cols, damp=damp, svd=svd, **truncation)
                matrices.append(MPOLinear.from_linear(linear, mpo=fitted.mpo))
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
            lstm.load_state_dict(self._weights())
        return lstm

    def _weights(self) -> dict[str, torch.Tensor]:
        """``nn.LSTM``'s parameters by name, from the cores (``bias_hh`` zero)."""
        weights = {}
        for suffix, cell in zip(_suffixes(self.num_layers, self.bidirectional), self.cells):
            weights[f"weight_ih_{suffix}"] = cell.ih.weight
            weights[f"weight_hh_{suffix}"] = cell.hh.weight
            if self.bias:
                weights[f"bias_ih_{suffix}"] = cell.ih.bias
                weights[f"bias_hh_{suffix}"] = torch.zeros_like(cell.ih.bias)
        return weights

    def spec(self) -> dict[str, Any]:
        """The structure as JSON-ready data: ``nn.LSTM``'s settings and each matrix's
        factorization and bonds; [from_spec][mpotn.layers.lstm.MPOLSTM.from_spec] builds
        it again (then load the ``state_dict``). mpotn's model saves do not hold
        MPO-LSTMs: keep this and the ``state_dict``."""
        return {**self._settings(self), **self._structure(self.matrices())}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype | None = None) -> MPOLSTM:
        """An untrained MPO-LSTM of the structure ``spec`` describes, in ``dtype``."""
        return cls(**spec, dtype=dtype)

    def flatten_parameters(self) -> None:
        """Nothing to do (``nn.LSTM``'s method, which models call before a forward pass):
        the matrices are rebuilt from the cores at each call."""

    def forward(self, x: torch.Tensor | PackedSequence, state: State | None = None
                ) -> tuple[torch.Tensor | PackedSequence, State]:
        """``nn.LSTM.forward``: ``x`` is ``T x B x input_size`` (``B x T x ...`` with
        ``batch_first``), unbatched ``T x input_size``, or a ``PackedSequence``;
        ``state`` is ``(h_0, c_0)``, each ``num_layers * directions x B x H`` (zeros when
        omitted). Returns the last layer's outputs and ``(h_n, c_n)``."""
        weights = self._weights()
        with torch.device("meta"):  # nn.LSTM's recurrence, without weights of its own
            recurrence = nn.LSTM(**self._settings(self))
        recurrence.train(self.training)  # dropout between layers in training only
        return functional_call(recurrence, weights, (x,) if state is None else (x, state))

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional}, batch_first={self.batch_first}")
