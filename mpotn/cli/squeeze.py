"""``mpotn squeeze``: dimension squeezing of a fine-tuned MPO model (Algorithm 2).

The squeezing options, their defaults and help texts are the fields of
[mpotn.finetune.squeeze.SqueezeConfig][] (one source), as
[ConfigOption][mpotn.cli.common.ConfigOption]s, as ``mpotn heal`` does with its config.
A *step* is one round of Algorithm 2 and a *cut* one matrix's bond lowered once;
the flags of earlier versions, ``--steps-per-cut`` and ``--max-cuts``, are still
accepted (unlisted) for ``--training-steps`` and ``--step-limit``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from mpotn.cli import common
from mpotn.types import MONITORS

#: ``SqueezeConfig`` field -> (flag, argparse keywords).
OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "types": ("--types", {"nargs": "+", "metavar": "TYPE"}),
    "cut": ("--cut", {"type": common._positive_float}),
    "budget": ("--budget", {"type": float}),
    "training_steps": ("--training-steps", {"type": int, "metavar": "N"}),
    "step_limit": ("--step-limit", {"type": int, "metavar": "N"}),
    "delta": ("--delta", {"type": float}),
    "monitor": ("--monitor", {"choices": MONITORS}),
    "target_ratio": ("--target-ratio", {"type": common._positive_float}),
}
#: Flags of earlier versions, still accepted: old flag -> ``SqueezeConfig`` field.
OLD_FLAGS = {"--steps-per-cut": "training_steps", "--max-cuts": "step_limit"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mpotn squeeze`` to ``subparsers``."""
    squeeze = subparsers.add_parser(
        "squeeze",
        help="compress a fine-tuned MPO model gradually by dimension squeezing (Algorithm 2)",
        description=(
            "Algorithm 2: repeatedly cut the central bond of the matrix whose cut has the "
            "least estimated error (Eq. 3 from stored singular values), fine-tune the "
            "auxiliary tensors, evaluate, and stop when the score drops by more than "
            "--delta, at --target-ratio, or after --step-limit steps. MODEL is the model/ "
            "folder of `mpotn finetune --strategy lfa`, or a pre-trained model, which is then "
            "decomposed at full rank and LFA-fine-tuned for --init-epochs first. Every "
            "step is checkpointed; --resume continues a stopped run (on the --device given "
            "now). Fine-tunes on --device (default: CUDA when present). Writes metrics.json, "
            "history.csv/json, history.png and model/ to --out."
        ),
    )
    common._add_model_and_task(squeeze)
    group = squeeze.add_argument_group("squeezing")
    common.add_config_options(group, "mpotn.finetune.squeeze:SqueezeConfig", OPTIONS)
    for flag, field in OLD_FLAGS.items():
        group.add_argument(flag, dest=field, type=int, help=argparse.SUPPRESS,
                           default=argparse.SUPPRESS)
    squeeze.add_argument("--init-epochs", type=common._positive_float, default=1.0,
                         help="LFA epochs before squeezing a pre-trained MODEL (default: 1)")
    squeeze.add_argument("--direct", action="store_true",
                         help="also run the direct-truncation ablation at the final bonds")
    squeeze.add_argument("--resume", action="store_true",
                         help="continue the run checkpointed in --out")
    common._add_training(squeeze, epochs=None, default_out="mpotn-squeeze")  # steps: its own


def run(args: argparse.Namespace) -> None:
    """Fine-tune first if needed, squeeze, optionally run the direct ablation."""
    from mpotn.atomic import atomic_dir, check_writable, write_output
    from mpotn.compression import is_saved_model, load
    from mpotn.compression.models import load_tokenizer
    from mpotn.devices import check_device
    from mpotn.finetune.squeeze import SqueezeConfig, Squeezer, check_types, direct_truncation
    from mpotn.finetune.training import finetune, is_main_process, prepare_model, trainer_device

    common.check_out(args.out)
    check_device(args.device)
    common.check_not_input(Path(args.out) / "model", args.model)
    check_writable(Path(args.out) / "model", args.overwrite)
    data = common.load_task(args)
    settings = common.config_settings(args, OPTIONS)
    if settings.get("types") == ["all"]:
        settings["types"] = None  # every MPO layer
    if settings.get("budget") == 0:
        settings["budget"] = None  # one matrix per step
    config = SqueezeConfig(**settings)
    training = common.training_config(args, "lfa")
    squeezer = Squeezer(None, None, data, config, training, args.out,
                        progress=not args.no_progress, overwrite=args.overwrite)
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
        check_types(squeezer.model, config)  # before the first fine-tuning
        if not is_saved_model(args.model or ""):
            init = dataclasses.replace(training, epochs=args.init_epochs, max_steps=-1)
            finetune(squeezer.model, squeezer.tokenizer, data, init,
                     progress=not args.no_progress)
        if is_main_process():
            with atomic_dir(squeezer.checkpoints / "tokenizer") as tmp:
                squeezer.tokenizer.save_pretrained(str(tmp))
    result = squeezer.run(resume=args.resume)
    main = is_main_process()  # in a distributed launch, the main process writes and reports
    if main:
        common._print_record(result.record,
                             f"squeezing: stopped by {result.record['stop_reason']}")
        print(result.history.select({k: k for k in (
            "step", "matrix", "dim", "new_dim", "estimated_error", "params_over_original",
            "loss", data.spec.metrics[0])}).to_markdown())
    if args.direct:  # every process trains
        start = load(squeezer.checkpoints / "step-0000", device=trainer_device(training.device))
        direct = direct_truncation(start, squeezer.tokenizer, data, result.record["bond_dims"],
                                   squeezer.training, result.record["fine_tuning_steps"],
                                   progress=not args.no_progress)
        if main:
            write_output(Path(args.out) / "direct" / "metrics.json",
                         json.dumps(direct, indent=2))
            common._print_record(direct, "direct truncation to the same bonds:")
    if main:
        print(f"\nwrote {args.out}/metrics.json, history.csv, history.json, cuts.csv, "
              "history.png, model/")
