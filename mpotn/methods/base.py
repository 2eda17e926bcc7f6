"""The registry of decompositions, [FactorNetwork][mpotn.methods.base.FactorNetwork] and the helpers
methods share.

A method is a function ``matrix -> FactorNetwork`` added to
[DECOMPOSITIONS][mpotn.methods.base.DECOMPOSITIONS] by [register][mpotn.methods.base.register];
[decompose][mpotn.methods.base.decompose] looks it up by name. The shipped methods live in
[mpotn.methods.mpo][], [mpotn.methods.svd][], [mpotn.methods.tt][], [mpotn.methods.tucker][]
and [mpotn.methods.cp][]; [mpotn.methods][] imports them all, which registers them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import networkx as nx
import torch

from mpotn.contraction import autocast_operands, compiled
from mpotn.mpo import _compute_dtype, check_values
from mpotn.network import graph_equation, graph_to_networkx
from mpotn.shapes import Factorization, plan_side
from mpotn.truncation import TruncationPolicy

#: ``{name: decomposition function}``; see [register][mpotn.methods.base.register].
DECOMPOSITIONS: dict[str, Callable[..., FactorNetwork]] = {}


def register(name: str) -> Callable[[Callable[..., FactorNetwork]], Callable[..., FactorNetwork]]:
    """Decorator adding a decomposition function to
    [DECOMPOSITIONS][mpotn.methods.base.DECOMPOSITIONS] under ``name``."""
    def add(function: Callable[..., FactorNetwork]) -> Callable[..., FactorNetwork]:
        if name in DECOMPOSITIONS:
            raise ValueError(f"a decomposition named {name!r} is already registered")
        DECOMPOSITIONS[name] = function
        return function
    return add


@contextmanager
def tensorly_torch() -> Iterator[Any]:
    """tensorly with its pytorch backend, so that it computes on the device of the tensors
    it is given; the caller's global backend is restored afterwards."""
    import tensorly

    previous = tensorly.get_backend()
    tensorly.set_backend("pytorch")
    try:
        yield tensorly
    finally:
        tensorly.set_backend(previous)


@dataclass
class FactorNetwork:
    r"""A matrix as a network of named tensors.

    Attributes
    ----------
    method:
        The registered method that made it.
    nodes:
        ``{node name: tensor}``; the contractions take the tensors in this order.
    legs:
        ``{node name: leg names in axis order}``, matched to ``nodes`` by name (its
        own order is irrelevant); a leg shared by nodes is contracted, the open legs
        are ``row_k`` / ``col_k``.
    row, col:
        Factorizations of the matrix sides (with their zero-padding).
    roles:
        ``{node name: role}`` for drawing (``central``, ``auxiliary``, ``core``,
        ``factor``).
    relative_error:
        $\|M - \tilde M\|_F / \|M\|_F$, with $M$ the matrix it was made from and
        $\tilde M$ the network's.
    details:
        Method-specific extras (ranks, the [MPO][mpotn.mpo.MPO] object, ...).
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
    def params_ratio(self) -> float:
        """Parameters over the entries of the *unpadded* ``I x J`` matrix.

        Not Eq. 5's ratio ([mpotn.diagnostics.compression_ratio][], ``MPO.compression_ratio``),
        which divides by the padded matrix's entries: the methods compare by what the
        network stores against what the matrix holds.
        """
        return self.num_params / (self.row.size * self.col.size)

    def _node_legs(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``(node name, its legs)`` in the order of ``nodes``: each tensor is paired with its
        legs by name, whatever order ``legs`` lists them in."""
        missing = set(self.nodes) ^ set(self.legs)
        if missing:
            raise ValueError(f"nodes and legs name different tensors: {sorted(missing)}")
        return tuple((name, tuple(self.legs[name])) for name in self.nodes)

    def rebuild_equation(self) -> str:
        """Einsum equation ``nodes -> (i_1..i_n, j_1..j_n)``, operands in the order of
        ``nodes``."""
        return _equation(self._node_legs(), self.row_legs + self.col_legs, ())

    def apply_equation(self) -> str:
        """Einsum equation ``x[b, i_1..i_n], nodes -> y[b, j_1..j_n]``, operands in the order
        of ``nodes``."""
        return _equation(self._node_legs(), ("batch", *self.col_legs),
                         ("batch", *self.row_legs))

    def relative_error_to(self, matrix: torch.Tensor) -> float:
        r"""$\|M - \tilde M\|_F / \|M\|_F$ for $M$ = ``matrix`` and $\tilde M$ the network's
        matrix, both in float64 on the matrix's device (``1.0`` as the norm of a zero
        matrix)."""
        reference = matrix.detach().double()
        exact = FactorNetwork(self.method, {k: v.detach().to(reference.device, torch.float64)
                                            for k, v in self.nodes.items()},
                              self.legs, self.row, self.col).rebuild()
        return float((exact - reference).norm()) / (float(reference.norm()) or 1.0)

    def rebuild(self, tensors: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The ``I x J`` matrix (``tensors``, in the order of ``nodes``, replaces the stored
        ones)."""
        tensors = list(self.nodes.values()) if tensors is None else tensors
        plan = compiled(self.rebuild_equation(), tuple(tuple(t.shape) for t in tensors))
        full = plan.expression(*tensors).reshape(self.row.padded_size, self.col.padded_size)
        return full[: self.row.size, : self.col.size]

    def apply(self, x: torch.Tensor, tensors: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``x @ M`` for ``x`` of shape ``(..., I)``: contract or rebuild, whichever needs
        fewer FLOPs (opt_einsum's count); ``tensors`` as in
        [rebuild][mpotn.methods.base.FactorNetwork.rebuild]."""
        tensors = list(self.nodes.values()) if tensors is None else tensors
        x, tensors = autocast_operands(x, tensors)
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
        """Draw the network (see [mpotn.drawing.draw_graph][])."""
        from mpotn.drawing import draw_graph

        return draw_graph(self.to_networkx(), path,
                          title or f"{self.method}: {self.num_params:,} parameters")


@lru_cache(maxsize=1024)
def _equation(legs: tuple[tuple[str, tuple[str, ...]], ...], output: tuple[str, ...],
              extra: tuple[str, ...]) -> str:
    """[mpotn.network.graph_equation][], computed once per network structure."""
    return graph_equation(dict(legs), output, extra=extra or None)


def _tensorized(matrix: torch.Tensor, n: int) -> tuple[torch.Tensor, Factorization,
                                                       Factorization]:
    """The matrix padded and reshaped to ``(i_1..i_n, j_1..j_n)``, in float64 on its
    device; a matrix that is not real floating point is refused, as by the MPO."""
    check_values(matrix)
    _compute_dtype(matrix)
    row, col = plan_side(matrix.shape[0], n), plan_side(matrix.shape[1], n)
    padded = torch.nn.functional.pad(matrix.detach().double(),
                                     (0, col.padding, 0, row.padding))
    return padded.reshape(*row.factors, *col.factors), row, col


def _finish(method: str, tensors: dict[str, torch.Tensor], legs: dict[str, tuple[str, ...]],
            row: Factorization, col: Factorization, matrix: torch.Tensor,
            roles: dict[str, str], **details: Any) -> FactorNetwork:
    nodes = {name: t.to(matrix.device, matrix.dtype).contiguous() for name, t in tensors.items()}
    net = FactorNetwork(method, nodes, legs, row, col, roles, details=details)
    net.relative_error = net.relative_error_to(matrix)
    return net


def _largest_rank(params: Callable[[int], int], budget: float, top: int) -> int:
    """The largest rank ``r <= top`` with ``params(r) <= budget`` (at least 1)."""
    best = 1
    for r in range(1, top + 1):
        if params(r) > budget:
            break
        best = r
    return best


def _check_ratio(ratio: float | None, rank: int | None = None) -> None:
    """Refuse a ratio [TruncationPolicy][mpotn.truncation.TruncationPolicy] does not allow,
    and a ratio given with a rank (two policies: the rank would win silently)."""
    if ratio is not None and rank is not None:
        raise ValueError(f"give rank or ratio, not both (rank={rank!r}, ratio={ratio!r})")
    TruncationPolicy(ratio=ratio)


def decompose(matrix: torch.Tensor, method: str = "mpo", **options: Any) -> FactorNetwork:
    """Decompose ``matrix`` with a registered method (see
    [DECOMPOSITIONS][mpotn.methods.base.DECOMPOSITIONS]).

    A ``ratio`` below a method's smallest network: ``mpo`` and ``svd`` refuse it
    (``ValueError``); ``tt``, ``tucker`` and ``cp`` give their rank-1 network, whose
    ``params_ratio`` is then above the ratio (``compare`` skips such points).

    Examples
    --------
    >>> import torch
    >>> net = decompose(torch.randn(64, 96), "tt", n=3, ratio=0.002)  # 12 parameters asked
    >>> net.num_params, net.details["rank"]
    (26, 1)
    """
    if method not in DECOMPOSITIONS:
        raise ValueError(f"unknown decomposition {method!r}; registered: {sorted(DECOMPOSITIONS)}")
    if matrix.dim() != 2:
        raise ValueError(f"expected a matrix, got a tensor of shape {tuple(matrix.shape)}")
    return DECOMPOSITIONS[method](matrix, **options)
