"""``mpotn finetune``: fine-tune a model on a task with one strategy."""

from __future__ import annotations

import argparse

from mpotn.cli import common
from mpotn.types import CALIBRATION_SAMPLES, DEFAULT_TARGETS, FACTORIZE_FITS, STRATEGIES

#: Default of ``--save-steps`` (``mpotn.finetune.training.SAVE_STEPS``, which the parser does
#: not import: building it imports nothing heavier than argparse).
SAVE_STEPS = 500


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mpotn finetune`` to ``subparsers``."""
    finetune = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on a task with one strategy (full, lfa, central, last-k, lora)",
        description=(
            "Fine-tune MODEL on a task with the transformers Trainer. lfa and central "
            "first decompose the attention and FFN matrices (--targets) into MPOs "
            "(full rank unless --ratio / --max-bond) and train the auxiliary (lfa) or "
            "central tensors only, on --device (default: CUDA when present). Trainer "
            "checkpoints go to OUT/checkpoints (every --save-steps steps and at the end, the "
            "last two kept); --resume continues a stopped run. Writes metrics.json (metric, "
            "trainable and total parameters, wall time), history.csv/json, history.png and "
            "model/ (or, with --adapter-only, adapter/) to --out."
        ),
    )
    common._add_model_and_task(finetune)
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
    cut.add_argument("--ratio", type=common._positive_float, default=None,
                     help="compress the MPO matrices to this rho first (default: full rank)")
    cut.add_argument("--max-bond", type=common._positive_int, default=None,
                     help="compress the MPO matrices to this bond first (default: full rank)")
    finetune.add_argument("--adapter-only", action="store_true",
                          help="save only what training changed, to OUT/adapter, as an adapter "
                               "of MODEL, which must be a compressed save (mpotn compress "
                               "--out DIR); mpotn.load(OUT/adapter, base=MODEL) reads it")
    lpaf = finetune.add_argument_group(
        "LPAF: prune, then factorize (two runs: --prune, then --factorize on its model/)")
    lpaf.add_argument("--prune", type=common._open_share, default=None, metavar="SPARSITY",
                      help="prune this share of every --targets matrix while fine-tuning "
                           "(--strategy full; cubic schedule, 10%% warm-up, 20%% cool-down)")
    lpaf.add_argument("--prune-criterion", choices=("movement", "magnitude"), default=None,
                      help="rank entries by movement scores (first order) or by magnitude "
                           "(default: movement)")
    lpaf.add_argument("--factorize", type=common._open_share, default=None, metavar="RATIO",
                      help="first replace every --targets matrix by a truncated SVD of RATIO "
                           "of its size (see --factorize-fit)")
    lpaf.add_argument("--factorize-fit", choices=FACTORIZE_FITS, default=None,
                      help="with --factorize: whitened (SVD-LLM on --calibration-samples of "
                           "the task's training sentences: the pruned model's outputs kept "
                           "best), plain (the truncated SVD) or sparsity-aware (fitted to the "
                           "non-zero entries only; measured worse) (default: whitened)")
    lpaf.add_argument("--calibration-samples", type=common._positive_int, default=None,
                      metavar="N", help="with --factorize-fit whitened: sentences (default: "
                                        f"{CALIBRATION_SAMPLES})")
    lpaf.add_argument("--ssvd-iterations", type=common._count, default=None, metavar="N",
                      help="with --factorize-fit sparsity-aware: most fills (default: 50)")
    lpaf.add_argument("--mixed-rank", type=common._probability, default=None, metavar="P",
                      help="with --factorize: probability, falling to 0 over the first half "
                           "of the steps, that a factorized layer computes with its full-rank "
                           "matrix (default: 0.5; 0 turns mixed-rank fine-tuning off)")
    common._add_training(finetune, epochs=3.0, default_out="mpotn-finetune")
    checkpoints = finetune.add_argument_group("checkpoints")
    checkpoints.add_argument("--save-steps", type=common._positive_int, default=None,
                             metavar="N",
                             help=f"optimizer steps between checkpoints in OUT/checkpoints "
                                  f"(default: {SAVE_STEPS})")
    checkpoints.add_argument("--resume", action="store_true",
                             help="continue the run checkpointed in --out from its latest "
                                  "checkpoint (same model, task and settings; --device may "
                                  "change)")


def run(args: argparse.Namespace) -> None:
    """Prepare the model for the strategy, fine-tune, evaluate, write the run."""
    from pathlib import Path

    from mpotn.atomic import check_writable
    from mpotn.compression.calibrate import text_batches
    from mpotn.compression.lpaf import factorize_pruned
    from mpotn.compression.serialization import is_saved_model
    from mpotn.data.texts import texts
    from mpotn.devices import check_device
    from mpotn.finetune.mixed_rank import MixedRank
    from mpotn.finetune.pruning import GradualPruning
    from mpotn.finetune.training import (
        SAVE_STEPS,
        finetune,
        is_main_process,
        prepare_model,
        resume_checkpoint,
        trainer_device,
        write_run,
    )

    common.check_out(args.out)
    if args.prune is not None and (args.strategy != "full" or args.compress
                                   or args.factorize is not None):
        raise ValueError("--prune prunes a dense model while every parameter trains: use "
                         "--strategy full without --compress or --factorize (factorize the "
                         "pruned run's model/ in a second run)")
    if args.prune is not None and args.model is not None and is_saved_model(args.model):
        raise ValueError(f"--prune prunes a dense model, and {args.model} is an mpotn save "
                         "(compressed): give the dense model it came from")
    if args.prune is None and args.prune_criterion is not None:
        raise ValueError("--prune-criterion says how --prune ranks entries: give --prune too")
    shaping = {"--factorize-fit": args.factorize_fit, "--ssvd-iterations": args.ssvd_iterations,
               "--mixed-rank": args.mixed_rank,
               "--calibration-samples": args.calibration_samples}
    given = [flag for flag, value in shaping.items() if value is not None]
    if args.factorize is None and given:
        raise ValueError(f"{', '.join(given)} shape --factorize: give --factorize too")
    fit = args.factorize_fit or "whitened"
    if args.ssvd_iterations is not None and fit != "sparsity-aware":
        raise ValueError("--ssvd-iterations counts the fills of --factorize-fit sparsity-aware")
    if args.calibration_samples is not None and fit != "whitened":
        raise ValueError("--calibration-samples feeds --factorize-fit whitened")
    if args.factorize is not None and (args.compress or args.ratio or args.max_bond
                                       or args.strategy not in ("full", "lfa")):
        raise ValueError("--factorize makes the compressed model itself: drop --compress, "
                         "--ratio and --max-bond, and train it with --strategy full or lfa")
    if args.adapter_only and not (args.model and is_saved_model(args.model)):
        raise ValueError(
            f"--adapter-only needs MODEL to be a compressed save, the adapter's base; "
            f"{args.model or 'the embedded model'} is not one: compress it first "
            "(mpotn compress MODEL --out DIR) and fine-tune DIR")
    check_device(args.device)
    resume_checkpoint(args.out, args.resume)  # nothing to resume, or a run already there
    written = Path(args.out) / ("adapter" if args.adapter_only else "model")
    common.check_not_input(written, args.model)
    check_writable(written, args.overwrite)
    data = common.load_task(args)
    config = common.training_config(args, args.strategy, k=args.k, lora_rank=args.lora_rank)
    compression = {k: v for k, v in (("ratio", args.ratio), ("max_bond", args.max_bond))
                   if v is not None}
    factorize = args.factorize is not None
    model, tokenizer = prepare_model(args.model, data, config, targets=args.targets,
                                     compression=compression,
                                     compress_model=False if factorize else args.compress or None,
                                     progress=not args.no_progress)
    pruning = mixed_rank = None
    if args.prune is not None:
        pruning = GradualPruning(model, args.prune, args.prune_criterion or "movement",
                                 args.targets)
    if factorize:
        model.to(trainer_device(config.device))  # factorized where it will train
        sentences = args.calibration_samples or CALIBRATION_SAMPLES
        batches = (text_batches(tokenizer, texts(data, sentences), max_length=args.max_length)
                   if fit == "whitened" else None)
        model, pruned = factorize_pruned(
            model, args.factorize, args.targets, fit=fit, calibration=batches,
            progress=not args.no_progress,
            iterations=50 if args.ssvd_iterations is None else args.ssvd_iterations)
        p = 0.5 if args.mixed_rank is None else args.mixed_rank
        mixed_rank = MixedRank(model, pruned, p=p, seed=args.seed) if p > 0 else None
        del pruned  # the full-rank matrices live in the layers' buffers, or nowhere
    result = finetune(model, tokenizer, data, config, progress=not args.no_progress,
                      out=args.out, resume=args.resume, save_steps=args.save_steps or SAVE_STEPS,
                      pruning=pruning, mixed_rank=mixed_rank)
    if not is_main_process():
        return  # the main process of a distributed launch writes and reports the run
    paths = write_run(result, tokenizer, args.out, f"fine-tuning ({args.strategy})",
                      overwrite=args.overwrite, adapter_only=args.adapter_only)
    common._print_record(result.record, f"{data.spec.name}, strategy {args.strategy}:")
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
