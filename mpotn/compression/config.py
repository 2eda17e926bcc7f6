"""What to compress: [CompressionConfig][mpotn.compression.config.CompressionConfig] and the choice
of targets (SPEC §1-2).

Targets are chosen the way PEFT chooses them:

* a **list** of presets and module-name suffixes -- ``["ffn", "query", "value"]``;
  the presets are ``embeddings`` (every ``nn.Embedding``), ``attention``
  (query/key/value, fused QKV and attention-output linears), ``ffn`` (the FFN's
  gate, up and down linears) and ``all-linear`` (every ``nn.Linear`` and
  ``Conv1D``); ``attention`` and ``ffn`` read the matrix types of
  [mpotn.compression.architectures][], one table for BERT, GPT-2, GPT-NeoX,
  Llama-style and T5 models;
* a **string** is a regular expression the whole module name must match;
* ``exclude`` takes the same forms; ``overrides`` maps a preset or suffix to
  per-target settings (``n``, shapes, ``max_bond`` / ``tol`` / ``ratio`` /
  ``params`` / ``bond_dims``, ``allocation``, ``svd``).

A module shared by several parents (ALBERT's layer group, T5's ``shared``
embedding that is also each stack's ``embed_tokens``) is selected once and
replaced everywhere. An output layer whose weight is tied to an input embedding
(GPT-2's and T5's ``lm_head``) follows the embedding: when the embedding is
compressed with ``method="mpo"``, the head becomes a
[TiedMPOLinear][mpotn.layers.mpo.TiedMPOLinear] that reads the same cores. A
matched module that is not ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding``, or
whose weight is tied some other way, is skipped with a warning that names it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mpotn.calibration import DAMP
from mpotn.compression.architectures import (
    is_linear,
    known_architecture,
    matrix_type,
    overrides_forward,
)
from mpotn.layers import (
    FactorizedEmbedding,
    FactorizedLinear,
    MPOEmbedding,
    MPOLinear,
    TiedMPOLinear,
)
from mpotn.methods import DECOMPOSITIONS
from mpotn.truncation import POLICY_KEYS, TruncationPolicy
from mpotn.types import BUDGETS, FITS, PRESETS, STRUCTURES

#: Module classes mpotn compresses (and ``transformers``' ``Conv1D``: see
#: [is_supported][mpotn.compression.config.is_supported]).
SUPPORTED = (nn.Linear, nn.Embedding)
MPO_LAYERS = (MPOLinear, MPOEmbedding)
FACTORIZED_LAYERS = (FactorizedLinear, FactorizedEmbedding)
#: Every module [compress][mpotn.compression.compress.compress] puts in a model.
COMPRESSED_LAYERS = (*MPO_LAYERS, *FACTORIZED_LAYERS, TiedMPOLinear)

#: Matrix types (see [mpotn.compression.models.matrix_type][]) of the presets.
PRESET_TYPES = {
    "attention": {"query", "key", "value", "qkv", "attn_out"},
    "ffn": {"ffn_gate", "ffn_in", "ffn_out"},
}

#: Settings that may differ per target.
SETTING_KEYS = (
    "n", "row_shape", "col_shape", "pad", *POLICY_KEYS, "allocation", "svd", "gauge", "method",
    "structure", "fit", "sweeps", "damp",
)


@dataclass
class CompressionConfig:
    """What to compress and how.

    Attributes
    ----------
    targets:
        Presets and suffixes (a list), or a regular expression (a string).
    exclude:
        Same forms; matching modules are left alone.
    n, row_shape, col_shape, pad, svd:
        Decomposition settings (see [mpotn.mpo.MPO.from_matrix][]).
    gauge:
        How layers store their cores (see [mpotn.mpo.MPO.gauge_cores][]):
        ``"central"`` (default) or ``"left"``.
    method:
        A registered decomposition
        ([mpotn.methods.DECOMPOSITIONS][mpotn.methods.base.DECOMPOSITIONS]): ``"mpo"`` (default; MPO
        layers) or another (``svd``, the truncated SVD; ``tucker``, ``cp``, ``tt``;
        [FactorizedLinear][mpotn.layers.factorized.FactorizedLinear] layers, truncated by ``ratio``
        with ``n`` tensorization factors per side). ``cp`` refuses work above
        [mpotn.methods.cp.MAX_WORK][] multiply-adds; raise that attribute for longer runs.
    max_bond, tol, ratio, params, bond_dims, allocation:
        Truncation policy, at most one (see [mpotn.mpo.MPO.truncate][]);
        full rank when none is set.
    structure:
        ``"mpo"`` (default: ``n`` cores, balanced factors), ``"svd"`` (the
        truncated SVD as an MPO with rows ``(I, 1)`` and columns ``(1, J)``) or
        ``"auto"`` (per matrix, the one of the two with the lower error at the
        same parameter count; needs ``ratio`` or ``params``).
    budget:
        ``"matrix"`` (default): ``ratio`` / ``params`` apply to each matrix;
        ``"model"``: one budget for all target matrices together, spent where
        it lowers the summed relative (output) error most (SPEC §7).
    keep_dense:
        With ``budget="model"``: a matrix may also stay dense (exact, its own size),
        which the budget takes where its share would otherwise be a factorization as
        large as the matrix or larger (a truncated ``I x J`` SVD above rank
        ``IJ / (I + J)``; [spend_keeping_dense][mpotn.budget.spend_keeping_dense]). Such a
        matrix is not replaced; the report lists it with structure ``dense``.
    sensitivity:
        With ``budget="model"`` and calibration data: weigh each matrix's relative
        squared error by its measured effect on the model's outputs (its
        sensitivity ``s``, [mpotn.compression.sensitivity][]: one forward pass over
        64 calibration sequences per matrix), so that the budget minimises
        ``sum_m s_m eps_m^2`` instead of ``sum_m eps_m^2``. The report's
        ``sensitivity`` column shows each ``s``.
    fit, sweeps, damp:
        Used when [compress][mpotn.compression.compress.compress] gets calibration
        data: how a balanced MPO is fitted (``"als"``: plain truncation, then
        ``sweeps`` sweeps of [mpotn.calibration.refine][]; ``"whiten"``:
        [mpotn.calibration.calibrated_mpo][]), and the damping of the
        covariance (``svd`` structures are always whitened exactly).
    sequential:
        Used with calibration data: fit the matrices in the order the model runs
        them, each to the original's outputs from the inputs the already
        compressed layers before it give
        ([compensated_matrix][mpotn.calibration.compensated_matrix]), so that later
        layers correct the error of earlier ones. Costs two passes over the
        calibration data per group of matrices that share an input; a matrix with
        fewer than 10 calibration rows per input keeps the plain calibrated fit.
    calibrate_embeddings:
        Also calibrate ``nn.Embedding`` targets (their covariance is the
        diagonal of token counts). Off by default: tokens absent from the
        calibration text would lose their rows.
    overrides:
        ``{preset or suffix: {setting: value}}`` applied on top, in order.

    Examples
    --------
    Attention at half its size, the FFN as truncated SVDs of a quarter, checked at once:

    >>> from torch import nn
    >>> config = CompressionConfig(targets=["attention", "ffn"], ratio=0.5,
    ...                            overrides={"ffn": {"structure": "svd", "ratio": 0.25}})
    >>> layer = nn.Linear(8, 8)
    >>> settings = config.settings_for("encoder.layer.0.intermediate.dense", layer)
    >>> settings["structure"], settings["ratio"]
    ('svd', 0.25)
    >>> CompressionConfig(overrides={"ffn": {"fit": "dmrg"}})
    Traceback (most recent call last):
    ...
    ValueError: override 'ffn': fit must be one of ('als', 'whiten'), got 'dmrg'
    """

    targets: str | list[str] = field(default_factory=lambda: ["all-linear"])
    exclude: str | list[str] | None = None
    n: int = 5
    row_shape: list[int] | None = None
    col_shape: list[int] | None = None
    pad: bool = True
    max_bond: int | None = None
    tol: float | None = None
    ratio: float | None = None
    params: int | None = None
    bond_dims: list[int] | None = None
    allocation: str = "optimal"
    svd: str = "auto"
    gauge: str = "central"
    method: str = "mpo"
    structure: str = "mpo"
    budget: str = "matrix"
    keep_dense: bool = False
    sensitivity: bool = False
    fit: str = "als"
    sweeps: int = 2
    damp: float = DAMP
    calibrate_embeddings: bool = False
    sequential: bool = False
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.targets = _check_spec("targets", self.targets)
        if not self.targets:
            raise ValueError("targets is empty: name presets, suffixes or give a regex")
        self.exclude = _check_spec("exclude", self.exclude)
        for key, settings in self.overrides.items():
            unknown = set(settings) - set(SETTING_KEYS)
            if unknown:
                raise ValueError(
                    f"override {key!r} has unknown settings {sorted(unknown)}; "
                    f"allowed: {SETTING_KEYS}"
                )
        defaults = {key: getattr(self, key) for key in SETTING_KEYS}
        _check_target_settings(defaults)
        for key, override in self.overrides.items():
            merged = _merged(defaults, override)
            if merged["method"] != "mpo" and "structure" not in override:
                merged["structure"] = "mpo"  # another method ignores an inherited structure
            try:
                _check_target_settings(merged)
            except ValueError as error:
                raise ValueError(f"override {key!r}: {error}") from None
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        if self.budget == "model" and self.ratio is None and self.params is None:
            raise ValueError("budget='model' spends one ratio or parameter count over all "
                             "targets: give ratio or params")
        if self.keep_dense and self.budget != "model":
            raise ValueError("keep_dense=True lets one model-wide budget leave matrices "
                             "dense: use it with budget='model'")
        if self.budget == "model" and self.allocation != "optimal":
            raise ValueError("budget='model' spends the parameters cut by cut along each "
                             "matrix's optimal bonds; allocation='uniform' spreads one "
                             "matrix's ratio: use it with budget='matrix'")
        if self.sensitivity and self.budget != "model":
            raise ValueError("sensitivity=True weighs the matrices of one model-wide budget "
                             "against each other: use it with budget='model'")
        for key in ("calibrate_embeddings", "sequential", "keep_dense", "sensitivity"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be True or False, got {getattr(self, key)!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionConfig:
        """Inverse of [to_dict][mpotn.compression.config.CompressionConfig.to_dict]."""
        return cls(**data)

    def settings_for(self, name: str, module: nn.Module) -> dict[str, Any]:
        """Settings of one target: the defaults, then every override that matches it."""
        settings = {key: getattr(self, key) for key in SETTING_KEYS}
        for key, override in self.overrides.items():
            if _matches_one(key, name, module):
                settings = _merged(settings, override)
        return settings


def _merged(settings: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with ``override`` on top; a truncation policy in it replaces the one in
    ``settings`` (one policy per target)."""
    merged = dict(settings)
    if any(k in override for k in POLICY_KEYS):
        merged.update(dict.fromkeys(POLICY_KEYS))
    return {**merged, **override}


def _check_target_settings(settings: dict[str, Any]) -> None:
    """Refuse settings of a target (the defaults, or the defaults with an override) that
    compress could not follow."""
    method = settings["method"]
    if method not in DECOMPOSITIONS:
        raise ValueError(f"unknown method {method!r}; registered: {sorted(DECOMPOSITIONS)}")
    policy = TruncationPolicy.from_settings(settings)
    if method != "mpo" and policy.key not in (None, "ratio"):
        raise ValueError(f"method {method!r} is truncated by ratio only, got {policy.key}")
    for key, allowed in (("structure", STRUCTURES), ("fit", FITS)):
        if settings[key] not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {settings[key]!r}")
    if settings["structure"] != "mpo" and method != "mpo":
        raise ValueError(f"structure={settings['structure']!r} is for method='mpo', got "
                         f"method={method!r}")
    if settings["structure"] == "auto" and settings["ratio"] is None and (
            settings["params"] is None):
        raise ValueError("structure='auto' compares structures at equal parameter counts: "
                         "give ratio or params")
    sweeps = settings["sweeps"]
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
        raise ValueError(f"sweeps must be an integer >= 0, got {sweeps!r}")
    damp = settings["damp"]
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not (
            math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")


def layer_holder(model: nn.Module) -> nn.Module:
    """The module holding a model's layers: an MPOModel's ``base_model`` (known by its
    ``mpo_layers`` method), or ``model`` itself."""
    return model.base_model if callable(getattr(type(model), "mpo_layers", None)) else model


def is_supported(module: nn.Module) -> bool:
    """Whether mpotn can compress ``module``: ``nn.Linear``, ``Conv1D`` or ``nn.Embedding``,
    not a subclass that changes their forward pass
    ([overrides_forward][mpotn.compression.architectures.overrides_forward])."""
    return (isinstance(module, nn.Embedding) or is_linear(module)) and not (
        overrides_forward(module))


def _check_spec(key: str, spec: Any) -> str | list[str] | None:
    """``spec`` (``targets`` / ``exclude``) as a valid regular expression or a list of names."""
    if spec is None:
        return None
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as error:
            raise ValueError(f"{key} {spec!r} is not a valid regular expression ({error}); "
                             "escape special characters such as ( and . with a backslash, "
                             "or give a list of presets and suffixes") from None
        return spec
    if isinstance(spec, (list, tuple)) and all(isinstance(s, str) for s in spec):
        return list(spec)
    raise ValueError(f"{key} must be a regular expression (a string) or a list of presets and "
                     f"module-name suffixes (strings), got {spec!r}")


def _matches_one(spec: str, name: str, module: nn.Module) -> bool:
    """A preset name, or a suffix of the module name."""
    if spec == "embeddings":
        return isinstance(module, nn.Embedding)
    if spec == "all-linear":
        return is_linear(module)
    if spec in PRESET_TYPES:
        return is_supported(module) and matrix_type(name) in PRESET_TYPES[spec]
    return name == spec or name.endswith("." + spec)


def _matches(spec: str | Sequence[str] | None, name: str, module: nn.Module) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(_matches_one(s, name, module) for s in spec)


def _weight_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """``{id(weight): [(name, module), ...]}`` over the distinct modules of ``model``."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), []).append((name, module))
    return owners


def tied_modules(model: nn.Module, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The other ``nn.Linear`` / ``nn.Embedding`` modules of ``model`` whose weight is
    ``module``'s, as ``(name, module)``: T5's ``encoder.embed_tokens`` and ``lm_head``
    for ``shared``, GPT-2's ``lm_head`` for ``transformer.wte``."""
    return [(name, other) for name, other in model.named_modules()
            if isinstance(other, (nn.Linear, nn.Embedding)) and other is not module
            and other.weight is module.weight]


def _chosen(config: CompressionConfig, name: str, module: nn.Module) -> bool:
    return (is_supported(module) and _matches(config.targets, name, module)
            and not _matches(config.exclude, name, module))


def _tie_problem(config: CompressionConfig, name: str, module: nn.Module,
                 group: list[tuple[str, nn.Module]]) -> str | None:
    """For ``module`` in ``group`` (the modules sharing its weight, in model order):
    ``None`` when it is compressed (and the others follow it), ``""`` when it follows
    another embedding of the group, a warning when it cannot be compressed."""
    names = [o for o, m in group if m is not module]
    plain = all(isinstance(m, (nn.Linear, nn.Embedding)) and not overrides_forward(m)
                for _, m in group)
    embeddings = [o for o, m in group if isinstance(m, nn.Embedding)]
    if not plain or not embeddings:
        return f"skipping {name}: its weight is tied to {names}; untie it to compress it"
    chosen = [o for o, m in group if isinstance(m, nn.Embedding) and _chosen(config, o, m)]
    if chosen and chosen[0] != name:
        return ""
    if not chosen:
        return (f"skipping {name}: its weight is tied to the embedding {embeddings[0]}; "
                f"select {embeddings[0]} (the 'embeddings' preset) to compress both, tied")
    if config.settings_for(name, module)["method"] != "mpo":
        return (f"skipping {name}: its weight is tied to {names}, which only method 'mpo' "
                "keeps tied; compress it with method 'mpo' or untie it")
    return None


def select_targets(model: nn.Module, config: CompressionConfig) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs ``config`` selects, with warnings for skipped ones.

    Of modules that share one weight (see
    [tied_modules][mpotn.compression.config.tied_modules]), only the first selected
    embedding is listed: the others follow it.

    Raises
    ------
    ValueError
        When nothing matches; the message lists candidate module names.
    """
    owners = _weight_owners(model)  # shared weights, whatever module holds them
    selected = []
    for name, module in model.named_modules():  # shared modules come once
        if not name or not _matches(config.targets, name, module):
            continue
        if _matches(config.exclude, name, module):
            continue
        if not is_supported(module):
            kind = type(module).__name__
            if overrides_forward(module):
                warnings.warn(
                    f"skipping {name}: {kind} changes the forward pass of "
                    f"nn.{'Embedding' if isinstance(module, nn.Embedding) else 'Linear'} "
                    "(an MPO layer of its weight would "
                    "drop what it adds, such as a scale); exclude it to silence this",
                    stacklevel=3)
            elif isinstance(config.targets, str) or not module._modules:
                warnings.warn(
                    f"skipping {name}: {kind} is not nn.Linear, Conv1D or nn.Embedding",
                    stacklevel=3,
                )
            continue
        group = owners[id(module.weight)]
        problem = _tie_problem(config, name, module, group) if len(group) > 1 else None
        if problem is not None:
            if problem:
                warnings.warn(problem, stacklevel=3)
            continue
        selected.append((name, module))
    if not selected:
        raise ValueError(_nothing_selected(model, config))
    unused = [key for key in config.overrides
              if not any(_matches_one(key, name, module) for name, module in selected)]
    if unused:
        warnings.warn(f"overrides {unused} match none of the {len(selected)} targets, so they "
                      f"change nothing; targets are named as {selected[0][0]!r} (an override "
                      "key is a preset: attention, ffn, embeddings, all-linear, or the end of "
                      "a module name)", stacklevel=3)
    return selected


def _nothing_selected(model: nn.Module, config: CompressionConfig) -> str:
    """Why ``config`` selects nothing in ``model``, with the model's matrices and their types."""
    candidates = [f"{n} ({matrix_type(n)})" for n, m in model.named_modules()
                  if n and is_supported(m)]
    shown = ", ".join(candidates[:30]) + (" ..." if len(candidates) > 30 else "")
    presets = {"attention", "ffn"} & set(config.targets if isinstance(config.targets, list)
                                           else [])
    unknown = ""
    if presets and not known_architecture(model):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        unknown = (f" The presets {sorted(presets)} read matrix types from module names, and "
                   f"architecture {model_type!r} is not in mpotn's table "
                   "(mpotn.compression.architectures); name its matrices as suffixes or a "
                   "regular expression instead.")
    return (f"targets {config.targets!r} (exclude {config.exclude!r}) match no nn.Linear, "
            f"Conv1D or nn.Embedding module.{unknown} Presets: {', '.join(PRESETS)}. "
            f"The model's matrices ({len(candidates)}, with their types): {shown}")


def replace_module(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Put ``layer`` in place of the submodule ``name`` of ``model``, and wherever else
    ``model`` holds that same module (T5's ``shared`` is also each stack's
    ``embed_tokens``), so that a shared module stays shared.

    Examples
    --------
    >>> shared = nn.Linear(2, 2)
    >>> model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    >>> replace_module(model, "a", nn.Identity())
    >>> type(model["b"][0]).__name__
    'Identity'
    """
    old = model.get_submodule(name)
    paths = [path for path, module in model.named_modules(remove_duplicate=False)
             if module is old and path]
    for path in paths or [name]:
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
