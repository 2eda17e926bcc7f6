"""``mpotn compare``: error against compression ratio for every decomposition."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from mpotn.cli.common import _positive_float, _positive_int, check_out
from mpotn.types import COMPARE_METHODS as METHODS
from mpotn.types import COMPARE_RATIOS as RATIOS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mpotn compare`` to ``subparsers``."""
    compare = subparsers.add_parser(
        "compare",
        help="error against compression ratio for the truncated SVD, MPO (n = 2 with balanced "
             "factors, 3, 5, 7), TT, Tucker and CP",
        description=(
            "Decompose one matrix with every registered method at a range of compression "
            "ratios (the paper's Fig. 2) and measure the relative Frobenius error, the FLOPs "
            "of the cheaper way to apply it to a batch, and the time of that product (the "
            "paper's Table 2). Writes compare.csv, compare.json and compare.png to --out. "
            "Points a method refuses (a ratio below its smallest network, CP above its work "
            "limit) are listed on stderr and in compare.json; if nothing could be computed "
            "the command fails (exit code 2)."
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
    compare.add_argument("--max-cp-work", type=_positive_float, default=None, metavar="MADDS",
                         help="largest CP to run, in multiply-adds of its ALS sweeps (default: "
                              "mpotn.methods.cp.MAX_WORK, 1.2e10: about a minute); CP points "
                              "above it are skipped")
    compare.add_argument("--batch", type=_positive_int, default=128,
                         help="rows of the input batch timed for inference (default: 128)")
    compare.add_argument("--out", default="mpotn-compare",
                         help="output folder (default: ./mpotn-compare)")
    compare.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> None:
    """Decompose the matrix with every method and ratio; print and write the table and plot."""
    from mpotn.analysis.comparison import compare, describe_skipped, draw_comparison, load_matrix
    from mpotn.atomic import write_output

    known = {label: (label, method, options) for label, method, options in METHODS}
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method labels {unknown}; choose from {list(known)}")
    check_out(args.out)
    name, matrix = load_matrix(args.matrix, args.model)
    start = time.perf_counter()
    with warnings.catch_warnings():  # the skipped points are reported below
        warnings.filterwarnings("ignore", "compare skipped")
        table = compare(matrix, args.ratios, [known[m] for m in args.methods],
                        batch=args.batch, progress=not args.no_progress,
                        max_cp_work=args.max_cp_work)
    skipped = table.skipped
    hint = (" (raise CP's limit with --max-cp-work, or choose smaller --ratios)"
            if any(p["why"] == "work limit" for p in skipped) else "")
    if len(table) == 1:
        raise ValueError(f"nothing computed: all {len(skipped)} points were skipped{hint}:\n"
                         f"{describe_skipped(skipped)}")
    if skipped:
        print(f"skipped {len(skipped)} points{hint}:\n{describe_skipped(skipped)}",
              file=sys.stderr)
    out = Path(args.out)
    print(f"matrix: {name} ({matrix.shape[0]} x {matrix.shape[1]})")
    print(table.to_markdown())
    written = [
        write_output(out / "compare.csv", table.to_csv()),
        write_output(out / "compare.json", json.dumps(
            {"matrix": name, "shape": list(matrix.shape), "batch": args.batch,
             "rows": list(table), "skipped": list(skipped)}, indent=2)),
        write_output(out / "compare.png", lambda path: draw_comparison(
            table, path, f"{name} ({matrix.shape[0]} x {matrix.shape[1]})")),
    ]
    print(f"\n{len(table) - 1} decompositions ({len(skipped)} points skipped) in "
          f"{time.perf_counter() - start:.1f} s; wrote "
          f"{', '.join(str(path) for path in written if path) or 'nothing'}")
