"""``mpotn compress``: replace a model's matrices by MPO layers and save it."""

from __future__ import annotations

import argparse
import time
from typing import Any

from mpotn.cli.common import (
    _cores,
    _count,
    _positive_float,
    _positive_int,
    check_data_dir,
    check_fidelity,
    check_out,
    fidelity_probe,
)
from mpotn.types import (
    ALLOCATIONS,
    BUDGETS,
    CALIBRATION_SAMPLES,
    FITS,
    SHARE_INITS,
    STRUCTURES,
    SVD_METHODS,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mpotn compress`` to ``subparsers``."""
    compress = subparsers.add_parser(
        "compress",
        help="replace a model's matrices by MPO layers and save the compressed model",
        description=(
            "Decompose the targeted matrices of MODEL into MPOs (by default the truncated "
            f"SVD, calibrated on {CALIBRATION_SAMPLES} sentences so that each matrix keeps its "
            "outputs; "
            "--no-calibrate for the paper's weight truncation of balanced MPOs), truncate "
            "them by one policy, print the report (shape, factorization, bonds, ratio, "
            "central-bond entropy, Eq. 4 bound and actual error per matrix; #To and #Pr "
            "totals), and save the model to --out with report.md, report.json and plots. "
            "Load it back with mpotn.load(OUT)."
        ),
    )
    compress.add_argument(
        "model", nargs="?", default=None,
        help="local model folder or hub id (default: the embedded all-MiniLM-L6-v2)",
    )
    compress.add_argument(
        "--targets", nargs="+", default=None, metavar="T",
        help="presets (embeddings, attention, ffn, all-linear) and module-name suffixes "
             "(default: all-linear embeddings; attention ffn with --share-centrals, ffn "
             "with --experts)",
    )
    compress.add_argument(
        "--regex", default=None, help="a regular expression for module names, instead of --targets"
    )
    compress.add_argument("--exclude", nargs="+", default=None, metavar="T",
                          help="presets or suffixes to leave alone")
    compress.add_argument("--n", type=_cores, default=None,
                          help="cores per matrix of a balanced MPO (default: 5); an SVD "
                               "(--structure svd, the default when calibrating) has 2")
    compress.add_argument(
        "--method", default="mpo", metavar="NAME",
        help="the decomposition of each matrix: mpo, or another registered method to compare "
             "with it (svd, tt, tucker, cp), fitted to the weights and truncated by --ratio "
             "(default: mpo)")
    policy = compress.add_mutually_exclusive_group()
    policy.add_argument("--ratio", type=_positive_float,
                        help="compression ratio rho, Eq. 5: of all targets together with "
                             "--budget model, of each matrix with --budget matrix (default: "
                             "0.5; full rank with --share-centrals or --experts)")
    policy.add_argument("--max-bond", type=_positive_int, help="one maximum for every bond")
    policy.add_argument("--tol", type=_positive_float,
                        help="relative error tolerance: fewest parameters with Eq. 4 <= tol")
    policy.add_argument("--full-rank", action="store_true",
                        help="no truncation (exact: balanced MPOs, nothing to calibrate)")
    compress.add_argument(
        "--allocation", choices=ALLOCATIONS, default="optimal",
        help="how a --ratio budget is spread over bonds (default: optimal, minimising Eq. 4)",
    )
    compress.add_argument(
        "--structure", choices=STRUCTURES, default=None,
        help="mpo: --n cores with balanced factors; svd: the truncated SVD (an MPO with rows "
             "(I, 1) and columns (1, J)); auto: per matrix, the one with the lower error at "
             "the same parameter count (default: svd when calibrating, the structure that "
             "keeps a compressed model working best in docs/compression.md; mpo with "
             "--no-calibrate, --share-centrals or --experts)")
    compress.add_argument(
        "--budget", choices=BUDGETS, default=None,
        help="matrix: --ratio applies to each matrix; model: one budget for all targets, "
             "spent where it lowers the summed (weighted) relative error most (default: model "
             "when calibrating --method mpo by a ratio with --allocation optimal, without "
             "--share-centrals or --experts, with --sensitivity: the best measured in "
             "docs/compression.md; matrix otherwise)")
    compress.add_argument(
        "--keep-dense", action="store_true",
        help="with --budget model: leave a matrix dense where its share of the budget would "
             "be a factorization as large as the matrix or larger (a truncated SVD above "
             "rank IJ/(I+J)), and spend the difference elsewhere")
    compress.add_argument(
        "--sensitivity", action=argparse.BooleanOptionalAction, default=None,
        help="with --budget model and calibration: weigh each matrix's error by its measured "
             "effect on the model's outputs (one forward pass over 64 calibration sentences "
             "per matrix) instead of summing relative errors (default: on with --budget model "
             "when calibrating)")
    calibration = compress.add_mutually_exclusive_group()
    calibration.add_argument(
        "--calibrate", nargs="?", const="", default="", metavar="SOURCE",
        help="truncate to minimise each matrix's output error on real inputs (SPEC Eq. 7) "
             "instead of its weight error: SOURCE is a GLUE task name (with --data-dir, or "
             "from the hub), a .txt file with one sentence per line, or nothing for the "
             "shipped SST-2 training sample (default: calibrate on that sample)")
    calibration.add_argument(
        "--no-calibrate", dest="calibrate", action="store_const", const=None,
        help="truncate the weights as the paper does (Eq. 4), without calibration text")
    compress.add_argument("--samples", type=_positive_int, default=None,
                          help=f"calibration sentences (default: {CALIBRATION_SAMPLES})")
    compress.add_argument("--data-dir", default=None, metavar="DIR",
                          help="folder in GLUE's layout for --calibrate TASK")
    compress.add_argument(
        "--fit", choices=FITS, default=None,
        help="how a calibrated balanced MPO is fitted: als (alternating least squares on the "
             "output error) or whiten (Kronecker-factored whitening) (default: als)")
    compress.add_argument("--calibrate-embeddings", action=argparse.BooleanOptionalAction,
                          default=None,
                          help="also calibrate embeddings (token counts of the calibration "
                               "text; tokens it never uses lose their rows) (default: yes "
                               "when calibrating)")
    compress.add_argument(
        "--sequential", action="store_true",
        help="fit the matrices in the order the model runs them, each to the original's "
             "outputs from the inputs the compressed layers before it give; a matrix with "
             "fewer than 10 calibration rows per input keeps the plain fit (use e.g. "
             "--samples 2000 for MiniLM); runs the model twice per group of matrices")
    compress.add_argument(
        "--calibration-memory", type=_positive_float, default=4.0, metavar="GIB",
        help="GiB of input second moments (8 I^2 bytes per matrix of I inputs) to hold at "
             "once; a model that needs more is calibrated in groups of matrices that fit, one "
             "pass over the calibration text per group, with the same result; --budget model "
             "keeps at most as many GiB of decompositions for its fits, with or without "
             "calibration, and decomposes the others again (default: 4)")
    compress.add_argument("--svd", choices=SVD_METHODS, default="auto",
                          help="SVD flavour of the decomposition (default: auto)")
    shared = compress.add_argument_group(
        "one central tensor for many matrices (MPOBERT, MPOE; balanced MPOs at full rank "
        "and no calibration unless --max-bond; heal the result with mpotn heal)")
    shared.add_argument(
        "--share-centrals", choices=SHARE_INITS, default=None, metavar="INIT",
        help="MPOBERT: one central tensor per matrix type (and stack) shared by all layers, "
             "each layer keeping its auxiliary tensors; fit: fitted to every layer (ALS), layer: "
             "layer 0's (the reference code). The layers' bonds must be equal: full rank "
             "by default, --max-bond, or --ratio with --allocation uniform")
    shared.add_argument("--share-sweeps", type=_count, default=None,
                        help="ALS sweeps of --share-centrals fit (default: 5)")
    shared.add_argument(
        "--deepen", type=_positive_int, default=None, metavar="DEPTH",
        help="with --share-centrals: insert layers sharing the centrals (auxiliary tensors "
             "copied from their neighbours) up to DEPTH layers")
    shared.add_argument(
        "--experts", type=_positive_int, default=None, metavar="E",
        help="MPOE: each compressed FFN block becomes E routed experts sharing its central "
             "tensors, each with its own auxiliary tensors and a router (targets must "
             "include ffn)")
    shared.add_argument("--top-k", type=_positive_int, default=None,
                        help="experts per token with --experts (default: 2, or 1 for one expert)")
    compress.add_argument(
        "--device", default=None, metavar="DEVICE",
        help="where to calibrate, decompose and check the model: cpu, cuda or cuda:N "
             "(default: CUDA when present, else the CPU); a save made on any device loads on "
             "any device")
    compress.add_argument("--dry-run", action="store_true",
                          help="list what would be replaced, with sizes, and stop")
    compress.add_argument("--out", default="mpotn-compressed",
                          help="output folder (default: ./mpotn-compressed)")
    compress.add_argument("--overwrite", action="store_true",
                          help="save into --out even if it holds files mpotn did not write, "
                               "such as a Hugging Face model (they are kept; without this flag "
                               "that is an error)")
    compress.add_argument("--push-to-hub", default=None, metavar="REPO",
                          help="also upload the save, with a model card, to the Hugging Face "
                               "Hub repository REPO (user/name; created if missing, private "
                               "with --private; needs a login or HF_TOKEN)")
    compress.add_argument("--private", action="store_true",
                          help="with --push-to-hub: create the repository as private")
    compress.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _check_expert_targets(model: Any, config: Any) -> None:
    """Refuse ``--experts`` whose targets leave a feed-forward block without an MPO layer
    (the experts share its central tensors), before compressing."""
    from mpotn.compression.architectures import feed_forward_blocks

    selected = [name for name, _ in _selected(model, config)]  # the loaded, plain model
    bare = [block for block, _ in feed_forward_blocks(model)
            if not any(name.startswith(f"{block}.") for name in selected)]
    if bare:
        raise ValueError(f"--experts makes each feed-forward block's experts share the "
                         f"central tensors of its compressed matrices, but --targets leaves "
                         f"{len(bare)} blocks uncompressed ({', '.join(bare[:3])}); add ffn "
                         "to --targets")


def _selected(model: Any, config: Any) -> list[tuple[str, Any]]:
    """The targets ``config`` selects, quietly (compress itself warns about what it
    skips)."""
    import warnings

    from mpotn.compression.config import select_targets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return select_targets(model, config)


def _check_calibrated_targets(model: Any, config: Any) -> None:
    """Refuse calibration text no target would use (embeddings only, not calibrated),
    before compressing."""
    from mpotn.compression.architectures import is_linear

    if not any(is_linear(module) for _, module in _selected(model, config)):
        raise ValueError("the targets are embeddings only and --no-calibrate-embeddings "
                         "leaves them uncalibrated, so no target uses the calibration text: "
                         "drop --no-calibrate-embeddings, or pass --no-calibrate")


def _check_sharing(args: argparse.Namespace) -> None:
    """Refuse sharing options that do not go together, before any work."""
    if args.deepen is not None and args.share_centrals is None:
        raise ValueError("--deepen inserts layers that share the central tensors: add "
                         "--share-centrals fit (or layer)")
    if args.experts is not None and args.share_centrals is not None:
        raise ValueError("--experts (MPOE) and --share-centrals (MPOBERT) build different "
                         "architectures; choose one")
    unequal = [flag for flag, given in (
        ("--tol", args.tol is not None),
        ("--ratio with --allocation optimal", args.ratio is not None
         and args.allocation == "optimal"),
        ("--budget model", args.budget == "model"), ("--structure auto", args.structure == "auto"))
        if given]
    if args.share_centrals is not None and unequal:
        raise ValueError(f"--share-centrals needs equal bonds in every layer of a matrix type, "
                         f"which {' and '.join(unequal)} do not give: full rank is the default "
                         "with --share-centrals; or pass --max-bond, or --ratio with "
                         "--allocation uniform")
    if args.keep_dense and args.budget != "model":
        raise ValueError("--keep-dense lets one model-wide budget leave matrices dense: "
                         "add --budget model")
    if args.sensitivity and args.budget != "model":
        raise ValueError("--sensitivity weighs the matrices of one model-wide budget against "
                         "each other: add --budget model")
    if args.keep_dense and (args.experts is not None or args.share_centrals is not None):
        raise ValueError("--experts and --share-centrals share the central tensor of every "
                         "target's MPO, which a matrix kept dense does not have: drop "
                         "--keep-dense")
    if args.share_sweeps is not None and args.share_centrals != "fit":
        raise ValueError("--share-sweeps sets the ALS sweeps of --share-centrals fit")
    if args.top_k is not None and (args.experts is None or args.top_k > args.experts):
        raise ValueError(f"--top-k {args.top_k} needs --experts E with E >= {args.top_k}")
    if args.method != "mpo" and (args.share_centrals or args.experts or args.structure
                                 or args.sequential or args.budget != "matrix"):
        raise ValueError(f"--method {args.method} builds one network per matrix: --structure, "
                         "--sequential, --budget model, --share-centrals and --experts apply "
                         "to --method mpo")
    if args.structure in ("svd", "auto") and (args.share_centrals or args.experts):
        raise ValueError(f"sharing central tensors needs balanced MPOs: drop --structure "
                         f"{args.structure} (or pass --structure mpo)")


def _share(model: object, args: argparse.Namespace) -> None:
    """Apply ``--share-centrals`` / ``--deepen`` / ``--experts`` to the compressed model in
    place and print what each did."""
    from mpotn.compression import deepen, share_centrals, upcycle_experts
    from mpotn.table import Table

    if args.share_centrals is not None:
        sweeps = {} if args.share_sweeps is None else {"sweeps": args.share_sweeps}
        table = share_centrals(model, init=args.share_centrals, **sweeps)
        groups = Table(row for row in table if row["kind"] == "group")
        print(f"\nshared central tensors ({args.share_centrals} init), one per matrix type "
              "(and stack) over the layers; relative error of each group's matrices:")
        print(groups.select({"group": "group", "name": "layers",
                             "layer_init_error": "error, layer 0's central",
                             "error": "error", "central_params": "|C|",
                             "saved_params": "saved"}).to_markdown())
    if args.deepen is not None and deepen(model, depth=args.deepen):
        print(f"\ndeepened to {args.deepen} layers (new layers share the centrals)")
    if args.experts is not None:
        top_k = min(2, args.experts) if args.top_k is None else args.top_k
        upcycle_experts(model, experts=args.experts, top_k=top_k)
        print(f"\n{args.experts} experts per FFN block sharing its central tensors, "
              f"top-{top_k} routing")


def _resolve_budget(args: argparse.Namespace) -> None:
    """Fill in ``--budget`` and ``--sensitivity`` where not given: a model budget weighted
    by sensitivity when calibrating balanced or SVD MPOs by a ratio (optimal allocation),
    outside sharing (the best fidelity measured, ``benchmarks/fidelity_calibrated.py``);
    per matrix otherwise."""
    if args.budget is None:
        by_ratio = (args.max_bond is None and args.tol is None and not args.full_rank
                    and args.allocation == "optimal")
        args.budget = ("model" if args.calibrate is not None and args.method == "mpo"
                       and by_ratio and args.share_centrals is None and args.experts is None
                       else "matrix")
    if args.sensitivity is None:
        args.sensitivity = args.budget == "model" and args.calibrate is not None


def _check_can_push() -> None:
    """Refuse ``--push-to-hub`` before any work when it cannot succeed: offline, or without
    a Hub login."""
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ValueError("--push-to-hub needs the network, but HF_HUB_OFFLINE is set; unset "
                         "it, or drop --push-to-hub and upload the save later")
    if huggingface_hub.get_token() is None:
        raise ValueError("--push-to-hub needs a Hub login: run `hf auth login` or set "
                         "HF_TOKEN, or drop --push-to-hub and upload the save later")


def run(args: argparse.Namespace) -> None:
    """Compress the model, print the report and its expected fidelity, save weights, report
    and plots."""
    from mpotn.analysis.reports import report_table, write_compression_report
    from mpotn.compression import CompressionConfig, compress, plan
    from mpotn.compression.calibrate import text_batches
    from mpotn.compression.models import load_pretrained, load_tokenizer
    from mpotn.compression.serialization import HUB_ID, check_save_target, is_saved_model
    from mpotn.data import texts
    from mpotn.devices import resolve_device

    start = time.perf_counter()
    if args.model is not None and is_saved_model(args.model):
        raise ValueError(f"{args.model} is already a compressed model (an mpotn save); compress "
                         "the original model instead, or cut this one further with mpotn "
                         "squeeze")
    if args.private and not args.push_to_hub:
        raise ValueError("--private applies to --push-to-hub REPO")
    if args.push_to_hub and args.dry_run:
        raise ValueError("--dry-run saves nothing, so there is nothing to --push-to-hub")
    if args.push_to_hub and not HUB_ID.fullmatch(args.push_to_hub):
        raise ValueError(f"--push-to-hub takes a Hub repository such as user/minilm-mpo, got "
                         f"{args.push_to_hub!r}")
    if args.push_to_hub:
        _check_can_push()
    if args.sequential and args.calibrate is None:
        raise ValueError("--sequential fits each matrix to the original's outputs on the "
                         "calibration text: drop --no-calibrate, or drop --sequential")
    uncalibrated = [flag for flag, given in (
        ("--samples", args.samples is not None), ("--fit", args.fit is not None),
        ("--calibrate-embeddings", args.calibrate_embeddings)) if given]
    if args.calibrate is None and uncalibrated:
        raise ValueError(f"{', '.join(uncalibrated)} set how the calibration text is used: "
                         "drop --no-calibrate, or drop them")
    calibration_flags = [flag for flag, given in (
        (f"--calibrate {args.calibrate}", bool(args.calibrate)),
        ("--samples", args.samples is not None), ("--fit", args.fit is not None),
        ("--calibrate-embeddings", bool(args.calibrate_embeddings)),
        ("--sensitivity", bool(args.sensitivity)), ("--sequential", args.sequential))
        if given]  # as given: before the defaults
    if args.method != "mpo" and calibration_flags:
        raise ValueError(f"--method {args.method} is fitted to the weights; "
                         f"{', '.join(calibration_flags)} apply to --method mpo")
    check_data_dir(args.data_dir, args.calibrate, "--calibrate")
    _resolve_budget(args)
    if args.sensitivity and args.calibrate is None:
        raise ValueError("--sensitivity measures each matrix's effect on the model's outputs "
                         "on the calibration text: drop --no-calibrate, or drop --sensitivity")
    _check_sharing(args)
    device = resolve_device(args.device)
    if not args.dry_run:
        check_out(args.out)
        check_save_target(args.out, args.overwrite)
    policy = {"max_bond": args.max_bond, "tol": args.tol, "ratio": args.ratio}
    sharing = args.share_centrals is not None or args.experts is not None
    full_rank = args.full_rank or (sharing and all(v is None for v in policy.values()))
    if not full_rank and all(v is None for v in policy.values()):
        policy["ratio"] = 0.5
    # calibration changes nothing at full rank, where the decomposition is exact; other
    # methods are fitted to the weights
    calibrating = args.calibrate is not None and not full_rank and args.method == "mpo"
    targets = args.targets or (["attention", "ffn"] if args.share_centrals
                               else ["ffn"] if args.experts else ["all-linear", "embeddings"])
    structure = args.structure or ("svd" if calibrating and not sharing else "mpo")
    if args.n is not None and structure == "svd" and args.method == "mpo":
        raise ValueError(f"--n {args.n} shapes a balanced MPO, but the matrices get the SVD "
                         "structure (n = 2; the default when calibrating): pass --structure "
                         "mpo (or auto) with --n, or drop --n")
    config = CompressionConfig(
        targets=args.regex or targets, exclude=args.exclude,
        n=5 if args.n is None else args.n, method=args.method,
        allocation=args.allocation, svd=args.svd, structure=structure,
        budget=args.budget, keep_dense=args.keep_dense, sensitivity=args.sensitivity,
        fit=args.fit or "als", sequential=args.sequential,
        calibrate_embeddings=(calibrating if args.calibrate_embeddings is None
                              else args.calibrate_embeddings), **policy,
    )
    model = load_pretrained(args.model)
    name = args.model or "all-MiniLM-L6-v2 (embedded)"
    print(f"loaded {name} as {type(model).__name__} (its config's architecture)"
          + ("" if args.dry_run else f" on {device}"))
    layers = getattr(model.config, "num_hidden_layers", None)
    if args.deepen is not None and layers is not None and args.deepen < layers:
        raise ValueError(f"--deepen {args.deepen} is below the model's {layers} layers: "
                         "deepening only adds layers")
    if args.experts is not None:
        _check_expert_targets(model, config)
    if calibrating and not config.calibrate_embeddings:
        _check_calibrated_targets(model, config)
    if args.dry_run:
        print(plan(model, config).to_markdown())
        return
    model.to(device)
    tokenizer = load_tokenizer(args.model)
    probe = fidelity_probe(model, tokenizer)
    batches = None
    if calibrating:
        sentences = texts(args.calibrate or None, samples=args.samples or CALIBRATION_SAMPLES,
                          data_dir=args.data_dir)
        batches = text_batches(tokenizer, sentences)
        print(f"calibrating on {len(sentences)} sentences of "
              f"{args.calibrate or 'the shipped SST-2 training sample'}")
    compressed = compress(model, config, calibration=batches, progress=not args.no_progress,
                          calibration_memory=args.calibration_memory * 2**30).eval()
    _share(compressed, args)
    print(f"model: {name}")
    print(report_table(compressed))
    print(compressed.summary())
    fidelity = (None if probe is None else
                check_fidelity(compressed, probe, calibrated=batches is not None or sharing
                               or args.method != "mpo"))
    compressed.save_pretrained(args.out, overwrite=args.overwrite, tokenizer=tokenizer)
    paths = write_compression_report(compressed, args.out, name, fidelity)
    kept = sum(row.get("structure") == "dense" for row in compressed.report())
    print(f"\ncompressed {len(compressed.report()) - kept} matrices"
          f"{f' (kept {kept} dense)' if kept else ''} in "
          f"{time.perf_counter() - start:.1f} s; "
          f"saved the model to {args.out} (load it with mpotn.load({args.out!r})); wrote:")
    for path in paths.values():
        print(f"  {path}")
    if args.push_to_hub:
        from huggingface_hub.errors import HfHubHTTPError
        try:
            commit = compressed.push_to_hub(args.push_to_hub, tokenizer=tokenizer,
                                            private=args.private or None)
        except (HfHubHTTPError, OSError) as error:
            raise ValueError(f"pushing to {args.push_to_hub} failed ({error}); the save is in "
                             f"{args.out}: push it with mpotn.load({args.out!r}).push_to_hub("
                             f"{args.push_to_hub!r})") from error
        print(f"pushed to the Hub: {getattr(commit, 'commit_url', commit)}")
