"""``mpotn compress``: replace a model's matrices by MPO layers and save it."""

from __future__ import annotations

import argparse
import time

from mpotn.cli.common import _cores, _positive_float
from mpotn.types import ALLOCATIONS, SVD_METHODS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mpotn compress`` to ``subparsers``."""
    compress = subparsers.add_parser(
        "compress",
        help="replace a model's matrices by MPO layers and save the compressed model",
        description=(
            "Decompose the targeted matrices of MODEL into MPOs, truncate them by one "
            "policy, print the report (shape, factorization, bonds, ratio, central-bond "
            "entropy, Eq. 4 bound and actual error per matrix; #To and #Pr totals), and "
            "save the model to --out with report.md, report.json and plots. Load it back "
            "with mpotn.load(OUT)."
        ),
    )
    compress.add_argument(
        "model", nargs="?", default=None,
        help="local model folder or hub id (default: the embedded all-MiniLM-L6-v2)",
    )
    compress.add_argument(
        "--targets", nargs="+", default=["all-linear", "embeddings"], metavar="T",
        help="presets (embeddings, attention, ffn, all-linear) and module-name suffixes "
             "(default: all-linear embeddings)",
    )
    compress.add_argument(
        "--regex", default=None, help="a regular expression for module names, instead of --targets"
    )
    compress.add_argument("--exclude", nargs="+", default=None, metavar="T",
                          help="presets or suffixes to leave alone")
    compress.add_argument("--n", type=_cores, default=5, help="cores per matrix (default: 5)")
    policy = compress.add_mutually_exclusive_group()
    policy.add_argument("--ratio", type=_positive_float,
                        help="compression ratio rho per matrix, Eq. 5 (default: 0.5)")
    policy.add_argument("--max-bond", type=int, help="one maximum for every bond")
    policy.add_argument("--tol", type=_positive_float,
                        help="relative error tolerance: fewest parameters with Eq. 4 <= tol")
    policy.add_argument("--full-rank", action="store_true", help="no truncation (exact)")
    compress.add_argument(
        "--allocation", choices=ALLOCATIONS, default="optimal",
        help="how a --ratio budget is spread over bonds (default: optimal, minimising Eq. 4)",
    )
    compress.add_argument("--svd", choices=SVD_METHODS, default="auto",
                          help="SVD flavour of the decomposition (default: auto)")
    compress.add_argument("--dry-run", action="store_true",
                          help="list what would be replaced, with sizes, and stop")
    compress.add_argument("--out", default="mpotn-compressed",
                          help="output folder (default: ./mpotn-compressed)")
    compress.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> None:
    """Compress the model, print the report, save weights, report and plots."""
    from mpotn.analysis.reports import report_table, write_compression_report
    from mpotn.compression import CompressionConfig, compress, plan
    from mpotn.compression.models import load_model

    start = time.perf_counter()
    if args.max_bond is not None and args.max_bond < 1:
        raise ValueError(f"--max-bond must be >= 1, got {args.max_bond}")
    policy = {"max_bond": args.max_bond, "tol": args.tol, "ratio": args.ratio}
    if not args.full_rank and all(v is None for v in policy.values()):
        policy["ratio"] = 0.5
    config = CompressionConfig(
        targets=args.regex or args.targets, exclude=args.exclude, n=args.n,
        allocation=args.allocation, svd=args.svd, **policy,
    )
    model = load_model(args.model)
    name = args.model or "all-MiniLM-L6-v2 (embedded)"
    if args.dry_run:
        print(plan(model, config).to_markdown())
        return
    compressed = compress(model, config, progress=not args.no_progress).eval()
    print(f"model: {name}")
    print(report_table(compressed))
    print(compressed.summary())
    compressed.save_pretrained(args.out)
    paths = write_compression_report(compressed, args.out, name)
    print(f"\n{len(compressed.report())} matrices in {time.perf_counter() - start:.1f} s; "
          f"saved the model to {args.out} (load it with mpotn.load({args.out!r})); wrote:")
    for path in paths.values():
        print(f"  {path}")
