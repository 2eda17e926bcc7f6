"""Which tokens of a module's input are real: the ``attention_mask`` a model is called with.

A transformers model takes a 2-D ``attention_mask`` (``batch x length``, 1 for real
tokens) at its top and hands its layers a 4-D attention bias built from it, so a
module deep inside (a feed-forward matrix, an expert router) never sees the mask.
[mask_sources][mpotn.layers.masks.mask_sources] finds the modules above some chosen
modules whose ``forward`` takes an ``attention_mask``; a forward pre-hook on each
reads it ([attention_mask_argument][mpotn.layers.masks.attention_mask_argument]) and
hands a 2-D mask, or ``None``, to the chosen modules below it. Pre-hooks run outer
first, so the innermost source decides: T5's decoder stack passes its own mask, not
the encoder's. [real_rows][mpotn.layers.masks.real_rows] then keeps the rows of an
input that belong to real tokens.

Examples
--------
>>> import torch
>>> from torch import nn
>>> class Encoder(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.dense = nn.Linear(4, 4)
...     def forward(self, hidden, attention_mask=None):
...         return self.dense(hidden)
>>> encoder = Encoder()
>>> mask_sources(encoder, lambda m: m is encoder.dense) == [encoder]
True
>>> mask = torch.tensor([[1, 1, 0]])
>>> real_rows(torch.randn(1, 3, 4), mask).shape  # a linear's input: 2 real tokens
torch.Size([2, 4])
>>> real_rows(torch.arange(3)[None], mask, embedding=True)  # position ids
tensor([0, 1])
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


@functools.cache
def _mask_position(cls: type) -> int | None:
    """Position of ``attention_mask`` among the arguments of ``cls.forward`` (``self``
    left out), read once per class; ``None`` when it has none."""
    names = [n for n in inspect.signature(cls.forward).parameters if n != "self"]
    return names.index("attention_mask") if "attention_mask" in names else None


def takes_attention_mask(module: nn.Module) -> bool:
    """Whether ``module.forward`` has an ``attention_mask`` parameter."""
    return _mask_position(type(module)) is not None


def attention_mask_argument(module: nn.Module, args: tuple[Any, ...],
                            kwargs: dict[str, Any]) -> Any:
    """The ``attention_mask`` a module's ``forward`` is called with, by keyword or by
    position (``None`` when left out)."""
    if "attention_mask" in kwargs:
        return kwargs["attention_mask"]
    position = _mask_position(type(module))
    return args[position] if position is not None and len(args) > position else None


def token_mask(mask: Any) -> tuple[bool, torch.Tensor | None]:
    """``(is a token mask, mask)``: a 2-D tensor or ``None`` is one (``None``: every
    token is real); anything else (a 4-D attention bias) is not."""
    if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return True, mask
    return False, None


def mask_sources(model: nn.Module, chosen: Callable[[nn.Module], bool]) -> list[nn.Module]:
    """The modules of ``model`` (itself included) whose ``forward`` takes an
    ``attention_mask`` and that hold a module for which ``chosen`` is true, outer first."""
    return [module for module in model.modules()
            if not chosen(module) and takes_attention_mask(module)
            and any(chosen(m) for m in module.modules())]


def real_rows(x: torch.Tensor, mask: torch.Tensor | None, embedding: bool = False,
              flattened: bool = False) -> torch.Tensor:
    """The rows of ``x`` that belong to real tokens.

    A linear's input ``(..., features)`` gives ``(rows, features)``; an embedding's
    indices give a flat tensor. The leading shape of ``x`` (all of it for an
    embedding) must have the mask's rank and broadcast to its shape (position ids
    ``1 x length`` count once per sentence), or, with ``flattened`` (a module that
    takes every token of the batch, never a routed subset), be the batch's tokens
    flattened into one row each, batch-major (``batch * length`` rows, as Qwen2-MoE's
    shared expert takes them); otherwise, as for a pooler's one row per sentence or
    without a mask, every row is kept.

    Examples
    --------
    >>> mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    >>> real_rows(torch.randn(2, 3, 4), mask).shape
    torch.Size([3, 4])
    >>> real_rows(torch.randn(6, 4), mask, flattened=True).shape
    torch.Size([3, 4])
    >>> real_rows(torch.randn(2, 4), mask).shape  # one row per sentence: all kept
    torch.Size([2, 4])
    """
    lead = x.shape if embedding else x.shape[:-1]
    if (flattened and mask is not None and len(lead) == 1 < mask.dim()
            and lead[0] == mask.numel() > 1):
        return x[mask.reshape(-1).to(x.device).bool()]  # tokens flattened, batch-major
    if mask is not None and len(lead) == mask.dim():
        try:
            fits = torch.broadcast_shapes(lead, mask.shape) == mask.shape
        except RuntimeError:
            fits = False
        if fits:
            x = x.expand(*mask.shape, *x.shape[len(lead):])
            return x[mask.to(x.device).bool()]
    return x.reshape(-1) if embedding else x.reshape(-1, x.shape[-1])
