"""Compiled contractions of an MPO: rebuild the matrix, or apply it to a batch.

Contraction orders come from opt_einsum (``auto-hq``: the FLOP-optimal order) and
are compiled once per tensor-shape signature into an
``opt_einsum.contract_expression`` evaluated on torch tensors, so autograd
reaches every core and nothing is re-planned on the hot path.

Applying an MPO to ``B`` vectors can go two ways:

- ``contract``: contract the reshaped input with the cores in the planned order;
- ``rebuild``: contract the cores into the ``I x J`` matrix, then one matmul
  (``2 B I J`` FLOPs more).

Rebuilding sweeps the chain left to right (Eq. 1), keeping the partial product
in the layout ``(i_1..i_k, j_1..j_k, d_k)`` so that every step is one GEMM and
one copy and the last step yields the matrix itself. That is 1.1 to 2.6 times
faster on a CPU than contracting in the FLOP-optimal order and permuting at the
end, although the FLOP-optimal order may need slightly fewer FLOPs.

[Contractor.cost][mpotn.contraction.Contractor.cost] reports both FLOP counts and a modeled time for
each, and ``method="auto"`` takes the faster by the model. FLOPs alone mispredict on
a CPU: the pairwise steps of a contraction sum over small indices (``i_k d``,
often 16-64), run far below a large GEMM's rate and move big batch-sized
intermediates, so a path with half the FLOPs can take five times longer. The
model ([modeled_seconds][mpotn.contraction.modeled_seconds]) charges each pairwise step
``FLOPs / (PEAK * K / (K + K0)) + ELEMENT_COST * elements + STEP_COST``, with
``K`` the size of the summed indices and ``elements`` the entries read and
written; ties go to rebuilding (one contiguous GEMM). Its constants were fitted
(least squares on log times) to the forward passes of ``benchmarks/forward.py``
(two shapes, four bond sizes, batches 1 to 4096) on a two-core CPU; the
benchmark reports how far the resulting choice is from the faster path.

The model is fitted on one machine. [autotuning][mpotn.contraction.autotuning] (or
``MPOTN_AUTOTUNE=1``) replaces it by measurement: the first time a layer of given core shapes sees
a batch size (rounded up to a power of two) in a grad mode, on a device and
dtype, both paths are timed on a random input of that size -- forward, or
forward and backward when gradients are needed -- and the faster one is kept
for every later call with that key, as cuDNN's benchmark mode does. Choices
made by measurement can differ between runs, and the two paths round
differently (about 1e-7 relative in float32), so it is opt-in. Embedding
lookups ([Contractor.lookup][mpotn.contraction.Contractor.lookup]) always choose by the model.

Examples
--------
>>> import torch
>>> from mpotn.shapes import Factorization
>>> c = Contractor(Factorization(4, (2, 2)), Factorization(6, (2, 3)))
>>> cores = [torch.randn(1, 2, 2, 3), torch.randn(3, 2, 3, 1)]
>>> x = torch.randn(5, 4)
>>> bool(torch.allclose(c.apply(x, cores, method="contract"), x @ c.rebuild(cores), atol=1e-5))
True
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import opt_einsum as oe
import torch

from mpotn.network import (
    apply_equation,
    lookup_equation,
    squeeze_ends,
)
from mpotn.shapes import Factorization
from mpotn.types import CONTRACTION_METHODS as METHODS
from mpotn.types import SIDES, Side
from mpotn.types import ContractionMethod as Method

#: opt_einsum optimizer planning every contraction: exhaustive search up to 5
#: tensors (an MPO of n <= 4 cores and the input), dynamic programming over FLOPs
#: from 6 to 16 tensors, random greedy beyond.
OPTIMIZER = "auto-hq"

# Cost model of one pairwise step (see the module docstring and step_seconds).
#: Pairwise-step model: the GEMM FLOP rate (per second) of a large summed size.
PEAK = 200e9
#: Pairwise-step model: the summed index size at which half of ``PEAK`` is reached.
K0 = 127
#: Pairwise-step model: seconds per element read or written.
ELEMENT_COST = 3.0e-10
#: Pairwise-step model: seconds of overhead per step.
STEP_COST = 2.8e-5

# Cost model of the rebuild sweep (see _sweep_cost).
#: Rebuild-sweep model, fitted on 49 measured sweeps (seven shapes from 384 x 1536
#: to 384 x 30720, bonds 4 to full) on a two-core CPU, worst misprediction 1.6
#: times: seconds per FLOP of a sweep step's GEMM.
SWEEP_FLOP_COST = 7.1e-12
#: Rebuild-sweep model: seconds per element written (twice per step: GEMM and copy).
SWEEP_ELEMENT_COST = 2.9e-10
#: Rebuild-sweep model: seconds per element written for arrays above ``LARGE_ARRAY``
#: elements (fresh pages from the OS on every call).
LARGE_ELEMENT_COST = 1.5e-9
#: Rebuild-sweep model: the array size (elements) above which ``LARGE_ELEMENT_COST`` applies.
LARGE_ARRAY = 2**23


def autocast_operands(x: torch.Tensor, tensors: Sequence[torch.Tensor]
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``x`` and ``tensors`` as a matmul takes them: in the autocast dtype inside
    ``torch.autocast`` on ``x``'s device (gradients flow through the casts), unchanged
    outside it, and unchanged when one of them is float64 (autocast leaves float64
    alone, as ``nn.Linear`` does under it).

    Examples
    --------
    >>> x, cores = torch.ones(2, 3), [torch.ones(3, 4)]
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     x, cores = autocast_operands(x, cores)
    >>> x.dtype, cores[0].dtype
    (torch.bfloat16, torch.bfloat16)
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     x, cores = autocast_operands(torch.ones(2, 3).double(), [torch.ones(3, 4).double()])
    >>> x.dtype, cores[0].dtype
    (torch.float64, torch.float64)
    """
    kind = x.device.type
    if not torch.is_autocast_enabled(kind) or torch.float64 in (
            x.dtype, *(t.dtype for t in tensors)):
        return x, list(tensors)
    dtype = torch.get_autocast_dtype(kind)
    return x.to(dtype), [t.to(dtype) for t in tensors]


def _probe_generator(device: torch.device) -> torch.Generator:
    """A seeded generator on ``device`` for timing inputs, so that tuning draws nothing from
    the global random streams (a run's dropout and shuffling stay as seeded)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    return generator


def step_seconds(flops: int, elements: int, summed: int) -> float:
    """Modeled time of one pairwise contraction step."""
    return flops / (PEAK * summed / (summed + K0)) + ELEMENT_COST * elements + STEP_COST


def modeled_seconds(info: Any) -> float:
    """Modeled time of a planned contraction (an ``opt_einsum`` ``PathInfo``)."""
    total = 0.0
    for step in info.contraction_list:
        inputs, output = step[2].split("->")
        indices = set(inputs.replace(",", ""))
        size = info.size_dict
        summed = math.prod(size[i] for i in indices - set(output))
        elements = sum(math.prod(size[i] for i in term) for term in inputs.split(","))
        elements += math.prod(size[i] for i in output)
        total += step_seconds(2 * math.prod(size[i] for i in indices), elements, summed)
    return total


@dataclass(frozen=True)
class ContractionCost:
    """FLOPs and modeled times of applying an MPO to a batch, both ways.

    Attributes
    ----------
    contract_flops:
        The planned contraction of the input with the cores.
    rebuild_flops:
        Rebuilding the matrix plus the ``2 B I J`` matmul.
    method:
        ``"contract"`` or ``"rebuild"``, whichever the cost model finds faster.
    dense_flops:
        ``2 B I J``: a dense matmul with the (unpadded) matrix, for reference.
    contract_seconds, rebuild_seconds, dense_seconds:
        Modeled times of the three (see [modeled_seconds][mpotn.contraction.modeled_seconds]).
    """

    contract_flops: int
    rebuild_flops: int
    method: str
    dense_flops: int
    contract_seconds: float
    rebuild_seconds: float
    dense_seconds: float


@dataclass(frozen=True)
class _Plan:
    expression: Any
    flops: int
    seconds: float


_AUTOTUNE = [os.environ.get("MPOTN_AUTOTUNE", "") not in ("", "0")]
_TUNED: dict[tuple, str] = {}


def autotune_enabled() -> bool:
    """Whether ``method="auto"`` chooses by measurement (see the module docstring)."""
    return _AUTOTUNE[0]


@contextmanager
def autotuning(enabled: bool = True) -> Iterator[None]:
    """Choose between contracting and rebuilding by measurement inside the block.

    Examples
    --------
    >>> with autotuning():
    ...     autotune_enabled()
    True
    """
    previous = _AUTOTUNE[0]
    _AUTOTUNE[0] = enabled
    try:
        yield
    finally:
        _AUTOTUNE[0] = previous


def best_time(run: Any, repeats: int = 3) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``run``, after one warm-up call."""
    run()  # warm-up: plans, caches, allocator
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


@lru_cache(maxsize=4096)
def _sweep_cost(core_shapes: tuple[tuple[int, ...], ...]) -> tuple[int, float]:
    """FLOPs and modeled time of [rebuild_sweep][mpotn.contraction.rebuild_sweep] for cores of these
    shapes.

    Each step is one GEMM followed by a copy into the ``(rows, cols, bond)``
    layout: ``SWEEP_FLOP_COST`` per FLOP plus, per element written twice,
    ``SWEEP_ELEMENT_COST``, or ``LARGE_ELEMENT_COST`` for arrays of more than
    ``LARGE_ARRAY`` elements (fresh pages from the OS on every call).
    """
    flops, seconds = 0, 0.0
    _, rows, cols, _ = core_shapes[0]
    for left, i, j, right in core_shapes[1:]:
        step = 2 * rows * cols * left * i * j * right
        rows, cols = rows * i, cols * j
        out = rows * cols * right
        per_element = LARGE_ELEMENT_COST if out > LARGE_ARRAY else SWEEP_ELEMENT_COST
        flops += step
        seconds += SWEEP_FLOP_COST * step + 2 * out * per_element
    return flops, seconds


def rebuild_sweep(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The padded matrix ``M[(i_1..i_n), (j_1..j_n)]`` of Eq. 1, by a left-to-right sweep.

    Examples
    --------
    >>> cores = [torch.randn(1, 2, 3, 4), torch.randn(4, 5, 6, 1)]
    >>> expected = torch.einsum("aijb,bklc->ikjl", *cores).reshape(10, 18)
    >>> bool(torch.allclose(rebuild_sweep(cores), expected, atol=1e-5))
    True
    """
    matrix = cores[0][0]
    for core in cores[1:]:
        rows, cols, _ = matrix.shape
        _, i, j, right = core.shape
        matrix = torch.einsum("pqb,bijc->piqjc", matrix, core).reshape(rows * i, cols * j, right)
    return matrix[..., 0]


@lru_cache(maxsize=4096)
def _plan(equation: str, shapes: tuple[tuple[int, ...], ...]) -> _Plan:
    _, info = oe.contract_path(equation, *shapes, shapes=True, optimize=OPTIMIZER)
    expression = oe.contract_expression(equation, *shapes, optimize=info.path)
    return _Plan(expression, int(info.opt_cost), modeled_seconds(info))


def compiled(equation: str, shapes: tuple[tuple[int, ...], ...]) -> Any:
    """The planned (``auto-hq``), compiled contraction of ``equation`` for these shapes.

    Cached; the result has ``expression`` (call it on tensors), ``flops`` and
    modeled ``seconds``.

    Examples
    --------
    >>> plan = compiled("ab,bc->ac", ((2, 3), (3, 4)))
    >>> plan.flops
    48
    """
    return _plan(equation, shapes)


class Contractor:
    """Contractions of MPOs with a fixed factorization of rows and columns.

    Parameters
    ----------
    row, col:
        Factorizations of the matrix sides (they carry the zero-padding).
    """

    def __init__(self, row: Factorization, col: Factorization) -> None:
        if len(row.factors) != len(col.factors):
            raise ValueError("row and column factorizations need the same n")
        self.row, self.col = row, col
        self.n = len(row.factors)

    def _sides(self, over: Side) -> tuple[Factorization, Factorization]:
        if over not in SIDES:
            raise ValueError(f"over must be one of {SIDES}, got {over!r}")
        return (self.row, self.col) if over == "rows" else (self.col, self.row)

    def _apply_plan(
        self, batch: int, core_shapes: tuple[tuple[int, ...], ...], over: Side
    ) -> _Plan:
        into, _ = self._sides(over)
        x_shape = (batch, *into.factors)
        return _plan(apply_equation(self.n, over), (x_shape, *squeeze_ends(core_shapes)))

    def cost(
        self, batch: int, core_shapes: Sequence[Sequence[int]], over: Side = "rows"
    ) -> ContractionCost:
        """FLOPs and modeled times of both ways of applying the MPO to ``batch`` vectors."""
        shapes = tuple(tuple(s) for s in core_shapes)
        contract = self._apply_plan(batch, shapes, over)
        rebuild_flops, rebuild_seconds = _sweep_cost(shapes)
        into, out = self._sides(over)
        dense = 2 * batch * into.size * out.size
        matmul = step_seconds(dense, batch * (into.size + out.size) + into.size * out.size,
                              into.size)
        method = "contract" if contract.seconds < rebuild_seconds + matmul else "rebuild"
        return ContractionCost(contract.flops, rebuild_flops + dense, method, dense,
                               contract.seconds, rebuild_seconds + matmul, matmul)

    def tuned_method(self, batch: int, cores: Sequence[torch.Tensor], over: Side = "rows",
                     bias: bool = False) -> str:
        """``"contract"`` or ``"rebuild"``, whichever measured faster for this batch size.

        Both paths are timed once per key (core shapes, side, batch size rounded
        up to a power of two, grad mode, device, dtype) and the result is kept.
        """
        grad = torch.is_grad_enabled() and any(c.requires_grad for c in cores)
        size = 1 << max(0, batch - 1).bit_length()
        sample = cores[0]
        key = (self.row.factors, self.col.factors, tuple(tuple(c.shape) for c in cores), over,
               size, grad, sample.device.type, sample.dtype, bias)
        if key not in _TUNED:
            into, out = self._sides(over)
            x = torch.randn(size, into.size, dtype=sample.dtype, device=sample.device,
                            generator=_probe_generator(sample.device))  # not the user's
            leaves = [c.detach().clone().requires_grad_(grad) for c in cores]
            offset = torch.zeros(out.size, dtype=sample.dtype, device=sample.device)

            def run(method: str) -> Any:
                def once() -> None:
                    if method == "rebuild":
                        matrix = self.rebuild(leaves)
                        y = torch.nn.functional.linear(
                            x, matrix if over == "cols" else matrix.mT, offset if bias else None)
                    else:
                        y = self.apply(x, leaves, over, "contract")
                        y = y + offset if bias else y
                    if grad:
                        torch.autograd.grad(y.sum(), leaves)
                    if sample.device.type == "cuda":
                        torch.cuda.synchronize(sample.device)
                return once

            contract, rebuild = best_time(run("contract")), best_time(run("rebuild"))
            _TUNED[key] = "contract" if contract < rebuild else "rebuild"
        return _TUNED[key]

    def _digits(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """Mixed-radix digits ``(i_1, ..., i_n)`` of row numbers (``i_1`` most significant)."""
        digits = []
        rest = indices
        for factor in reversed(self.row.factors):
            digits.append(rest % factor)
            rest = rest // factor
        return digits[::-1]

    def _lookup_plan(self, batch: int, core_shapes: tuple[tuple[int, ...], ...]) -> _Plan:
        gathered = tuple((d, batch, j, e) for d, _, j, e in core_shapes)
        return _plan(lookup_equation(self.n), tuple(squeeze_ends(gathered)))

    def lookup_cost(self, batch: int, core_shapes: Sequence[Sequence[int]]) -> ContractionCost:
        """FLOPs and modeled times of gathering ``batch`` rows, both ways."""
        shapes = tuple(tuple(s) for s in core_shapes)
        contract = self._lookup_plan(batch, shapes)
        rebuild_flops, rebuild_seconds = _sweep_cost(shapes)
        gather = ELEMENT_COST * 2 * batch * self.col.size
        method = "contract" if contract.seconds < rebuild_seconds + gather else "rebuild"
        return ContractionCost(contract.flops, rebuild_flops, method, 0, contract.seconds,
                               rebuild_seconds + gather, gather)

    def lookup(
        self, indices: torch.Tensor, cores: Sequence[torch.Tensor], method: Method = "auto"
    ) -> torch.Tensor:
        """Rows ``M[indices]`` (an embedding lookup), shape ``(*indices.shape, J)``.

        ``contract`` indexes every core with its digit of the row numbers and
        contracts the gathered chain; ``rebuild`` forms ``M`` and indexes it;
        ``auto`` takes the faster by modeled time
        ([lookup_cost][mpotn.contraction.Contractor.lookup_cost]).
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
        flat = indices.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.row.size):
            raise ValueError(
                f"indices must lie in [0, {self.row.size}), got values in "
                f"[{int(flat.min())}, {int(flat.max())}]"
            )
        shapes = tuple(tuple(c.shape) for c in cores)
        if method == "auto":
            method = self.lookup_cost(flat.numel(), shapes).method
        if method == "rebuild":
            return torch.nn.functional.embedding(indices, self.rebuild(cores))
        gathered = [core[:, digit] for core, digit in zip(cores, self._digits(flat))]
        y = self._lookup_plan(flat.numel(), shapes).expression(*squeeze_ends(gathered))
        y = y.reshape(flat.numel(), self.col.padded_size)[:, : self.col.size]
        return y.reshape(*indices.shape, self.col.size)

    def rebuild(self, cores: Sequence[torch.Tensor], padded: bool = False) -> torch.Tensor:
        """The matrix ``M`` (``I x J``; with the zero-padding if ``padded``)."""
        matrix = rebuild_sweep(cores)
        return matrix if padded else matrix[: self.row.size, : self.col.size]

    def apply(
        self,
        x: torch.Tensor,
        cores: Sequence[torch.Tensor],
        over: Side = "rows",
        method: Method = "auto",
    ) -> torch.Tensor:
        """``x @ M`` (``over="rows"``) or ``x @ M^T`` (``over="cols"``).

        Parameters
        ----------
        x:
            Shape ``(..., I)`` for ``over="rows"``, ``(..., J)`` for ``"cols"``.
        cores:
            The MPO cores.
        method:
            ``"contract"``, ``"rebuild"`` or ``"auto"``: the faster by modeled
            time ([cost][mpotn.contraction.Contractor.cost]; ties go to
            ``"rebuild"``), or, inside [autotuning][mpotn.contraction.autotuning]
            (``MPOTN_AUTOTUNE=1``), the faster by measurement
            ([tuned_method][mpotn.contraction.Contractor.tuned_method]).
        """
        into, out = self._sides(over)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        x, cores = autocast_operands(x, cores)
        if x.dtype != cores[0].dtype or x.device != cores[0].device:
            raise ValueError(
                f"input is {x.dtype} on {x.device} but the cores are {cores[0].dtype} on "
                f"{cores[0].device}; move one with .to(...)"
            )
        if x.shape[-1] != into.size:
            raise ValueError(
                f"input has {x.shape[-1]} features in its last dimension but the "
                f"MPO's {over} have size {into.size}"
            )
        lead = x.shape[:-1]
        batch = math.prod(lead)
        shapes = tuple(tuple(c.shape) for c in cores)
        if method == "auto":
            method = (self.tuned_method(batch, cores, over) if autotune_enabled()
                      else self.cost(batch, shapes, over).method)
        if method == "rebuild":
            matrix = self.rebuild(cores)
            return x @ (matrix if over == "rows" else matrix.mT)
        flat = x.reshape(batch, into.size)
        if into.padding:
            flat = torch.nn.functional.pad(flat, (0, into.padding))
        y = self._apply_plan(batch, shapes, over).expression(
            flat.reshape(batch, *into.factors), *squeeze_ends(cores)
        )
        y = y.reshape(batch, out.padded_size)[:, : out.size]
        return y.reshape(*lead, out.size)
