"""Which parameters are which: counts and the set lightweight fine-tuning trains.

This lives in compression, not in [mpotn.finetune][], because
[mpotn.compression.model.MPOModel.totals][] (#Pr) needs it and imports only
go down; [mpotn.finetune.strategies][] imports it from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from mpotn.compression.config import MPO_LAYERS


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


def count_parameters(params: Any) -> int:
    """Number of entries of the given parameters."""
    return sum(p.numel() for p in params)
