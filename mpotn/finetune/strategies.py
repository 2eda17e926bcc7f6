"""Which parameters fine-tuning updates: SPEC §2's strategy and its baselines.

``full``
    every parameter.
``lfa``
    lightweight fine-tuning: the auxiliary tensors of every MPO layer, biases,
    normalization layers and the task head; central tensors and dense weights
    stay frozen ([mpotn.compression.parameters.lfa_parameters][] with
    ``head=True``).
``central``
    only the central tensors (and what starts untrained: the task head, the
    routers of mixtures of experts, bottleneck adapters).
``last-k``
    the last ``k`` transformer layers of an (uncompressed) model and what starts
    untrained, the paper's Table 5 baseline.
``lora``
    PEFT's LoRA adapters on the attention and FFN linears (and what starts
    untrained), with a rank that can be chosen to match LFA's trainable budget
    ([lora_rank_for_budget][mpotn.finetune.strategies.lora_rank_for_budget]).

[optimizer_groups][mpotn.finetune.strategies.optimizer_groups] gives central and auxiliary tensors
their own learning rates.

Examples
--------
>>> from torch import nn
>>> from mpotn.compression import compress
>>> model = compress(nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16)), targets=["0"], n=3,
...                  progress=False).base_model
>>> apply_strategy(model, "lfa")
{'strategy': 'lfa', 'trainable_params': 80, 'total_params': 336}
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn
from transformers import Trainer

from mpotn.compression.architectures import head_part, is_linear, linear_matrix, matrix_type
from mpotn.compression.config import MPO_LAYERS, PRESET_TYPES
from mpotn.compression.models import layer_index
from mpotn.compression.parameters import (
    count_parameters,
    lfa_parameters,
    untrained_parameters,
)
from mpotn.types import STRATEGIES

#: Matrix types LoRA adapts: the attention and FFN linears of
#: [mpotn.compression.architectures][] (``nn.Linear`` or ``Conv1D``), in every family.
LORA_TYPES = frozenset(PRESET_TYPES["attention"] | PRESET_TYPES["ffn"])


def lora_targets(model: nn.Module, types: frozenset[str] = LORA_TYPES) -> list[str]:
    """Names of the linear layers (``nn.Linear`` or ``Conv1D``) of ``types`` in ``model``."""
    return [n for n, m in model.named_modules() if is_linear(m) and matrix_type(n) in types]


def central_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The central tensor of every MPO layer."""
    for name, module in model.named_modules():
        if isinstance(module, MPO_LAYERS):
            index = next(k for k, c in enumerate(module.cores) if c is module.central)
            yield f"{name}.cores.{index}", module.central


def last_k_parameters(model: nn.Module, k: int) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters of the last ``k`` numbered layers (``...layer.N...``)."""
    layers = {layer_index(n) for n, _ in model.named_parameters()} - {None}
    if not layers:
        raise ValueError("the model has no numbered layers (layer.N) to tune the last k of")
    if not 1 <= k <= len(layers):
        raise ValueError(f"last-k needs 1 <= k <= {len(layers)} (the model's layers), got {k}")
    chosen = set(sorted(layers)[-k:])
    for name, param in model.named_parameters():
        if layer_index(name) in chosen:
            yield name, param


def lora_rank_for_budget(model: nn.Module, budget: int, types: frozenset[str] = LORA_TYPES
                         ) -> int:
    """LoRA rank whose adapters on the linears of ``types`` hold about ``budget`` parameters.

    A rank-``r`` adapter on an ``in x out`` linear has ``r (in + out)`` parameters.
    """
    width = sum(sum(linear_matrix(model.get_submodule(n)).shape)
                for n in lora_targets(model, types))
    if width == 0:
        raise ValueError(f"no linear layer in the model has a LoRA type {sorted(types)}")
    return max(1, round(budget / width))


def apply_strategy(
    model: nn.Module,
    strategy: str,
    *,
    k: int | None = None,
    lora_rank: int | None = None,
    lora_alpha: int | None = None,
) -> Any:
    """Set ``requires_grad`` for a fine-tuning strategy.

    Every strategy trains what starts untrained
    ([untrained_parameters][mpotn.compression.parameters.untrained_parameters]: the task
    head, routers of mixtures of experts, bottleneck adapters); ``lfa`` trains
    [lfa_parameters][mpotn.compression.parameters.lfa_parameters] with ``head=True``
    (so ``trainable_params`` is [lfa_budget][mpotn.finetune.training.lfa_budget], and
    more than #Pr of [MPOModel.totals][mpotn.compression.model.MPOModel.totals], which
    leaves the head's weights out).

    Returns ``{"strategy", "trainable_params", "total_params"}``; for ``lora``
    also the PEFT-wrapped ``"model"`` (use it instead of ``model``) and the rank.

    Raises
    ------
    ValueError
        For an unknown strategy, ``last-k`` without a valid ``k``, ``lora``
        without a rank, or ``lfa`` / ``central`` on a model without MPO layers.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    if strategy in ("lfa", "central") and not any(isinstance(m, MPO_LAYERS)
                                                  for m in model.modules()):
        raise ValueError(f"strategy {strategy!r} needs MPO layers: compress the model first")
    if strategy == "lora":
        return _apply_lora(model, lora_rank, lora_alpha)
    for param in model.parameters():
        param.requires_grad_(strategy == "full")
    chosen: list[tuple[str, nn.Parameter]] = ([] if strategy == "lfa"  # it has them all
                                              else list(untrained_parameters(model)))
    if strategy == "lfa":
        chosen += list(lfa_parameters(model, head=True))
    elif strategy == "central":
        chosen += list(central_parameters(model))
    elif strategy == "last-k":
        if k is None:
            raise ValueError("strategy 'last-k' needs k (how many final layers to tune)")
        chosen += list(last_k_parameters(model, k))
    for _, param in chosen:
        param.requires_grad_(True)
    return {
        "strategy": strategy if strategy != "last-k" else f"last-{k}",
        "trainable_params": count_parameters(p for p in model.parameters() if p.requires_grad),
        "total_params": count_parameters(model.parameters()),
    }


def _apply_lora(model: nn.Module, rank: int | None, alpha: int | None) -> dict[str, Any]:
    if rank is None or rank < 1:
        raise ValueError(f"strategy 'lora' needs a rank >= 1, got {rank!r}")
    from peft import LoraConfig, get_peft_model

    names = [n for n, m in model.named_modules() if is_linear(m)]
    heads = sorted({part for n in names if (part := head_part(n)) is not None})
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank,
                        target_modules=lora_targets(model),
                        modules_to_save=heads or None)
    new = [p for n, p in untrained_parameters(model) if head_part(n) is None]  # routers, ...
    wrapped = get_peft_model(model, config)
    for param in new:  # trained as they are: they have no pre-trained values to adapt
        param.requires_grad_(True)
    trainable = count_parameters(p for p in wrapped.parameters() if p.requires_grad)
    return {"strategy": "lora", "trainable_params": trainable,
            "total_params": count_parameters(wrapped.parameters()), "model": wrapped, "rank": rank}


def optimizer_groups(
    model: nn.Module,
    lr: float,
    central_lr: float | None = None,
    auxiliary_lr: float | None = None,
    weight_decay: float = 0.0,
    scores: Sequence[nn.Parameter] = (),
) -> list[dict[str, Any]]:
    """Parameter groups for a torch optimizer: central, auxiliary, the rest, the rest
    that takes no weight decay (``no_decay``: biases and normalization weights, as the
    Trainer's ``get_decay_parameter_names`` finds them) and ``scores`` (pruning scores:
    rate ``lr``, no weight decay).

    Only trainable parameters are included; empty groups are left out.

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    >>> [(g["name"], len(g["params"]), g["weight_decay"])
    ...  for g in optimizer_groups(model, 1e-3, weight_decay=0.01)]
    [('other', 1, 0.01), ('no_decay', 3, 0.0)]
    """
    central = {id(p) for _, p in central_parameters(model)}
    auxiliary = {id(c) for m in model.modules() if isinstance(m, MPO_LAYERS)
                 for c in m.auxiliary}
    score_ids = {id(p) for p in scores}
    decays = set(Trainer.get_decay_parameter_names(None, model))  # uses nothing of a Trainer
    decayed = {id(p) for name, p in model.named_parameters() if name in decays}
    groups: dict[str, list] = {"central": [], "auxiliary": [], "other": [], "no_decay": [],
                               "scores": []}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        key = "central" if id(param) in central else "auxiliary" if id(param) in auxiliary \
            else "scores" if id(param) in score_ids \
            else "other" if id(param) in decayed else "no_decay"
        groups[key].append(param)
    rates = {"central": lr if central_lr is None else central_lr,
             "auxiliary": lr if auxiliary_lr is None else auxiliary_lr, "other": lr,
             "no_decay": lr, "scores": lr}
    return [{"params": params, "lr": rates[key],
             "weight_decay": 0.0 if key in ("scores", "no_decay") else weight_decay,
             "name": key}
            for key, params in groups.items() if params]
