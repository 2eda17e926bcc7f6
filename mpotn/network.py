"""The MPO as an explicit tensor network (the only module importing ``tensornetwork``).

Cores are ``tensornetwork`` nodes named by role -- ``central`` for the core at
index ``(n - 1) // 2`` and ``auxiliary_k`` for the others (``k`` is the 1-based
core number of SPEC Eq. 1) -- with axes and edges named ``bond_k`` (between
core ``k`` and ``k + 1``), ``row_k`` and ``col_k``.

The graph is the single description of the network's structure. Einsum
equations are read off it once per ``n`` and cached, so no node is ever built
on the hot path. Two of them drive the compiled contractions of
[Contractor][mpotn.contraction.Contractor]:
[apply_equation][mpotn.network.apply_equation] (an MPO applied to a batch, ``x @ M`` or
``x @ M^T``) and [lookup_equation][mpotn.network.lookup_equation] (embedding rows gathered
core by core), which is derived from [rebuild_equation][mpotn.network.rebuild_equation]. Rebuilding
the matrix itself contracts no equation: [rebuild_sweep][mpotn.contraction.rebuild_sweep] sweeps
the chain with one GEMM per core, which is faster on a CPU than the FLOP-optimal order.
Networks of the other decompositions ([mpotn.methods][]) take their equations from
[graph_equation][mpotn.network.graph_equation] instead. [to_networkx][mpotn.network.to_networkx]
exports the graph for analysis and drawing.

Examples
--------
>>> import numpy as np
>>> nodes = build_network([np.ones((1, 2, 2, 3)), np.ones((3, 2, 2, 1))], backend="numpy")
>>> [node.name for node in nodes]
['central', 'auxiliary_2']
>>> rebuild_equation(2)
'abc,cde->adbe'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import networkx as nx
import numpy as np
import opt_einsum as oe
import tensornetwork as tn

from mpotn.types import Side


def central_index(n: int) -> int:
    """0-based index of the central tensor: ``(n - 1) // 2``."""
    return (n - 1) // 2


def core_name(index: int, n: int) -> str:
    """Role name of the core at 0-based ``index`` in an ``n``-core MPO.

    Examples
    --------
    >>> [core_name(i, 5) for i in range(5)]
    ['auxiliary_1', 'auxiliary_2', 'central', 'auxiliary_4', 'auxiliary_5']
    """
    return "central" if index == central_index(n) else f"auxiliary_{index + 1}"


def build_network(cores: Sequence[Any], backend: str = "pytorch") -> list[tn.Node]:
    """Connected ``tensornetwork`` nodes for cores ``T_k[d_{k-1}, i_k, j_k, d_k]``.

    Parameters
    ----------
    cores:
        Four-way tensors, ``cores[k].shape[3] == cores[k + 1].shape[0]``.
    backend:
        The tensornetwork backend of the tensors (``"pytorch"`` or ``"numpy"``).
    """
    n = len(cores)
    nodes = []
    for k, core in enumerate(cores, start=1):
        axes = [f"bond_{k - 1}", f"row_{k}", f"col_{k}", f"bond_{k}"]
        node = tn.Node(core, name=core_name(k - 1, n), axis_names=axes, backend=backend)
        for axis in axes:
            node[axis].set_name(axis)
        nodes.append(node)
    for k in range(1, n):
        tn.connect(nodes[k - 1][f"bond_{k}"], nodes[k][f"bond_{k}"], name=f"bond_{k}")
    return nodes


def _is_boundary(edge: tn.Edge, n: int) -> bool:
    return edge.is_dangling() and edge.name in ("bond_0", f"bond_{n}")


def _equation(nodes: Sequence[tn.Node], output: Sequence[tn.Edge], n: int) -> str:
    """Einsum subscripts of ``nodes`` (one term each, axes in order) to ``output``.

    The size-1 boundary bonds ``bond_0`` and ``bond_n`` are left out, so the
    end cores enter as ``T_1[i, j, d_1]`` and ``T_n[d_{n-1}, i, j]`` (see
    [squeeze_ends][mpotn.network.squeeze_ends]) and every pairwise step of a planned contraction is
    a BLAS call.
    """
    symbols: dict[tn.Edge, str] = {}
    terms = []
    for node in nodes:
        term = ""
        for edge in node.edges:
            if not _is_boundary(edge, n):
                term += symbols.setdefault(edge, oe.get_symbol(len(symbols)))
        terms.append(term)
    return ",".join(terms) + "->" + "".join(symbols[e] for e in output)


def squeeze_ends(tensors: Sequence[Any]) -> list[Any]:
    """Drop the size-1 boundary axes: the first of the first tensor, the last of the last.

    Works on tensors (returning views) and on shape tuples.

    Examples
    --------
    >>> [t.shape for t in squeeze_ends([np.ones((1, 2, 2, 3)), np.ones((3, 2, 2, 1))])]
    [(2, 2, 3), (3, 2, 2)]
    >>> squeeze_ends([(1, 2, 2, 3), (3, 2, 2, 1)])
    [(2, 2, 3), (3, 2, 2)]
    """
    first, last = tensors[0], tensors[-1]
    if isinstance(first, tuple):
        return [first[1:], *tensors[1:-1], last[:-1]]
    return [first[0], *tensors[1:-1], last[..., 0]]


def _skeleton(n: int) -> list[tn.Node]:
    """A structural copy of an ``n``-core MPO with size-1 placeholder tensors."""
    return build_network([np.zeros((1, 1, 1, 1))] * n, backend="numpy")


@cache
def rebuild_equation(n: int) -> str:
    """Einsum equation ``cores -> (i_1..i_n, j_1..j_n)`` read off the graph (Eq. 1).

    The basis of [lookup_equation][mpotn.network.lookup_equation]; the matrix itself is rebuilt by
    [rebuild_sweep][mpotn.contraction.rebuild_sweep], not by contracting this equation.
    """
    nodes = _skeleton(n)
    rows = [node[f"row_{k}"] for k, node in enumerate(nodes, start=1)]
    cols = [node[f"col_{k}"] for k, node in enumerate(nodes, start=1)]
    return _equation(nodes, rows + cols, n)


@cache
def apply_equation(n: int, over: Side = "rows") -> str:
    """Einsum equation ``x[b, i_1..i_n], cores -> y[b, j_1..j_n]`` (or rows/cols swapped).

    The input is an extra node ``input`` whose legs connect to the ``row_k``
    (``over="rows"``, i.e. ``x @ M``) or ``col_k`` (``over="cols"``,
    ``x @ M^T``) edges of the cores.
    """
    nodes = _skeleton(n)
    contracted, kept = ("row", "col") if over == "rows" else ("col", "row")
    x = tn.Node(np.zeros((1,) * (n + 1)), name="input", backend="numpy")
    for k, node in enumerate(nodes, start=1):
        tn.connect(x[k], node[f"{contracted}_{k}"], name=f"{contracted}_{k}")
    output = [x[0]] + [node[f"{kept}_{k}"] for k, node in enumerate(nodes, start=1)]
    return _equation([x, *nodes], output, n)


@cache
def lookup_equation(n: int) -> str:
    """Einsum equation gathering rows: ``cores[:, digits] -> y[b, j_1..j_n]``.

    Derived from [rebuild_equation][mpotn.network.rebuild_equation]: every ``row_k`` index is
    replaced by one batch index ``b`` shared by all cores, each core having been indexed
    with the ``k``-th digit of the row numbers (a hyperedge, which plain
    tensornetwork edges cannot express).

    Examples
    --------
    >>> lookup_equation(2)
    'abc,cae->abe'
    """
    inputs, output = rebuild_equation(n).split("->")
    rows, cols = output[:n], output[n:]
    batch = rows[0]
    for row in rows[1:]:
        inputs = inputs.replace(row, batch)
    return f"{inputs}->{batch}{cols}"


def build_graph(legs: Mapping[str, Sequence[str]], shapes: Mapping[str, Sequence[int]]
                ) -> list[tn.Node]:
    """``tensornetwork`` nodes of any network: a leg name shared by two nodes is an edge.

    A leg shared by more than two nodes (CP's rank index) is a hyperedge: a
    ``tensornetwork`` copy tensor named ``copy_<leg>`` joins its ends.

    Parameters
    ----------
    legs:
        ``{node name: [leg names, in axis order]}``.
    shapes:
        ``{node name: shape}``.

    Examples
    --------
    >>> nodes = build_graph({"core": ["a", "r"], "factor": ["r", "b"]},
    ...                     {"core": (3, 2), "factor": (2, 4)})
    >>> [(e.name, e.is_dangling()) for e in nodes[0].edges]
    [('a', True), ('r', False)]
    """
    count: dict[str, int] = {}
    for axes in legs.values():
        for axis in axes:
            count[axis] = count.get(axis, 0) + 1
    nodes, open_legs, copies = [], {}, {}
    for name, axes in legs.items():
        node = tn.Node(np.zeros(tuple(shapes[name])), name=name, axis_names=list(axes),
                       backend="numpy")
        for axis in axes:
            node[axis].set_name(axis)
            if count[axis] > 2:
                if axis not in copies:
                    copies[axis] = [tn.CopyNode(count[axis], node[axis].dimension,
                                                name=f"copy_{axis}", backend="numpy"), 0]
                copy, used = copies[axis]
                tn.connect(node[axis], copy[used], name=axis)
                copies[axis][1] += 1
            elif axis in open_legs:
                tn.connect(open_legs.pop(axis), node[axis], name=axis)
            else:
                open_legs[axis] = node[axis]
        nodes.append(node)
    return nodes + [copy for copy, _ in copies.values()]


def graph_equation(legs: Mapping[str, Sequence[str]], output: Sequence[str],
                   extra: Sequence[str] | None = None) -> str:
    """Einsum equation contracting a network given by leg names into ``output`` legs.

    ``extra`` adds one more term first (the input of an ``apply``), whose
    legs join the network's open legs of the same names.

    Examples
    --------
    >>> graph_equation({"u": ["i", "r"], "v": ["r", "j"]}, ["i", "j"], extra=["b", "i"])
    'ab,bc,cd->bd'
    """
    symbols: dict[str, str] = {}
    terms = [list(extra)] if extra else []
    terms += [list(axes) for axes in legs.values()]
    subscripts = ["".join(symbols.setdefault(a, oe.get_symbol(len(symbols))) for a in term)
                  for term in terms]
    return ",".join(subscripts) + "->" + "".join(symbols[a] for a in output)


def graph_to_networkx(legs: Mapping[str, Sequence[str]], shapes: Mapping[str, Sequence[int]],
                      roles: Mapping[str, str] | None = None) -> nx.Graph:
    """Any network as a ``networkx.Graph``, in the form [to_networkx][mpotn.network.to_networkx]
    gives MPOs."""
    roles = roles or {}
    nodes = build_graph(legs, shapes)
    graph = nx.Graph()
    for index, node in enumerate(nodes, start=1):
        copy = isinstance(node, tn.CopyNode)
        graph.add_node(node.name, kind="hyperedge" if copy else "core",
                       role="copy" if copy else roles.get(node.name, "factor"), index=index,
                       shape=tuple(node.shape), params=0 if copy else int(np.prod(node.shape)))
    for edge in tn.get_all_edges(nodes):
        if edge.is_dangling():
            graph.add_node(edge.name, kind="open", index=len(graph))
            ends = (edge.node1.name, edge.name)
        else:
            ends = (edge.node1.name, edge.node2.name)
        graph.add_edge(*ends, name=edge.name, dim=edge.dimension)
    return graph


def to_networkx(
    cores: Sequence[Any],
    bond_attributes: Mapping[str, Mapping[str, Any]] | None = None,
) -> nx.Graph:
    """The network as a ``networkx.Graph``.

    Cores become nodes (``kind="core"``) with ``shape``, ``params`` and
    ``role``; every open leg ``row_k`` / ``col_k`` becomes a node of kind
    ``"open"``. Edges carry ``name``, ``dim`` and any extra attributes given
    per edge name in ``bond_attributes`` (entropies, truncation errors, ...).
    """
    bond_attributes = bond_attributes or {}
    nodes = build_network([np.zeros(tuple(c.shape)) for c in cores], backend="numpy")
    graph = nx.Graph()
    for k, node in enumerate(nodes, start=1):
        graph.add_node(
            node.name,
            kind="core",
            role="central" if node.name == "central" else "auxiliary",
            index=k,
            shape=tuple(node.shape),
            params=int(np.prod(node.shape)),
        )
    for edge in tn.get_all_edges(nodes):
        if edge.is_dangling():
            if edge.dimension == 1 and edge.name.startswith("bond_"):
                continue  # the trivial boundary bonds d_0 = d_n = 1
            graph.add_node(edge.name, kind="open", index=int(edge.name.split("_")[1]))
            ends = (edge.node1.name, edge.name)
        else:
            ends = (edge.node1.name, edge.node2.name)
        graph.add_edge(
            *ends, name=edge.name, dim=edge.dimension, **bond_attributes.get(edge.name, {})
        )
    return graph


def shared_graph(chains: Mapping[str, Sequence[Sequence[int]]]) -> nx.Graph:
    """MPO chains that share their central tensor, as one ``networkx.Graph``: the central
    tensor is one node (``"central"``, drawn once) with an edge to each chain's
    neighbouring auxiliary tensors, and each chain's auxiliary tensors are nodes
    ``"<chain>:A<k>"`` (``A_k``, 1-based ``k`` as in [core_name][mpotn.network.core_name]).
    Nodes carry ``kind``, ``role``, ``shape`` and ``params`` (the central's once), edges
    ``name`` and ``dim``, as [to_networkx][mpotn.network.to_networkx] gives them.

    ``chains`` maps a label to the core shapes ``(d_{k-1}, i_k, j_k, d_k)`` of one
    layer; all chains have ``n`` cores and the same central shape.

    Examples
    --------
    >>> chain = [(1, 2, 2, 4), (4, 2, 2, 4), (4, 2, 2, 1)]
    >>> graph = shared_graph({"layer 0": chain, "layer 1": chain})
    >>> sorted(graph.neighbors("central"))
    ['layer 0:A1', 'layer 0:A3', 'layer 1:A1', 'layer 1:A3']
    >>> graph.number_of_nodes(), graph.nodes["central"]["params"]
    (5, 64)
    """
    shapes = list(chains.values())
    n = len(shapes[0])
    center = central_index(n)
    if any(len(s) != n or tuple(s[center]) != tuple(shapes[0][center]) for s in shapes):
        raise ValueError("the chains sharing a central tensor need the same number of cores "
                         "and the same central shape")
    graph = nx.Graph()
    central = tuple(shapes[0][center])
    graph.add_node("central", kind="core", role="central", index=center + 1, shape=central,
                   params=int(np.prod(central)))
    for label, cores in chains.items():
        names = [f"{label}:A{k + 1}" if k != center else "central" for k in range(n)]
        for k, shape in enumerate(cores):
            if k != center:
                graph.add_node(names[k], kind="core", role="auxiliary", index=k + 1,
                               shape=tuple(shape), params=int(np.prod(shape)))
        for k in range(n - 1):
            graph.add_edge(names[k], names[k + 1], name=f"{label}:bond_{k + 1}",
                           dim=int(cores[k][3]))
    return graph
