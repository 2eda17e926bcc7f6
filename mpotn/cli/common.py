"""Argument helpers and task/training plumbing shared by the ``mpotn`` subcommands.

Building arguments needs only [mpotn.types][]; the functions that turn
parsed arguments into data and configs import the library when called.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpotn.types import DEFAULT_LR, LFA_LR_TWO_CORE

if TYPE_CHECKING:
    from mpotn.analysis.fidelity import FidelityProbe
    from mpotn.data.tasks import TaskData
    from mpotn.finetune.training import TrainingConfig

#: Mean cosine of sentence embeddings below which a compressed model is called unusable
#: as is.
USABLE_COSINE = 0.9
#: Perplexity over the original's above which a causal LM is called unusable as is
#: (SVD-LLM's LLaMA-7B at 20% fewer parameters: 7.9 against 5.68, 1.39x).
USABLE_PERPLEXITY = 1.5
#: Held-out SST-2 dev sentences the fidelity check embeds.
CHECK_SENTENCES = 128


def _positive_float(text: str) -> float:
    """A finite number > 0 (NaN, infinity and words are argument errors: exit code 2)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (a finite number), got {text!r}")
    return value


def _share(text: str, *, zero: bool = False, one: bool = False) -> float:
    """A number in ``(0, 1)``, with 0 and 1 allowed when ``zero`` / ``one`` say so."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not ((value >= 0 if zero else value > 0) and (value <= 1 if one else value < 1)):
        bounds = f"{'[' if zero else '('}0, 1{']' if one else ')'}"
        raise argparse.ArgumentTypeError(f"must be a share in {bounds}, got {text!r}")
    return value


def _open_share(text: str) -> float:
    """A share strictly between 0 and 1."""
    return _share(text)


def _probability(text: str) -> float:
    """A probability, 0 to 1."""
    return _share(text, zero=True, one=True)


def _integer(text: str, lowest: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = lowest - 1
    if value < lowest:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    """An integer >= 1."""
    return _integer(text, 1, "must be an integer >= 1")


def _count(text: str) -> int:
    """An integer >= 0."""
    return _integer(text, 0, "must be an integer >= 0")


def _cores(text: str) -> int:
    """A number of MPO cores: an integer >= 2."""
    return _integer(text, 2, "an MPO needs at least 2 cores (an integer)")


class ConfigOption(argparse.Action):
    """A field of a config dataclass as an option: its default and help text are the
    config's own.

    The option's default is ``None`` ("not given": the config keeps its default), and
    its help is the field's ``metadata["help"]`` with the default
    ([FieldHelp.help][mpotn.finetune.training.FieldHelp.help]), read only when help is
    shown, so that building the parser imports nothing heavier than argparse (the
    config's module imports torch). [config_settings][mpotn.cli.common.config_settings]
    collects the given ones.

    Parameters
    ----------
    config:
        ``"module:Class"`` of the config, e.g. ``"mpotn.finetune.heal:HealConfig"``.
    field:
        The config's field the option sets (also its ``dest``).
    """

    def __init__(self, option_strings: list[str], dest: str, *, config: str, field: str,
                 **kwargs: Any) -> None:
        self.config, self.field = config, field
        super().__init__(option_strings, dest, default=None, **kwargs)

    @property
    def help(self) -> str:
        module, _, name = self.config.partition(":")
        return getattr(importlib.import_module(module), name).help(self.field).replace("%", "%%")

    @help.setter
    def help(self, value: str | None) -> None:
        """argparse sets the help text; it comes from the config instead."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def add_config_options(group: argparse._ActionsContainer, config: str,
                       options: dict[str, tuple[str, dict[str, Any]]]) -> None:
    """Add ``options`` (``{field: (flag, argparse keywords)}``) of ``config``
    (``"module:Class"``) to ``group`` as [ConfigOption][mpotn.cli.common.ConfigOption]s."""
    for field, (flag, keywords) in options.items():
        group.add_argument(flag, dest=field, action=ConfigOption, config=config, field=field,
                           **keywords)


def config_settings(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """The config fields among ``options`` that the command line gave (the rest keep the
    config's defaults)."""
    return {field: getattr(args, field) for field in options
            if getattr(args, field) is not None}


def _add_model_and_task(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", default=None,
        help="local model folder, hub id, or an earlier run's model/ folder (default: the "
             "embedded all-MiniLM-L6-v2)",
    )
    task = parser.add_argument_group("task (default: the shipped SST-2 sample, 2,000 "
                                     "training phrases and the 872-sentence dev set)")
    task.add_argument("--glue", default=None, metavar="TASK",
                      help="a GLUE task by name (sst2, mrpc, rte, ... or GLUE's SST-2, MRPC, "
                           "RTE); from --data-dir when given, else from the Hugging Face hub "
                           "(needs a network)")
    task.add_argument("--data-dir", default=None, metavar="DIR",
                      help="folder in GLUE's glue_data/ layout (DIR/RTE/train.tsv, "
                           "DIR/RTE/dev.tsv, ...: the official files) to read --glue from; "
                           "without it the task comes from the Hugging Face hub")
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


def _add_training(parser: argparse.ArgumentParser, epochs: float | None,
                  default_out: str) -> None:
    """The training options; ``epochs=None`` for a command that sets its own steps (no
    ``--epochs`` or ``--max-steps``)."""
    train = parser.add_argument_group("training")
    train.add_argument("--lr", type=_positive_float, default=None,
                       help="learning rate (default per strategy: "
                            + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
                            + f"; lfa on two-core MPOs, the truncated SVDs mpotn compress "
                            f"makes by default: {LFA_LR_TWO_CORE:g})")
    train.add_argument("--central-lr", type=_positive_float, default=None,
                       help="learning rate of central tensors (default: --lr)")
    train.add_argument("--auxiliary-lr", type=_positive_float, default=None,
                       help="learning rate of auxiliary tensors (default: --lr)")
    if epochs is not None:
        train.add_argument("--epochs", type=_positive_float, default=epochs,
                           help=f"passes over the training set (default: {epochs:g})")
        train.add_argument("--max-steps", type=int, default=-1,
                           help="optimizer steps, overriding --epochs (default: -1, use "
                                "epochs)")
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
    train.add_argument("--overwrite", action="store_true",
                       help="write OUT/model/ even if it holds files mpotn did not write (they "
                            "are kept; without this flag that is an error)")
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_device(train, "mpotn.finetune.training:TrainingConfig")


def add_device(group: argparse._ActionsContainer, config: str) -> None:
    """Add ``--device`` to ``group``: the ``device`` field of ``config`` (``"module:Class"``),
    as a [ConfigOption][mpotn.cli.common.ConfigOption] (its help is the field's)."""
    add_config_options(group, config, {"device": ("--device", {"metavar": "DEVICE"})})


def check_not_input(written: str | os.PathLike, model: str | None) -> None:
    """Refuse to write ``written`` (a folder under ``--out``) when it is the input model's
    own folder: the run would replace the model it reads.

    Raises
    ------
    ValueError
        Naming both and what to do.
    """
    if model and Path(model).exists() and Path(written).resolve() == Path(model).resolve():
        raise ValueError(f"this run would write {written}, which is the input model {model} "
                         "itself, and replace it; choose another --out")


def check_out(out: str | os.PathLike) -> None:
    """Refuse ``--out`` before any work when it is a file or cannot be written.

    The nearest folder that exists on the way to ``out`` must take a new file:
    a temporary file is created there and removed at once.

    Raises
    ------
    ValueError
        Naming ``--out``, the folder and the reason (a file, read-only, no permission).
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(f"--out {out} cannot be written ({existing}: "
                         f"{error.strerror or error}); choose a writable folder") from None


def _column(value: str | None) -> str | int | None:
    return int(value) if value is not None and value.isdigit() else value


def check_data_dir(data_dir: str | None, task: str | None, flag: str) -> None:
    """Refuse ``--data-dir`` without the GLUE task (given by ``flag``) it is the folder of.

    Examples
    --------
    >>> check_data_dir("glue_data", None, "--texts")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --data-dir is the folder of a GLUE task's files: give the task as --texts ...
    """
    if data_dir is not None and not task:
        raise ValueError(f"--data-dir is the folder of a GLUE task's files: give the task as "
                         f"{flag} NAME (e.g. {flag} rte --data-dir glue_data), or drop "
                         "--data-dir")


def load_task(args: argparse.Namespace) -> TaskData:
    """The task named by the command line (default: the shipped SST-2 sample)."""
    from mpotn.data import load_glue, load_local, sst2_sample

    if args.glue and (args.train_file or args.eval_file):
        raise ValueError("give --glue or --train-file/--eval-file, not both")
    data_dir = getattr(args, "data_dir", None)
    check_data_dir(data_dir, args.glue, "--glue")
    if args.glue:
        return load_glue(args.glue, data_dir=data_dir)
    if args.train_file or args.eval_file:
        if not (args.train_file and args.eval_file):
            raise ValueError("local data needs both --train-file and --eval-file")
        return load_local(args.eval_file, args.train_file, text=_column(args.text_column),
                          text_pair=_column(args.text_pair_column),
                          label=_column(args.label_column), header=not args.no_header,
                          regression=args.regression)
    return sst2_sample()


def training_config(args: argparse.Namespace, strategy: str, **extra: object) -> TrainingConfig:
    """The [TrainingConfig][mpotn.finetune.training.TrainingConfig] of the command line's training
    options."""
    from mpotn.finetune.training import TrainingConfig

    steps = {key: getattr(args, key) for key in ("epochs", "max_steps") if hasattr(args, key)}
    return TrainingConfig(
        strategy=strategy, lr=args.lr, central_lr=args.central_lr,
        auxiliary_lr=args.auxiliary_lr, **steps,
        batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
        train_limit=args.train_limit, eval_limit=args.eval_limit,
        device=getattr(args, "device", None), **extra,
    )


def _print_record(record: dict, title: str) -> None:
    from mpotn.table import Table

    print(f"\n{title}")
    print(Table([{k: v for k, v in record.items()
                  if not isinstance(v, (dict, list))}]).to_markdown())


def fidelity_probe(model: object, tokenizer: object) -> FidelityProbe | None:
    """The original's outputs on held-out SST-2 dev sentences, kept before compressing in
    place (``None``, with the reason printed, for a model that gives no hidden states or a
    tokenizer that cannot pad)."""
    from mpotn.analysis.fidelity import FidelityProbe, sst2_dev

    try:
        return FidelityProbe(model, tokenizer, sst2_dev()[0][:CHECK_SENTENCES])
    except (ValueError, AttributeError) as error:  # no pad token, no hidden_states
        print(f"fidelity check skipped: {error}")
        return None


def check_fidelity(compressed: object, probe: FidelityProbe, calibrated: bool = True,
                   before: dict[str, float] | None = None) -> dict[str, float]:
    """Print the mean cosine of sentence embeddings (and, for a causal LM, the perplexity)
    of ``compressed`` against the original's in ``probe`` (after the values ``before``,
    when given: before healing), and warn when the compressed model is not usable
    without fine-tuning or healing (and, unless ``calibrated``, without calibration).
    Returns what was measured."""
    fidelity = probe.measure(compressed)
    cosine = fidelity["mean_cosine"]
    count = len(probe.sentences)
    was = "" if before is None else f"{before['mean_cosine']:.4f} -> "
    print(f"expected fidelity: mean cosine {was}{cosine:.4f} (worst "
          f"{fidelity['worst_cosine']:.4f}) between the compressed and the original model's "
          f"mean-pooled last hidden states on {count} held-out SST-2 dev sentences")
    # "not >=": a NaN (overflowing float16 activations) is a problem too
    problems = ([f"mean cosine {cosine:.4f} < {USABLE_COSINE}"]
                if not cosine >= USABLE_COSINE else [])
    if "perplexity" in fidelity:
        ratio = fidelity["perplexity"] / fidelity["original_perplexity"]
        was = "" if before is None else f"{before['perplexity']:.2f} -> "
        print(f"perplexity on those sentences: {was}{fidelity['perplexity']:.2f}, the original's "
              f"{fidelity['original_perplexity']:.2f} ({ratio:.2f}x)")
        if not ratio <= USABLE_PERPLEXITY:
            problems.append(f"perplexity {ratio:.4f}x the original's > {USABLE_PERPLEXITY}x")
    if problems:
        advice = ("heal it longer (more --steps or --samples)" if before is not None
                  else ("" if calibrated else "calibrate it (--calibrate), ")
                  + "heal it (mpotn heal)")
        print(f"WARNING: {' and '.join(problems)}: this model is not usable as it is; "
              f"{advice} or fine-tune it (mpotn finetune) before use, or compress less")
    return fidelity
