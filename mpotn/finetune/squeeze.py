r"""Dimension squeezing (SPEC §3, Algorithm 2), with checkpoints and the ``direct`` ablation.

Starting from a fine-tuned MPO model with task score $P$, each step

1. estimates, for every matrix allowed to shrink, the error of its next cut
   of the central bond ($d \to d - c$) from its *stored* singular values
   (Eq. 3: $\epsilon = \sqrt{\sum_{d - c < k \le d} \lambda_k^2}$; no matrix is rebuilt);
2. cuts the matrix with the least estimated error (relative to its norm by
   default), by TT-rounding its current cores, which refreshes that matrix's
   stored spectrum; with a per-step parameter ``budget`` (a generalization
   SPEC §3 allows) it keeps taking the next least-error cut, a matrix already
   chosen in this step competing with its next dimensions, until the step
   removes at least ``budget`` parameters, then cuts every chosen matrix once;
3. fine-tunes the auxiliary tensors (with biases, norms and the task head;
   central tensors frozen) for a set number of optimizer steps;
4. evaluates the score $\tilde P$ and stops once it is worse than $P$ by more
   than $\Delta$ (the returned model is then the last one within $\Delta$),
   at a target compression, at the step limit, or when nothing can be cut.

A *step* is that whole round; a *cut* is one matrix's central bond lowered once
(a step makes one cut, or with a budget one per chosen matrix).

Every step is checkpointed (an mpotn save plus the squeezing state, published
by an atomic rename of ``latest.json``), so a run killed at any moment resumes
where it stopped, with the same data order and seeds as an uninterrupted run.

Fine-tuning and evaluation run on the training config's ``device`` (default: the
Trainer's choice, CUDA when present; see
[trainer_arguments][mpotn.finetune.training.trainer_arguments]); cuts happen on the
device the model is on. In a distributed launch (``accelerate launch``) every process
takes the same steps and only the main one writes files.

[direct_truncation][mpotn.finetune.squeeze.direct_truncation] is the paper's ``MPOP_dir`` ablation:
cut every matrix straight to the squeezed model's bonds and fine-tune for the same
total number of steps.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tqdm.auto import tqdm

from mpotn.atomic import check_writable, remove_written, write_output, write_text
from mpotn.compression.model import MPOModel, load
from mpotn.compression.models import matrix_type
from mpotn.compression.parameters import count_parameters
from mpotn.compression.serialization import is_saved_model, resolve_inside
from mpotn.compression.sharing import (
    cut_shared_bond,
    shared_bond_spectrum,
    shared_central_groups,
)
from mpotn.data.tasks import TaskData
from mpotn.drawing import draw_history
from mpotn.finetune.training import (
    FieldHelp,
    FinetuneResult,
    TrainingConfig,
    evaluate_task,
    examples_sha256,
    finetune,
    is_main_process,
    lfa_budget,
    save_model,
    tokenize,
    trainer_device,
)
from mpotn.table import Table
from mpotn.types import ERRORS, MONITORS

STATE_NAME = "latest.json"
#: Training settings a squeeze sets itself (``training_steps``), or has no option for.
DERIVED_TRAINING = ("max_steps", "epochs", "strategy")
#: Name of a step's checkpoint folder in ``out / "checkpoints"``.
_CHECKPOINT = re.compile(r"step-(\d{4,})")


@dataclass
class SqueezeConfig(FieldHelp):
    r"""How to squeeze; each field's ``metadata["help"]`` is its ``mpotn squeeze`` help text
    (the command takes its defaults from here).

    A *step* is one round of Algorithm 2 (cut, fine-tune, evaluate); a *cut* is one
    matrix's central bond lowered once. A step makes one cut, or with a ``budget`` one
    cut of each matrix it chose.

    Attributes
    ----------
    types:
        Matrix types that may be cut (``query``, ``key``, ``value``,
        ``attn_out``, ``ffn_in``, ``ffn_out``, ``word_emb``, ...; see
        [mpotn.compression.models.matrix_type][]); ``None``: every MPO layer. A
        central tensor shared by several layers is cut only when all their types
        are listed.
    cut:
        Size of one cut: an integer ``>= 1`` removes that many dimensions (the
        paper: 1); a fraction in ``(0, 1)`` removes that share of the current
        central bond (at least one dimension).
    budget:
        Parameters one step removes: ``None`` (Algorithm 2) cuts one matrix
        per step; otherwise cuts are taken by least estimated error, each
        matrix's next cut competing with every other's, until at least this
        many parameters go (an integer ``>= 1``, or a fraction in ``(0, 1)``
        of the original model's parameters). With ``cut=1`` every step is the
        paper's one-dimension rule applied repeatedly, with one fine-tuning
        and one evaluation per step instead of per dimension.
    training_steps:
        Optimizer steps of auxiliary fine-tuning after each step (one
        fine-tuning per step, however many matrices the step cut).
    step_limit:
        Most steps a run takes (``iter`` of Algorithm 2).
    delta:
        Tolerated degradation $\Delta$ of the monitored score (a score that is not a
        number, NaN, is beyond any ``delta``).
    monitor:
        ``"metric"`` (the task's headline metric, higher is better) or
        ``"loss"`` (evaluation loss, lower is better).
    target_ratio:
        Stop once the model's parameters over the original model's reach it.
    min_bond:
        No central bond is cut below this.
    error:
        Rank candidates by ``"relative"`` ($\epsilon / \|M\|$) or ``"absolute"``
        (``eps``) estimated error.

    The defaults are the command's: a step frees 1.4% of the original model's
    parameters, 40 fine-tuning steps follow it, and four steps bring a full-rank MPO
    model of MiniLM down to the dense model's size (see the fine-tuning guide).

    Examples
    --------
    >>> SqueezeConfig.help("step_limit")
    'most squeeze steps, iter of Algorithm 2 (default: 4)'
    >>> SqueezeConfig.from_dict({"steps_per_cut": 8, "max_cuts": 2}).training_steps
    8
    """

    types: list[str] | None = field(default=None, metadata={
        "help": "matrix types that may be cut: query key value attn_out ffn_in ffn_out "
                "word_emb, or all (default: all)"})
    cut: float = field(default=1, metadata={
        "help": "dimensions one cut removes from a central bond: an integer (the paper: 1) "
                "or a fraction of the current bond"})
    budget: float | None = field(default=0.014, metadata={
        "help": "parameters one step removes, by repeated least-error cuts over all "
                "matrices: a count, or a fraction of the original model's parameters; 0 "
                "cuts one matrix per step"})
    training_steps: int = field(default=40, metadata={
        "help": "auxiliary fine-tuning steps after each squeeze step's cuts"})
    step_limit: int = field(default=4, metadata={
        "help": "most squeeze steps, iter of Algorithm 2"})
    delta: float = field(default=0.05, metadata={
        "help": "tolerated drop of the monitored score"})
    monitor: str = field(default="metric", metadata={
        "help": "score watched by --delta: the task metric or the eval loss"})
    target_ratio: float | None = field(default=None, metadata={
        "help": "stop when parameters / original reach this (default: none)"})
    min_bond: int = field(default=1, metadata={"help": "no central bond is cut below this"})
    error: str = field(default="relative", metadata={
        "help": "rank cuts by relative (eps / ||M||) or absolute (eps) estimated error"})

    #: Names earlier versions saved (``latest.json``), read as today's.
    RENAMED: ClassVar[dict[str, str]] = {"steps_per_cut": "training_steps",
                                         "max_cuts": "step_limit"}

    def __post_init__(self) -> None:
        for name in ("cut", "budget", "delta", "target_ratio"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.cut <= 0 or (self.cut >= 1 and self.cut != int(self.cut)):
            raise ValueError(
                f"cut must be a whole number of dimensions >= 1 or a fraction in (0, 1), "
                f"got {self.cut}"
            )
        if self.budget is not None and (
                self.budget <= 0 or (self.budget >= 1 and self.budget != int(self.budget))):
            raise ValueError(
                f"budget must be a whole number of parameters >= 1 or a fraction in (0, 1) "
                f"of the original model's parameters, got {self.budget}"
            )
        if self.training_steps < 0 or self.step_limit < 1:
            raise ValueError("training_steps must be >= 0 and step_limit >= 1")
        if self.delta < 0:
            raise ValueError(f"delta is a tolerance and must be >= 0, got {self.delta}")
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {MONITORS}, got {self.monitor!r}")
        if self.error not in ERRORS:
            raise ValueError(f"error must be one of {ERRORS}, got {self.error!r}")
        if self.min_bond < 1:
            raise ValueError(f"min_bond must be >= 1, got {self.min_bond}")
        if self.target_ratio is not None and self.target_ratio <= 0:
            raise ValueError(f"target_ratio must be > 0, got {self.target_ratio}")

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> SqueezeConfig:
        """The config of ``settings`` (its [to_dict][mpotn.finetune.training.FieldHelp.to_dict]),
        also as earlier versions saved it (``steps_per_cut``, ``max_cuts``; see ``RENAMED``).

        Raises
        ------
        ValueError
            If a setting is given under its old and its new name at once.
        """
        renamed = {cls.RENAMED.get(key, key): value for key, value in settings.items()}
        if len(renamed) < len(settings):
            raise ValueError(f"settings name a field twice (old and new name): {sorted(settings)}")
        return cls(**renamed)

    def next_dim(self, dim: int) -> int:
        """Central-bond dimension after one cut of a bond of size ``dim``."""
        removed = int(self.cut) if self.cut >= 1 else max(1, math.floor(self.cut * dim))
        return max(self.min_bond, dim - removed)

    def step_budget(self, original_params: int) -> int:
        """Parameters one step removes at least (``0``: a single cut)."""
        if self.budget is None:
            return 0
        return int(self.budget) if self.budget >= 1 else math.ceil(self.budget * original_params)


@dataclass
class SqueezeState:
    r"""Everything a resumed run needs besides the model's weights.

    Attributes
    ----------
    step:
        Steps done so far (a step may cut several matrices; ``cuts`` has one
        row per matrix cut).
    baseline:
        The score $P$ of the starting model (monitored quantity).
    spectra:
        ``{matrix: {"bond": k, "values": [lambda_1, ...], "norm": ||M||}}``,
        the stored central-bond singular values.
    history:
        One row per evaluated model (step 0 is the starting model).
    cuts:
        One row per matrix cut: step, matrix, bond, dimensions, estimated and
        actual error.
    accepted:
        Step of the last model within $\Delta$.
    stop_reason:
        Why the run ended (``None`` while it runs).
    """

    step: int = 0
    baseline: float = math.nan
    spectra: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    cuts: list[dict[str, Any]] = field(default_factory=list)
    accepted: int = 0
    stop_reason: str | None = None


def central_spectrum(layer: Any) -> dict[str, Any]:
    """The central bond of an MPO layer, its singular values and the matrix norm."""
    mpo = layer.mpo()
    bond = mpo.central_bond
    return {"bond": bond, "values": mpo.singular_values[bond - 1].tolist(), "norm": mpo.norm}


def squeeze_units(model: MPOModel) -> dict[str, list[str]]:
    """What squeezing cuts as one: ``{unit: module names}``, every MPO layer alone, and
    the layers sharing a central tensor
    ([shared_central_groups][mpotn.compression.sharing.shared_central_groups]) as one
    unit named by its first layer, whose shared bond is cut for all of them
    ([cut_shared_bond][mpotn.compression.sharing.cut_shared_bond])."""
    grouped = {name: group for group in shared_central_groups(model) for name in group}
    units: dict[str, list[str]] = {}
    for name in model.mpo_layers():
        group = grouped.get(name, [name])
        units.setdefault(group[0], group)
    return units


def unit_spectrum(model: MPOModel, names: list[str]) -> dict[str, Any]:
    """The central spectrum of a unit: its layer's
    ([central_spectrum][mpotn.finetune.squeeze.central_spectrum]), or its group's shared
    bond ([shared_bond_spectrum][mpotn.compression.sharing.shared_bond_spectrum])."""
    layers = [model.base_model.get_submodule(name) for name in names]
    if len(layers) == 1:
        return central_spectrum(layers[0])
    return shared_bond_spectrum(layers, layers[0].central_bond)


def estimated_error(spectrum: dict[str, Any], keep: int, relative: bool = True,
                    upto: int | None = None) -> float:
    r"""Eq. 3 from stored singular values, relative to $\|M\|$ unless ``relative=False``.

    $$
    \epsilon = \sqrt{\sum_{\mathrm{keep} < k \le \mathrm{upto}} \lambda_k^2}
    $$

    ``upto`` (default: every stored value) is the bond's dimension before the
    cut, when earlier cuts of the same step already lowered it.

    Examples
    --------
    >>> spectrum = {"values": [4.0, 3.0, 2.0, 1.0], "norm": 2.0}
    >>> estimated_error(spectrum, 2, relative=False) ** 2  # 2^2 + 1^2
    5.000000000000001
    >>> estimated_error(spectrum, 1, upto=2)  # lambda_2 / ||M||
    1.5
    """
    eps = math.sqrt(sum(v * v for v in spectrum["values"][keep:upto]))
    return eps / spectrum["norm"] if relative and spectrum["norm"] > 0 else eps


def _removed_params(layers: list[Any], bond: int, dim: int, new_dim: int) -> int:
    """Core entries freed by cutting ``bond`` from ``dim`` to ``new_dim`` in every layer of
    a unit (the two cores at the bond, a shared one once)."""
    left = {id(layer.cores[bond - 1]): layer.cores[bond - 1].shape for layer in layers}
    right = {id(layer.cores[bond]): layer.cores[bond].shape for layer in layers}
    return (dim - new_dim) * (sum(math.prod(shape[:3]) for shape in left.values())
                              + sum(math.prod(shape[1:]) for shape in right.values()))


def _next_cut(name: str, layers: list[Any], spectrum: dict[str, Any], dim: int,
              config: SqueezeConfig) -> dict[str, Any] | None:
    """The next cut of unit ``name``'s central bond from ``dim`` (``None``: it cannot
    shrink)."""
    new = config.next_dim(dim)
    if new >= dim:
        return None
    bond = spectrum["bond"]
    return {"matrix": name, "bond": bond, "dim": dim, "new_dim": new,
            "estimated_error": estimated_error(spectrum, new, config.error == "relative", dim),
            "removed_params": _removed_params(layers, bond, dim, new)}


def _unit_layers(model: MPOModel) -> dict[str, list[Any]]:
    return {unit: [model.base_model.get_submodule(n) for n in names]
            for unit, names in squeeze_units(model).items()}


def check_types(model: MPOModel, config: SqueezeConfig) -> None:
    """Refuse ``config.types`` naming a matrix type the model's MPO layers do not have (a typo
    would otherwise leave nothing to cut, and the run would stop at once)."""
    if config.types is None:
        return
    present = {matrix_type(name) for names in squeeze_units(model).values() for name in names}
    unknown = sorted(set(config.types) - present)
    if unknown:
        raise ValueError(f"types {unknown} match no MPO layer of this model; its types are "
                         f"{sorted(present)} (or 'all')")


def candidates(model: MPOModel, state: SqueezeState, config: SqueezeConfig) -> Table:
    """Every unit ([squeeze_units][mpotn.finetune.squeeze.squeeze_units]: a matrix, or the
    matrices sharing a central tensor) that may be cut, with its next cut and estimated
    error, best first."""
    rows = Table()
    for name, names in squeeze_units(model).items():
        if config.types is not None and not all(matrix_type(n) in config.types
                                                for n in names):
            continue  # a shared bond is cut only when every layer using it may be cut
        layers = [model.base_model.get_submodule(n) for n in names]
        spectrum = state.spectra.get(name)
        if spectrum is None:
            continue
        row = _next_cut(name, layers, spectrum, layers[0].bond_dims[spectrum["bond"]], config)
        if row is not None:
            rows.append(row)
    rows.sort(key=lambda r: (r["estimated_error"], r["matrix"]))
    return rows


def plan_step(model: MPOModel, state: SqueezeState, config: SqueezeConfig) -> Table:
    """The cuts of one step, one row per matrix (its bond's dimension before and after).

    Without a budget this is the best candidate alone (Algorithm 2). With one,
    the best candidate is taken repeatedly, the matrix it lowers re-entering
    the ranking with its next cut, until the cuts free ``config.step_budget``
    parameters or nothing is left to cut; a matrix taken several times appears
    once, with ``estimated_error`` the Eq. 3 error of its whole cut.
    """
    budget = config.step_budget(model.original_params)
    layers = _unit_layers(model)
    queue = [(row["estimated_error"], row["matrix"], row)
             for row in candidates(model, state, config)]  # sorted, hence a heap
    chosen: dict[str, dict[str, Any]] = {}
    removed = 0
    while queue:
        _, name, best = heapq.heappop(queue)
        first = chosen.setdefault(name, {**best, "removed_params": 0})
        first["new_dim"] = best["new_dim"]
        first["removed_params"] += best["removed_params"]
        removed += best["removed_params"]
        if removed >= budget:
            break
        following = _next_cut(name, layers[name], state.spectra[name], best["new_dim"], config)
        if following is not None:
            heapq.heappush(queue, (following["estimated_error"], name, following))
    plan = Table()
    for row in chosen.values():
        row["estimated_error"] = estimated_error(state.spectra[row["matrix"]], row["new_dim"],
                                                 config.error == "relative", row["dim"])
        plan.append(row)
    return plan


def cut(model: MPOModel, name: str, bond: int, dim: int) -> dict[str, Any]:
    """Cut ``bond`` of matrix ``name`` to ``dim`` (TT-rounding); return its new spectrum.

    The returned spectrum also carries ``error``: the cut's actual relative
    error against the matrix before the cut. When ``name`` is a layer whose central
    tensor is shared, its whole group is cut as one
    ([cut_shared_bond][mpotn.compression.sharing.cut_shared_bond]; ``error`` over the
    group), so that the layers keep sharing it.
    """
    for names in shared_central_groups(model):
        if name in names:
            return cut_shared_bond([model.base_model.get_submodule(n) for n in names],
                                   bond, dim)
    layer = model.base_model.get_submodule(name)
    mpo = layer.mpo()
    truncated = mpo.truncate(bond_dims={bond: dim})
    layer.load_mpo(truncated, model.compression_config.gauge)
    spectrum = {"bond": bond, "values": truncated.singular_values[bond - 1].tolist(),
                "norm": truncated.norm}
    spectrum["error"] = truncated.error_bound / mpo.norm if mpo.norm > 0 else 0.0
    return spectrum


def _score(scores: dict[str, float], data: TaskData, monitor: str) -> float:
    return scores["loss"] if monitor == "loss" else scores[data.spec.metrics[0]]


def _worse_by(baseline: float, value: float, monitor: str) -> float:
    """How much worse ``value`` is than ``baseline`` (negative when better)."""
    return value - baseline if monitor == "loss" else baseline - value


@dataclass
class SqueezeResult:
    """A finished squeeze: the accepted model, its history, and the final record."""

    model: MPOModel
    history: Table
    record: dict[str, Any]


class Squeezer:
    """Algorithm 2 on one model, checkpointed in ``out / "checkpoints"``.

    Parameters
    ----------
    model:
        The fine-tuned MPO model to squeeze (ignored when resuming).
    tokenizer, data:
        The task.
    config:
        Squeezing settings.
    training:
        Settings of the auxiliary fine-tuning after each step's cuts (its strategy
        is forced to ``lfa`` and its ``max_steps`` to ``config.training_steps``;
        its seed plus the step number seeds each step).
    out:
        Output directory.
    overwrite:
        Let the final ``out / "model"`` be written beside files mpotn did not
        write (see [save_model][mpotn.finetune.training.save_model]).
    """

    def __init__(self, model: MPOModel | None, tokenizer: Any, data: TaskData,
                 config: SqueezeConfig, training: TrainingConfig, out: str | os.PathLike,
                 progress: bool = True, overwrite: bool = False) -> None:
        self.model, self.tokenizer, self.data = model, tokenizer, data
        self.config = config
        self.training = dataclasses.replace(training, strategy="lfa",
                                            max_steps=config.training_steps)
        self.out = Path(out)
        self.progress = progress
        self.overwrite = overwrite
        self.state = SqueezeState()
        self._tokenized: tuple[Any, Any] | None = None
        self._resumed_data: str | None = None  # the data digest of a resumed run

    # ------------------------------------------------------------ checkpoints
    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def _checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:04d}"

    def save_checkpoint(self) -> None:
        """Save the model of this step, then publish it with the state (atomic rename).

        Only the main process writes (see
        [is_main_process][mpotn.finetune.training.is_main_process]).
        """
        if not is_main_process():
            return
        self.model.save_pretrained(str(self._checkpoint_dir(self.state.step)))
        write_text(self.checkpoints / STATE_NAME, json.dumps({
            "checkpoint": self._checkpoint_dir(self.state.step).name,
            "config": self.config.to_dict(),
            "training": self.training.to_dict(),
            "state": dataclasses.asdict(self.state),
            "data_sha256": self._data_sha256(),
        }, indent=2))
        keep = {0, self.state.step, self.state.accepted}
        for old in self.checkpoints.iterdir():
            match = _CHECKPOINT.fullmatch(old.name)
            if (match and int(match.group(1)) not in keep and old.is_dir()
                    and not old.is_symlink() and is_saved_model(old)):
                remove_written(old)

    def _data_sha256(self) -> str | None:
        """The tokenized training and evaluation examples' digest (``None`` before
        [run][mpotn.finetune.squeeze.Squeezer.run] tokenizes them)."""
        if self._tokenized is None:
            return None
        return ",".join("none" if split is None else examples_sha256(split)
                        for split in self._tokenized)

    def resume(self) -> None:
        """Continue from the latest checkpoint (its configs replace the given ones, with a
        warning naming the fields that differ, but for the training config's ``device``:
        the run goes where it is told now, and the checkpointed model is loaded there, as
        the Trainer places it). [run][mpotn.finetune.squeeze.Squeezer.run] then refuses
        other task data than the checkpointed run's (a state written before runs stored
        their data's digest is not checked).

        A ``latest.json`` written before the squeeze settings were renamed
        (``steps_per_cut``, ``max_cuts``) resumes too: old names are read as the new
        ([SqueezeConfig.from_dict][mpotn.finetune.squeeze.SqueezeConfig.from_dict]), the
        training config's unused ``extra`` is dropped and its ``device``, which earlier
        versions did not save, is the given one
        ([TrainingConfig.from_dict][mpotn.finetune.training.TrainingConfig.from_dict]).

        Raises
        ------
        ValueError
            If ``latest.json`` is missing, not JSON (a truncated file), lacks or
            adds a field, holds a setting these classes do not have or an
            invalid value, or names a checkpoint that is not a ``step-NNNN``
            folder inside ``checkpoints``.
        """
        path = self.checkpoints / STATE_NAME
        if not path.is_file():
            raise ValueError(f"nothing to resume: {path} does not exist; run without --resume")
        damaged = (f"the checkpoint state is damaged; start a new run in another folder (the "
                   f"saves in {self.checkpoints} are loadable with mpotn.load)")
        try:
            saved = json.loads(path.read_bytes().decode("utf-8"))
        except ValueError as error:  # bad UTF-8 or a truncated file
            raise ValueError(f"{path} is not valid JSON ({error}); {damaged}") from error
        fields = {"checkpoint", "config", "training", "state"}
        if not isinstance(saved, dict) or not fields <= saved.keys() <= fields | {"data_sha256"}:
            raise ValueError(f"{path} is not a squeeze state (an object with the fields "
                             f"{sorted(fields)} and data_sha256); {damaged}")
        parts = {}
        # each part's reader, and the names earlier versions saved that it still accepts
        readers = {"config": (SqueezeConfig, SqueezeConfig.from_dict,
                              set(SqueezeConfig.RENAMED)),
                   "training": (TrainingConfig, TrainingConfig.from_dict,
                                set(TrainingConfig.REMOVED)),
                   "state": (SqueezeState, lambda v: SqueezeState(**v), set())}
        for key, (cls, build, old_names) in readers.items():
            known = {f.name for f in dataclasses.fields(cls)}
            value = saved[key]
            if not isinstance(value, dict) or value.keys() - known - old_names:
                unknown = (sorted(value.keys() - known - old_names)
                           if isinstance(value, dict) else value)
                raise ValueError(f"{path}: '{key}' has unknown settings {unknown!r} "
                                 f"({cls.__name__} has {sorted(known)}); {damaged}")
            try:
                parts[key] = build(value)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{path}: '{key}' is invalid ({error}); {damaged}") from error
        name = saved["checkpoint"]
        checkpoint = resolve_inside(self.checkpoints, name, f"{path} 'checkpoint'")
        if not _CHECKPOINT.fullmatch(name) or not is_saved_model(checkpoint):
            raise ValueError(f"{path} names the checkpoint {name!r}, which is not a step-NNNN "
                             f"save in {self.checkpoints}; {damaged}")
        training = dataclasses.replace(parts["training"], device=self.training.device)
        if changed := (parts["config"].changed(self.config)  # not what the run derives
                       + training.changed(self.training, ignore=DERIVED_TRAINING)):
            warnings.warn(f"resuming with the checkpointed settings; ignoring the new values "
                          f"of {', '.join(changed)}", stacklevel=3)
        self.config, self.training, self.state = parts["config"], training, parts["state"]
        self._resumed_data = saved.get("data_sha256")
        self.model = load(checkpoint, device=trainer_device(training.device))

    def has_checkpoint(self) -> bool:
        """Whether ``out`` already holds a squeeze run."""
        return (self.checkpoints / STATE_NAME).is_file()

    # ------------------------------------------------------------------ steps
    def _evaluate(self) -> dict[str, float]:
        return evaluate_task(self.model, self.tokenizer, self.data, self.training,
                             self._tokenized[1])

    def _row(self, scores: dict[str, float], **extra: Any) -> dict[str, Any]:
        total = count_parameters(self.model.base_model.parameters())
        return {
            "step": self.state.step, **extra,
            "params": total,
            "params_over_original": total / self.model.original_params,
            **scores,
        }

    def start(self) -> None:
        """Step 0: store every candidate's central spectrum and the baseline score $P$."""
        check_types(self.model, self.config)
        for name, names in squeeze_units(self.model).items():
            self.state.spectra[name] = unit_spectrum(self.model, names)
        scores = self._evaluate()
        self.state.baseline = _score(scores, self.data, self.config.monitor)
        self.state.history.append(self._row(scores, matrix=None, bond=None, dim=None,
                                            new_dim=None, estimated_error=0.0, cut_error=0.0,
                                            train_loss=None, seconds=0.0))
        self.save_checkpoint()

    def _stop_reason(self) -> str | None:
        last = self.state.history[-1]
        if self.state.step and not _worse_by(self.state.baseline,
                                             _score(last, self.data, self.config.monitor),
                                             self.config.monitor) <= self.config.delta:
            return "delta"  # a score that is not a number (NaN) counts as beyond delta
        if (self.config.target_ratio is not None
                and last["params_over_original"] <= self.config.target_ratio):
            return "target_ratio"
        if self.state.step >= self.config.step_limit:
            return "step_limit"
        if not candidates(self.model, self.state, self.config):
            return "nothing_to_cut"
        return None

    def step(self) -> None:
        """One step of Algorithm 2: plan, cut, fine-tune, evaluate, checkpoint.

        Plans the step ([plan_step][mpotn.finetune.squeeze.plan_step]: the best cut alone, or
        with a ``budget`` cuts until the step frees it), cuts every planned
        matrix once by TT-rounding and stores its new central spectrum,
        fine-tunes the auxiliary tensors (``lfa``) for ``training_steps``
        optimizer steps (none when it is 0; seed ``training.seed + step``),
        evaluates, and appends one history row (the matrix, or ``"k matrices"``,
        with the largest estimated and actual error of the step's cuts). The
        step becomes the accepted one when its score is within ``delta`` of the
        baseline; either way it is checkpointed. Stop conditions are checked by
        [run][mpotn.finetune.squeeze.Squeezer.run], not here.
        """
        start = time.perf_counter()
        plan = plan_step(self.model, self.state, self.config)
        self.state.step += 1
        for row in plan:
            spectrum = cut(self.model, row["matrix"], row["bond"], row["new_dim"])
            row["cut_error"] = spectrum.pop("error")
            self.state.spectra[row["matrix"]] = spectrum
            self.state.cuts.append({"step": self.state.step, **row})
        first = plan[0] if len(plan) == 1 else dict.fromkeys(("bond", "dim", "new_dim"))
        train_loss = None
        if self.config.training_steps:
            config = dataclasses.replace(self.training, seed=self.training.seed
                                         + self.state.step)
            result: FinetuneResult = finetune(self.model, self.tokenizer, self.data, config,
                                              progress=False, evaluate_after=False,
                                              tokenized=self._tokenized)
            train_loss = result.record["train_loss"]
        scores = self._evaluate()
        self.state.history.append(self._row(
            scores, matrix=plan[0]["matrix"] if len(plan) == 1 else f"{len(plan)} matrices",
            bond=first["bond"], dim=first["dim"], new_dim=first["new_dim"],
            estimated_error=max(row["estimated_error"] for row in plan),
            cut_error=max(row["cut_error"] for row in plan), train_loss=train_loss,
            seconds=time.perf_counter() - start))
        worse = _worse_by(self.state.baseline, _score(scores, self.data, self.config.monitor),
                          self.config.monitor)
        if worse <= self.config.delta:
            self.state.accepted = self.state.step
        self.save_checkpoint()

    def run(self, resume: bool = False) -> SqueezeResult:
        """Squeeze until a stop condition; write the history, plot, metrics and model.

        ``out / "model"`` is checked first: a folder holding files mpotn did not
        write is refused before any work unless ``overwrite``.
        """
        if resume:
            self.resume()
        elif self.has_checkpoint():
            raise ValueError(
                f"{self.out} already holds a squeeze run; pass resume=True (--resume) to "
                "continue it, or choose another output directory"
            )
        check_writable(self.out / "model", self.overwrite)
        self._tokenized = tokenize(self.data, self.tokenizer, self.training.max_length,
                                   self.training.train_limit, self.training.eval_limit)
        if self._resumed_data not in (None, self._data_sha256()):
            raise ValueError(f"the task data differ from those of the run checkpointed in "
                             f"{self.checkpoints}; resume with the same task (--glue, "
                             "--data-dir) or choose another --out")
        if not self.state.history:
            self.start()
        bar = tqdm(total=self.config.step_limit, initial=self.state.step, desc="squeezing",
                   unit="step", disable=not self.progress)
        while (reason := self._stop_reason()) is None:
            self.step()
            last = self.state.history[-1]
            bar.update(1)
            bar.set_postfix(matrix=last["matrix"], params=f"{last['params_over_original']:.3f}",
                            score=f"{_score(last, self.data, self.config.monitor):.4f}")
        bar.close()
        self.state.stop_reason = reason
        self.save_checkpoint()
        return self.finish()

    def finish(self) -> SqueezeResult:
        """The accepted model, and the output files of the run (written by the main
        process only)."""
        accepted = self.state.accepted
        model = self.model if accepted == self.state.step else load(
            self._checkpoint_dir(accepted), device=trainer_device(self.training.device))
        history = Table(self.state.history)
        final = history[accepted]
        record = {
            "stop_reason": self.state.stop_reason,
            "squeeze_steps": self.state.step,
            "accepted_step": accepted,
            "matrix_cuts": sum(1 for row in self.state.cuts if row["step"] <= accepted),
            "baseline": self.state.baseline,
            "monitor": self.config.monitor,
            "training_steps": self.config.training_steps,
            "fine_tuning_steps": accepted * self.config.training_steps,
            "bond_dims": {name: list(layer.bond_dims)
                          for name, layer in model.mpo_layers().items()},
            **{k: v for k, v in final.items() if k not in ("matrix", "bond", "dim", "new_dim")},
        }
        if is_main_process():
            write_output(self.out / "metrics.json", json.dumps(record, indent=2))
            write_output(self.out / "history.json", json.dumps(list(history), indent=2))
            write_output(self.out / "history.csv", history.to_csv())
            write_output(self.out / "cuts.csv", Table(self.state.cuts).to_csv())
            metric = "loss" if self.config.monitor == "loss" else self.data.spec.metrics[0]
            write_output(self.out / "history.png", lambda path: draw_history(
                history, "step", [metric, "params_over_original"], path,
                "dimension squeezing (Algorithm 2)",
                marks=["matrix"] if len(history) <= 40 else []))
            save_model(model, self.tokenizer, self.out / "model", self.overwrite)
        return SqueezeResult(model, history, record)


def squeeze(model: MPOModel | None, tokenizer: Any, data: TaskData, config: SqueezeConfig,
            training: TrainingConfig, out: str | os.PathLike, *, resume: bool = False,
            progress: bool = True, overwrite: bool = False) -> SqueezeResult:
    """Run Algorithm 2 (see [Squeezer][mpotn.finetune.squeeze.Squeezer]); ``resume`` continues a
    stopped run."""
    return Squeezer(model, tokenizer, data, config, training, out, progress,
                    overwrite).run(resume)


def direct_truncation(model: MPOModel, tokenizer: Any, data: TaskData,
                      bond_dims: dict[str, list[int]], training: TrainingConfig,
                      steps: int, *, progress: bool = True) -> dict[str, Any]:
    """The ``direct`` ablation: cut straight to ``bond_dims``, fine-tune ``steps``, evaluate.

    ``model`` (the squeeze's starting model) is modified in place. Layers sharing a
    central tensor are cut as one unit
    ([cut_shared_bond][mpotn.compression.sharing.cut_shared_bond], the bonds of the
    central tensor only, as squeezing cuts them).

    Raises
    ------
    ValueError
        If the layers of a shared group are given different bonds, or bonds other
        than their central tensor's.
    """
    for unit, names in squeeze_units(model).items():
        layers = [model.base_model.get_submodule(name) for name in names]
        targets = {tuple(bond_dims[name]) for name in names if name in bond_dims}
        if not targets:
            continue
        if len(targets) > 1 or any(name not in bond_dims for name in names):
            raise ValueError(f"the layers sharing a central tensor with {unit!r} must all be "
                             f"given the same bond dimensions, got {sorted(targets)}")
        dims = targets.pop()
        if len(layers) == 1:
            if dims != layers[0].bond_dims:
                layers[0].load_mpo(layers[0].mpo().truncate(bond_dims=list(dims)[1:-1]),
                                   model.compression_config.gauge)
            continue
        center = layers[0].central_index
        for bond, (now, new) in enumerate(zip(layers[0].bond_dims, dims)):
            if now == new:
                continue
            if bond not in (center, center + 1):
                raise ValueError(f"bond {bond} of {unit!r} is not a bond of its shared central "
                                 f"tensor; only bonds {center} and {center + 1} can be cut "
                                 "for a group")
            cut_shared_bond(layers, bond, new)
    config = dataclasses.replace(training, strategy="lfa", max_steps=steps)
    if steps:
        record = finetune(model, tokenizer, data, config, progress=progress).record
    else:
        record = evaluate_task(model, tokenizer, data, config)
    total = count_parameters(model.base_model.parameters())
    return {**record, "strategy": "direct", "fine_tuning_steps": steps, "params": total,
            "trainable_params": lfa_budget(model.base_model),
            "params_over_original": total / model.original_params}
