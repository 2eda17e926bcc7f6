"""Which parameters are which: counts, the task head, and the set lightweight fine-tuning trains.

This lives in compression, not in [mpotn.finetune][], because
[mpotn.compression.model.MPOModel.totals][] (#Pr) needs it and imports only
go down; [mpotn.finetune.strategies][] and [mpotn.finetune.training][] import it
from here.

[lfa_parameters][mpotn.compression.parameters.lfa_parameters] is the one
definition of what LFA trains; whether the task head belongs to it is the
caller's explicit ``head`` argument: #Pr (``MPOModel.totals``) counts the
compressed model without its head's weights (``head=False``), while
``apply_strategy(model, "lfa")`` and ``lfa_budget`` count what a fine-tuning run
trains, the new head included (``head=True``).

Examples
--------
>>> from torch import nn
>>> model = nn.Sequential()
>>> model.add_module("body", nn.Linear(4, 4))
>>> model.add_module("classifier", nn.Linear(4, 2))
>>> [name for name, _ in lfa_parameters(model, head=False)]
['body.bias', 'classifier.bias']
>>> [name for name, _ in lfa_parameters(model, head=True)]
['body.bias', 'classifier.bias', 'classifier.weight']
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from mpotn.compression.architectures import head_part
from mpotn.compression.config import MPO_LAYERS
from mpotn.layers.bottleneck import BottleneckAdapter
from mpotn.layers.experts import MixtureOfExperts


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def head_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters of the task head (those
    [head_part][mpotn.compression.architectures.head_part] places in one)."""
    for name, param in model.named_parameters():
        if head_part(name) is not None:
            yield name, param


def _new_module_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]] | None:
    """The parameters of ``module`` that start untrained: a mixture's router, a bottleneck
    adapter's; ``None`` for any other module."""
    if isinstance(module, MixtureOfExperts):
        return [("router.weight", module.router.weight)]
    if isinstance(module, BottleneckAdapter):
        return list(module.named_parameters())
    return None


def untrained_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters that start untrained, which every fine-tuning strategy trains, each once:
    the task head's ([head_parameters][mpotn.compression.parameters.head_parameters]), the
    router of every mixture of experts
    ([MixtureOfExperts][mpotn.layers.experts.MixtureOfExperts]: random at first) and
    every bottleneck adapter's
    ([BottleneckAdapter][mpotn.layers.bottleneck.BottleneckAdapter]).

    Examples
    --------
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> model = BertForSequenceClassification(BertConfig(
    ...     hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    >>> [name for name, _ in untrained_parameters(model)]
    ['classifier.weight', 'classifier.bias']
    """
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local, param in _new_module_parameters(module) or []:
            if id(param) not in seen:
                seen.add(id(param))
                yield f"{module_name}.{local}" if module_name else local, param
    for name, param in head_parameters(model):
        if id(param) not in seen:
            seen.add(id(param))
            yield name, param


def lfa_parameters(model: nn.Module, *, head: bool = False
                   ) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters lightweight fine-tuning (SPEC §2) updates, each once.

    The auxiliary tensors of every MPO layer, every bias, every
    normalization layer's parameters, the router of every mixture of experts
    ([MixtureOfExperts][mpotn.layers.experts.MixtureOfExperts], MPOE) and every
    bottleneck adapter ([BottleneckAdapter][mpotn.layers.bottleneck.BottleneckAdapter]);
    central tensors and dense weights stay frozen.

    Parameters
    ----------
    model:
        The (compressed) model.
    head:
        Also yield the task head's parameters
        ([head_parameters][mpotn.compression.parameters.head_parameters]), after the
        rest: what a fine-tuning run trains, the head starting untrained
        (``apply_strategy(model, "lfa")``, ``lfa_budget``). Without it (the
        default) the head's weights are left out -- its biases are in, as every
        bias -- which is what #Pr counts (``MPOModel.totals``) and what healing
        trains.
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
        elif (new := _new_module_parameters(module)) is not None:
            chosen = new
        else:
            chosen = [(n, p) for n, p in module.named_parameters(recurse=False) if n == "bias"]
        for local, param in chosen:
            if id(param) not in seen:
                seen.add(id(param))
                yield (f"{module_name}.{local}" if module_name else local), param
    if head:
        for name, param in head_parameters(model):
            if id(param) not in seen:
                seen.add(id(param))
                yield name, param


def count_parameters(params: Any) -> int:
    """Number of entries of the given parameters."""
    return sum(p.numel() for p in params)
