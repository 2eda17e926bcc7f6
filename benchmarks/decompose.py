"""Benchmark: MPO decomposition against tensorly, and contraction FLOPs against optimal.

Run from the repository root::

    python benchmarks/decompose.py            # full run, about a minute on 2 cores
    python benchmarks/decompose.py --quick    # FFN matrix only, one repeat

Part 1 decomposes real all-MiniLM-L6-v2 matrices (the word embedding,
30522 x 384 zero-padded to 30720, and an FFN matrix, 1536 x 384) with
``mpotn.MPO.from_matrix`` and with ``tensorly.decomposition.tensor_train_matrix``
(the same cores ``T_k[d_{k-1}, i_k, j_k, d_k]``) at equal ranks: full rank,
every bond capped at 32, and the budget-optimal bonds at rho = 0.25. Both get
the float32 weights; times are the best of ``--repeats`` runs in this process,
reported as the ratio tensorly / mpotn, and errors are relative Frobenius
errors of the rebuilt matrix.

Part 2 compares the FLOPs of the contraction path mpotn plans for ``x @ M``
with opt_einsum's exhaustive ``optimal`` path, for n = 3, 5, 7 and batches of
1 to 4096 vectors.

The tables are printed and written to ``benchmarks/results/decompose.json`` and
``benchmarks/results/decompose.md`` (which the documentation includes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import opt_einsum as oe
import tensorly as tl
import torch
from safetensors.torch import load_file
from tensorly.decomposition import tensor_train_matrix

from mpotn import MPO, Table
from mpotn.atomic import write_text
from mpotn.compression.models import default_model_path
from mpotn.network import apply_equation, squeeze_ends

RESULTS = Path(__file__).parent / "results" / "decompose.json"


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def tensorly_error(matrix: torch.Tensor, mpo: MPO, factors: list[np.ndarray]) -> float:
    dense = tl.tt_matrix.tt_matrix_to_tensor(factors).reshape(mpo.padded_shape)
    dense = torch.from_numpy(np.asarray(dense, dtype=np.float64))[: mpo.shape[0], : mpo.shape[1]]
    return float((dense - matrix.double()).norm() / matrix.double().norm())


def decomposition_rows(name: str, matrix: torch.Tensor, repeats: int) -> list[dict]:
    full = MPO.from_matrix(matrix.double())
    settings = {
        "full rank": full.bond_dims,
        "max bond 32": full.truncate(max_bond=32).bond_dims,
        "optimal at rho=0.25": full.truncate(ratio=0.25).bond_dims,
    }
    rows_pad, cols_pad = full.row.padding, full.col.padding
    padded = torch.nn.functional.pad(matrix, (0, cols_pad, 0, rows_pad))
    tensor = padded.reshape(*full.row_shape, *full.col_shape).numpy()
    rows = []
    for setting, dims in settings.items():
        inner = list(dims[1:-1])
        t_tl, tt = best_time(
            lambda dims=dims: tensor_train_matrix(tensor, rank=list(dims)), repeats
        )
        err_tl = tensorly_error(matrix, full, tt.factors)
        for svd in ("auto", "full"):
            t_mp, mpo = best_time(
                lambda svd=svd, inner=inner: MPO.from_matrix(
                    matrix, row_shape=full.row_shape, col_shape=full.col_shape,
                    bond_dims=inner, svd=svd,
                ),
                repeats,
            )
            err_mp = mpo.reconstruction_error(matrix) / float(matrix.double().norm())
            rows.append({
                "matrix": name,
                "setting": setting,
                "bonds": ",".join(map(str, inner)),
                "mpotn_svd": svd,
                "mpotn_s": t_mp,
                "tensorly_s": t_tl,
                "speedup_vs_tensorly": t_tl / t_mp,
                "mpotn_rel_error": err_mp,
                "tensorly_rel_error": err_tl,
                "error_ratio_mpotn_over_tensorly": err_mp / err_tl if err_tl > 0 else float("nan"),
                "mpotn_bound": mpo.error_bound / float(matrix.double().norm()),
            })
    return rows


def flop_rows(matrix: torch.Tensor, batches: list[int]) -> list[dict]:
    rows = []
    for n in (3, 5, 7):
        mpo = MPO.from_matrix(matrix, n=n).truncate(ratio=0.25)
        for batch in batches:
            shapes = ((batch, *mpo.row_shape), *squeeze_ends([tuple(c.shape) for c in mpo.cores]))
            equation = apply_equation(n, "rows")
            start = time.perf_counter()
            _, optimal = oe.contract_path(equation, *shapes, shapes=True, optimize="optimal")
            search = time.perf_counter() - start
            cost = mpo.contraction_cost(batch)
            rows.append({
                "n": n,
                "batch": batch,
                "bonds": ",".join(map(str, mpo.bond_dims[1:-1])),
                "planned_flops": cost.contract_flops,
                "optimal_flops": int(optimal.opt_cost),
                "planned_over_optimal": cost.contract_flops / int(optimal.opt_cost),
                "rebuild_flops": cost.rebuild_flops,
                "auto_choice": cost.method,
                "dense_flops": cost.dense_flops,
                "optimal_search_s": search,
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="FFN matrix only, one repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    torch.set_num_threads(torch.get_num_threads())
    weights = load_file(str(default_model_path() / "model.safetensors"))
    ffn = weights["encoder.layer.0.output.dense.weight"].T.contiguous()  # 1536 x 384
    matrices = {"ffn 1536x384 (layer 0 output.dense)": ffn}
    if not args.quick:
        matrices["word embedding 30522x384"] = weights["embeddings.word_embeddings.weight"]
    decomposition = Table()
    for name, matrix in matrices.items():
        decomposition.extend(decomposition_rows(name, matrix, repeats))
    flops = Table(flop_rows(ffn, [1, 64] if args.quick else [1, 64, 1024, 4096]))

    tables = (
        "### Decomposition: mpotn vs tensorly tensor_train_matrix at equal ranks\n\n"
        + decomposition.to_markdown(floatfmt=".3g")
        + "\n\n### Contraction FLOPs: planned path vs opt_einsum optimal (FFN, rho = 0.25)\n\n"
        + flops.to_markdown(floatfmt=".6g")
        + "\n"
    )
    print(tables)
    report = {
        "torch": torch.__version__, "tensorly": tl.__version__, "threads": torch.get_num_threads(),
        "repeats": repeats, "decomposition": list(decomposition), "contraction_flops": list(flops),
    }
    write_text(args.out, json.dumps(report, indent=2))
    write_text(args.out.with_suffix(".md"), tables)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
