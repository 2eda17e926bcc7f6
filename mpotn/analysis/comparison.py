"""Decompositions side by side: error against compression ratio, and inference cost.

[compare][mpotn.analysis.comparison.compare] decomposes one matrix with every method at a range of
compression ratios (the paper's Fig. 2a/2b: the truncated SVD, MPO with
n = 3, 5, 7, TT, Tucker and CP; also the balanced n = 2 MPO, a sum of Kronecker
products) and records, per point, the parameters, the
actual relative Frobenius error, the FLOPs of the cheaper way to apply the
network to a batch (the paper's Table 2, counted by opt_einsum) and the
measured time of that product. [load_matrix][mpotn.analysis.comparison.load_matrix] reads the
matrix: the MiniLM word embedding by default, a named module of a model, or a ``.npy`` /
``.safetensors`` file.

Examples
--------
>>> import torch
>>> table = compare(torch.randn(96, 64, dtype=torch.float64), ratios=[0.3],
...                 methods=[("SVD", "svd", {}), ("Tucker n=2", "tucker", {"n": 2})],
...                 batch=8, repeats=1)
>>> [row["label"] for row in table], all(row["ratio"] <= 0.3 for row in table[1:])
(['dense', 'SVD', 'Tucker n=2'], True)
>>> table.skipped
[]
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from mpotn.compression.architectures import matrix_type
from mpotn.compression.models import load_model, weight_matrices
from mpotn.contraction import best_time, compiled
from mpotn.drawing import draw_lines
from mpotn.methods import decompose
from mpotn.methods.cp import WorkLimitError
from mpotn.table import Table
from mpotn.truncation import ratio_params
from mpotn.types import COMPARE_METHODS, COMPARE_RATIOS

#: The paper's Fig. 2 line-up ``(label, method, options)`` and its ratios, defined in
#: [mpotn.types][] (the command line shows them).
METHODS: list[tuple[str, str, dict[str, Any]]] = COMPARE_METHODS
RATIOS = COMPARE_RATIOS


class Comparison(Table):
    """The rows [compare][mpotn.analysis.comparison.compare] computed (a
    [Table][mpotn.table.Table]) and ``skipped``: the points it did not, each
    ``{"label", "method", "target", "why", "reason"}`` (``why``: ``"work limit"`` or
    ``"refused"``, ``reason``: the method's message)."""

    def __init__(self, rows: Iterable[dict[str, Any]] = (),
                 skipped: Iterable[dict[str, Any]] = ()) -> None:
        super().__init__(rows)
        self.skipped = Table(skipped)


def load_matrix(source: str | os.PathLike | None = None, model: str | None = None
                ) -> tuple[str, torch.Tensor]:
    """``(name, matrix)`` in the paper's orientation.

    Parameters
    ----------
    source:
        ``None`` (the word embedding of the model), a module name of the
        model (``encoder.layer.0.intermediate.dense``), a ``.npy`` file, or a
        ``.safetensors`` file (its only tensor, or ``file.safetensors:key``).
    model:
        The model for module names (default: the embedded all-MiniLM-L6-v2).
    """
    text = None if source is None else str(source)
    if text is not None and (text.endswith(".npy") or ".safetensors" in text):
        path, _, key = text.partition(".safetensors:")
        file = Path(path + ".safetensors" if key else text)
        if not file.is_file():
            raise ValueError(f"matrix file {file} does not exist; give a .npy or .safetensors "
                             "file, or a module name of the model")
        if text.endswith(".npy"):
            try:  # never pickled objects: a matrix file holds numbers only
                array = torch.from_numpy(np.load(text, allow_pickle=False))
            except (ValueError, OSError, TypeError) as error:
                raise ValueError(f"{text} is not a .npy file of a numeric matrix ({error}); "
                                 "save one with numpy.save(path, matrix)") from error
            name = Path(text).name
        else:
            try:
                tensors = load_file(path + ".safetensors" if key else text)
            except (SafetensorError, OSError) as error:
                raise ValueError(f"{file} is not a safetensors file ({error}); save one with "
                                 "safetensors.torch.save_file") from error
            if not key:
                if len(tensors) != 1:
                    raise ValueError(f"{text} holds {len(tensors)} tensors; name one as "
                                     f"FILE.safetensors:KEY (keys: {sorted(tensors)[:8]} ...)")
                key = next(iter(tensors))
            if key not in tensors:
                raise ValueError(f"{path}.safetensors has no tensor {key!r}; keys: "
                                 f"{sorted(tensors)[:8]} ...")
            array, name = tensors[key], key
        if array.dim() != 2:
            raise ValueError(f"{text}: expected a matrix, got shape {tuple(array.shape)}")
        return name, array.double()
    matrices = {m.name: m for m in weight_matrices(load_model(model))}
    name = text or next((n for n in matrices if matrix_type(n) == "word_emb"), None)
    if name is None:
        raise ValueError(f"the model has no word embedding to compare on by default; name a "
                         f"matrix: {', '.join(list(matrices)[:6])}, ...")
    if name not in matrices:
        raise ValueError(f"no matrix {name!r} in the model; candidates: "
                         f"{', '.join(list(matrices)[:6])}, ...")
    return name, matrices[name].matrix.double()


def compare(matrix: torch.Tensor, ratios: Sequence[float] = RATIOS,
            methods: Sequence[tuple[str, str, dict[str, Any]]] = tuple(METHODS),
            batch: int = 128, repeats: int = 3, progress: bool = False,
            max_cp_work: float | None = None) -> Comparison:
    """Every method at every ratio: parameters, relative error, FLOPs and time of ``x @ M``.

    Each row's ``ratio`` is the network's
    [params_ratio][mpotn.methods.base.FactorNetwork.params_ratio] (parameters over the
    unpadded matrix's entries, the same measure for every method). The dense product's
    FLOPs and time are measured too (``label="dense"``).
    A point whose method refuses it (a budget below its smallest network, or CP's
    ALS above its work limit: ``max_cp_work``, default
    [mpotn.methods.cp.MAX_WORK][]), or whose smallest network is above its ratio
    (TT, Tucker and CP stop at rank 1), has no row: it is listed in the result's
    ``skipped``, with the reason, and a warning says how many were skipped and why.
    """
    rows = Comparison()
    x32 = torch.randn(batch, matrix.shape[0], device=matrix.device)
    dense = matrix.float()
    rows.append({"label": "dense", "method": "dense", "target": 1.0, "ratio": 1.0,
                 "params": matrix.numel(), "relative_error": 0.0,
                 "flops": 2 * batch * matrix.numel(), "path": "matmul",
                 "ms_per_batch": 1e3 * best_time(lambda: x32 @ dense, repeats)})
    jobs = [(label, method, options, ratio) for label, method, options in methods
            for ratio in ratios]
    for label, method, options, ratio in tqdm(jobs, desc="decomposing", disable=not progress):
        options = dict(options)
        if method == "cp" and max_cp_work is not None:
            options["max_work"] = max_cp_work
        try:
            net = decompose(matrix, method, ratio=ratio, **options)
        except ValueError as error:  # below the smallest network, or too much work
            rows.skipped.append({
                "label": label, "method": method, "target": ratio,
                "why": "work limit" if isinstance(error, WorkLimitError) else "refused",
                "reason": str(error)})
            continue
        budget = ratio_params(ratio, matrix.numel())
        if net.num_params > budget:  # TT, Tucker and CP stop at rank 1, whatever its size
            rows.skipped.append({
                "label": label, "method": method, "target": ratio, "why": "above the ratio",
                "reason": f"its smallest network ({method} at rank 1) holds "
                          f"{net.num_params:,} parameters, above the {budget:,} of ratio "
                          f"{ratio:g}"})
            continue
        tensors = [t.float() for t in net.nodes.values()]
        shapes = tuple(tuple(t.shape) for t in tensors)
        contract = compiled(net.apply_equation(), ((batch, *net.row.factors), *shapes)).flops
        rebuild = compiled(net.rebuild_equation(), shapes).flops + 2 * batch * matrix.numel()
        seconds = best_time(lambda net=net, tensors=tensors: net.apply(x32, tensors), repeats)
        rows.append({"label": label, "method": method, "target": ratio,
                     "ratio": net.params_ratio, "params": net.num_params,
                     "relative_error": net.relative_error, "flops": min(contract, rebuild),
                     "path": "contract" if contract < rebuild else "rebuild",
                     "ms_per_batch": 1e3 * seconds})
    if rows.skipped:
        warnings.warn(f"compare skipped {len(rows.skipped)} of {len(jobs)} points: "
                      f"{describe_skipped(rows.skipped)}", stacklevel=2)
    return rows


def describe_skipped(skipped: Sequence[dict[str, Any]]) -> str:
    """One line per label: the ratios skipped and why (the first reason in full).

    Examples
    --------
    >>> print(describe_skipped([
    ...     {"label": "CP n=3", "target": 0.1, "why": "work limit", "reason": "too much"},
    ...     {"label": "CP n=3", "target": 0.2, "why": "work limit", "reason": "more"}]))
    CP n=3 at 0.1, 0.2 (work limit: too much)
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for point in skipped:
        groups.setdefault((point["label"], point["why"]), []).append(point)
    lines = []
    for (label, why), points in groups.items():
        targets = ", ".join(format(p["target"], "g") for p in points)
        lines.append(f"{label} at {targets} ({why}: {points[0]['reason']})")
    return "\n".join(lines)


def draw_comparison(table: Table, path: str | Path, title: str) -> Path:
    """Relative error against compression ratio, one line per method (log-scaled ratio)."""
    series = {}
    for row in table:
        if row["label"] != "dense":
            series.setdefault(row["label"], []).append((row["ratio"], row["relative_error"]))
    return draw_lines(series, path, title, "compression ratio (parameters / entries)",
                      "relative error ||M - M'|| / ||M||", log_x=True)
