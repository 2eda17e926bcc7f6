"""How much one matrix's error moves the whole model's outputs (SPEC §7, model-wide budget).

A model-wide budget ([mpotn.budget.spend][]) minimises a sum of per-matrix errors,
each relative to its own matrix's outputs (Eq. 7). Matrices differ in how much of
that reaches the model's output: a feed-forward output projection writes into
the residual stream directly, a query projection through a softmax, the pooler
into its own output (``pooler_output``) only. An
[OutputSensitivity][mpotn.compression.sensitivity.OutputSensitivity] measures it:
one matrix at a time is replaced by a truncation of itself, the model is run on
calibration inputs, and the relative squared change of its outputs, divided by the
matrix's own relative squared error ``eps^2``, is that matrix's *sensitivity*
``s``. The budget then minimises ``sum_m s_m eps_m^2``, a first-order estimate of
the model's output error, instead of ``sum_m eps_m^2``: ASVD's sensitivity-based
rank search (Yuan et al., 2023) measured the same thing by perplexity, one ratio
at a time.

The outputs compared are the floating-point tensors at the top level of what the
model returns (``last_hidden_state`` and ``pooler_output``, or ``logits``, ...;
not caches or tuples of hidden states), each over the real tokens of the batch
(padding excluded through the attention mask), each relative to its own norm,
summed: a pooler that a classifier fine-tuned later will read keeps its weight.
An output wider than ``SKETCH`` columns (a language model's logits, a large
model's hidden states) is compared through a fixed Gaussian sketch of ``SKETCH``
columns, an unbiased estimate of its squared norm, so that holding the reference
outputs costs ``tokens x SKETCH`` numbers per output, not ``tokens x vocabulary``.

Examples
--------
The model's output is its last layer's: halving that matrix (a relative error of
0.5) changes the output by a relative 0.5 too, a sensitivity of 1.

>>> import torch
>>> from torch import nn
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.first, self.last = nn.Linear(4, 4), nn.Linear(4, 3, bias=False)
...     def forward(self, input):
...         return self.last(torch.relu(self.first(input)))
>>> _ = torch.manual_seed(0)
>>> net = Net()
>>> probe = OutputSensitivity(net, [{"input": torch.randn(64, 4)}])
>>> matrix = net.last.weight.detach().T  # in x out
>>> round(probe.sensitivity("last", net.last, 0.5 * matrix, error=0.5), 6)
1.0
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mpotn.compression.calibrate import prepared
from mpotn.compression.models import model_device
from mpotn.layers.masks import real_rows

#: Columns of the Gaussian sketch an output wider than this is compared through.
SKETCH = 512
#: Calibration sequences the outputs are measured on: batches drawn (seeded) from all of
#: the calibration data until they hold this many.
SEQUENCES = 64


def _tensors(output: Any) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every floating-point tensor ``output`` holds at its top level
    (a ``ModelOutput``, a tuple or one tensor); caches and tuples of hidden states are
    not compared."""
    if isinstance(output, torch.Tensor):
        items: list[tuple[str, Any]] = [("output", output)]
    elif isinstance(output, Mapping):
        items = list(output.items())
    elif isinstance(output, (tuple, list)):
        items = [(str(k), value) for k, value in enumerate(output)]
    else:
        raise ValueError(f"cannot measure output sensitivity: the model returned a "
                         f"{type(output).__name__}, not tensors")
    return [(name, value) for name, value in items
            if isinstance(value, torch.Tensor) and value.is_floating_point()]


#: Two-dimensional outputs with one value per token (question answering's span scores);
#: any other ``(batch, width)`` output is one row per sentence (a pooler's), even where its
#: width equals the padded length.
PER_TOKEN_SCORES = ("start_logits", "end_logits")


def _rows(name: str, value: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """``value`` as rows: one per real token when its first two dimensions are those of
    the batch's ``attention_mask`` or ``decoder_attention_mask`` (when they are of both
    and the masks differ, the decoder's unless ``name`` starts with ``encoder``) and it has
    a feature dimension, or is one of the ``PER_TOKEN_SCORES``; else one per leading
    entry."""
    value = value.reshape(1) if value.dim() == 0 else value
    per_token = value.dim() >= 3 or (value.dim() == 2 and name in PER_TOKEN_SCORES)
    masks = [batch[key] for key in ("attention_mask", "decoder_attention_mask")
             if isinstance(batch.get(key), torch.Tensor) and per_token
             and tuple(value.shape[:2]) == tuple(batch[key].shape)]
    if not masks:
        return value.reshape(value.shape[0], -1)
    if len(masks) == 2 and not torch.equal(*masks):
        masks = masks[:1] if name.startswith("encoder") else masks[1:]
    return real_rows(value.reshape(*value.shape[:2], -1), masks[0])


@contextmanager
def replaced(module: nn.Module, matrix: torch.Tensor) -> Iterator[None]:
    """``module`` (an ``nn.Linear`` or ``nn.Embedding``) computing with ``matrix``
    (``in x out``, the paper's orientation) instead of its weight, which is restored on
    leaving, also after an error.

    Examples
    --------
    >>> layer = nn.Linear(2, 3)
    >>> before = layer.weight.detach().clone()
    >>> with replaced(layer, torch.zeros(2, 3)):
    ...     float(layer.weight.detach().abs().sum())
    0.0
    >>> torch.equal(layer.weight, before)
    True
    """
    weight = module.weight
    if isinstance(module, nn.Embedding):
        new = matrix
    elif isinstance(module, nn.Linear):
        new = matrix.T
    else:
        raise ValueError(f"cannot replace the matrix of a {type(module).__name__}: "
                         "nn.Linear or nn.Embedding only")
    if tuple(new.shape) != tuple(weight.shape):
        raise ValueError(f"a {tuple(matrix.shape)} matrix cannot stand in for a weight of "
                         f"shape {tuple(weight.shape)}")
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.copy_(new.to(weight.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


class OutputSensitivity:
    """The model's outputs on calibration inputs, and how far a changed matrix moves them.

    Parameters
    ----------
    model:
        The model, called as ``model(**batch)``; its outputs are read the first time
        they are needed, so that the reference is the model as it is then.
    batches:
        Model-input dicts (tokenizer outputs, moved to the model's device); a seeded
        random choice of them holding ``sequences`` rows is used, so that batches made
        by length ([text_batches][mpotn.compression.calibrate.text_batches]) give texts
        of every length.
    sequences:
        How many calibration sequences to measure on (default ``SEQUENCES``, 64):
        the measurement costs one forward pass over them per matrix.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Mapping[str, Any]],
                 sequences: int = SEQUENCES) -> None:
        self.model = model
        self.batches: list[Mapping[str, Any]] = []
        order = list(range(len(batches)))
        random.Random(0).shuffle(order)  # batches by length would give the shortest texts
        rows = 0
        for k in order:
            if rows >= sequences:
                break
            self.batches.append(batches[k])
            first = next((v for v in batches[k].values() if isinstance(v, torch.Tensor)), None)
            rows += 1 if first is None or first.dim() == 0 else first.shape[0]
        if not self.batches:
            raise ValueError("measuring output sensitivity needs calibration batches: "
                             "give at least one")
        self._sketches: dict[tuple[str, int], torch.Tensor] = {}
        self._reference: list[list[tuple[str, torch.Tensor]]] | None = None
        #: ``{matrix name: s}`` of every matrix measured so far.
        self.measured: dict[str, float] = {}

    def _sketch(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.float()
        width = rows.shape[1]
        if width <= SKETCH:
            return rows
        key = (name, width)
        if key not in self._sketches:
            generator = torch.Generator(device="cpu").manual_seed(width)
            self._sketches[key] = (torch.randn(width, SKETCH, generator=generator)
                                   / SKETCH**0.5).to(rows.device)
        return rows @ self._sketches[key]

    @torch.no_grad()
    def _outputs(self) -> list[list[tuple[str, torch.Tensor]]]:
        device = model_device(self.model)
        training = self.model.training
        self.model.eval()
        out = []
        try:
            for batch in self.batches:
                batch = prepared(self.model, batch, device)
                out.append([(name, self._sketch(name, _rows(name, value, batch)))
                            for name, value in _tensors(self.model(**batch))])
        finally:
            self.model.train(training)
        if not out[0]:
            raise ValueError("cannot measure output sensitivity: the model returns no "
                             "floating-point tensor at the top level of its output")
        return out

    def output_error(self, module: nn.Module, matrix: torch.Tensor) -> float:
        """The relative squared change of the model's outputs with ``module`` computing
        with ``matrix`` (``in x out``): ``sum_o ||Y_o' - Y_o||^2 / ||Y_o||^2`` over the
        outputs ``o`` it returns."""
        if self._reference is None:
            self._reference = self._outputs()
        with replaced(module, matrix):
            changed = self._outputs()
        norms: dict[str, float] = {}
        diffs: dict[str, float] = {}
        for reference, new in zip(self._reference, changed):
            for (name, ref), (_, out) in zip(reference, new):
                norms[name] = norms.get(name, 0.0) + float(ref.double().pow(2).sum())
                diffs[name] = diffs.get(name, 0.0) + float((out - ref).double().pow(2).sum())
        if not any(norms.values()):
            raise ValueError("cannot measure output sensitivity: the model's outputs on the "
                             "calibration batches are all zero")
        return sum(diffs[name] / norms[name] for name in norms if norms[name] > 0)

    def sensitivity(self, name: str, module: nn.Module, matrix: torch.Tensor, error: float
                    ) -> float:
        """``s``: the model's relative squared output change with ``module`` computing
        with ``matrix``, over that matrix's own relative error squared (``error``: Eq. 7
        on the calibration inputs, or the weight error of an uncalibrated matrix);
        ``0.0`` when ``error`` is 0 (nothing to weigh). Kept in ``measured[name]``.

        Raises
        ------
        ValueError
            When the outputs are not finite (a half-precision model that overflows).
        """
        value = 0.0 if error <= 0 else self.output_error(module, matrix) / error**2
        if not math.isfinite(value):
            raise ValueError(f"the measured sensitivity of {name} is {value}: the model's "
                             "outputs are not finite with it truncated (in half precision, "
                             "compress in float32)")
        self.measured[name] = value
        return value
