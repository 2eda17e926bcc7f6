"""Pictures of networks and of bond structure (matplotlib, no display needed).

Examples
--------
>>> import tempfile, torch
>>> from mpotn.mpo import MPO
>>> mpo = MPO.from_matrix(torch.randn(48, 64), n=3)
>>> path = mpo.draw(tempfile.mkdtemp() + "/net.svg")
>>> path.suffix
'.svg'
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import networkx as nx
import numpy as np
import torch

from mpotn.atomic import atomic_path
from mpotn.table import Table

FORMATS = (".png", ".svg", ".pdf")


def _save(fig: plt.Figure, path: str | Path) -> Path:
    """Save atomically (see [mpotn.atomic.atomic_path][]) and close the figure."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        plt.close(fig)
        raise ValueError(f"picture files must end in one of {FORMATS}, got {path.name!r}")
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, bbox_inches="tight", dpi=150)
    finally:
        plt.close(fig)
    return path


def draw_network(graph: nx.Graph, path: str | Path, title: str | None = None) -> Path:
    """Draw an MPO graph from [mpotn.network.to_networkx][].

    Cores sit on a line (the central tensor larger), ``row_k`` legs point up
    and ``col_k`` legs down. Bond edges are as wide as ``log2(dim)`` and
    coloured by entanglement entropy (Eq. 6); labels give kept/full dims.
    """
    cores = sorted(
        (n for n, a in graph.nodes(data=True) if a["kind"] == "core"),
        key=lambda n: graph.nodes[n]["index"],
    )
    pos = {name: (2.0 * graph.nodes[name]["index"], 0.0) for name in cores}
    for name, attrs in graph.nodes(data=True):
        if attrs["kind"] == "open":
            side = 1.0 if name.startswith("row") else -1.0
            pos[name] = (2.0 * attrs["index"], side)
    bonds = [(u, v, a) for u, v, a in graph.edges(data=True) if a["name"].startswith("bond")]
    legs = [(u, v, a) for u, v, a in graph.edges(data=True) if not a["name"].startswith("bond")]
    entropies = [a.get("entropy", 0.0) for *_, a in bonds]
    cmap = plt.get_cmap("viridis")
    top = max([*entropies, 1e-12])

    fig, ax = plt.subplots(figsize=(1.9 * max(len(cores), 3), 3.2))
    nx.draw_networkx_edges(graph, pos, edgelist=[(u, v) for u, v, _ in legs], ax=ax,
                           width=1.0, edge_color="0.55", style="dashed")
    nx.draw_networkx_edges(
        graph, pos, edgelist=[(u, v) for u, v, _ in bonds], ax=ax,
        width=[1.0 + 1.5 * math.log2(max(a["dim"], 1)) for *_, a in bonds],
        edge_color=[cmap(e / top) for e in entropies],
    )
    sizes = [2600 if graph.nodes[c]["role"] == "central" else 1300 for c in cores]
    colors = ["#d62728" if graph.nodes[c]["role"] == "central" else "#1f77b4" for c in cores]
    nx.draw_networkx_nodes(graph, pos, nodelist=cores, node_size=sizes, node_color=colors, ax=ax)
    nx.draw_networkx_labels(
        graph, pos, ax=ax, font_size=7, font_color="white",
        labels={c: c.replace("auxiliary_", "aux ") for c in cores},
    )
    for *_, a in legs:
        x, y = pos[a["name"]]
        symbol = "i" if a["name"].startswith("row") else "j"
        ax.text(x, y + 0.12 * y, f"{symbol}{a['name'].split('_')[1]}={a['dim']}",
                ha="center", va="center", fontsize=7)
    bond_labels = {
        (u, v): f"{a['name']}\n{a['dim']}/{a.get('full_dim', a['dim'])}"
        f"\nS={a.get('entropy', 0):.2f}"
        for u, v, a in bonds
    }
    nx.draw_networkx_edge_labels(graph, pos, edge_labels=bond_labels, font_size=6, ax=ax)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, top))
    fig.colorbar(sm, ax=ax, fraction=0.03, pad=0.01, label="entanglement entropy (Eq. 6)")
    ax.set_title(title or "MPO network (bond width ~ log2 dim; label kept/full)", fontsize=9)
    ax.set_ylim(-1.5, 1.5)
    ax.axis("off")
    return _save(fig, path)


def _qualified_type(record: dict) -> str:
    """``type`` with the stack (``encoder``/``decoder``) and the expert its name holds.

    Examples
    --------
    >>> _qualified_type({"type": "query", "name": "decoder.block.0.layer.0.SelfAttention.q"})
    'decoder query'
    >>> _qualified_type({"type": "ffn_in", "name": "transformer.h.0.mlp.experts.2.c_fc"})
    'ffn_in (expert 2)'
    """
    name = str(record.get("name", ""))
    stack = re.search(r"(?:^|\.)(encoder|decoder)\.", name)
    expert = re.search(r"\.experts\.(\d+)\.", name)
    return (f"{stack.group(1)} " if stack else "") + record["type"] + (
        f" (expert {expert.group(1)})" if expert else "")


def draw_entropy_heatmap(records: Table, path: str | Path, model_name: str) -> Path | None:
    """Central-bond entropy by matrix type and layer, from per-matrix records.

    The records need ``type``, ``layer`` and ``central_entropy`` (and ``name``); ``None``
    when no record with an entropy (a matrix kept dense, another decomposition has none)
    belongs to a layer. When two matrices share a type and a layer (an encoder-decoder's
    stacks, a mixture's experts), each row names its stack and expert, so that every
    matrix has its own cell.
    """
    kept = [r for r in records if isinstance(r.get("central_entropy"), (int, float))
            and math.isfinite(r["central_entropy"])]
    cells = [(r["type"], r["layer"]) for r in kept]
    if len(set(cells)) < len(cells):
        kept = [{**r, "type": _qualified_type(r)} for r in kept]
    grid, types, layers = Table(kept).pivot("type", "layer", "central_entropy")
    if not layers:
        return None
    return draw_heatmap(
        grid, types, [f"layer {k}" for k in layers], path,
        title=f"central-bond entanglement entropy, {model_name}",
        colorbar_label="S (Eq. 6, nats)",
    )


def draw_errors(records: Table, path: str | Path, title: str) -> Path:
    """Horizontal bars per matrix: the Eq. 4 bound, the actual weight error and, for a
    calibrated compression, the output error of Eq. 7, all relative.

    The records need ``name``, ``relative_bound`` and ``relative_error``; an
    ``output_error`` column is drawn when any record has one. A missing value
    (``None``: a bound read from whitened spectra) draws no bar.
    """
    def values(key: str) -> list[float]:
        return [float("nan") if r.get(key) is None else r[key] for r in records]

    names = [r["name"] for r in records]
    bars = [("relative_bound", "Eq. 4 bound", "#9ecae1"),
            ("relative_error", "weight error", "#08519c")]
    if any(r.get("output_error") is not None for r in records):
        bars.append(("output_error", "output error (Eq. 7)", "#e6550d"))
    height = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(7.5, 0.6 + 0.22 * len(names)))
    positions = np.arange(len(names))
    for k, (key, label, color) in enumerate(bars):
        ax.barh(positions + (k - (len(bars) - 1) / 2) * height, values(key), height=height,
                label=label, color=color)
    ax.set_yticks(positions, names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("relative error (weights: ||M - MPO|| / ||M||; outputs: ||X(M - MPO)|| / ||XM||)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def draw_heatmap(
    values: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | Path,
    title: str,
    colorbar_label: str,
) -> Path:
    """A labelled heatmap (missing entries as NaN are left blank)."""
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(
        figsize=(1.1 + 0.75 * max(len(col_labels), 2), 1.2 + 0.45 * max(len(row_labels), 2))
    )
    image = ax.imshow(np.ma.masked_invalid(values), cmap="magma", aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels, fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v):
            shade = "black" if v > np.nanmean(values) else "white"
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color=shade)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def draw_history(history: Table, x: str, ys: Sequence[str], path: str | Path, title: str,
                 marks: Sequence[str] = ()) -> Path:
    """Curves of ``ys`` against ``x`` (rows lacking a value are skipped), one panel each.

    ``marks`` name columns whose text is written next to each point (e.g. the
    matrix cut at a squeezing step).
    """
    fig, axes = plt.subplots(len(ys), 1, figsize=(7.0, 2.2 * len(ys)), sharex=True,
                             squeeze=False)
    for ax, y in zip(axes[:, 0], ys):
        rows = [r for r in history if r.get(y) is not None and r.get(x) is not None]
        ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o", markersize=3)
        for mark in marks:
            for r in rows:
                if r.get(mark) is not None:
                    ax.annotate(str(r[mark]), (r[x], r[y]), fontsize=5, rotation=30)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(x)
    axes[0, 0].set_title(title, fontsize=9)
    return _save(fig, path)


def draw_graph(graph: nx.Graph, path: str | Path, title: str) -> Path:
    """Draw any network from [mpotn.network.graph_to_networkx][] (Tucker, CP, TT, ...).

    Tensors are large dots (central / core tensors red), open legs small grey
    dots, hyperedges (copy tensors) black diamonds; edge width grows with
    ``log2`` of the dimension, which labels it.
    """
    pos = nx.kamada_kawai_layout(graph) if len(graph) > 2 else nx.spring_layout(graph, seed=0)
    tensors = [n for n, a in graph.nodes(data=True) if a["kind"] == "core"]
    legs = [n for n, a in graph.nodes(data=True) if a["kind"] == "open"]
    hubs = [n for n, a in graph.nodes(data=True) if a["kind"] == "hyperedge"]
    fig, ax = plt.subplots(figsize=(6.5, 5.0))
    nx.draw_networkx_edges(graph, pos, ax=ax, edge_color="0.4",
                           width=[1.0 + math.log2(max(a["dim"], 1)) for *_, a in
                                  graph.edges(data=True)])
    colors = ["#d62728" if graph.nodes[t]["role"] in ("central", "core") else "#1f77b4"
              for t in tensors]
    nx.draw_networkx_nodes(graph, pos, nodelist=tensors, node_color=colors, node_size=900, ax=ax)
    nx.draw_networkx_nodes(graph, pos, nodelist=legs, node_color="0.75", node_size=60, ax=ax)
    nx.draw_networkx_nodes(graph, pos, nodelist=hubs, node_color="black", node_size=120,
                           node_shape="D", ax=ax)
    nx.draw_networkx_labels(graph, pos, labels={t: t for t in tensors}, font_size=6,
                            font_color="white", ax=ax)
    nx.draw_networkx_labels(graph, pos, labels={leg: leg for leg in legs}, font_size=6, ax=ax,
                            verticalalignment="bottom")
    nx.draw_networkx_edge_labels(graph, pos, font_size=6, ax=ax,
                                 edge_labels={(u, v): a["dim"] for u, v, a in
                                              graph.edges(data=True)})
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return _save(fig, path)


def draw_lines(series: dict[str, Sequence[tuple[float, float]]], path: str | Path, title: str,
               xlabel: str, ylabel: str, log_x: bool = False) -> Path:
    """One marked line per series of ``(x, y)`` points (sorted by ``x``)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def draw_spectra(mpo: Any, path: str | Path, title: str) -> Path:
    """Singular values of every bond of an MPO (``mpo.singular_values``), log scale.

    Each bond's values are divided by its largest, so that bonds compare; a
    flat spectrum (near-maximal entropy) is a horizontal line.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for k, values in enumerate(mpo.singular_values, start=1):
        values = torch.as_tensor(values).detach().double().cpu().numpy()  # from any device
        ax.plot(np.arange(1, len(values) + 1), values / max(values[0], 1e-300),
                label=f"bond_{k} (d={len(values)})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("index of the singular value")
    ax.set_ylabel("lambda / lambda_1")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def draw_entropy_profiles(records: Table, path: str | Path, title: str) -> Path:
    """Entanglement entropy along the chain (bond by bond), over ``ln d`` of the full bond.

    One line per matrix type (and number of cores, where a type has matrices of several),
    averaged over layers; records need ``type``, ``entropies`` and ``full_bonds`` (as
    [mpotn.analysis.inspection.inspect_model][] writes).
    """
    profiles: dict[tuple[str, int], list[list[float]]] = {}
    for r in records:
        full = [int(d) for d in str(r["full_bonds"]).split(",")]
        share = [s / math.log(d) if d > 1 else 0.0 for s, d in zip(r["entropies"], full)]
        profiles.setdefault((r["type"], len(share)), []).append(share)
    lengths: dict[str, int] = {}
    for kind, _ in profiles:
        lengths[kind] = lengths.get(kind, 0) + 1
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for (kind, bonds), rows in profiles.items():
        label = kind if lengths[kind] == 1 else f"{kind} (n = {bonds + 1})"
        ax.plot(range(1, bonds + 1), np.mean(rows, axis=0), marker="o", label=label)
    ax.set_xlabel("bond k")
    ax.set_ylabel("S_k / ln d_k (Eq. 6, share of the maximum)")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
