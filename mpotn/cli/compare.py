"""``mpotn compare``: error against compression ratio for every decomposition."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mpotn.cli.common import _positive_float
from mpotn.types import COMPARE_METHODS as METHODS
from mpotn.types import COMPARE_RATIOS as RATIOS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mpotn compare`` to ``subparsers``."""
    compare = subparsers.add_parser(
        "compare",
        help="error against compression ratio for SVD, MPO (n = 3, 5, 7), TT, Tucker and CP",
        description=(
            "Decompose one matrix with every registered method at a range of compression "
            "ratios (the paper's Fig. 2) and measure the relative Frobenius error, the FLOPs "
            "of the cheaper way to apply it to a batch, and the time of that product (the "
            "paper's Table 2). Writes compare.csv, compare.json and compare.png to --out."
        ),
    )
    compare.add_argument(
        "matrix", nargs="?", default=None,
        help="a module name of --model, a .npy file, or FILE.safetensors[:KEY] (default: the "
             "word embedding of the embedded all-MiniLM-L6-v2)",
    )
    compare.add_argument("--model", default=None,
                         help="model for module names (default: the embedded MiniLM)")
    compare.add_argument("--ratios", type=_positive_float, nargs="+", default=list(RATIOS),
                         help="compression ratios (default: "
                              + " ".join(f"{r:g}" for r in RATIOS) + ")")
    compare.add_argument("--methods", nargs="+", default=[label for label, _, _ in METHODS],
                         metavar="LABEL",
                         help="labels to run (default: " + ", ".join(
                             label for label, _, _ in METHODS) + ")")
    compare.add_argument("--batch", type=int, default=128,
                         help="rows of the input batch timed for inference (default: 128)")
    compare.add_argument("--out", default="mpotn-compare",
                         help="output folder (default: ./mpotn-compare)")
    compare.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> None:
    """Decompose the matrix with every method and ratio; print and write the table and plot."""
    from mpotn.analysis.comparison import compare, draw_comparison, load_matrix
    from mpotn.atomic import write_text

    known = {label: (label, method, options) for label, method, options in METHODS}
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method labels {unknown}; choose from {list(known)}")
    name, matrix = load_matrix(args.matrix, args.model)
    start = time.perf_counter()
    table = compare(matrix, args.ratios, [known[m] for m in args.methods], batch=args.batch,
                    progress=not args.no_progress)
    out = Path(args.out)
    print(f"matrix: {name} ({matrix.shape[0]} x {matrix.shape[1]})")
    print(table.to_markdown())
    write_text(out / "compare.csv", table.to_csv())
    write_text(out / "compare.json", json.dumps({"matrix": name, "shape": list(matrix.shape),
                                                 "batch": args.batch, "rows": list(table)},
                                                indent=2))
    draw_comparison(table, out / "compare.png", f"{name} ({matrix.shape[0]} x {matrix.shape[1]})")
    print(f"\n{len(table) - 1} decompositions in {time.perf_counter() - start:.1f} s; wrote "
          f"{out}/compare.csv, compare.json, compare.png")
