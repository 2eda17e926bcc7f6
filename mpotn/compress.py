"""Compressing a model: replace its weight matrices by MPO layers (SPEC §1-2).

Targets are chosen the way PEFT chooses them:

* a **list** of presets and module-name suffixes -- ``["ffn", "query", "value"]``;
  the presets are ``embeddings`` (every ``nn.Embedding``), ``attention``
  (query/key/value/attention-output linears), ``ffn`` (the two FFN linears)
  and ``all-linear`` (every ``nn.Linear``);
* a **string** is a regular expression the whole module name must match;
* ``exclude`` takes the same forms; ``overrides`` maps a preset or suffix to
  per-target settings (``n``, shapes, ``max_bond`` / ``tol`` / ``ratio`` /
  ``params`` / ``bond_dims``, ``allocation``, ``svd``).

A module shared by several parents (ALBERT's layer group) is decomposed once and
stays shared. A matched module that is not ``nn.Linear`` / ``nn.Embedding``, or
whose weight is tied to another module, is skipped with a warning that names it.

Examples
--------
>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
>>> compressed = compress(model, targets=["0", "2"], n=3, ratio=0.5, progress=False)
>>> [r["name"] for r in compressed.report()]
['0', '2']
>>> compressed.totals()["total_params"] < compressed.totals()["original_params"]
True
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mpotn.layers import (
    FactorizedEmbedding,
    FactorizedLinear,
    MPOEmbedding,
    MPOLinear,
    apply_policy,
)
from mpotn.methods import DECOMPOSITIONS, decompose
from mpotn.models import layer_index, matrix_type
from mpotn.mpo import MPO
from mpotn.table import Table

SUPPORTED = (nn.Linear, nn.Embedding)
MPO_LAYERS = (MPOLinear, MPOEmbedding)
FACTORIZED_LAYERS = (FactorizedLinear, FactorizedEmbedding)

#: Matrix types (see :func:`mpotn.models.matrix_type`) of the presets.
PRESET_TYPES = {
    "attention": {"query", "key", "value", "attn_out"},
    "ffn": {"ffn_in", "ffn_out"},
}
PRESETS = ("embeddings", "attention", "ffn", "all-linear")

#: Settings that may differ per target.
SETTING_KEYS = (
    "n", "row_shape", "col_shape", "pad", "max_bond", "tol", "ratio", "params", "bond_dims",
    "allocation", "svd", "gauge", "method",
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
        Decomposition settings (see :meth:`mpotn.mpo.MPO.from_matrix`).
    gauge:
        How layers store their cores (see :meth:`mpotn.mpo.MPO.gauge_cores`):
        ``"central"`` (default) or ``"left"``.
    method:
        A registered decomposition (:data:`mpotn.methods.DECOMPOSITIONS`):
        ``"mpo"`` (default; MPO layers) or another (``tucker``, ``cp``, ``tt``;
        :class:`~mpotn.layers.FactorizedLinear` layers, truncated by ``ratio``
        with ``n`` tensorization factors per side).
    max_bond, tol, ratio, params, bond_dims, allocation:
        Truncation policy, at most one (see :meth:`mpotn.mpo.MPO.truncate`);
        full rank when none is set.
    overrides:
        ``{preset or suffix: {setting: value}}`` applied on top, in order.
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
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.targets, (list, tuple)):
            self.targets = list(self.targets)
            if not self.targets:
                raise ValueError("targets is empty: name presets, suffixes or give a regex")
        for key, settings in self.overrides.items():
            unknown = set(settings) - set(SETTING_KEYS)
            if unknown:
                raise ValueError(
                    f"override {key!r} has unknown settings {sorted(unknown)}; "
                    f"allowed: {SETTING_KEYS}"
                )
        if self.method not in DECOMPOSITIONS:
            raise ValueError(f"unknown method {self.method!r}; registered: "
                             f"{sorted(DECOMPOSITIONS)}")
        policies = [k for k in ("max_bond", "tol", "ratio", "params", "bond_dims")
                    if getattr(self, k) is not None]
        if len(policies) > 1:
            raise ValueError(f"give at most one truncation policy, got {policies}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)

    def settings_for(self, name: str, module: nn.Module) -> dict[str, Any]:
        """Settings of one target: the defaults, then every override that matches it."""
        settings = {key: getattr(self, key) for key in SETTING_KEYS}
        for key, override in self.overrides.items():
            if _matches_one(key, name, module):
                if any(k in override for k in ("max_bond", "tol", "ratio", "params", "bond_dims")):
                    for policy in ("max_bond", "tol", "ratio", "params", "bond_dims"):
                        settings[policy] = None
                settings.update(override)
        return settings


def _matches_one(spec: str, name: str, module: nn.Module) -> bool:
    """A preset name, or a suffix of the module name."""
    if spec == "embeddings":
        return isinstance(module, nn.Embedding)
    if spec == "all-linear":
        return isinstance(module, nn.Linear)
    if spec in PRESET_TYPES:
        return isinstance(module, SUPPORTED) and matrix_type(name) in PRESET_TYPES[spec]
    return name == spec or name.endswith("." + spec)


def _matches(spec: str | Sequence[str] | None, name: str, module: nn.Module) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(_matches_one(s, name, module) for s in spec)


def _policy(settings: dict[str, Any]) -> str:
    for key in ("max_bond", "tol", "ratio", "params", "bond_dims"):
        if settings[key] is not None:
            return f"{key}={settings[key]}"
    return "full rank"


def _tied(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), []).append(name)
    return owners


def select_targets(model: nn.Module, config: CompressionConfig) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs ``config`` selects, with warnings for skipped ones.

    Raises
    ------
    ValueError
        When nothing matches; the message lists candidate module names.
    """
    owners = _tied(model)
    selected = []
    for name, module in model.named_modules():  # shared modules come once
        if not name or not _matches(config.targets, name, module):
            continue
        if _matches(config.exclude, name, module):
            continue
        if not isinstance(module, SUPPORTED):
            if isinstance(config.targets, str) or not module._modules:
                warnings.warn(
                    f"skipping {name}: {type(module).__name__} is not nn.Linear or "
                    "nn.Embedding", stacklevel=3,
                )
            continue
        others = [o for o in owners[id(module.weight)] if o != name]
        if others:
            warnings.warn(
                f"skipping {name}: its weight is tied to {others}; untie it to compress it",
                stacklevel=3,
            )
            continue
        selected.append((name, module))
    if not selected:
        candidates = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED)]
        shown = ", ".join(candidates[:20]) + (" ..." if len(candidates) > 20 else "")
        raise ValueError(
            f"targets {config.targets!r} (exclude {config.exclude!r}) match no nn.Linear or "
            f"nn.Embedding module. Presets: {', '.join(PRESETS)}. Candidates "
            f"({len(candidates)}): {shown}"
        )
    return selected


def _matrix(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach()
    return weight if isinstance(module, nn.Embedding) else weight.T


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def lfa_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters lightweight fine-tuning (SPEC §2) updates, each once.

    The auxiliary tensors of every MPO layer, every bias, and every
    normalization layer's parameters; central tensors and dense weights stay
    frozen (a task head added later is trained as well, by the training code).
    """
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, MPO_LAYERS):
            chosen = [(f"cores.{k}", c) for k, c in enumerate(module.cores)
                      if c is not module.central]
            if getattr(module, "bias", None) is not None:
                chosen.append(("bias", module.bias))
        elif _is_norm(module):
            chosen = list(module.named_parameters(recurse=False))
        else:
            chosen = [(n, p) for n, p in module.named_parameters(recurse=False) if n == "bias"]
        for local, param in chosen:
            if id(param) not in seen:
                seen.add(id(param))
                yield (f"{module_name}.{local}" if module_name else local), param


def _factorized(name: str, module: nn.Module, matrix: torch.Tensor, settings: dict[str, Any]
                ) -> tuple[nn.Module, dict[str, Any]]:
    """A non-MPO layer for one target (``settings["method"]``) and its report row."""
    others = [k for k in ("max_bond", "tol", "params", "bond_dims") if settings[k] is not None]
    if others:
        raise ValueError(f"method {settings['method']!r} is truncated by ratio only, got "
                         f"{others}")
    network = decompose(matrix, settings["method"], n=settings["n"], ratio=settings["ratio"])
    if isinstance(module, nn.Embedding):
        layer = FactorizedEmbedding(network, module.padding_idx)
    else:
        layer = FactorizedLinear(network, bias=module.bias is not None)
        if module.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(module.bias)
    ranks = network.details.get("ranks", [network.details.get("rank")])
    return layer, {
        "name": name,
        "type": matrix_type(name),
        "layer": layer_index(name),
        "method": network.method,
        "shape": f"{matrix.shape[0]}x{matrix.shape[1]}",
        "factorization": " x ".join("·".join(map(str, f.factors))
                                    for f in (network.row, network.col)),
        "bond_dims": ",".join(map(str, ranks)),
        "params": network.num_params,
        "original_params": matrix.numel(),
        "ratio": network.compression_ratio,
        "central_entropy": float("nan"),
        "relative_bound": float("nan"),
        "relative_error": network.relative_error,
    }


def count_parameters(params: Any) -> int:
    """Number of entries of the given parameters."""
    return sum(p.numel() for p in params)


class MPOModel(nn.Module):
    """A model whose selected matrices are MPO layers, with its report.

    Calls and unknown attributes go to the wrapped ``base_model``.

    Attributes
    ----------
    base_model:
        The compressed model (modified in place by :func:`compress`).
    config:
        The :class:`CompressionConfig` used.
    records:
        Per-matrix report rows (see :meth:`report`).
    original_params:
        Parameters of the model before compression.
    """

    def __init__(
        self,
        base_model: nn.Module,
        config: CompressionConfig,
        records: list[dict[str, Any]],
        original_params: int,
    ) -> None:
        super().__init__()
        self.base_model = base_model
        self.config = config
        self.records = Table(records)
        self.original_params = original_params

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    def mpo_layers(self) -> dict[str, nn.Module]:
        """``{module name: MPOLinear or MPOEmbedding}``."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, MPO_LAYERS)}

    def compressed_layers(self) -> dict[str, nn.Module]:
        """Every replaced module: MPO layers and layers of other methods."""
        kinds = MPO_LAYERS + FACTORIZED_LAYERS
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, kinds)}

    def report(self) -> Table:
        """Per matrix: name, shape, factorization, bonds, ratio, entropy, bound, error."""
        return self.records

    def totals(self) -> dict[str, Any]:
        """The paper's totals: #To (all parameters) and #Pr (what LFA updates)."""
        params = list(self.base_model.parameters())
        total = count_parameters(params)
        pr = count_parameters(p for _, p in lfa_parameters(self.base_model))
        mpo = list(self.mpo_layers().values())
        return {
            "original_params": self.original_params,
            "total_params": total,
            "total_over_original": total / self.original_params,
            "lfa_trainable_params": pr,
            "lfa_over_original": pr / self.original_params,
            "central_params": sum(m.central_params for m in mpo),
            "auxiliary_params": sum(m.auxiliary_params for m in mpo),
            "trainable_params": count_parameters(p for p in params if p.requires_grad),
            "compressed_matrices": len(self.compressed_layers()),
        }

    def summary(self) -> str:
        """One line in the style of PEFT's ``print_trainable_parameters()``."""
        t = self.totals()
        return (
            f"trainable params: {t['trainable_params']:,} || all params (#To): "
            f"{t['total_params']:,} ({100 * t['total_over_original']:.2f}% of the original "
            f"{t['original_params']:,}) || aux-only fine-tuning updates (#Pr): "
            f"{t['lfa_trainable_params']:,} ({100 * t['lfa_over_original']:.2f}%)"
        )

    def print_trainable_parameters(self) -> None:
        """Print :meth:`summary`."""
        print(self.summary())

    def save_pretrained(self, directory: str) -> None:
        """Save weights and plan atomically; see :func:`mpotn.serialization.save`."""
        from mpotn.serialization import save

        save(self, directory)


def plan(model: nn.Module, config: CompressionConfig | None = None, **kwargs: Any) -> Table:
    """The dry run: what :func:`compress` would replace, with sizes, changing nothing."""
    config = config or CompressionConfig(**kwargs)
    rows = Table()
    for name, module in select_targets(model, config):
        settings = config.settings_for(name, module)
        matrix = _matrix(module)
        rows.append({
            "name": name,
            "module": type(module).__name__,
            "type": matrix_type(name),
            "shape": f"{matrix.shape[0]}x{matrix.shape[1]}",
            "params": matrix.numel(),
            "n": settings["n"],
            "policy": _policy(settings),
        })
    return rows


def compress(
    model: nn.Module,
    config: CompressionConfig | None = None,
    *,
    progress: bool = True,
    **kwargs: Any,
) -> MPOModel:
    """Replace the selected matrices of ``model`` by MPO layers, in place.

    Parameters
    ----------
    model:
        A Hugging Face model or any module built of ``nn.Linear`` / ``nn.Embedding``.
    config:
        What and how; keyword arguments build one when omitted
        (``compress(model, targets=["ffn"], ratio=0.5)``).
    progress:
        Show a progress bar over the matrices.

    Returns
    -------
    MPOModel
        The model (wrapping the same, modified ``model``) with its report.
    """
    if config is not None and kwargs:
        raise ValueError("give a CompressionConfig or keyword settings, not both")
    config = config or CompressionConfig(**kwargs)
    original = count_parameters(model.parameters())
    selected = select_targets(model, config)
    records = []
    for name, module in tqdm(selected, desc="compressing", unit="matrix", disable=not progress):
        settings = config.settings_for(name, module)
        matrix = _matrix(module)
        if settings["method"] != "mpo":
            layer, record = _factorized(name, module, matrix, settings)
            _replace(model, name, layer)
            records.append(record)
            continue
        full = MPO.from_matrix(matrix, n=settings["n"], row_shape=settings["row_shape"],
                               col_shape=settings["col_shape"], pad=settings["pad"],
                               svd=settings["svd"])
        truncation = {k: settings[k] for k in ("max_bond", "tol", "ratio", "params",
                                               "bond_dims", "allocation")}
        build = MPOEmbedding.from_embedding if isinstance(module, nn.Embedding) else (
            MPOLinear.from_linear)
        cut = apply_policy(full, truncation)
        layer = build(module, mpo=cut, gauge=settings["gauge"])
        _replace(model, name, layer)
        norm = full.norm or 1.0
        records.append({
            "name": name,
            "type": matrix_type(name),
            "layer": layer_index(name),
            "shape": f"{matrix.shape[0]}x{matrix.shape[1]}",
            "factorization": " x ".join("·".join(map(str, s))
                                        for s in (full.row_shape, full.col_shape)),
            "bond_dims": ",".join(map(str, layer.bond_dims[1:-1])),
            "full_bond_dims": ",".join(map(str, full.full_bond_dims[1:-1])),
            "params": sum(c.numel() for c in layer.cores),
            "original_params": matrix.numel(),
            "ratio": layer.compression_ratio,
            "central_entropy": full.entropy(full.central_bond),
            "relative_bound": cut.error_bound / norm,
            "relative_error": cut.reconstruction_error(matrix) / norm,
        })
    return MPOModel(model, config, records, original)
