"""Compare SVD, MPO, TT, Tucker and CP on one real MiniLM matrix.

Run from the repository root::

    python examples/compare_methods.py [--matrix NAME] [--out DIR] [--fast]

It decomposes a weight matrix of the embedded all-MiniLM-L6-v2 (by default
layer 0's FFN up-projection) with every method of the paper's Fig. 2 at a few
compression ratios, prints error, FLOPs and time per batch against the dense
matmul, saves the error curve, and draws the Tucker network of one point.
``--fast`` uses two ratios and one timing repeat.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mpotn.analysis.comparison import METHODS, compare, draw_comparison, load_matrix
from mpotn.methods import decompose
from mpotn.table import Table


def main(argv: list[str] | None = None) -> Table:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--matrix", default="encoder.layer.0.intermediate.dense")
    parser.add_argument("--out", type=Path, default=Path("example-compare"))
    parser.add_argument("--fast", action="store_true", help="two ratios, one timing repeat")
    args = parser.parse_args(argv)

    name, matrix = load_matrix(args.matrix)
    ratios = [0.05, 0.2] if args.fast else [0.02, 0.05, 0.1, 0.2, 0.4]
    methods = [m for m in METHODS if m[0] != "CP n=3"] if args.fast else METHODS
    table = compare(matrix, ratios, methods, repeats=1 if args.fast else 3)
    print(f"{name}: {matrix.shape[0]} x {matrix.shape[1]}")
    print(table.to_markdown())
    draw_comparison(table, args.out / "compare.png", name)
    decompose(matrix, "tucker", n=3, ratio=0.2).draw(args.out / "tucker.png")
    return table


if __name__ == "__main__":
    main()
