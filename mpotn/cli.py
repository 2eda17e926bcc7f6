"""Command line: ``mpotn inspect``, ``compress``, ``finetune``, ``squeeze`` and ``compare``.

Run ``mpotn --help`` or ``mpotn COMMAND --help`` for every option and its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mpotn.atomic import write_text
from mpotn.comparison import METHODS, RATIOS, compare, draw_comparison, load_matrix
from mpotn.data import TaskData, load_glue, load_local, sst2_sample
from mpotn.inspection import DEFAULT_RATIO
from mpotn.models import load_tokenizer
from mpotn.serialization import is_saved_model, load
from mpotn.squeeze import MONITORS, SqueezeConfig, Squeezer, direct_truncation
from mpotn.strategies import STRATEGIES
from mpotn.table import Table
from mpotn.training import (
    DEFAULT_LR,
    DEFAULT_TARGETS,
    TrainingConfig,
    finetune,
    prepare_model,
    write_run,
)


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
        "--changes", nargs=2, default=None, metavar=("BEFORE", "AFTER"),
        help="instead: compare two mpotn saves of the same model (e.g. a squeeze run's "
             "checkpoints/step-0000 and a fine-tuned model/) and report how far each "
             "matrix's central and auxiliary tensors moved",
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

    finetune = commands.add_parser(
        "finetune",
        help="fine-tune a model on a task with one strategy (full, lfa, central, last-k, lora)",
        description=(
            "Fine-tune MODEL on a task with the transformers Trainer. lfa and central "
            "first decompose the word embedding, attention and FFN matrices into MPOs "
            "(full rank unless --ratio / --max-bond) and train the auxiliary (lfa) or "
            "central tensors only. Writes metrics.json (metric, trainable and total "
            "parameters, wall time), history.csv/json, history.png and model/ to --out."
        ),
    )
    _add_model_and_task(finetune)
    finetune.add_argument("--strategy", choices=STRATEGIES, default="lfa",
                          help="which parameters to train (default: lfa)")
    finetune.add_argument("--k", type=int, default=1,
                          help="layers tuned by last-k (default: 1)")
    finetune.add_argument("--lora-rank", type=int, default=None,
                          help="LoRA rank (default: matched to LFA's trainable budget)")
    finetune.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), metavar="T",
                          help="matrices decomposed for lfa/central (default: "
                               f"{' '.join(DEFAULT_TARGETS)})")
    finetune.add_argument("--compress", action="store_true",
                          help="decompose first for every strategy (with full: fine-tune every "
                               "core and report how far central and auxiliary tensors moved); "
                               "lfa and central always do")
    cut = finetune.add_mutually_exclusive_group()
    cut.add_argument("--ratio", type=_positive_float, default=None,
                     help="compress the MPO matrices to this rho first (default: full rank)")
    cut.add_argument("--max-bond", type=int, default=None,
                     help="compress the MPO matrices to this bond first (default: full rank)")
    _add_training(finetune, epochs=3.0, default_out="mpotn-finetune")

    squeeze = commands.add_parser(
        "squeeze",
        help="compress a fine-tuned MPO model gradually by dimension squeezing (Algorithm 2)",
        description=(
            "Algorithm 2: repeatedly cut the central bond of the matrix whose cut has the "
            "least estimated error (Eq. 3 from stored singular values), fine-tune the "
            "auxiliary tensors, evaluate, and stop when the score drops by more than "
            "--delta, at --target-ratio, or after --max-cuts. MODEL is the model/ folder "
            "of `mpotn finetune --strategy lfa`, or a pre-trained model, which is then "
            "decomposed at full rank and LFA-fine-tuned for --init-epochs first. Every "
            "step is checkpointed; --resume continues a stopped run. Writes metrics.json, "
            "history.csv/json, history.png and model/ to --out."
        ),
    )
    _add_model_and_task(squeeze)
    squeeze.add_argument("--types", nargs="+", default=["all"], metavar="TYPE",
                         help="matrix types that may be cut: query key value attn_out ffn_in "
                              "ffn_out word_emb, or all (default: all)")
    squeeze.add_argument("--cut", type=_positive_float, default=1,
                         help="dimensions removed per cut: an integer (the paper: 1) or a "
                              "fraction of the current bond (default: 1)")
    squeeze.add_argument("--budget", type=float, default=0.014,
                         help="parameters one step removes, by repeated least-error cuts over "
                              "all matrices: a count, or a fraction of the original model's "
                              "parameters; 0 cuts one matrix per step (default: 0.014)")
    squeeze.add_argument("--steps-per-cut", type=int, default=40,
                         help="auxiliary fine-tuning steps after each step's cuts (default: 40)")
    squeeze.add_argument("--max-cuts", type=int, default=4,
                         help="step limit, iter of Algorithm 2 (default: 4)")
    squeeze.add_argument("--delta", type=float, default=0.05,
                         help="tolerated drop of the monitored score (default: 0.05)")
    squeeze.add_argument("--monitor", choices=MONITORS, default="metric",
                         help="score watched by --delta: the task metric or the eval loss "
                              "(default: metric)")
    squeeze.add_argument("--target-ratio", type=_positive_float, default=None,
                         help="stop when parameters / original reach this (default: none)")
    squeeze.add_argument("--init-epochs", type=float, default=1.0,
                         help="LFA epochs before squeezing a pre-trained MODEL (default: 1)")
    squeeze.add_argument("--direct", action="store_true",
                         help="also run the direct-truncation ablation at the final bonds")
    squeeze.add_argument("--resume", action="store_true",
                         help="continue the run checkpointed in --out")
    _add_training(squeeze, epochs=1.0, default_out="mpotn-squeeze")

    compare = commands.add_parser(
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
    return parser


def _add_model_and_task(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", default=None,
        help="local model folder, hub id, or an earlier run's model/ folder (default: the "
             "embedded all-MiniLM-L6-v2)",
    )
    task = parser.add_argument_group("task (default: the shipped SST-2 sample, 2,000 "
                                     "training phrases and the 872-sentence dev set)")
    task.add_argument("--glue", default=None, metavar="TASK",
                      help="a GLUE task by name from the Hugging Face hub (needs a network)")
    task.add_argument("--train-file", default=None, help="local TSV/CSV/JSON(L) training file")
    task.add_argument("--eval-file", default=None, help="local evaluation file")
    task.add_argument("--text-column", default="sentence",
                      help="text column name, or 0-based position (default: sentence)")
    task.add_argument("--text-pair-column", default=None,
                      help="second text column for pair tasks (default: none)")
    task.add_argument("--label-column", default="label", help="label column (default: label)")
    task.add_argument("--no-header", action="store_true",
                      help="TSV/CSV files have no header row (columns by position)")
    task.add_argument("--regression", action="store_true", help="real-valued labels")


def _add_training(parser: argparse.ArgumentParser, epochs: float, default_out: str) -> None:
    train = parser.add_argument_group("training")
    train.add_argument("--lr", type=_positive_float, default=None,
                       help="learning rate (default per strategy: "
                            + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    train.add_argument("--central-lr", type=_positive_float, default=None,
                       help="learning rate of central tensors (default: --lr)")
    train.add_argument("--auxiliary-lr", type=_positive_float, default=None,
                       help="learning rate of auxiliary tensors (default: --lr)")
    train.add_argument("--epochs", type=_positive_float, default=epochs,
                       help=f"passes over the training set (default: {epochs:g})")
    train.add_argument("--max-steps", type=int, default=-1,
                       help="optimizer steps, overriding --epochs (default: -1, use epochs)")
    train.add_argument("--batch-size", type=int, default=32, help="default: 32")
    train.add_argument("--max-length", type=int, default=64,
                       help="tokens per example (default: 64)")
    train.add_argument("--seed", type=int, default=0, help="default: 0")
    train.add_argument("--train-limit", type=int, default=None,
                       help="use only the first N training examples (default: all)")
    train.add_argument("--eval-limit", type=int, default=None,
                       help="use only the first N evaluation examples (default: all)")
    train.add_argument("--out", default=default_out,
                       help=f"output folder (default: ./{default_out})")
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_core_changes(before: str, after: str, out: str) -> None:
    """Relative change of central and auxiliary tensors between two saves of one model."""
    from mpotn.inspection import core_changes, snapshot_cores

    start, end = load(before), load(after)
    cores = snapshot_cores(start.base_model)
    if set(cores) != set(snapshot_cores(end.base_model)):
        raise ValueError(f"{before} and {after} do not hold the same MPO layers")
    for name, layer in end.mpo_layers().items():
        if [tuple(c.shape) for c in cores[name]] != [tuple(c.shape) for c in layer.cores]:
            raise ValueError(f"{name} has other bond dimensions in {after} than in {before}; "
                             "compare saves made before any cut")
    table = core_changes(cores, end.base_model)
    print(table.to_markdown(floatfmt=".4g"))
    write_text(Path(out) / "core_changes.csv", table.to_csv())
    print(f"\nwrote {out}/core_changes.csv")


def run_inspect(args: argparse.Namespace) -> None:
    """Load the model, inspect it, print the table and write the files."""
    from mpotn.inspection import inspect_model
    from mpotn.models import load_model, resolve_model, weight_matrices

    if args.changes:
        run_core_changes(*args.changes, args.out)
        return
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


def _column(value: str | None) -> str | int | None:
    return int(value) if value is not None and value.isdigit() else value


def load_task(args: argparse.Namespace) -> TaskData:
    """The task named by the command line (default: the shipped SST-2 sample)."""
    if args.glue and (args.train_file or args.eval_file):
        raise ValueError("give --glue or --train-file/--eval-file, not both")
    if args.glue:
        return load_glue(args.glue)
    if args.train_file or args.eval_file:
        if not (args.train_file and args.eval_file):
            raise ValueError("local data needs both --train-file and --eval-file")
        return load_local(args.eval_file, args.train_file, text=_column(args.text_column),
                          text_pair=_column(args.text_pair_column),
                          label=_column(args.label_column), header=not args.no_header,
                          regression=args.regression)
    return sst2_sample()


def training_config(args: argparse.Namespace, strategy: str, **extra: object) -> TrainingConfig:
    """The :class:`TrainingConfig` of the command line's training options."""
    return TrainingConfig(
        strategy=strategy, lr=args.lr, central_lr=args.central_lr,
        auxiliary_lr=args.auxiliary_lr, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
        train_limit=args.train_limit, eval_limit=args.eval_limit, **extra,
    )


def _print_record(record: dict, title: str) -> None:
    print(f"\n{title}")
    print(Table([{k: v for k, v in record.items() if not isinstance(v, dict)}]).to_markdown())


def run_finetune(args: argparse.Namespace) -> None:
    """Prepare the model for the strategy, fine-tune, evaluate, write the run."""
    data = load_task(args)
    config = training_config(args, args.strategy, k=args.k, lora_rank=args.lora_rank)
    compression = {k: v for k, v in (("ratio", args.ratio), ("max_bond", args.max_bond))
                   if v is not None}
    model, tokenizer = prepare_model(args.model, data, config, targets=args.targets,
                                     compression=compression,
                                     compress_model=args.compress or None,
                                     progress=not args.no_progress)
    result = finetune(model, tokenizer, data, config, progress=not args.no_progress)
    paths = write_run(result, tokenizer, args.out, f"fine-tuning ({args.strategy})")
    _print_record(result.record, f"{data.spec.name}, strategy {args.strategy}:")
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")


def run_squeeze(args: argparse.Namespace) -> None:
    """Fine-tune first if needed, squeeze, optionally run the direct ablation."""
    data = load_task(args)
    types = None if args.types == ["all"] else args.types
    config = SqueezeConfig(types=types, cut=args.cut, budget=args.budget or None,
                           steps_per_cut=args.steps_per_cut,
                           max_cuts=args.max_cuts, delta=args.delta, monitor=args.monitor,
                           target_ratio=args.target_ratio)
    training = training_config(args, "lfa")
    squeezer = Squeezer(None, None, data, config, training, args.out,
                        progress=not args.no_progress)
    if args.resume:
        if not squeezer.has_checkpoint():
            raise ValueError(f"nothing to resume: {args.out} holds no squeeze checkpoint; run "
                             "without --resume")
        squeezer.tokenizer = load_tokenizer(squeezer.checkpoints / "tokenizer")
    else:
        if squeezer.has_checkpoint():
            raise ValueError(f"{args.out} already holds a squeeze run; pass --resume to "
                             "continue it, or choose another --out")
        squeezer.model, squeezer.tokenizer = prepare_model(
            args.model, data, training, progress=not args.no_progress)
        if not is_saved_model(args.model or ""):
            init = dataclasses.replace(training, epochs=args.init_epochs, max_steps=-1)
            finetune(squeezer.model, squeezer.tokenizer, data, init,
                     progress=not args.no_progress)
        squeezer.tokenizer.save_pretrained(str(squeezer.checkpoints / "tokenizer"))
    result = squeezer.run(resume=args.resume)
    _print_record(result.record, f"squeezing: stopped by {result.record['stop_reason']}")
    print(result.history.select({k: k for k in (
        "step", "matrix", "dim", "new_dim", "estimated_error", "params_over_original",
        "loss", data.spec.metrics[0])}).to_markdown())
    if args.direct:
        start = load(squeezer.checkpoints / "step-0000")
        direct = direct_truncation(start, squeezer.tokenizer, data, result.record["bond_dims"],
                                   squeezer.training, result.record["fine_tuning_steps"],
                                   progress=not args.no_progress)
        write_text(Path(args.out) / "direct" / "metrics.json", json.dumps(direct, indent=2))
        _print_record(direct, "direct truncation to the same bonds:")
    print(f"\nwrote {args.out}/metrics.json, history.csv, history.json, cuts.csv, "
          "history.png, model/")


def run_compare(args: argparse.Namespace) -> None:
    """Decompose the matrix with every method and ratio; print and write the table and plot."""
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mpotn`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            run_inspect(args)
        elif args.command == "compress":
            run_compress(args)
        elif args.command == "finetune":
            run_finetune(args)
        elif args.command == "squeeze":
            run_squeeze(args)
        elif args.command == "compare":
            run_compare(args)
    except ValueError as error:
        print(f"mpotn {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
