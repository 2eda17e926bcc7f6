"""Decompositions side by side: error against compression ratio, and inference cost.

[compare][mpotn.analysis.comparison.compare] decomposes one matrix with every method at a range of
compression ratios (the paper's Fig. 2a/2b: the truncated SVD, MPO with
n = 3, 5, 7, TT, Tucker and CP) and records, per point, the parameters, the
actual relative Frobenius error, the FLOPs of the cheaper way to apply the
network to a batch (the paper's Table 2, counted by opt_einsum) and the
measured time of that product. [load_matrix][mpotn.analysis.comparison.load_matrix] reads the
matrix: the MiniLM word embedding by default, a named module of a model, or a ``.npy`` /
``.safetensors`` file.

Examples
--------
>>> import torch
>>> table = compare(torch.randn(96, 64, dtype=torch.float64), ratios=[0.3],
...                 methods=[("svd", "mpo", {"n": 2}), ("Tucker n=2", "tucker", {"n": 2})],
...                 batch=8, repeats=1)
>>> [row["label"] for row in table], all(row["ratio"] <= 0.3 for row in table[1:])
(['dense', 'svd', 'Tucker n=2'], True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpotn.compression.models import load_model, weight_matrices
from mpotn.contraction import best_time, compiled
from mpotn.methods import decompose
from mpotn.shapes import plan_side
from mpotn.table import Table
from mpotn.types import COMPARE_METHODS, COMPARE_RATIOS

#: The paper's Fig. 2 line-up ``(label, method, options)`` and its ratios, defined in
#: [mpotn.types][] (the command line shows them).
METHODS: list[tuple[str, str, dict[str, Any]]] = COMPARE_METHODS
RATIOS = COMPARE_RATIOS

#: CP's ALS costs about ``entries x rank`` per sweep and mode; points where that
#: product exceeds this are skipped (on the 11.7M-entry word embedding, every
#: ratio above 1e-5; on a 384 x 1536 FFN matrix, ratios up to about 0.03 run).
MAX_CP_WORK = 2e8


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
            array = torch.from_numpy(np.load(text))
            name = Path(text).name
        else:
            from safetensors.torch import load_file

            tensors = load_file(path + ".safetensors" if key else text)
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
    name = text or next(n for n in matrices if n.endswith("word_embeddings"))
    if name not in matrices:
        raise ValueError(f"no matrix {name!r} in the model; candidates: "
                         f"{', '.join(list(matrices)[:6])}, ...")
    return name, matrices[name].matrix.double()


def compare(matrix: torch.Tensor, ratios: Sequence[float] = RATIOS,
            methods: Sequence[tuple[str, str, dict[str, Any]]] = tuple(METHODS),
            batch: int = 128, repeats: int = 3, progress: bool = False) -> Table:
    """Every method at every ratio: parameters, relative error, FLOPs and time of ``x @ M``.

    The dense product's FLOPs and time are measured too (``label="dense"``).
    Points a method cannot reach (a budget below its smallest network) or that
    would take too long (CP beyond [MAX_CP_WORK][mpotn.analysis.comparison.MAX_CP_WORK]) are left
    out.
    """
    from tqdm.auto import tqdm

    rows = Table()
    x32 = torch.randn(batch, matrix.shape[0])
    dense = matrix.float()
    rows.append({"label": "dense", "method": "dense", "target": 1.0, "ratio": 1.0,
                 "params": matrix.numel(), "relative_error": 0.0,
                 "flops": 2 * batch * matrix.numel(), "path": "matmul",
                 "ms_per_batch": 1e3 * best_time(lambda: x32 @ dense, repeats)})
    jobs = [(label, method, options, ratio) for label, method, options in methods
            for ratio in ratios]
    for label, method, options, ratio in tqdm(jobs, desc="decomposing", disable=not progress):
        options = dict(options)
        if method == "mpo" and options.get("n") == 2:
            options.update(row_shape=(matrix.shape[0], 1), col_shape=(1, matrix.shape[1]))
        if method == "cp":
            per_rank = sum(decompose_shape(matrix, options["n"]))
            if ratio * matrix.numel() / per_rank * matrix.numel() > MAX_CP_WORK:
                continue
        try:
            net = decompose(matrix, method, ratio=ratio, **options)
        except ValueError:  # below the smallest network of this method
            continue
        tensors = [t.float() for t in net.nodes.values()]
        shapes = tuple(tuple(t.shape) for t in tensors)
        contract = compiled(net.apply_equation(), ((batch, *net.row.factors), *shapes)).flops
        rebuild = compiled(net.rebuild_equation(), shapes).flops + 2 * batch * matrix.numel()
        seconds = best_time(lambda net=net, tensors=tensors: net.apply(x32, tensors), repeats)
        rows.append({"label": label, "method": method, "target": ratio,
                     "ratio": net.compression_ratio, "params": net.num_params,
                     "relative_error": net.relative_error, "flops": min(contract, rebuild),
                     "path": "contract" if contract < rebuild else "rebuild",
                     "ms_per_batch": 1e3 * seconds})
    return rows


def decompose_shape(matrix: torch.Tensor, n: int) -> tuple[int, ...]:
    """Mode sizes of the tensorized matrix ``(i_1..i_n, j_1..j_n)`` (with padding)."""
    return (*plan_side(matrix.shape[0], n).factors, *plan_side(matrix.shape[1], n).factors)


def draw_comparison(table: Table, path: str | Path, title: str) -> Path:
    """Relative error against compression ratio, one line per method (log-scaled ratio)."""
    from mpotn.drawing import draw_lines

    series = {}
    for row in table:
        if row["label"] != "dense":
            series.setdefault(row["label"], []).append((row["ratio"], row["relative_error"]))
    return draw_lines(series, path, title, "compression ratio (parameters / entries)",
                      "relative error ||M - M'|| / ||M||", log_x=True)
