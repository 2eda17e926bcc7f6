"""Decompositions of a weight matrix as plug-ins: a registry of named methods.

Every method takes a matrix (the paper's ``in x out`` orientation) and returns
a :class:`FactorNetwork`: named nodes holding tensors, legs named by what they
connect (a leg shared by nodes is a bond, an open leg is a row or column index
of the tensorized matrix), a compiled contraction, its parameter count and its
actual reconstruction error. The methods shipped (SPEC §5):

``mpo``
    the matrix product operator of Algorithm 1 (``n = 2`` is the truncated SVD);
``tt``
    a tensor train over the ``2n`` modes ``(i_1..i_n, j_1..j_n)`` of the
    tensorized matrix (tensorly's TT-SVD);
``tucker``
    a Tucker core with one factor per mode (tensorly; HOSVD with
    ``iterations=0``, HOOI otherwise);
``cp``
    a rank-``R`` CP decomposition by ALS (tensorly); its rank index is a
    hyperedge shared by every factor.

Adding a method takes its decomposition function and one registration line::

    @register("my-method")
    def my_method(matrix, *, ratio=None, **options) -> FactorNetwork: ...

tensorly runs on its numpy backend inside :func:`tensorly_numpy`, which
restores whatever global backend the caller had.

Examples
--------
>>> import torch
>>> matrix = torch.randn(64, 96, dtype=torch.float64)
>>> net = decompose(matrix, "tucker", n=2, ratio=0.5)
>>> net.method, net.compression_ratio <= 0.5, net.relative_error < 1
('tucker', True, True)
>>> sorted(DECOMPOSITIONS)
['cp', 'mpo', 'tt', 'tucker']
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch

from mpotn.contraction import compiled
from mpotn.mpo import MPO
from mpotn.network import core_name, graph_equation, graph_to_networkx
from mpotn.shapes import Factorization, plan_side

#: ``{name: decomposition function}``; see :func:`register`.
DECOMPOSITIONS: dict[str, Callable[..., FactorNetwork]] = {}


def register(name: str) -> Callable[[Callable[..., FactorNetwork]], Callable[..., FactorNetwork]]:
    """Decorator adding a decomposition function to :data:`DECOMPOSITIONS` under ``name``."""
    def add(function: Callable[..., FactorNetwork]) -> Callable[..., FactorNetwork]:
        if name in DECOMPOSITIONS:
            raise ValueError(f"a decomposition named {name!r} is already registered")
        DECOMPOSITIONS[name] = function
        return function
    return add


@contextmanager
def tensorly_numpy() -> Iterator[Any]:
    """tensorly with its numpy backend, the caller's global backend restored afterwards."""
    import tensorly

    previous = tensorly.get_backend()
    tensorly.set_backend("numpy")
    try:
        yield tensorly
    finally:
        tensorly.set_backend(previous)


@dataclass
class FactorNetwork:
    """A matrix as a network of named tensors.

    Attributes
    ----------
    method:
        The registered method that made it.
    nodes:
        ``{node name: tensor}``, in a fixed order.
    legs:
        ``{node name: leg names in axis order}``; a leg shared by nodes is
        contracted, the open legs are ``row_k`` / ``col_k``.
    row, col:
        Factorizations of the matrix sides (with their zero-padding).
    roles:
        ``{node name: role}`` for drawing (``central``, ``auxiliary``, ``core``,
        ``factor``).
    relative_error:
        ``||M - network|| / ||M||`` against the matrix it was made from.
    details:
        Method-specific extras (ranks, the :class:`~mpotn.mpo.MPO` object, ...).
    """

    method: str
    nodes: dict[str, torch.Tensor]
    legs: dict[str, tuple[str, ...]]
    row: Factorization
    col: Factorization
    roles: dict[str, str] = field(default_factory=dict)
    relative_error: float = math.nan
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def row_legs(self) -> tuple[str, ...]:
        return tuple(f"row_{k}" for k in range(1, len(self.row.factors) + 1))

    @property
    def col_legs(self) -> tuple[str, ...]:
        return tuple(f"col_{k}" for k in range(1, len(self.col.factors) + 1))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.row.size, self.col.size)

    @property
    def num_params(self) -> int:
        """Entries of all node tensors."""
        return sum(t.numel() for t in self.nodes.values())

    @property
    def compression_ratio(self) -> float:
        """Parameters over the entries of the (unpadded) matrix."""
        return self.num_params / (self.row.size * self.col.size)

    def rebuild_equation(self) -> str:
        """Einsum equation ``nodes -> (i_1..i_n, j_1..j_n)``."""
        return _equation(tuple(self.legs.items()), self.row_legs + self.col_legs, ())

    def apply_equation(self) -> str:
        """Einsum equation ``x[b, i_1..i_n], nodes -> y[b, j_1..j_n]``."""
        return _equation(tuple(self.legs.items()), ("batch", *self.col_legs),
                         ("batch", *self.row_legs))

    def rebuild(self, tensors: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The ``I x J`` matrix (``tensors`` replaces the stored ones, e.g. parameters)."""
        tensors = list(self.nodes.values()) if tensors is None else tensors
        plan = compiled(self.rebuild_equation(), tuple(tuple(t.shape) for t in tensors))
        full = plan.expression(*tensors).reshape(self.row.padded_size, self.col.padded_size)
        return full[: self.row.size, : self.col.size]

    def apply(self, x: torch.Tensor, tensors: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``x @ M`` for ``x`` of shape ``(..., I)``: contract or rebuild, whichever needs
        fewer FLOPs (opt_einsum's count)."""
        tensors = list(self.nodes.values()) if tensors is None else tensors
        lead, batch = x.shape[:-1], math.prod(x.shape[:-1])
        shapes = tuple(tuple(t.shape) for t in tensors)
        contract = compiled(self.apply_equation(), ((batch, *self.row.factors), *shapes))
        rebuild = compiled(self.rebuild_equation(), shapes)
        if contract.flops >= rebuild.flops + 2 * batch * self.row.size * self.col.size:
            return x @ self.rebuild(tensors)
        flat = torch.nn.functional.pad(x.reshape(batch, self.row.size), (0, self.row.padding))
        y = contract.expression(flat.reshape(batch, *self.row.factors), *tensors)
        return y.reshape(batch, self.col.padded_size)[:, : self.col.size].reshape(
            *lead, self.col.size)

    def to_networkx(self) -> nx.Graph:
        """The network as a graph (nodes with shapes and roles, edges with dimensions)."""
        return graph_to_networkx(self.legs, {n: t.shape for n, t in self.nodes.items()},
                                 self.roles)

    def draw(self, path: str | Path, title: str | None = None) -> Path:
        """Draw the network (see :func:`mpotn.drawing.draw_graph`)."""
        from mpotn.drawing import draw_graph

        return draw_graph(self.to_networkx(), path,
                          title or f"{self.method}: {self.num_params:,} parameters")


@lru_cache(maxsize=1024)
def _equation(legs: tuple[tuple[str, tuple[str, ...]], ...], output: tuple[str, ...],
              extra: tuple[str, ...]) -> str:
    """:func:`mpotn.network.graph_equation`, computed once per network structure."""
    return graph_equation(dict(legs), output, extra=extra or None)


def _tensorized(matrix: torch.Tensor, n: int) -> tuple[np.ndarray, Factorization, Factorization]:
    """The matrix padded and reshaped to ``(i_1..i_n, j_1..j_n)``, as float64 numpy."""
    row, col = plan_side(matrix.shape[0], n), plan_side(matrix.shape[1], n)
    padded = torch.nn.functional.pad(matrix.detach().double().cpu(),
                                     (0, col.padding, 0, row.padding))
    return padded.reshape(*row.factors, *col.factors).numpy(), row, col


def _finish(method: str, tensors: dict[str, np.ndarray | torch.Tensor],
            legs: dict[str, tuple[str, ...]], row: Factorization, col: Factorization,
            matrix: torch.Tensor, roles: dict[str, str], **details: Any) -> FactorNetwork:
    nodes = {name: torch.as_tensor(np.asarray(t) if not isinstance(t, torch.Tensor) else t)
             .to(matrix.dtype) for name, t in tensors.items()}
    net = FactorNetwork(method, nodes, legs, row, col, roles, details=details)
    reference = matrix.detach().double().cpu()
    exact = FactorNetwork(method, {k: v.double().cpu() for k, v in nodes.items()}, legs, row,
                          col).rebuild()
    norm = float(reference.norm()) or 1.0
    net.relative_error = float((exact - reference).norm()) / norm
    return net


def _largest_rank(params: Callable[[int], int], budget: float, top: int) -> int:
    """The largest rank ``r <= top`` with ``params(r) <= budget`` (at least 1)."""
    best = 1
    for r in range(1, top + 1):
        if params(r) > budget:
            break
        best = r
    return best


def _check_ratio(ratio: float | None) -> None:
    if ratio is not None and ratio <= 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")


@register("mpo")
def mpo_method(matrix: torch.Tensor, *, n: int = 5, ratio: float | None = None,
               max_bond: int | None = None, allocation: str = "optimal",
               **options: Any) -> FactorNetwork:
    """Algorithm 1 and a truncation (``ratio`` with budget-optimal bonds, or ``max_bond``)."""
    _check_ratio(ratio)
    full = MPO.from_matrix(matrix, n=n, **options)
    policy = {"ratio": ratio, "allocation": allocation} if ratio is not None else (
        {"max_bond": max_bond} if max_bond is not None else {})
    mpo = full.truncate(**policy) if policy else full
    cores = mpo.gauge_cores("central")
    cores = [cores[0][0], *cores[1:-1], cores[-1][..., 0]] if n > 1 else cores
    names = [core_name(k, n) for k in range(n)]
    legs = {}
    for k, name in enumerate(names, start=1):
        axes = [f"bond_{k - 1}", f"row_{k}", f"col_{k}", f"bond_{k}"]
        legs[name] = tuple(axes[1 if k == 1 else 0: 3 if k == n else 4])
    roles = {name: "central" if name == "central" else "auxiliary" for name in names}
    return _finish("mpo", dict(zip(names, cores)), legs, mpo.row, mpo.col, matrix, roles,
                   n=n, bond_dims=list(mpo.bond_dims), mpo=mpo)


@register("tt")
def tt_method(matrix: torch.Tensor, *, n: int = 3, ratio: float | None = None,
              rank: int | None = None) -> FactorNetwork:
    """TT-SVD of the tensorized matrix over its ``2n`` modes ``(i_1..i_n, j_1..j_n)``."""
    from tensorly.decomposition import tensor_train

    _check_ratio(ratio)
    tensor, row, col = _tensorized(matrix, n)
    modes = tensor.shape

    def ranks(r: int) -> list[int]:
        out, left = [1], 1
        for k, size in enumerate(modes[:-1]):
            left *= size
            out.append(min(r, left, math.prod(modes[k + 1:])))
        return [*out, 1]

    def params(r: int) -> int:
        d = ranks(r)
        return sum(d[k] * size * d[k + 1] for k, size in enumerate(modes))

    top = max(ranks(tensor.size))
    if rank is None:
        rank = top if ratio is None else _largest_rank(params, ratio * matrix.numel(), top)
    with tensorly_numpy():
        factors = tensor_train(tensor, rank=ranks(rank)).factors
    legs_names = [*(f"row_{k}" for k in range(1, n + 1)), *(f"col_{k}" for k in range(1, n + 1))]
    tensors, legs = {}, {}
    for k, (factor, leg) in enumerate(zip(factors, legs_names), start=1):
        name = f"tt_{k}"
        axes = (f"t_{k - 1}", leg, f"t_{k}")
        if k == 1:
            factor, axes = factor[0], axes[1:]
        if k == 2 * n:
            factor, axes = factor[..., 0], axes[:-1]
        tensors[name], legs[name] = factor, axes
    return _finish("tt", tensors, legs, row, col, matrix, dict.fromkeys(tensors, "factor"),
                   n=n, rank=rank, ranks=ranks(rank))


@register("tucker")
def tucker_method(matrix: torch.Tensor, *, n: int = 3, ratio: float | None = None,
                  rank: int | None = None, iterations: int = 0) -> FactorNetwork:
    """Tucker of the tensorized matrix: HOSVD (``iterations=0``) or HOOI (more)."""
    from tensorly.decomposition import tucker

    _check_ratio(ratio)
    tensor, row, col = _tensorized(matrix, n)
    modes = tensor.shape

    def ranks(r: int) -> list[int]:
        return [min(r, size) for size in modes]

    def params(r: int) -> int:
        d = ranks(r)
        return math.prod(d) + sum(size * dk for size, dk in zip(modes, d))

    if rank is None:
        rank = max(modes) if ratio is None else _largest_rank(params, ratio * matrix.numel(),
                                                             max(modes))
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0 (0: HOSVD), got {iterations}")
    with tensorly_numpy():
        core, factors = tucker(tensor, rank=ranks(rank), n_iter_max=iterations, init="svd")
    leg_names = [*(f"row_{k}" for k in range(1, n + 1)), *(f"col_{k}" for k in range(1, n + 1))]
    tensors = {"core": core}
    legs = {"core": tuple(f"r_{m}" for m in range(1, 2 * n + 1))}
    for m, (factor, leg) in enumerate(zip(factors, leg_names), start=1):
        tensors[f"factor_{m}"], legs[f"factor_{m}"] = factor, (leg, f"r_{m}")
    roles = {name: "central" if name == "core" else "auxiliary" for name in tensors}
    return _finish("tucker", tensors, legs, row, col, matrix, roles, n=n, rank=rank,
                   ranks=ranks(rank), iterations=iterations)


@register("cp")
def cp_method(matrix: torch.Tensor, *, n: int = 3, ratio: float | None = None,
              rank: int | None = None, iterations: int = 100, seed: int = 0) -> FactorNetwork:
    """Rank-``R`` CP of the tensorized matrix by alternating least squares."""
    from tensorly.decomposition import parafac

    _check_ratio(ratio)
    tensor, row, col = _tensorized(matrix, n)
    per_rank = sum(tensor.shape)
    if rank is None:
        if ratio is None:
            raise ValueError("cp has no exact rank to default to: give rank or ratio")
        rank = max(1, math.floor(ratio * matrix.numel() / per_rank))
    with tensorly_numpy(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Trying to compute SVD", UserWarning)  # rank > mode
        weights, factors = parafac(tensor, rank=rank, n_iter_max=iterations, init="svd",
                                   random_state=seed, tol=1e-10)
    factors = [f.copy() for f in factors]
    factors[0] = factors[0] * weights[None, :]
    leg_names = [*(f"row_{k}" for k in range(1, n + 1)), *(f"col_{k}" for k in range(1, n + 1))]
    tensors = {f"factor_{m}": f for m, f in enumerate(factors, start=1)}
    legs = {f"factor_{m}": (leg, "rank") for m, leg in enumerate(leg_names, start=1)}
    return _finish("cp", tensors, legs, row, col, matrix, dict.fromkeys(tensors, "factor"),
                   n=n, rank=rank, iterations=iterations)


def decompose(matrix: torch.Tensor, method: str = "mpo", **options: Any) -> FactorNetwork:
    """Decompose ``matrix`` with a registered method (see :data:`DECOMPOSITIONS`)."""
    if method not in DECOMPOSITIONS:
        raise ValueError(f"unknown decomposition {method!r}; registered: {sorted(DECOMPOSITIONS)}")
    if matrix.dim() != 2:
        raise ValueError(f"expected a matrix, got a tensor of shape {tuple(matrix.shape)}")
    return DECOMPOSITIONS[method](matrix, **options)
