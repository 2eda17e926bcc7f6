"""Fine-tuning on a task with the transformers ``Trainer``: one path for every strategy.

[finetune][mpotn.finetune.training.finetune] trains a sequence-classification (or regression) model
with the parameters a strategy selects ([mpotn.finetune.strategies][]), the central and
auxiliary tensors at their own learning rates, and evaluates it on the task's
evaluation split. Every run returns a [FinetuneResult][mpotn.finetune.training.FinetuneResult]
recording the trainable and total parameters, the wall time, the training loss and the
task's metrics.

[prepare_model][mpotn.finetune.training.prepare_model] builds the model a strategy needs: the
pre-trained encoder with a new task head, decomposed into MPOs at full rank (or a budget)
for ``lfa`` and ``central``.

Examples
--------
>>> from torch import nn
>>> from mpotn.data import sst2_sample
>>> data = sst2_sample()
>>> config = TrainingConfig(strategy="lfa", max_steps=1, batch_size=4, eval_limit=8)
>>> model, tokenizer = prepare_model(None, data, config, targets=["ffn"], progress=False)
>>> result = finetune(model, tokenizer, data, config, progress=False)
>>> result.record["strategy"], result.record["steps"], 0 <= result.record["accuracy"] <= 1
('lfa', 1, True)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from mpotn.atomic import atomic_dir, check_writable, write_text
from mpotn.compression.compress import compress
from mpotn.compression.config import MPO_LAYERS, CompressionConfig, select_targets
from mpotn.compression.model import MPOModel, load
from mpotn.compression.models import load_classifier, load_tokenizer
from mpotn.compression.parameters import count_parameters, head_parameters, lfa_parameters
from mpotn.compression.serialization import is_saved_model
from mpotn.data.tasks import TaskData, compute_metrics
from mpotn.drawing import draw_history
from mpotn.finetune.core_changes import core_changes, snapshot_cores
from mpotn.finetune.strategies import apply_strategy, lora_rank_for_budget, optimizer_groups
from mpotn.network import central_index
from mpotn.shapes import full_bond_dims, plan_side
from mpotn.table import Table
from mpotn.types import DEFAULT_LR, DEFAULT_TARGETS, STRATEGIES


class FieldHelp:
    """A dataclass whose fields carry their command-line help, as PEFT's configs do.

    Each field has ``metadata={"help": ...}``; [help][mpotn.finetune.training.FieldHelp.help]
    adds the field's default, so that a command's options take their defaults and help
    texts from the config alone ([HealConfig][mpotn.finetune.heal.HealConfig],
    [SqueezeConfig][mpotn.finetune.squeeze.SqueezeConfig]; see ``mpotn.cli.common.ConfigOption``).
    """

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of field ``name``, with its default when it has one (``None`` and
        switches have none to show)."""
        spec = {f.name: f for f in dataclasses.fields(cls)}[name]
        text = spec.metadata["help"]
        if spec.default is None or isinstance(spec.default, bool):
            return text
        default = f"{spec.default:g}" if isinstance(spec.default, float) else spec.default
        return f"{text} (default: {default})"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable form."""
        return dataclasses.asdict(self)


@dataclass
class TrainingConfig:
    """How to fine-tune.

    Attributes
    ----------
    strategy:
        One of [mpotn.types.STRATEGIES][].
    k:
        Layers tuned by ``last-k``.
    lora_rank:
        LoRA rank; ``None`` matches LFA's trainable budget on the same model.
    lr:
        Learning rate; ``None`` takes [DEFAULT_LR][mpotn.types.DEFAULT_LR] for the strategy.
    central_lr, auxiliary_lr:
        Learning rates of central and auxiliary tensors (default: ``lr``).
    epochs:
        Passes over the training set (ignored when ``max_steps`` > 0).
    max_steps:
        Optimizer steps; ``-1`` trains for ``epochs``.
    batch_size, max_length:
        Examples per step; tokens per example (longer ones are truncated).
    weight_decay, warmup_ratio:
        AdamW weight decay; share of steps with a linear warm-up (at most all
        steps but the last, so that a one-step run trains).
    seed:
        Seeds the task head, the data order and dropout.
    train_limit, eval_limit:
        Use only the first examples of each split (``None``: all).
    """

    strategy: str = "lfa"
    k: int | None = None
    lora_rank: int | None = None
    lr: float | None = None
    central_lr: float | None = None
    auxiliary_lr: float | None = None
    epochs: float = 3.0
    max_steps: int = -1
    batch_size: int = 32
    max_length: int = 64
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    seed: int = 0
    train_limit: int | None = None
    eval_limit: int | None = None

    #: Fields earlier versions saved that no longer exist (``extra`` was never read).
    REMOVED: ClassVar[frozenset[str]] = frozenset({"extra"})

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {STRATEGIES}")
        if self.strategy == "last-k" and self.k is None:
            raise ValueError("strategy 'last-k' needs k (how many final layers to tune)")
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError("batch_size must be >= 1 and max_length >= 2")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("give max_steps > 0 or epochs > 0")
        for key in ("train_limit", "eval_limit"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (examples used) or None (all), got "
                                 f"{getattr(self, key)}")

    @property
    def learning_rate(self) -> float:
        """``lr``, or the strategy's default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.strategy]

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> TrainingConfig:
        """The config of ``settings`` (its ``to_dict()``), also as earlier versions saved
        it: fields in ``REMOVED`` are dropped."""
        return cls(**{k: v for k, v in settings.items() if k not in cls.REMOVED})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable form."""
        return dataclasses.asdict(self)


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced.

    Attributes
    ----------
    model:
        The trained model (PEFT-wrapped for ``lora``; an
        [MPOModel][mpotn.compression.model.MPOModel] when the model was compressed).
    record:
        Strategy, trainable / total / original parameters, steps, seconds,
        training loss, evaluation loss and the task's metrics.
    history:
        The Trainer's log (step, loss, learning rate, ...).
    core_changes:
        For a model with MPO layers: how far training moved each matrix's
        central and auxiliary tensors ([mpotn.finetune.core_changes.core_changes][]).
    """

    model: nn.Module
    record: dict[str, Any]
    history: Table
    core_changes: Table = field(default_factory=Table)


def prepare_model(
    model: str | os.PathLike | None,
    data: TaskData,
    config: TrainingConfig,
    *,
    targets: list[str] | str | None = None,
    compression: dict[str, Any] | None = None,
    compress_model: bool | None = None,
    progress: bool = True,
) -> tuple[nn.Module, Any]:
    """The model a strategy trains, and its tokenizer.

    Parameters
    ----------
    model:
        ``None`` (the embedded all-MiniLM-L6-v2), a local folder or hub id of a
        pre-trained encoder (a task head is added), or the ``model/`` folder
        of an earlier run (an mpotn save with its tokenizer, loaded as it is).
    data:
        The task (its number of labels sizes the head).
    config:
        The training configuration (its strategy and seed).
    targets, compression:
        For ``lfa`` and ``central``: what to decompose (default
        [DEFAULT_TARGETS][mpotn.types.DEFAULT_TARGETS]) and
        [CompressionConfig][mpotn.compression.config.CompressionConfig] settings (default: full
        rank, ``n = 5``).
    compress_model:
        Decompose before training; default: for ``lfa`` and ``central`` only
        (``True`` with ``full`` fine-tunes every core of the MPO model).
    """
    if model is not None and is_saved_model(model):
        saved = load(model)
        _check_labels(saved, data, model)
        return saved, load_tokenizer(model)
    torch.manual_seed(config.seed)  # the new task head
    classifier = load_classifier(model, data.num_labels, data.label_names)
    tokenizer = load_tokenizer(model)
    if compress_model is None:
        compress_model = config.strategy in ("lfa", "central")
    if compress_model:
        settings = {"targets": list(targets or DEFAULT_TARGETS), **(compression or {})}
        return compress(classifier, CompressionConfig(**settings), progress=progress), tokenizer
    return classifier, tokenizer


def _check_labels(model: nn.Module, data: TaskData, source: str | os.PathLike) -> None:
    """Refuse a saved classifier whose class names (``id2label``) are not the task's."""
    saved = getattr(getattr(_trainable_model(model), "config", None), "id2label", None)
    if data.label_names is None or not saved:
        return
    names = [saved[k] for k in sorted(saved)]
    if names != [f"LABEL_{k}" for k in range(len(names))] and names != list(data.label_names):
        raise ValueError(f"{source} was trained on the classes {names}, but the task's classes "
                         f"are {list(data.label_names)}; train it on the same labels, or start "
                         "from the pre-trained model")


def tokenize(data: TaskData, tokenizer: Any, max_length: int, train_limit: int | None = None,
             eval_limit: int | None = None) -> tuple[Any, Any]:
    """Tokenized train and eval splits (columns ``input_ids``, ``attention_mask``, ``label``)."""
    def encode(batch: dict[str, list]) -> dict[str, list]:
        pair = batch.get("text_pair")
        return tokenizer(batch["text"], pair, truncation=True, max_length=max_length)

    def prepare(split: Any, limit: int | None) -> Any:
        if split is None:
            return None
        if limit is not None:
            split = split.select(range(min(limit, len(split))))
        drop = [c for c in split.column_names if c != "label"]
        return split.map(encode, batched=True, remove_columns=drop)

    return prepare(data.train, train_limit), prepare(data.eval, eval_limit)


def _trainable_model(model: nn.Module) -> nn.Module:
    """The module the Trainer sees: the wrapped model of an
    [MPOModel][mpotn.compression.model.MPOModel]."""
    return model.base_model if isinstance(model, MPOModel) else model


def _metric_fn(data: TaskData) -> Any:
    def metrics(prediction: Any) -> dict[str, float]:
        logits = np.asarray(prediction.predictions)
        predicted = logits[..., 0] if data.spec.regression else logits.argmax(-1)
        return compute_metrics(data.spec.metrics, predicted, prediction.label_ids)
    return metrics


def training_arguments(config: TrainingConfig, output_dir: str | os.PathLike, progress: bool,
                       steps: int) -> Any:
    """``transformers.TrainingArguments`` that save nothing by themselves.

    The Trainer picks the device: CUDA when present (every visible GPU), else the CPU.
    """
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=max(64, config.batch_size),
        num_train_epochs=config.epochs,
        max_steps=steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=warmup_steps(config, steps),
        lr_scheduler_type="linear",
        logging_steps=max(1, steps // 20),
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )


def warmup_steps(config: TrainingConfig, steps: int) -> int:
    """Warm-up steps of a run of ``steps``: ``warmup_ratio`` of them, rounded up, but never
    every step (the first warm-up step has learning rate 0, so a one-step run has none).

    Examples
    --------
    >>> config = TrainingConfig()
    >>> warmup_steps(config, 1), warmup_steps(config, 2), warmup_steps(config, 100)
    (0, 1, 6)
    """
    return max(0, min(math.ceil(config.warmup_ratio * steps), steps - 1))


def planned_steps(config: TrainingConfig, train_size: int) -> int:
    """Optimizer steps of a run: ``max_steps``, or ``epochs`` over ``train_size`` examples."""
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.epochs * math.ceil(train_size / config.batch_size)))


def evaluate_task(model: nn.Module, tokenizer: Any, data: TaskData, config: TrainingConfig,
                  eval_set: Any | None = None) -> dict[str, float]:
    """The task scores: evaluation loss and the task's metrics on the evaluation split.

    (How faithfully a compressed model keeps the original's outputs, without labels, is
    [mpotn.analysis.fidelity][] instead.)
    """
    from transformers import DataCollatorWithPadding, Trainer

    if eval_set is None:
        _, eval_set = tokenize(data, tokenizer, config.max_length, 0, config.eval_limit)
    if eval_set is None or len(eval_set) == 0:
        raise ValueError("the task has no evaluation examples to score; give an evaluation "
                         "file with examples")
    with tempfile.TemporaryDirectory(prefix="mpotn-eval-") as scratch:
        trainer = Trainer(
            model=_trainable_model(model),
            args=training_arguments(config, scratch, False, 1),
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=_metric_fn(data),
        )
        output = trainer.predict(eval_set)
    return {k.removeprefix("test_"): float(v) for k, v in output.metrics.items()
            if k in ("test_loss", *(f"test_{m}" for m in data.spec.metrics))}


def finetune(
    model: nn.Module,
    tokenizer: Any,
    data: TaskData,
    config: TrainingConfig,
    *,
    progress: bool = True,
    evaluate_after: bool = True,
    tokenized: tuple[Any, Any] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``data.train`` with ``config.strategy`` and evaluate it.

    The model is modified in place (``lora`` wraps it; use ``result.model``).
    ``tokenized`` passes the output of [tokenize][mpotn.finetune.training.tokenize] for repeated
    runs.

    Raises
    ------
    ValueError
        For a strategy the model cannot take (``lfa`` without MPO layers, ...)
        or a task without a training split.
    """
    from transformers import DataCollatorWithPadding, PrinterCallback, Trainer

    if data.train is None:
        raise ValueError("the task has no training split to fine-tune on")
    trained = _trainable_model(model)
    lora_rank = config.lora_rank
    if config.strategy == "lora" and lora_rank is None:
        head = count_parameters(p for _, p in head_parameters(trained))
        lora_rank = lora_rank_for_budget(trained, lfa_budget(trained) - head)
    selection = apply_strategy(trained, config.strategy, k=config.k, lora_rank=lora_rank)
    trained = selection.pop("model", trained)
    start_cores = snapshot_cores(trained)
    train_set, eval_set = tokenized or tokenize(data, tokenizer, config.max_length,
                                                config.train_limit, config.eval_limit)
    if len(train_set) == 0:
        raise ValueError("the task's training split has no examples to fine-tune on")
    steps = planned_steps(config, len(train_set))
    optimizer = torch.optim.AdamW(optimizer_groups(
        trained, config.learning_rate, config.central_lr, config.auxiliary_lr,
        config.weight_decay))
    with tempfile.TemporaryDirectory(prefix="mpotn-train-") as scratch:
        trainer = Trainer(
            model=trained,
            args=training_arguments(config, scratch, progress, steps),
            train_dataset=train_set,
            data_collator=DataCollatorWithPadding(tokenizer),
            optimizers=(optimizer, None),
        )
        if not progress:
            trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
    trained.eval()
    result_model = model if trained is _trainable_model(model) else trained
    record = {
        **selection,
        "original_params": getattr(model, "original_params", None)
        or count_parameters(_trainable_model(model).parameters()),
        "lr": config.learning_rate,
        "seed": config.seed,
        "steps": int(output.global_step),
        "train_examples": len(train_set),
        "train_seconds": seconds,
        "train_loss": float(output.training_loss),
    }
    if "rank" in selection:
        record["lora_rank"] = record.pop("rank")
    if data.label_names is not None:
        record["id2label"] = dict(enumerate(data.label_names))
        record["label2id"] = {name: k for k, name in enumerate(data.label_names)}
    if evaluate_after:
        start = time.perf_counter()
        record.update(evaluate_task(result_model, tokenizer, data, config, eval_set))
        record["eval_seconds"] = time.perf_counter() - start
    history = Table({k: v for k, v in row.items()} for row in trainer.state.log_history
                    if "loss" in row)
    changes = core_changes(start_cores, trained)
    if changes:
        record["mean_central_change"] = float(np.mean([r["central_change"] for r in changes]))
        record["mean_auxiliary_change"] = float(np.mean([r["auxiliary_change"]
                                                         for r in changes]))
    return FinetuneResult(result_model, record, history, changes)


def lfa_budget(model: nn.Module) -> int:
    """Parameters LFA trains on ``model``: auxiliary tensors, biases, norms and the head.

    That is [lfa_parameters][mpotn.compression.parameters.lfa_parameters] with
    ``head=True`` (what ``apply_strategy(model, "lfa")`` trains), not #Pr of
    [MPOModel.totals][mpotn.compression.model.MPOModel.totals], which leaves the head's
    weights out.

    On a model without MPO layers, it is what LFA would train after the
    default preparation ([DEFAULT_TARGETS][mpotn.types.DEFAULT_TARGETS] at full rank, ``n = 5``),
    counted from the factorizations and Eq. 2 without decomposing anything.

    Examples
    --------
    >>> model = load_classifier()
    >>> lfa_budget(model)
    1271642
    """
    trained = count_parameters(p for _, p in lfa_parameters(model, head=True))
    if any(isinstance(m, MPO_LAYERS) for m in model.modules()):
        return trained
    config = CompressionConfig(targets=list(DEFAULT_TARGETS))
    for _, module in select_targets(model, config):
        rows, cols = (module.weight.shape if isinstance(module, nn.Embedding)
                      else module.weight.shape[::-1])
        row, col = plan_side(rows, config.n), plan_side(cols, config.n)
        dims = full_bond_dims(row.factors, col.factors)
        sizes = [dims[k] * i * j * dims[k + 1]
                 for k, (i, j) in enumerate(zip(row.factors, col.factors))]
        trained += sum(sizes) - sizes[central_index(config.n)]
    return trained


def write_run(result: FinetuneResult, tokenizer: Any, out: str | os.PathLike,
              title: str, overwrite: bool = False) -> dict[str, Path]:
    """Write ``metrics.json``, ``history.csv`` / ``.json``, ``history.png`` and ``model/``
    (see [save_model][mpotn.finetune.training.save_model] for ``overwrite``)."""
    out = Path(out)
    check_writable(out / "model", overwrite)
    paths = {
        "metrics": write_text(out / "metrics.json", json.dumps(result.record, indent=2)),
        "history_json": write_text(out / "history.json", json.dumps(list(result.history),
                                                                    indent=2)),
        "history_csv": write_text(out / "history.csv", result.history.to_csv()),
    }
    if result.core_changes:
        paths["core_changes"] = write_text(out / "core_changes.csv", result.core_changes.to_csv())
    if len(result.history):
        paths["plot"] = draw_history(result.history, "step", ["loss"], out / "history.png", title)
    paths["model"] = save_model(result.model, tokenizer, out / "model", overwrite)
    return paths


def save_model(model: nn.Module, tokenizer: Any, directory: str | os.PathLike,
               overwrite: bool = False) -> Path:
    """Save a trained model and its tokenizer, replacing what mpotn wrote in ``directory``
    atomically ([mpotn.atomic.atomic_dir][]).

    An [MPOModel][mpotn.compression.model.MPOModel] is an mpotn save (``mpotn.load`` and
    [prepare_model][mpotn.finetune.training.prepare_model] read it back); other models use Hugging
    Face's ``save_pretrained`` (a PEFT model saves its adapters).

    Raises
    ------
    ValueError
        If ``directory`` holds files mpotn did not write (its manifest does not
        list them) and ``overwrite`` is false; with it they are kept.
    """
    with atomic_dir(directory, overwrite) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return Path(directory)
