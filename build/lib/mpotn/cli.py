"""Command line: ``mpotn inspect [MODEL]`` and ``mpotn compress [MODEL]``.

Run ``mpotn --help`` or ``mpotn inspect --help`` for every option.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from mpotn.inspection import DEFAULT_RATIO


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _cores(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"an MPO needs at least 2 cores, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mpotn`` command."""
    parser = argparse.ArgumentParser(
        prog="mpotn",
        description="Matrix product operators for compressing pre-trained language models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect",
        help="decompose every weight matrix of a model and report its bond structure",
        description=(
            "Decompose every embedding and linear weight of MODEL into an MPO "
            "(Algorithm 1) and report its factorization, full bonds (Eq. 2), "
            "central-bond entropy (Eq. 6) and, at a budget, the Eq. 4 error bound "
            "and the actual error. Writes inspect.md, inspect.json, an entropy "
            "heatmap and a drawing of one network to --out."
        ),
    )
    inspect.add_argument(
        "model", nargs="?", default=None,
        help="local model folder or hub id (default: the embedded all-MiniLM-L6-v2)",
    )
    inspect.add_argument("--n", type=_cores, default=5, help="cores per matrix (default: 5)")
    inspect.add_argument(
        "--ratio", type=_positive_float, default=DEFAULT_RATIO,
        help=f"budget as compression ratio rho, Eq. 5 (default: {DEFAULT_RATIO})",
    )
    inspect.add_argument(
        "--allocation", choices=("optimal", "uniform"), default="optimal",
        help="how the budget is spread over bonds (default: optimal, minimising Eq. 4)",
    )
    inspect.add_argument(
        "--svd", choices=("auto", "full", "randomized"), default="auto",
        help="SVD flavour of the decomposition (default: auto)",
    )
    inspect.add_argument(
        "--draw", default=None, metavar="NAME",
        help="module name of the matrix to draw (default: the first FFN matrix)",
    )
    inspect.add_argument(
        "--out", default="mpotn-inspect", help="output folder (default: ./mpotn-inspect)"
    )
    inspect.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    compress = commands.add_parser(
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
        "--allocation", choices=("optimal", "uniform"), default="optimal",
        help="how a --ratio budget is spread over bonds (default: optimal, minimising Eq. 4)",
    )
    compress.add_argument("--svd", choices=("auto", "full", "randomized"), default="auto",
                          help="SVD flavour of the decomposition (default: auto)")
    compress.add_argument("--dry-run", action="store_true",
                          help="list what would be replaced, with sizes, and stop")
    compress.add_argument("--out", default="mpotn-compressed",
                          help="output folder (default: ./mpotn-compressed)")
    compress.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run_inspect(args: argparse.Namespace) -> None:
    """Load the model, inspect it, print the table and write the files."""
    from mpotn.inspection import inspect_model
    from mpotn.models import load_model, resolve_model, weight_matrices

    start = time.perf_counter()
    model = load_model(args.model)
    name = args.model or "all-MiniLM-L6-v2 (embedded)"
    draw = args.draw
    if draw is None:
        matrices = weight_matrices(model)
        ffn = [m.name for m in matrices if m.type == "ffn_in"]
        draw = (ffn or [m.name for m in matrices])[0]
    result = inspect_model(
        model, n=args.n, ratio=args.ratio, allocation=args.allocation, svd=args.svd,
        keep=[draw], progress=not args.no_progress,
    )
    print(f"model: {name} ({resolve_model(args.model)})")
    print(result.table().to_markdown())
    paths = result.write(args.out, name)
    print(f"\n{len(result.records)} matrices in {time.perf_counter() - start:.1f} s; wrote:")
    for path in paths.values():
        print(f"  {path}")


def run_compress(args: argparse.Namespace) -> None:
    """Compress the model, print the report, save weights, report and plots."""
    from mpotn.compress import CompressionConfig, compress, plan
    from mpotn.models import load_model
    from mpotn.reports import report_table, write_compression_report

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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mpotn`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            run_inspect(args)
        elif args.command == "compress":
            run_compress(args)
    except ValueError as error:
        print(f"mpotn {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
