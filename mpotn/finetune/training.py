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

Devices: ``TrainingConfig.device`` (``--device``) is the user's choice; left at ``None``
the Trainer picks CUDA when present (every visible GPU; one per process under
``accelerate launch``), else the CPU. [trainer_arguments][mpotn.finetune.training.trainer_arguments]
is the one place a device becomes ``TrainingArguments``: fine-tuning, evaluation,
squeezing and healing all build theirs with it. Given ``out``, fine-tuning saves Trainer
checkpoints in ``out / "checkpoints"`` and ``resume=True`` continues from the latest one.

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
import functools
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from mpotn.atomic import atomic_dir, check_writable, write_output, write_text
from mpotn.compression.compress import compress
from mpotn.compression.config import MPO_LAYERS, CompressionConfig, select_targets
from mpotn.compression.model import MPOModel, load
from mpotn.compression.models import load_classifier, load_tokenizer, padding_tokenizer
from mpotn.compression.parameters import count_parameters, head_parameters, lfa_parameters
from mpotn.compression.serialization import is_saved_model
from mpotn.data.tasks import TaskData, compute_metrics
from mpotn.devices import check_device, parse_device
from mpotn.drawing import draw_history
from mpotn.finetune.core_changes import core_changes, snapshot_cores
from mpotn.finetune.mixed_rank import MixedRank
from mpotn.finetune.pruning import GradualPruning, pruning_summary
from mpotn.finetune.router_logs import RouterLogging
from mpotn.finetune.shared_checkpoints import SharedTensorCheckpoints
from mpotn.finetune.strategies import apply_strategy, lora_rank_for_budget, optimizer_groups
from mpotn.layers.experts import add_router_loss
from mpotn.network import central_index
from mpotn.shapes import full_bond_dims, plan_side
from mpotn.table import Table
from mpotn.types import DEFAULT_LR, DEFAULT_TARGETS, LFA_LR_TWO_CORE, STRATEGIES

#: Help of the ``device`` setting ([TrainingConfig][mpotn.finetune.training.TrainingConfig],
#: [HealConfig][mpotn.finetune.heal.HealConfig]) and of ``--device``.
DEVICE_HELP = ("where to train: cpu, cuda (every visible GPU) or cuda:N (one GPU); by "
               "default CUDA when present, else the CPU, and under accelerate launch each "
               "process's own GPU")

#: Fine-tuning checkpoints are saved every this many optimizer steps (and at the end).
SAVE_STEPS = 500

#: File in ``out / "checkpoints"`` recording the fine-tuning run a resume must continue.
FINETUNE_STATE = "finetune_state.json"
#: The Trainer's state in each of its checkpoints (JSON: step, log history, ...).
STATE_FILE = "trainer_state.json"


class FieldHelp:
    """A dataclass whose fields carry their command-line help, as PEFT's configs do.

    A field that is an option has ``metadata={"help": ...}``;
    [help][mpotn.finetune.training.FieldHelp.help] adds the field's default, so that a
    command's options take their defaults and help texts from the config alone
    ([HealConfig][mpotn.finetune.heal.HealConfig],
    [SqueezeConfig][mpotn.finetune.squeeze.SqueezeConfig], and ``device`` of
    [TrainingConfig][mpotn.finetune.training.TrainingConfig]; see
    ``mpotn.cli.common.ConfigOption``).
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

    def changed(self, other: FieldHelp, ignore: Iterable[str] = ()) -> list[str]:
        """The names of the fields whose values differ in ``other``, but for ``ignore``,
        sorted: what a resumed run that keeps its checkpointed settings ignores.

        Examples
        --------
        >>> TrainingConfig(epochs=1.0).changed(TrainingConfig(epochs=2.0, seed=1))
        ['epochs', 'seed']
        """
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in mine if k not in set(ignore) and mine[k] != theirs[k])


@dataclass
class TrainingConfig(FieldHelp):
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
        Learning rate; ``None`` takes [DEFAULT_LR][mpotn.types.DEFAULT_LR] for the strategy
        ([finetune][mpotn.finetune.training.finetune] takes
        [LFA_LR_TWO_CORE][mpotn.types.LFA_LR_TWO_CORE] for ``lfa`` on a model whose MPO
        layers all have two cores).
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
    device:
        Where to train and evaluate: ``"cpu"``, ``"cuda"`` (every visible GPU) or
        ``"cuda:N"`` (that GPU only); ``None`` lets the Trainer choose (CUDA when present,
        every visible GPU, else the CPU). Checked when the Trainer's arguments are built
        ([check_device][mpotn.devices.check_device]). Where a run goes, not what
        it computes: a resumed squeeze or healing run keeps the device it is given.
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
    device: str | None = field(default=None, metadata={"help": DEVICE_HELP})

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
        for key in ("lr", "central_lr", "auxiliary_lr"):
            rate = getattr(self, key)
            if rate is not None and not (isinstance(rate, (int, float)) and math.isfinite(rate)
                                         and rate > 0):
                raise ValueError(f"{key} must be a finite number > 0 (or None: the default), "
                                 f"got {rate!r}")
        if self.weight_decay < 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"weight_decay must be >= 0 and warmup_ratio in [0, 1), got "
                             f"{self.weight_decay} and {self.warmup_ratio}")
        for key in ("train_limit", "eval_limit"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (examples used) or None (all), got "
                                 f"{getattr(self, key)}")
        parse_device(self.device)

    @property
    def learning_rate(self) -> float:
        """``lr``, or the strategy's default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.strategy]

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> TrainingConfig:
        """The config of ``settings`` (its ``to_dict()``), also as earlier versions saved
        it: fields in ``REMOVED`` are dropped, fields they did not have (``device``) take
        their defaults."""
        return cls(**{k: v for k, v in settings.items() if k not in cls.REMOVED})


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced.

    Attributes
    ----------
    model:
        The trained model (PEFT-wrapped for ``lora``; an
        [MPOModel][mpotn.compression.model.MPOModel] when the model was compressed).
    record:
        Strategy, trainable / total / original parameters, steps (of the whole run),
        seconds and training loss (of the steps this call trained; ``train_loss`` is
        ``None`` when a resume found the run at its last step), evaluation loss and the
        task's metrics; a resumed run adds ``resumed_from``, its checkpoint.
    history:
        The Trainer's log (step, loss, learning rate, ...), of the whole run.
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
        pre-trained encoder (a task head is added; a sequence classifier keeps its head,
        and must have the task's classes in the task's order), or the ``model/`` folder
        of an earlier run (an mpotn save with its tokenizer, loaded as it is). A model
        to decompose, and a save, are put on the device the Trainer will use first.
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
        saved = load(model, device=trainer_device(config.device))
        _check_labels(getattr(getattr(_trainable_model(saved), "config", None), "id2label",
                              None), data, model)
        return saved, load_tokenizer(model)
    if model is not None:  # a fine-tuned classifier keeps its head: the same classes only
        _check_labels(_trained_classes(model), data, model)
    torch.manual_seed(config.seed)  # the new task head
    classifier = load_classifier(model, data.num_labels, data.label_names)
    tokenizer = load_tokenizer(model)
    if tokenizer.pad_token is None:  # the head must skip the padding the collator adds
        classifier.config.pad_token_id = padding_tokenizer(tokenizer).pad_token_id
    if compress_model is None:
        compress_model = config.strategy in ("lfa", "central")
    if compress_model:
        settings = {"targets": list(targets or DEFAULT_TARGETS), **(compression or {})}
        classifier.to(trainer_device(config.device))  # decomposed where it will train
        return compress(classifier, CompressionConfig(**settings), progress=progress), tokenizer
    return classifier, tokenizer


def _trained_classes(model: str | os.PathLike) -> dict[int, str] | None:
    """``id2label`` of a Hugging Face sequence classifier's config (``None`` for another
    model, or a config that cannot be read here: loading the model then says why)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model))
    except (OSError, ValueError):
        return None
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or ()):
        return None
    return config.id2label


def _check_labels(saved: Mapping[int, str] | None, data: TaskData,
                  source: str | os.PathLike) -> None:
    """Refuse a trained classifier whose class names (``id2label``) are not the task's, in
    the task's order (a head's rows are its classes), whatever their case; names that
    say nothing (``LABEL_0``, ..., or a task's integer labels ``0``, ``1``, ...) are not
    compared."""
    if data.label_names is None or not saved:
        return
    names = [str(saved[k]) for k in sorted(saved)]
    task = [str(name) for name in data.label_names]
    unnamed = ([f"LABEL_{k}" for k in range(len(names))], [str(k) for k in range(len(task))])
    if (names not in unnamed and task not in unnamed
            and [n.casefold() for n in names] != [n.casefold() for n in task]):
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


def _two_core_only(model: nn.Module) -> bool:
    """Whether the model has MPO layers and every one has two cores (truncated SVDs)."""
    layers = [m for m in model.modules() if isinstance(m, MPO_LAYERS)]
    return bool(layers) and all(layer.n == 2 for layer in layers)


def _metric_fn(data: TaskData) -> Any:
    def metrics(prediction: Any) -> dict[str, float]:
        logits = np.asarray(prediction.predictions)
        predicted = logits[..., 0] if data.spec.regression else logits.argmax(-1)
        return compute_metrics(data.spec.metrics, predicted, prediction.label_ids)
    return metrics


@functools.cache
def _pinned_arguments() -> type:
    """``TrainingArguments`` on one GPU, ``cuda:pinned_gpu``, whatever else is visible.

    The Trainer of a single process takes ``cuda:0`` and wraps the model in
    ``DataParallel`` over every visible GPU; this class sets the current CUDA device to
    ``pinned_gpu`` after the Trainer's own device setup and counts one GPU.
    """
    from transformers import TrainingArguments

    @dataclass
    class PinnedTrainingArguments(TrainingArguments):
        pinned_gpu: int = 0

        @functools.cached_property
        def _setup_devices(self) -> torch.device:
            TrainingArguments._setup_devices.func(self)
            device = torch.device("cuda", self.pinned_gpu)
            torch.cuda.set_device(device)
            self._n_gpu = 1
            return device

    return PinnedTrainingArguments


def trainer_arguments(device: str | None, *, seed: int = 42, progress: bool = True,
                      **options: Any) -> Any:
    """``transformers.TrainingArguments(**options)`` that run on ``device``.

    Every Trainer of mpotn (fine-tuning, evaluation, squeezing, healing) gets its arguments
    here, with what they share: ``seed`` (also the data order's), a progress bar or not,
    no evaluation, no reporting, a linear schedule and no dataloader workers unless
    ``options`` say otherwise. The device is chosen here too:

    - ``None``: the Trainer's choice, CUDA when present (``cuda:0``, and ``DataParallel``
      over every visible GPU in a single process; under ``accelerate launch`` or
      ``torchrun`` one GPU per process, with ``DistributedDataParallel``), else the CPU;
    - ``"cpu"``: ``use_cpu=True``, even when a GPU is present;
    - ``"cuda"``: as ``None``, but an error when no CUDA device is visible;
    - ``"cuda:N"``: that GPU only.

    Batches are copied to pinned memory only when they go to a GPU.

    Raises
    ------
    ValueError
        From [check_device][mpotn.devices.check_device]: a bad device name, or a
        CUDA device that is not visible.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as scratch:
    ...     args = trainer_arguments("cpu", output_dir=scratch)
    >>> args.use_cpu, str(args.device)
    (True, 'cpu')
    """
    from transformers import TrainingArguments

    parsed = check_device(device)
    options = {"eval_strategy": "no", "report_to": [], "lr_scheduler_type": "linear",
               "dataloader_num_workers": 0, "seed": seed, "data_seed": seed,
               "disable_tqdm": not progress, **options}
    on_cpu = parsed is not None and parsed.type == "cpu"
    options.setdefault("dataloader_pin_memory", torch.cuda.is_available() and not on_cpu)
    if on_cpu:
        return TrainingArguments(use_cpu=True, **options)
    if parsed is not None and parsed.index is not None:
        return _pinned_arguments()(pinned_gpu=parsed.index, **options)
    return TrainingArguments(**options)


def trainer_device(device: str | None) -> torch.device:
    """The device a Trainer of mpotn runs on for ``device``
    ([trainer_arguments][mpotn.finetune.training.trainer_arguments]): where to decompose or
    load a model it will train, so that the work before training runs there too.

    Examples
    --------
    >>> trainer_device("cpu")
    device(type='cpu')
    """
    with tempfile.TemporaryDirectory() as scratch:  # the arguments write nothing there
        return trainer_arguments(device, output_dir=scratch, progress=False).device


def training_arguments(config: TrainingConfig, output_dir: str | os.PathLike, progress: bool,
                       steps: int, save_steps: int | None = None) -> Any:
    """``transformers.TrainingArguments`` of a fine-tuning (or evaluation) run.

    The device is ``config.device`` ([trainer_arguments][mpotn.finetune.training.trainer_arguments]:
    ``None`` lets the Trainer use CUDA when present, every visible GPU). With
    ``save_steps`` the Trainer saves a checkpoint in ``output_dir`` every ``save_steps``
    steps and at the end, keeping the last two; without it, it saves nothing.
    """
    saving = ({"save_strategy": "steps", "save_steps": save_steps, "save_total_limit": 2}
              if save_steps is not None else {"save_strategy": "no"})
    return trainer_arguments(
        config.device,
        seed=config.seed,
        progress=progress,
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=max(64, config.batch_size),
        num_train_epochs=config.epochs,
        max_steps=steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=warmup_steps(config, steps),
        logging_steps=max(1, steps // 20),
        **saving,
    )


def warmup_steps(config: Any, steps: int) -> int:
    """Warm-up steps of a run of ``steps``: ``config.warmup_ratio`` of them (a
    ``TrainingConfig`` or ``HealConfig``), rounded up, but never every step (the first
    warm-up step has learning rate 0, so a one-step run has none).

    Examples
    --------
    >>> config = TrainingConfig()
    >>> warmup_steps(config, 1), warmup_steps(config, 2), warmup_steps(config, 100)
    (0, 1, 6)
    """
    return max(0, min(math.ceil(config.warmup_ratio * steps), steps - 1))


def planned_steps(config: TrainingConfig, train_size: int, replicas: int = 1) -> int:
    """Optimizer steps of a run: ``max_steps``, or ``epochs`` over ``train_size`` examples.

    ``replicas`` is how many batches of ``batch_size`` one step takes: the processes of a
    distributed launch, or the GPUs one process spreads its batch over (``DataParallel``).

    Examples
    --------
    >>> config = TrainingConfig(epochs=2, batch_size=32)
    >>> planned_steps(config, 100), planned_steps(config, 100, replicas=4)
    (8, 2)
    """
    if config.max_steps > 0:
        return config.max_steps
    per_epoch = math.ceil(train_size / (config.batch_size * replicas))
    return max(1, math.ceil(config.epochs * per_epoch))


def _task_trainer(model: nn.Module, args: Any, tokenizer: Any, **options: Any) -> Any:
    """A ``Trainer`` of a task model, batches padded by ``DataCollatorWithPadding``
    ([padding_tokenizer][mpotn.compression.models.padding_tokenizer]: a tokenizer without a
    padding token pads with its end-of-sequence token).

    A task model's loss is the mean over its own batch (transformers' sequence-classification
    heads ignore ``num_items_in_batch``, though their ``forward`` takes ``**kwargs``), so the
    Trainer must not scale it for averaging over devices: it would multiply the loss, and the
    gradients, by the number of processes (``accelerate launch``) or GPUs (``DataParallel``).
    The training loss of a model with mixtures of experts includes their load-balancing
    loss ([add_router_loss][mpotn.layers.experts.add_router_loss]); evaluation losses
    are the task's own.
    """
    from transformers import DataCollatorWithPadding, Trainer

    class TaskTrainer(RouterLogging, SharedTensorCheckpoints, Trainer):
        def compute_loss(self, model: nn.Module, inputs: dict[str, Any],
                         return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
            counted = ({} if num_items_in_batch is None  # older Trainers lack the keyword
                       else {"num_items_in_batch": num_items_in_batch})
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **counted)
            if torch.is_grad_enabled():  # a training step, not an evaluation
                loss = add_router_loss(loss, model)
                self.record_router(model)
            return (loss, outputs) if return_outputs else loss

    trainer = TaskTrainer(model=model, args=args,
                          data_collator=DataCollatorWithPadding(padding_tokenizer(tokenizer)),
                          **options)
    trainer.model_accepts_loss_kwargs = False
    return trainer


def evaluate_task(model: nn.Module, tokenizer: Any, data: TaskData, config: TrainingConfig,
                  eval_set: Any | None = None) -> dict[str, float]:
    """The task scores: evaluation loss and the task's metrics on the evaluation split.

    (How faithfully a compressed model keeps the original's outputs, without labels, is
    [mpotn.analysis.fidelity][] instead.)
    """
    if eval_set is None:
        _, eval_set = tokenize(data, tokenizer, config.max_length, 0, config.eval_limit)
    if eval_set is None or len(eval_set) == 0:
        raise ValueError("the task has no evaluation examples to score; give an evaluation "
                         "file with examples")
    with tempfile.TemporaryDirectory(prefix="mpotn-eval-") as scratch:
        trainer = _task_trainer(_trainable_model(model), training_arguments(config, scratch,
                                                                            False, 1),
                                tokenizer, compute_metrics=_metric_fn(data))
        output = trainer.predict(eval_set)
    return {k.removeprefix("test_"): float(v) for k, v in output.metrics.items()
            if k in ("test_loss", *(f"test_{m}" for m in data.spec.metrics))}


def is_main_process() -> bool:
    """Whether this process writes the run's files: always, except in the processes of a
    distributed launch (``accelerate launch``, ``torchrun``) other than rank 0."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def resume_checkpoint(out: str | os.PathLike | None, resume: bool) -> str | None:
    """The Trainer checkpoint a fine-tuning run into ``out`` continues from.

    Returns
    -------
    str or None
        With ``resume``, the latest complete ``checkpoint-N`` folder in
        ``out / "checkpoints"`` ([last_checkpoint][mpotn.finetune.training.last_checkpoint]),
        or ``None`` when the run stopped before its first complete checkpoint (it starts
        again at step 0); without it ``None`` (a fresh run).

    Raises
    ------
    ValueError
        With ``resume``: when ``out`` is ``None`` or holds no fine-tuning run (its
        ``finetune_state.json``).
        Without it: when ``out / "checkpoints"`` already holds a Trainer checkpoint (mpotn
        never writes over a run; pass ``resume`` or choose another folder).
    """
    if out is None:
        if resume:
            raise ValueError("resume needs out, the folder of the run to continue (--out)")
        return None
    checkpoints = Path(out) / "checkpoints"
    if resume:
        if not (checkpoints / FINETUNE_STATE).is_file():
            raise ValueError(f"nothing to resume: {checkpoints} holds no fine-tuning run (its "
                             f"{FINETUNE_STATE}); run without --resume")
        return last_checkpoint(checkpoints)  # None: stopped before a complete checkpoint
    started = last_checkpoint(checkpoints, complete=False)
    if started is not None:
        raise ValueError(f"{out} already holds checkpoints of a run ({started}); pass "
                         "--resume (resume=True) to continue it, or choose another --out")
    return None


def last_checkpoint(checkpoints: str | os.PathLike, complete: bool = True) -> str | None:
    """The newest Trainer checkpoint (``checkpoint-N`` folder) in ``checkpoints``.

    Parameters
    ----------
    checkpoints:
        A run's checkpoint folder (it need not exist).
    complete:
        Only checkpoints whose ``trainer_state.json`` is there: the Trainer writes it
        last, so a run stopped while saving continues from the checkpoint before.

    Returns
    -------
    str or None
        The folder's path, ``None`` when there is none.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as run:
    ...     for step in (50, 100):
    ...         (Path(run) / f"checkpoint-{step}").mkdir()
    ...     _ = (Path(run) / "checkpoint-50" / STATE_FILE).write_text("{}")
    ...     Path(last_checkpoint(run)).name, Path(last_checkpoint(run, False)).name
    ('checkpoint-50', 'checkpoint-100')
    """
    folder = Path(checkpoints)
    found = [] if not folder.is_dir() else [
        path for path in folder.glob("checkpoint-*") if path.is_dir()
        and path.name.removeprefix("checkpoint-").isdigit()
        and (not complete or (path / STATE_FILE).is_file())]
    if not found:
        return None
    return str(max(found, key=lambda path: int(path.name.removeprefix("checkpoint-"))))


def train_from(trainer: Any, checkpoint: str | None, steps: int) -> Any:
    """``trainer.train()``, continuing from ``checkpoint`` (``None``: a fresh run) to
    ``steps`` optimizer steps. A checkpoint at the last step is loaded, not trained
    from: the Trainer would take one step more. Returns the ``TrainOutput`` (its
    training loss NaN when nothing was trained). A checkpoint whose optimizer state has
    other parameter groups than this run's (another mpotn version wrote it) is refused
    with what to do."""
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    if checkpoint is not None and _checkpoint_step(checkpoint) >= steps:
        trainer._load_from_checkpoint(checkpoint)
        trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / STATE_FILE))
        return TrainOutput(trainer.state.global_step, math.nan, {})
    try:
        return trainer.train(resume_from_checkpoint=checkpoint)
    except ValueError as error:
        if checkpoint is None or "parameter group" not in str(error):
            raise
        raise ValueError(
            f"{checkpoint} holds an optimizer state whose parameter groups are not this "
            f"run's ({error}): another version of mpotn, or other trainable parameters, "
            "wrote it; resume with the version and settings that wrote it, or start the run "
            "again in a new --out") from error


def _checkpoint_step(checkpoint: str | os.PathLike) -> int:
    """The optimizer step a Trainer checkpoint was saved at (its ``trainer_state.json``)."""
    return int(json.loads((Path(checkpoint) / STATE_FILE).read_text())["global_step"])


def examples_sha256(split: Any) -> str:
    """SHA-256 of a tokenized split's token ids and labels (the output of
    [tokenize][mpotn.finetune.training.tokenize]): what a resumed run checks it trains and
    evaluates on."""
    examples = hashlib.sha256()
    for ids in split["input_ids"]:
        examples.update(np.asarray(ids, dtype=np.int64).tobytes() + b";")
    examples.update(np.asarray(split["label"]).tobytes())
    return examples.hexdigest()


def parameters_sha256(model: nn.Module) -> str:
    """SHA-256 of ``model``'s parameters' names, shapes and trainable flags (not their
    values): what a resumed run's model must match its checkpoint's in.

    Examples
    --------
    >>> parameters_sha256(nn.Linear(2, 3)) == parameters_sha256(nn.Linear(2, 3))
    True
    >>> parameters_sha256(nn.Linear(2, 3)) == parameters_sha256(nn.Linear(3, 2))
    False
    """
    params = hashlib.sha256()
    for name, param in model.named_parameters():
        params.update(f"{name}:{tuple(param.shape)}:{param.requires_grad};".encode())
    return params.hexdigest()


def _run_signature(trained: nn.Module, config: TrainingConfig, train_set: Any,
                   replicas: int, schedules: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a resumed fine-tuning run must share with the checkpointed one: the settings
    that change training (all but ``device`` and ``eval_limit``), the trained model's
    parameters (names, shapes, trained or frozen), the tokenized training set, the
    number of batches one step takes (processes or GPUs) and the settings of its pruning
    and mixed-rank schedules."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("device", "eval_limit")}
    return {"config": settings, "parameters_sha256": parameters_sha256(trained),
            "train_examples": len(train_set), "train_sha256": examples_sha256(train_set),
            "replicas": replicas, "schedules": schedules}


def _check_resumed_run(checkpoints: Path, signature: dict[str, Any]) -> None:
    """Refuse to resume a run with other settings, another model or other data."""
    saved = json.loads((checkpoints / FINETUNE_STATE).read_text())
    before, now = saved.get("config", {}), signature["config"]
    changed = [f"{k} ({before.get(k)!r} -> {now[k]!r})" for k in sorted(now)
               if before.get(k) != now[k]]
    reasons = [f"settings {', '.join(changed)}"] if changed else []
    if saved.get("parameters_sha256") != signature["parameters_sha256"]:
        reasons.append("the trained model (other targets, ratio, strategy or model)")
    if (saved.get("train_examples"), saved.get("train_sha256")) != (
            signature["train_examples"], signature["train_sha256"]):
        reasons.append(f"the training examples ({saved.get('train_examples')} -> "
                       f"{signature['train_examples']})")
    if saved.get("replicas") != signature["replicas"]:
        reasons.append(f"the processes or GPUs one step uses ({saved.get('replicas')} -> "
                       f"{signature['replicas']})")
    if saved.get("schedules") != signature["schedules"]:
        reasons.append(f"the pruning or mixed-rank settings ({saved.get('schedules')} -> "
                       f"{signature['schedules']})")
    if reasons:
        raise ValueError(f"the run checkpointed in {checkpoints} differs in "
                         f"{'; '.join(reasons)}; resume with the same model, task and "
                         "settings, or choose another --out")


def finetune(
    model: nn.Module,
    tokenizer: Any,
    data: TaskData,
    config: TrainingConfig,
    *,
    progress: bool = True,
    evaluate_after: bool = True,
    tokenized: tuple[Any, Any] | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    save_steps: int = SAVE_STEPS,
    pruning: GradualPruning | None = None,
    mixed_rank: MixedRank | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``data.train`` with ``config.strategy`` and evaluate it.

    The model is modified in place (``lora`` wraps it; use ``result.model``).
    ``tokenized`` passes the output of [tokenize][mpotn.finetune.training.tokenize] for repeated
    runs. The device is ``config.device`` (``None``: CUDA when present, every visible GPU;
    see [trainer_arguments][mpotn.finetune.training.trainer_arguments]); the trained model
    stays there.

    Parameters
    ----------
    out:
        Folder of the run's Trainer checkpoints, ``out / "checkpoints"``: one every
        ``save_steps`` optimizer steps and one at the end, the last two kept (with
        ``finetune_state.json``, what a resume must match). ``None`` keeps none.
    resume:
        Continue the run checkpointed in ``out`` from its latest checkpoint: pass the
        model as it was before that run (the same model, task and ``config``; only
        ``device`` and ``eval_limit`` may change). Its weights, optimizer, scheduler and
        random states are read from the checkpoint, so the run ends with the weights of an
        uninterrupted one. Model weights are safetensors; the optimizer, scheduler and
        random states are torch files this run wrote, read by the Trainer with
        ``torch.load(weights_only=True)`` (tensors and plain containers, no code).
    save_steps:
        Optimizer steps between checkpoints (with ``out``).
    pruning:
        Prune while training: a [GradualPruning][mpotn.finetune.pruning.GradualPruning]
        attached to ``model`` (LPAF's first stage; strategy ``full``). Its masks follow
        its schedule over this run's steps and its movement scores train in their own
        optimizer group (no weight decay; ``score_params`` in the record, left out of
        ``trainable_params`` and ``total_params``). At the end it is finalized: the
        weights hold their zeros and the record gets the pruning's settings,
        ``sparsity``, ``mean_rank_share``, ``mean_energy_rank_share`` and one row per
        matrix (``pruned``). A resumed run needs the same pruning attached again.
    mixed_rank:
        Mixed-rank fine-tuning (LPAF's third stage; strategy ``full`` or ``lfa``): a
        [MixedRank][mpotn.finetune.mixed_rank.MixedRank] on ``model``'s factorized
        layers draws which of them compute at full rank at each step, and is closed at
        the end (its settings go into the record).

    Raises
    ------
    ValueError
        For a strategy the model cannot take (``lfa`` without MPO layers, ...)
        or a task without a training split; for ``resume`` without a run in ``out``
        or with another model, task or settings; for a fresh run into an
        ``out`` that holds checkpoints (pass ``resume`` or choose another folder);
        for a device that is not here.
    """
    from transformers import PrinterCallback

    if data.train is None:
        raise ValueError("the task has no training split to fine-tune on")
    if pruning is not None and config.strategy != "full":
        raise ValueError(f"pruning prunes a dense model while every parameter trains: "
                         f"strategy 'full', not {config.strategy!r}")
    if mixed_rank is not None and config.strategy not in ("full", "lfa"):
        raise ValueError(f"mixed-rank fine-tuning trains the factorized model with strategy "
                         f"'full' or 'lfa', not {config.strategy!r}")
    if save_steps < 1:
        raise ValueError(f"save_steps must be >= 1, got {save_steps}")
    check_device(config.device)
    checkpoint = resume_checkpoint(out, resume)
    checkpoints = Path(out) / "checkpoints" if out is not None else None
    trained = _trainable_model(model)
    if config.lr is None and config.strategy == "lfa" and _two_core_only(trained):
        config = dataclasses.replace(config, lr=LFA_LR_TWO_CORE)
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
    scores = pruning.scores() if pruning is not None else []
    if scores:  # trained with the model, but not the model's: counted apart
        ids = {id(score) for score in scores}
        selection["trainable_params"] = count_parameters(
            p for p in trained.parameters() if p.requires_grad and id(p) not in ids)
        selection["total_params"] = count_parameters(
            p for p in trained.parameters() if id(p) not in ids)
        selection["score_params"] = count_parameters(scores)
    for score in scores:
        score.requires_grad_(True)
    optimizer = torch.optim.AdamW(optimizer_groups(
        trained, config.learning_rate, config.central_lr, config.auxiliary_lr,
        config.weight_decay, scores))
    with tempfile.TemporaryDirectory(prefix="mpotn-train-") as scratch:
        output_dir, save = checkpoints or scratch, save_steps if checkpoints else None
        args = training_arguments(config, output_dir, progress, 1, save)
        replicas = args.world_size * max(1, args.n_gpu)  # batches per optimizer step
        steps = planned_steps(config, len(train_set), replicas)
        if checkpoints is not None:
            signature = _run_signature(trained, config, train_set, replicas, {
                **(pruning.settings() if pruning is not None else {}),
                **(mixed_rank.settings() if mixed_rank is not None else {})} or None)
            if resume:
                _check_resumed_run(checkpoints, signature)
            elif is_main_process():
                write_text(checkpoints / FINETUNE_STATE, json.dumps(signature, indent=2))
        trainer = _task_trainer(
            trained, training_arguments(config, output_dir, progress, steps, save), tokenizer,
            train_dataset=train_set, optimizers=(optimizer, None))
        if not progress:
            trainer.remove_callback(PrinterCallback)
        for schedule in (pruning, mixed_rank):
            if schedule is not None:
                trainer.add_callback(schedule.callback())
        start = time.perf_counter()
        output = train_from(trainer, checkpoint, steps)
        seconds = time.perf_counter() - start
    trained.eval()
    pruned = pruning.finalize() if pruning is not None else None  # scores gone from here on
    if mixed_rank is not None:
        mixed_rank.close()
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
        "train_loss": (None if math.isnan(output.training_loss)
                       else float(output.training_loss)),
    }
    if checkpoint is not None:
        record["resumed_from"] = Path(checkpoint).name
    if pruning is not None:
        record.update(pruning.settings(), **pruning_summary(pruned), pruned=list(pruned))
    if mixed_rank is not None:
        record.update(mixed_rank.settings())
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
              title: str, overwrite: bool = False, adapter_only: bool = False
              ) -> dict[str, Path]:
    """Write ``metrics.json``, ``history.csv`` / ``.json``, ``history.png`` and ``model/``
    -- or, with ``adapter_only``, ``adapter/``: only the trained parameters, an adapter of
    the compressed save the model was loaded from
    ([mpotn.compression.adapters][]); see [save_model][mpotn.finetune.training.save_model]
    for ``overwrite``."""
    out = Path(out)
    folder = out / ("adapter" if adapter_only else "model")
    check_writable(folder, overwrite)
    paths = {
        "metrics": write_output(out / "metrics.json", json.dumps(result.record, indent=2)),
        "history_json": write_output(out / "history.json", json.dumps(list(result.history),
                                                                      indent=2)),
        "history_csv": write_output(out / "history.csv", result.history.to_csv()),
    }
    if result.core_changes:
        paths["core_changes"] = write_output(out / "core_changes.csv",
                                             result.core_changes.to_csv())
    if len(result.history):
        paths["plot"] = write_output(out / "history.png", lambda path: draw_history(
            result.history, "step", ["loss"], path, title))
    paths["adapter" if adapter_only else "model"] = save_model(
        result.model, tokenizer, folder, overwrite, adapter_only)
    return {key: path for key, path in paths.items() if path}


def save_model(model: nn.Module, tokenizer: Any, directory: str | os.PathLike,
               overwrite: bool = False, adapter_only: bool = False) -> Path:
    """Save a trained model and its tokenizer, replacing what mpotn wrote in ``directory``
    atomically ([mpotn.atomic.atomic_dir][]).

    An [MPOModel][mpotn.compression.model.MPOModel] is an mpotn save (``mpotn.load`` and
    [prepare_model][mpotn.finetune.training.prepare_model] read it back); other models use Hugging
    Face's ``save_pretrained`` (a PEFT model saves its adapters). ``adapter_only``
    writes an MPOModel's trained parameters alone, as an adapter of the save it was
    loaded from (``mpotn.load(directory, base=...)`` reads it).

    Raises
    ------
    ValueError
        If ``directory`` holds files mpotn did not write (its manifest does not
        list them) and ``overwrite`` is false; with it they are kept.
    """
    with atomic_dir(directory, overwrite) as tmp:
        if adapter_only:  # an MPOModel loaded from a compressed save
            model.save_pretrained(str(tmp), adapter_only=True)
        else:
            model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return Path(directory)
