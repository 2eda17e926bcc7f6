"""Healing (SPEC §7): distil the original model into its compressed copy on unlabelled text.

A compressed model (the *student*, usually an [MPOModel][mpotn.compression.model.MPOModel])
is trained for a few hundred to a few thousand steps to reproduce the hidden
states of the model it was compressed from (the *teacher*) at every layer,
the embeddings' output included; optionally its output logits too. This is
the brief retraining that tensor-network compression of large language models
(CompactifAI, 2024) uses to recover most of what truncation lost. No labels
are needed: any text of the domain does.

The loss of a batch is, per layer ``l``, the squared error of the student's
hidden states normalised by the teacher's mean square at that layer, over the
real tokens only (padding is masked out with ``attention_mask``),

    L_l = sum_tokens ||h_s - h_t||^2 / sum_tokens ||h_t||^2,

averaged over the layers; with ``logits_weight > 0`` it adds that weight times
the (masked) mean squared error of the logits. [heal][mpotn.finetune.heal.heal] trains either
the LFA parameter set (``train="auxiliary"``:
[lfa_parameters][mpotn.compression.parameters.lfa_parameters], i.e. the auxiliary
tensors, biases and norms) or every parameter (``train="all"``) with the
transformers ``Trainer``, on ``config.device`` (default: the Trainer's choice, CUDA when
present; see [trainer_arguments][mpotn.finetune.training.trainer_arguments]).
Checkpoints go to ``out / "checkpoints"``; ``resume=True`` continues a stopped
run, and ends with the weights an uninterrupted run would have.

Examples
--------
>>> import copy, torch
>>> from transformers import BertConfig, BertModel
>>> from mpotn.compression import compress
>>> from mpotn.compression.models import load_tokenizer
>>> _ = torch.manual_seed(0)
>>> teacher = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
...                                intermediate_size=64)).eval()
>>> student = compress(copy.deepcopy(teacher), targets=["ffn"], ratio=0.3, progress=False)
>>> sentences = ["a fine film .", "dull and slow .", "it works .", "not at all ."] * 4
>>> config = HealConfig(steps=4, batch_size=4, heldout=4, learning_rate=5e-4)  # tiny model
>>> result = heal(student, teacher, load_tokenizer(), sentences, config, progress=False)
>>> result.steps, result.mse_after < result.mse_before
(4, True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mpotn.atomic import write_output, write_text
from mpotn.compression.calibrate import text_batches
from mpotn.compression.config import MPO_LAYERS
from mpotn.compression.deepen import layer_origins
from mpotn.compression.models import model_device, padding_tokenizer
from mpotn.compression.parameters import count_parameters, lfa_parameters
from mpotn.devices import check_device, parse_device
from mpotn.finetune.router_logs import RouterLogging
from mpotn.finetune.shared_checkpoints import SharedTensorCheckpoints
from mpotn.finetune.training import (
    DEVICE_HELP,
    FieldHelp,
    _trainable_model,
    is_main_process,
    last_checkpoint,
    parameters_sha256,
    save_model,
    train_from,
    trainer_arguments,
    warmup_steps,
)
from mpotn.layers.experts import add_router_loss
from mpotn.table import Table
from mpotn.types import HEAL_TRAIN, HealTrain

#: Learning rate per ``train`` choice when none is given. ``auxiliary``: measured on
#: all-MiniLM-L6-v2 compressed at rho = 0.5 by weight truncation (attention and FFN;
#: held-out error 0.661 before healing), 448 SST-2 sentences (64 held out), batch 16, 300
#: steps: 2e-3 -> 0.224, 5e-3 -> 0.217 (1e-2 was already worse than 5e-3 at 100 steps, 5e-4
#: and 1e-4 clearly worse). ``all``: on the same weight-truncated model 1e-3 gave 0.188 and
#: 3e-4 0.220, but on the default calibrated compression (SVDs, budget weighted by
#: sensitivity; ``benchmarks/fidelity_calibrated.py``, 2,000 sentences) 1e-3 *lowers* the
#: mean cosine at 0.9 and 0.75 of the size (0.978 -> 0.944, 0.948 -> 0.935) where 1e-4
#: raises it (0.982, 0.963), and at 0.5 both give 0.89: 1e-4.
HEAL_LR = {"auxiliary": 2e-3, "all": 1e-4}
#: The defaults until 2026-12-06: a run checkpointed then without a learning rate of its
#: own resumes with the one it started with.
EARLIER_HEAL_LR = {"auxiliary": 2e-3, "all": 1e-3}

#: File in ``out / "checkpoints"`` recording the run a resume must continue.
STATE_NAME = "heal_state.json"


@dataclass
class HealConfig(FieldHelp):
    """How to heal; each field's ``metadata["help"]`` is its ``mpotn heal`` help text.

    Examples
    --------
    >>> HealConfig(train="all").lr
    0.0001
    >>> HealConfig(train="all").resolved().learning_rate
    0.0001
    >>> HealConfig.help("steps")
    'optimizer steps (default: 300)'
    """

    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    train: HealTrain = field(default="auxiliary", metadata={
        "help": "parameters trained: auxiliary (the LFA set: auxiliary tensors, biases and "
                "norms; central tensors and dense weights stay frozen) or all"})
    learning_rate: float | None = field(default=None, metadata={
        "help": "peak learning rate (default per --train: "
                + ", ".join(f"{k} {v:g}" for k, v in HEAL_LR.items()) + ")"})
    batch_size: int = field(default=16, metadata={
        "help": "sentences per step and process (a distributed launch multiplies it)"})
    max_length: int = field(default=128, metadata={
        "help": "tokens per sentence (longer ones are truncated)"})
    logits_weight: float = field(default=0.0, metadata={
        "help": "weight of the logits' mean squared error added to the hidden-state loss "
                "(for models that return logits)"})
    dropout: bool = field(default=False, metadata={
        "help": "keep the student in training mode (dropout active) while healing; by "
                "default it runs in evaluation mode, so that it fits the teacher's "
                "deterministic hidden states (gradients still flow; mixtures of experts then "
                "route without a capacity limit, as they do in evaluation)"})
    warmup_ratio: float = field(default=0.06, metadata={
        "help": "share of steps with a linear warm-up (then a linear decay to 0)"})
    heldout: int = field(default=32, metadata={
        "help": "sentences held out to measure the hidden-state error before and after "
                "(at most half of the texts)"})
    save_steps: int = field(default=100, metadata={"help": "steps between checkpoints"})
    logging_steps: int = field(default=10, metadata={"help": "steps between logged losses"})
    seed: int = field(default=0, metadata={
        "help": "seeds the held-out split, the data order and dropout"})
    device: str | None = field(default=None, metadata={"help": DEVICE_HELP})

    #: Fields that say where a run goes, not what it computes: a resume keeps the given ones.
    PLACEMENT: ClassVar[frozenset[str]] = frozenset({"device"})

    def __post_init__(self) -> None:
        if self.train not in HEAL_TRAIN:
            raise ValueError(f"unknown train {self.train!r}; choose from {HEAL_TRAIN}")
        for name in ("steps", "batch_size", "heldout", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.learning_rate is not None and not 0 < self.learning_rate < math.inf:
            raise ValueError(f"learning_rate must be a finite number > 0, got "
                             f"{self.learning_rate}")
        if not 0 <= self.logits_weight < math.inf or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"logits_weight must be a finite number >= 0 and warmup_ratio in "
                             f"[0, 1), got {self.logits_weight} and {self.warmup_ratio}")
        parse_device(self.device)

    @property
    def lr(self) -> float:
        """``learning_rate``, or ``train``'s [HEAL_LR][mpotn.finetune.heal.HEAL_LR]."""
        return self.learning_rate if self.learning_rate is not None else HEAL_LR[self.train]

    def resolved(self) -> HealConfig:
        """This configuration with its learning rate set (``lr``), as a checkpointed run
        stores it so that a resume keeps it whatever the defaults become."""
        return dataclasses.replace(self, learning_rate=self.lr)


@dataclass
class HealResult:
    """What a healing run produced.

    Attributes
    ----------
    model:
        The healed student (the object passed in, trained in place).
    history:
        The Trainer's log per logged step (step, loss, learning rate, gradient norm).
    mse_before, mse_after:
        Relative hidden-state error on the held-out sentences
        ([hidden_state_mse][mpotn.finetune.heal.hidden_state_mse]) before and after healing.
    layers_before, layers_after:
        The same per hidden state (embeddings first).
    seconds:
        Wall time of the training (of this call, for a resumed run).
    steps:
        Optimizer steps the student has taken (a resumed run counts all).
    trainable_params, total_params:
        Parameters trained, and all parameters of the student.
    config:
        The configuration used (a resumed run's saved one).
    device:
        Where the Trainer ran.
    train_texts, heldout_texts:
        Sentences trained on, and held out.
    """

    model: nn.Module
    history: Table
    mse_before: float
    mse_after: float
    layers_before: list[float]
    layers_after: list[float]
    seconds: float
    steps: int
    trainable_params: int
    total_params: int
    config: HealConfig
    device: str
    train_texts: int
    heldout_texts: int

    @property
    def record(self) -> dict[str, Any]:
        """Everything but the model and the history, as plain JSON-serializable values."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("model", "history", "config")}
        record["mse_drop"] = 1 - self.mse_after / self.mse_before if self.mse_before else 0.0
        return {**record, "learning_rate": self.config.lr, "config": self.config.to_dict()}


# ----------------------------------------------------------------------------- the loss


def _layer_errors(student: Any, teacher: Any, attention_mask: torch.Tensor | None,
                  origins: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per hidden state of the teacher: summed squared error and summed teacher square, over
    real tokens. A deeper student (``deepen``) is compared at its matched hidden states
    ([matched_layers][mpotn.finetune.heal.matched_layers], with its layers' ``origins``)."""
    ours, theirs = student.hidden_states, teacher.hidden_states
    if ours is None or theirs is None:
        raise ValueError("both models must return hidden_states (output_hidden_states=True)")
    if len(ours) < len(theirs):
        raise ValueError(f"the student returns {len(ours)} hidden states and the teacher "
                         f"{len(theirs)}: heal needs the model that was compressed (or "
                         "deepened) as teacher")
    ours = [ours[k] for k in matched_layers(len(ours) - 1, len(theirs) - 1, origins)]
    errors, scales = [], []
    for s, t in zip(ours, theirs):
        if s.shape != t.shape:
            raise ValueError(f"hidden states of shape {tuple(s.shape)} (student) and "
                             f"{tuple(t.shape)} (teacher) differ: heal needs the model that "
                             "was compressed as teacher")
        s, t = s.float(), t.float()  # float16 sums overflow past 65504
        mask = (torch.ones(s.shape[:-1], dtype=s.dtype, device=s.device)
                if attention_mask is None else attention_mask.to(s.dtype))[..., None]
        errors.append(((s - t).square() * mask).sum())
        scales.append((t.square() * mask).sum())
    return torch.stack(errors), torch.stack(scales)


def matched_layers(student_layers: int, teacher_layers: int,
                   origins: Sequence[int] | None = None) -> list[int]:
    """The student's hidden state compared with each of the teacher's, for a student as
    deep or deeper ([deepen][mpotn.compression.deepen.deepen]): the embeddings with the
    embeddings, and the teacher's hidden state after its layer ``j - 1`` with the student's
    after that layer and the copies that follow it -- the student's layers whose
    ``origins`` ([layer_origins][mpotn.compression.deepen.layer_origins]) are below ``j``
    -- so the last with the last. Without ``origins`` (or with origins of another teacher
    depth) the student is taken as ``deepen``'s default ``"interleave"`` placement makes
    it: ``j + floor(j e / L_t)`` for ``e = L_s - L_t`` new layers (``j L_s / L_t`` when
    ``L_t`` divides ``L_s``: the uniform layer map of TinyBERT's distillation).

    Examples
    --------
    >>> matched_layers(6, 6), matched_layers(12, 6), matched_layers(8, 6)
    ([0, 1, 2, 3, 4, 5, 6], [0, 2, 4, 6, 8, 10, 12], [0, 1, 2, 4, 5, 6, 8])
    >>> matched_layers(5, 3, origins=[0, 1, 2, 2, 2])  # deepen(..., placement="append")
    [0, 1, 2, 5]
    """
    if (origins is not None and len(origins) == student_layers
            and sorted(set(origins)) == list(range(teacher_layers))):
        return [sum(origin < j for origin in origins) for j in range(teacher_layers + 1)]
    extra = student_layers - teacher_layers
    return [j + j * extra // teacher_layers if teacher_layers else 0
            for j in range(teacher_layers + 1)]


def _logits_error(student: Any, teacher: Any, attention_mask: torch.Tensor | None
                  ) -> torch.Tensor:
    ours, theirs = getattr(student, "logits", None), getattr(teacher, "logits", None)
    if ours is None or theirs is None:
        raise ValueError("logits_weight > 0 needs a student and a teacher that return logits")
    if ours.shape != theirs.shape:
        raise ValueError(f"logits of shape {tuple(ours.shape)} (student) and "
                         f"{tuple(theirs.shape)} (teacher) differ")
    square = (ours.float() - theirs.float()).square()
    if attention_mask is None or square.dim() != 3 or square.shape[:2] != attention_mask.shape:
        return square.mean()
    mask = attention_mask.to(square.dtype)[..., None]
    return (square * mask).sum() / (mask.sum() * square.shape[-1]).clamp_min(1)


def distillation_loss(student: Any, teacher: Any, attention_mask: torch.Tensor | None = None,
                      logits_weight: float = 0.0, origins: Sequence[int] | None = None
                      ) -> torch.Tensor:
    """The healing loss of one batch, from both models' outputs.

    Parameters
    ----------
    student, teacher:
        Model outputs with ``hidden_states`` (and ``logits`` when
        ``logits_weight > 0``), as returned with ``output_hidden_states=True``.
    attention_mask:
        ``batch x tokens``, 1 for real tokens; padding does not count.
    logits_weight:
        Weight of the logits' mean squared error.
    origins:
        For a deeper student, the original layer each of its layers descends from
        ([layer_origins][mpotn.compression.deepen.layer_origins]; which of its hidden
        states are compared: [matched_layers][mpotn.finetune.heal.matched_layers]).

    Returns
    -------
    torch.Tensor
        The mean over hidden states of the squared error normalised by the
        teacher's square, plus ``logits_weight`` times the logits' MSE, in float32
        whatever the models' dtype (float16 sums overflow).

    Examples
    --------
    >>> from types import SimpleNamespace as Out
    >>> t = Out(hidden_states=(torch.ones(1, 2, 4), 2 * torch.ones(1, 2, 4)))
    >>> s = Out(hidden_states=(torch.zeros(1, 2, 4), 2 * torch.ones(1, 2, 4)))
    >>> float(distillation_loss(s, t))  # layer 0 entirely wrong, layer 1 exact
    0.5
    """
    errors, scales = _layer_errors(student, teacher, attention_mask, origins)
    loss = (errors / scales.clamp_min(torch.finfo(scales.dtype).tiny)).mean()
    if logits_weight > 0:
        loss = loss + logits_weight * _logits_error(student, teacher, attention_mask)
    return loss


@contextmanager
def _evaluating(*models: nn.Module) -> Iterator[None]:
    """``models`` in eval mode while the body runs, each back in its own mode after."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


@torch.no_grad()
def _heldout_errors(student: nn.Module, teacher: nn.Module, batches: Iterable[dict[str, Any]],
                    device: torch.device) -> list[float]:
    """Per hidden state, squared error over teacher square, summed over all ``batches``."""
    errors = scales = None
    with _evaluating(student, teacher):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            e, s = _layer_errors(student(**batch, output_hidden_states=True),
                                 teacher(**batch, output_hidden_states=True),
                                 batch.get("attention_mask"), layer_origins(student))
            errors = e.double() if errors is None else errors + e.double()
            scales = s.double() if scales is None else scales + s.double()
    if errors is None:
        raise ValueError("no held-out sentences to measure the hidden-state error on")
    return (errors / scales.clamp_min(torch.finfo(torch.float64).tiny)).tolist()


@torch.no_grad()
def check_pair(student: nn.Module, teacher: nn.Module, tokenizer: Any, text: str,
               logits: bool = False, max_length: int = 128) -> None:
    """Raise ``ValueError`` unless healing can compare ``student`` with ``teacher``: both
    give hidden states of the same shapes on ``text`` (a deeper student at its
    [matched_layers][mpotn.finetune.heal.matched_layers]), and, with ``logits``, logits of
    the same shape. One forward pass of each, in eval mode, on the student's device (where
    the teacher must be too).

    Examples
    --------
    >>> from transformers import BertConfig, BertModel
    >>> from mpotn.compression.models import load_tokenizer
    >>> def bert(width):
    ...     return BertModel(BertConfig(hidden_size=width, num_hidden_layers=1,
    ...                                 num_attention_heads=2, intermediate_size=2 * width))
    >>> check_pair(bert(32), bert(32), load_tokenizer(), "a short sentence .")
    >>> check_pair(bert(32), bert(16), load_tokenizer(), "a short sentence .")
    Traceback (most recent call last):
    ...
    ValueError: hidden states of shape (1, 6, 32) (student) and (1, 6, 16) (teacher) differ: ...
    """
    batch = {k: v.to(model_device(student))
             for k, v in text_batches(tokenizer, [text], 1, max_length)[0].items()}
    with _evaluating(student, teacher):
        ours = student(**batch, output_hidden_states=True)
        theirs = teacher(**batch, output_hidden_states=True)
    mask = batch.get("attention_mask")
    _layer_errors(ours, theirs, mask, layer_origins(student))
    if logits:
        _logits_error(ours, theirs, mask)


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[dict[str, list]]:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [{k: encoded[k][i] for k in encoded} for i in range(len(texts))]


def hidden_state_mse(student: nn.Module, teacher: nn.Module, tokenizer: Any,
                     texts: Sequence[str], *, batch_size: int = 16, max_length: int = 128,
                     per_layer: bool = False) -> float | list[float]:
    """Relative hidden-state error of ``student`` against ``teacher`` on ``texts``.

    Per hidden state (the embeddings' output, then every layer's), the summed
    squared error over all real tokens divided by the teacher's summed square;
    the mean over hidden states (or the list with ``per_layer=True``). Both
    models run in eval mode, without gradients, on the student's device (the
    teacher is moved there and back).

    Examples
    --------
    >>> from transformers import BertConfig, BertModel
    >>> from mpotn.compression.models import load_tokenizer
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1,
    ...                              num_attention_heads=2, intermediate_size=64))
    >>> hidden_state_mse(model, model, load_tokenizer(), ["same model ."])
    0.0
    """
    device, home = model_device(student), model_device(teacher)
    teacher.to(device)
    try:
        layers = _heldout_errors(student, teacher,
                                 text_batches(tokenizer, texts, batch_size, max_length), device)
    finally:
        teacher.to(home)
    return layers if per_layer else sum(layers) / len(layers)


# ----------------------------------------------------------------------------- training


def _split(texts: Sequence[str], config: HealConfig) -> tuple[list[str], list[str]]:
    """Training and held-out sentences: a seeded random ``heldout`` (at most half)."""
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if len(texts) < 2:
        raise ValueError(f"healing needs at least 2 non-empty sentences, got {len(texts)}")
    count = min(config.heldout, len(texts) // 2)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(config.seed))
    held = set(order[:count].tolist())
    return ([t for k, t in enumerate(texts) if k not in held],
            [t for k, t in enumerate(texts) if k in held])


def _texts_digest(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def _heal_arguments(config: HealConfig, output_dir: Path, progress: bool, save: bool) -> Any:
    """``TrainingArguments`` of a healing run, on ``config.device``
    ([trainer_arguments][mpotn.finetune.training.trainer_arguments]: ``None`` lets the
    Trainer use CUDA when present), saving a checkpoint every ``save_steps`` with ``save``.
    """
    return trainer_arguments(
        config.device,
        seed=config.seed,
        progress=progress,
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        max_steps=config.steps,
        learning_rate=config.lr,
        weight_decay=0.0,
        warmup_steps=warmup_steps(config, config.steps),
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if save else "no",
        save_steps=config.save_steps,
        save_total_limit=2,
        remove_unused_columns=False,
    )


def _trainer_class() -> type:
    from transformers import Trainer

    class HealTrainer(RouterLogging, SharedTensorCheckpoints, Trainer):
        """A Trainer whose loss is [distillation_loss][mpotn.finetune.heal.distillation_loss]
        (plus, in training steps, the load-balancing loss of any mixture of experts,
        [add_router_loss][mpotn.layers.experts.add_router_loss]).

        The teacher runs without gradients, in eval mode, on the student's device.
        """

        def __init__(self, *args: Any, teacher: nn.Module, logits_weight: float,
                     dropout: bool, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.teacher = teacher
            self.logits_weight = logits_weight
            self.dropout = dropout

        def compute_loss(self, model: nn.Module, inputs: dict[str, Any],
                         return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
            if not self.dropout:
                model.eval()  # gradients still flow; dropout off (and experts' capacity)
            outputs = model(**inputs, output_hidden_states=True)
            device = outputs.hidden_states[-1].device
            if model_device(self.teacher) != device:
                self.teacher.to(device)
            self.teacher.eval()
            with torch.no_grad():
                target = self.teacher(**inputs, output_hidden_states=True)
            loss = distillation_loss(outputs, target, inputs.get("attention_mask"),
                                     self.logits_weight, layer_origins(model))
            if torch.is_grad_enabled():  # a training step, not an evaluation
                loss = add_router_loss(loss, model)
                self.record_router(model)
            return (loss, outputs) if return_outputs else loss

    return HealTrainer


@contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """Hide transformers' own bars (writing checkpoints, ...) unless ``show``; restore after."""
    from transformers.utils import logging as hf_logging

    hide = not show and hf_logging.is_progress_bar_enabled()
    if hide:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            hf_logging.enable_progress_bar()


def _select(model: nn.Module, train: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` for ``train`` and return the trained parameters."""
    if train == "auxiliary" and not any(isinstance(m, MPO_LAYERS) for m in model.modules()):
        raise ValueError("train='auxiliary' needs MPO layers in the student; compress it first "
                         "or heal with train='all'")
    chosen = (list(model.parameters()) if train == "all"
              else [p for _, p in lfa_parameters(model, head=False)])
    for param in model.parameters():
        param.requires_grad_(False)
    for param in chosen:
        param.requires_grad_(True)
    return chosen


def check_run_folder(out: str | os.PathLike, resume: bool) -> None:
    """Raise ``ValueError`` when ``resume`` and ``out`` holds no healing run, or when not
    ``resume`` and ``out`` already holds one (a checkpoint in ``out/checkpoints``): what
    [heal][mpotn.finetune.heal.heal] checks first, for a caller to check before loading
    its models.

    Examples
    --------
    >>> import tempfile
    >>> check_run_folder(tempfile.mkdtemp(), resume=False)
    """
    checkpoints = Path(out) / "checkpoints"
    if resume and not (checkpoints / STATE_NAME).is_file():
        raise ValueError(f"nothing to resume: {checkpoints} holds no healing run (its "
                         f"{STATE_NAME}); run without resume (--resume)")
    if not resume and last_checkpoint(checkpoints, complete=False):
        raise ValueError(f"{out} already holds a healing run; pass resume=True (--resume) to "
                         "continue it, or choose another folder")


def _check_student(checkpoints: Path, signature: str) -> None:
    """Refuse to resume with a student whose parameters (names, shapes, what trains) are
    not the checkpointed run's ([parameters_sha256][mpotn.finetune.training.parameters_sha256];
    runs checkpointed before it was stored are not checked)."""
    saved = json.loads((checkpoints / STATE_NAME).read_text()).get("parameters_sha256")
    if saved is not None and saved != signature:
        raise ValueError(f"the student is not the model the run checkpointed in {checkpoints} "
                         "healed (other parameters, shapes or trained set); resume with the "
                         "same compressed model and --train, or start a new run elsewhere")


def _resume_config(checkpoints: Path, config: HealConfig, digest: str) -> HealConfig:
    saved = json.loads((checkpoints / STATE_NAME).read_text())
    if saved["texts_sha256"] != digest:
        raise ValueError(f"the texts differ from those of the run checkpointed in {checkpoints}; "
                         "resume with the same texts (source, samples and seed)")
    given = {k: getattr(config, k) for k in HealConfig.PLACEMENT}
    settings = saved["config"]
    if settings.get("learning_rate") is None:  # checkpointed before runs stored theirs
        settings = {**settings,
                    "learning_rate": EARLIER_HEAL_LR[settings.get("train", "auxiliary")]}
    saved_config = HealConfig(**{**settings, **given})  # earlier runs lack device
    config = config.resolved()
    if changed := saved_config.changed(config):
        warnings.warn(f"resuming with the checkpointed configuration; ignoring the new values "
                      f"of {', '.join(changed)}", stacklevel=3)
    return saved_config


def heal(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    config: HealConfig | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
) -> HealResult:
    """Distil ``teacher`` into ``student`` on ``texts``, in place.

    Parameters
    ----------
    student:
        The compressed model (an [MPOModel][mpotn.compression.model.MPOModel],
        or any model with MPO layers; any model for ``train="all"``).
    teacher:
        The model that was compressed, with the same hidden states. It runs in
        eval mode without gradients on the student's device, and goes back to
        its device and mode afterwards.
    tokenizer:
        The models' tokenizer.
    texts:
        Unlabelled sentences (e.g. [mpotn.data.texts.texts][]); a seeded
        random ``config.heldout`` of them (at most half) is held out to measure
        the hidden-state error before and after.
    config:
        How to heal (default [HealConfig][mpotn.finetune.heal.HealConfig]).
    out:
        Folder for checkpoints (``out / "checkpoints"``, every
        ``config.save_steps`` steps and at the end); ``None`` keeps none.
    resume:
        Continue the run checkpointed in ``out`` (its configuration replaces
        ``config``, but for ``config.device``; the texts must be the same). The resumed
        run ends with the weights of an uninterrupted one. Pass the student as it was
        before healing: its weights are read from the checkpoint (safetensors; the
        optimizer, scheduler and random states are torch files the run wrote, read with
        ``torch.load(weights_only=True)``).
    progress:
        Show the Trainer's progress bar and logs.

    Returns
    -------
    HealResult
        The student, the loss history, the held-out error before and after,
        the wall time and the parameter counts.

    Raises
    ------
    ValueError
        For fewer than 2 sentences, ``train="auxiliary"`` without MPO layers,
        models whose hidden states (or logits, with ``logits_weight > 0``)
        differ in number or shape, ``resume`` without a run in ``out`` or with
        other texts, a fresh run into an ``out`` that holds one, and a
        ``config.device`` that is not here.

    Notes
    -----
    Only the trained set changes: every other parameter stays bit-identical.
    The student's ``requires_grad`` flags, its train/eval mode and its device
    are restored afterwards. Both models run on ``config.device`` (``None``: the
    Trainer's choice, CUDA when present).
    """
    from transformers import DataCollatorWithPadding, PrinterCallback

    config = config or HealConfig()
    check_device(config.device)
    trained = _trainable_model(student)
    checkpoints = Path(out) / "checkpoints" if out is not None else None
    digest = _texts_digest(texts)
    if resume and checkpoints is None:
        raise ValueError("resume needs out, the folder of the run to continue")
    if checkpoints is not None:
        check_run_folder(out, resume)
    if resume:
        config = _resume_config(checkpoints, config, digest)
    train_texts, held_texts = _split(texts, config)
    flags = {id(p): p.requires_grad for p in student.parameters()}
    modes = student.training, teacher.training
    homes = model_device(student), model_device(teacher)
    scratch = tempfile.TemporaryDirectory(prefix="mpotn-heal-") if checkpoints is None else None
    try:
        chosen = _select(trained, config.train)
        signature = parameters_sha256(trained)
        if resume:
            _check_student(checkpoints, signature)
        output_dir = Path(scratch.name) if scratch else checkpoints
        args = _heal_arguments(config, output_dir, progress, save=scratch is None)
        device = args.device
        held = text_batches(tokenizer, held_texts, config.batch_size, config.max_length)
        student.to(device)
        teacher.to(device)
        check_pair(student, teacher, tokenizer, held_texts[0], config.logits_weight > 0,
                   config.max_length)  # fail before training if either lacks logits
        before = _heldout_errors(student, teacher, held, device)
        trainer = _trainer_class()(
            model=trained,
            args=args,
            train_dataset=_encode(tokenizer, train_texts, config.max_length),
            # padded on the right, as the held-out batches: each sentence at its own positions
            data_collator=DataCollatorWithPadding(padding_tokenizer(tokenizer, side="right")),
            teacher=teacher,
            logits_weight=config.logits_weight,
            dropout=config.dropout,
        )
        if not progress:
            trainer.remove_callback(PrinterCallback)
        if checkpoints is not None and not resume and is_main_process():
            write_text(checkpoints / STATE_NAME, json.dumps(
                {"config": config.resolved().to_dict(), "texts_sha256": digest,
                 "texts": len(texts), "parameters_sha256": signature}, indent=2))
        start = time.perf_counter()
        with _progress_bars(progress):
            output = train_from(trainer, last_checkpoint(checkpoints) if resume else None,
                                config.steps)
        seconds = time.perf_counter() - start
        after = _heldout_errors(student, teacher, held, device)
    finally:
        for param in student.parameters():
            param.requires_grad_(flags.get(id(param), param.requires_grad))
        student.to(homes[0]).train(modes[0])
        teacher.to(homes[1]).train(modes[1])
        if scratch is not None:
            scratch.cleanup()
    history = Table({k: v for k, v in row.items()} for row in trainer.state.log_history
                    if "loss" in row)
    return HealResult(
        model=student,
        history=history,
        mse_before=sum(before) / len(before),
        mse_after=sum(after) / len(after),
        layers_before=before,
        layers_after=after,
        seconds=seconds,
        steps=int(output.global_step),
        trainable_params=count_parameters(chosen),
        total_params=count_parameters(trained.parameters()),
        config=config,
        device=str(device),
        train_texts=len(train_texts),
        heldout_texts=len(held_texts),
    )


def write_heal(result: HealResult, tokenizer: Any, out: str | os.PathLike,
               overwrite: bool = False) -> dict[str, Path]:
    """Write ``out/model/`` (student and tokenizer; ``overwrite`` as for
    [save_model][mpotn.finetune.training.save_model]), ``metrics.json`` and ``history.csv``."""
    out = Path(out)
    paths = {
        "model": save_model(result.model, tokenizer, out / "model", overwrite),
        "metrics": write_output(out / "metrics.json", json.dumps(result.record, indent=2)),
        "history": write_output(out / "history.csv", result.history.to_csv()),
    }
    return {key: path for key, path in paths.items() if path}
