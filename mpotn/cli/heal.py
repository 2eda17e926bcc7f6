"""``mpotn heal``: distil the original model into a compressed one on unlabelled text.

The training options and their help texts are the fields of
[mpotn.finetune.heal.HealConfig][] (one source of defaults), as
[ConfigOption][mpotn.cli.common.ConfigOption]s: their help is read from it only
when shown, and an option left out keeps the config's default, so building the
parser still imports nothing heavier than argparse.
"""

from __future__ import annotations

import argparse
from typing import Any

from mpotn.cli import common
from mpotn.types import HEAL_TRAIN

#: ``HealConfig`` field -> (flag, argparse keywords).
OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "steps": ("--steps", {"type": common._positive_int, "metavar": "N"}),
    "train": ("--train", {"choices": HEAL_TRAIN}),
    "learning_rate": ("--lr", {"type": common._positive_float, "metavar": "LR"}),
    "logits_weight": ("--logits-weight", {"type": float, "metavar": "W"}),
    "batch_size": ("--batch-size", {"type": int}),
    "max_length": ("--max-length", {"type": int}),
    "warmup_ratio": ("--warmup-ratio", {"type": float}),
    "dropout": ("--dropout", {"nargs": 0}),
    "heldout": ("--heldout", {"type": int, "metavar": "N"}),
    "save_steps": ("--save-steps", {"type": int}),
    "logging_steps": ("--logging-steps", {"type": int}),
    "seed": ("--seed", {"type": int}),
    "device": ("--device", {"metavar": "DEVICE"}),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mpotn heal`` to ``subparsers``."""
    heal = subparsers.add_parser(
        "heal",
        help="recover a compressed model's accuracy by distilling the original into it",
        description=(
            "Healing (SPEC §7): train a compressed model (MODEL, a folder saved by mpotn "
            "compress, finetune or squeeze) to reproduce the hidden states of the model it "
            "was compressed from (--teacher) at every layer, on unlabelled text: the "
            "squared error per layer, normalised by the teacher's mean square and averaged "
            "over layers (plus --logits-weight times the logits' MSE). Trains the auxiliary "
            "tensors (with biases and norms) or all parameters with the transformers "
            "Trainer, on --device (default: CUDA when present). Checkpoints go to "
            "OUT/checkpoints; --resume continues a stopped run. Writes OUT/model/, "
            "OUT/metrics.json (hidden-state error before and after on held-out sentences, "
            "steps, seconds, trainable parameters), OUT/history.csv and OUT/fidelity.json "
            "(the expected fidelity before and after, as mpotn compress prints it: mean "
            "cosine of sentence embeddings against the teacher's and, for a causal LM, "
            "perplexity; with a warning when the model is not usable as it is)."
        ),
    )
    heal.add_argument("model", help="the compressed model: a folder saved by mpotn")
    heal.add_argument("--out", required=True, help="output folder")
    heal.add_argument("--overwrite", action="store_true",
                      help="write OUT/model/ even if it holds files mpotn did not write (they "
                           "are kept; without this flag that is an error)")
    heal.add_argument(
        "--teacher", default=None,
        help="the original model: local folder or hub id (default: the embedded "
             "all-MiniLM-L6-v2). It must be the model that MODEL was compressed from",
    )
    text = heal.add_argument_group("texts (default: the shipped SST-2 sample sentences)")
    text.add_argument("--texts", default=None, metavar="SOURCE",
                      help="a GLUE task name (its training sentences) or a .txt file with one "
                           "sentence per line")
    text.add_argument("--samples", type=common._positive_int, default=None,
                      help="use a seeded random subset of this many sentences (default: all "
                           "of them; varied text heals best: 1,000 steps on 16,000 SST-2 "
                           "sentences beat the same steps on 2,000, docs/compression.md)")
    text.add_argument("--data-dir", default=None,
                      help="folder in GLUE's glue_data/ layout, for a GLUE task name "
                           "(default: the hub)")
    common.add_config_options(heal.add_argument_group("training"),
                              "mpotn.finetune.heal:HealConfig", OPTIONS)
    heal.add_argument("--resume", action="store_true",
                      help="continue the run checkpointed in --out (with the same texts)")
    heal.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> None:
    """Load the student and the teacher, heal, write the run and print a summary."""
    import json
    import os
    from pathlib import Path

    from mpotn.atomic import check_writable, write_output
    from mpotn.compression import is_saved_model, load
    from mpotn.compression.models import has_tokenizer, load_pretrained, load_tokenizer
    from mpotn.data.texts import texts
    from mpotn.devices import check_device, resolve_device
    from mpotn.finetune.heal import HealConfig, check_pair, check_run_folder, heal, write_heal
    from mpotn.finetune.training import is_main_process, trainer_device

    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    common.check_out(args.out)
    common.check_data_dir(args.data_dir, args.texts, "--texts")
    config = HealConfig(**common.config_settings(args, OPTIONS))
    check_device(config.device)
    common.check_not_input(Path(args.out) / "model", args.model)
    check_writable(Path(args.out) / "model", args.overwrite)
    if not is_saved_model(args.model):
        raise ValueError(f"{args.model} is not a model saved by mpotn (compress it first with "
                         "mpotn compress)")
    check_run_folder(args.out, args.resume)
    student = load(args.model, device=trainer_device(config.device))  # where heal runs it
    teacher = load_pretrained(args.teacher)  # with its head: a causal LM's perplexity
    tokenizer = load_tokenizer(args.model if has_tokenizer(args.model) else args.teacher)
    sentences = texts(args.texts, samples=args.samples, data_dir=args.data_dir,
                      seed=config.seed)
    probe = before = None
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        print("fidelity check skipped: it runs in single-process healing only")
    else:  # on the device healing runs on, where heal() then leaves both models
        device = resolve_device(config.device)
        student.to(device)
        teacher.to(device)
        check_pair(student, teacher, tokenizer, sentences[0], config.logits_weight > 0,
                   config.max_length)  # heal's own error before the probe's
        probe = common.fidelity_probe(teacher, tokenizer)
        before = None if probe is None else probe.measure(student)
    result = heal(student, teacher, tokenizer, sentences, config, out=args.out,
                  resume=args.resume, progress=not args.no_progress)
    if not is_main_process():
        return  # the main process of a distributed launch writes and reports the run
    paths = write_heal(result, tokenizer, args.out, overwrite=args.overwrite)
    print(f"\nhealed {args.model} ({result.config.train}: {result.trainable_params:,} of "
          f"{result.total_params:,} parameters) for {result.steps} steps on "
          f"{result.train_texts} sentences in {result.seconds:.1f} s on {result.device}")
    print(f"hidden-state error on {result.heldout_texts} held-out sentences: "
          f"{result.mse_before:.4g} -> {result.mse_after:.4g}"
          + (f" ({100 * (result.mse_after / result.mse_before - 1):+.1f}%)"
             if result.mse_before else ""))
    if probe is not None:
        after = common.check_fidelity(result.model, probe, before=before)
        paths["fidelity"] = write_output(Path(args.out) / "fidelity.json", json.dumps(
            {"before": before, "after": after}, indent=2))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
