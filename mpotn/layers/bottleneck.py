r"""Bottleneck adapters (Houlsby et al., 2019), as MPOBERT adds them per layer (SPEC §4).

A [BottleneckAdapter][mpotn.layers.bottleneck.BottleneckAdapter] of width $m$ maps a
hidden state $h$ (width $H$) to

$$
h + W_{\uparrow}\, \sigma(W_{\downarrow} h + b_{\downarrow}) + b_{\uparrow},
\qquad W_{\downarrow} \in \mathbb{R}^{m \times H},\ W_{\uparrow} \in \mathbb{R}^{H \times m},
$$

with $W_{\uparrow}, b_{\uparrow}$ zero at the start, so that a new adapter is the
identity and a model gains $2Hm + H + m$ parameters per adapter without changing its
function. [Adapted][mpotn.layers.bottleneck.Adapted] runs a module and then its
adapter; it keeps the module as ``layer``, so the module's path gains ``.layer``.

Examples
--------
>>> import torch
>>> from torch import nn
>>> dense = nn.Linear(8, 8)
>>> adapted = Adapted(dense, BottleneckAdapter(8, 2))
>>> x = torch.randn(3, 8)
>>> torch.equal(adapted(x), dense(x)), sum(p.numel() for p in adapted.adapter.parameters())
(True, 42)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class BottleneckAdapter(nn.Module):
    """``h + up(gelu(down(h)))``, ``up`` zero at the start (see the module docstring).

    Raises
    ------
    ValueError
        If ``hidden_size`` or ``size`` is not a whole number >= 1.
    """

    def __init__(self, hidden_size: int, size: int) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("size", size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        self.down = nn.Linear(hidden_size, size)
        self.up = nn.Linear(size, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def size(self) -> int:
        """The bottleneck width ``m``."""
        return self.down.out_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(nn.functional.gelu(self.down(hidden)))


class Adapted(nn.Module):
    """``adapter(layer(x))``: a module followed by its bottleneck adapter.

    Attributes it does not have itself are the layer's (``weight``, ``in_features``,
    ...), so that model code that reads them, as T5's feed-forward block reads
    ``wo.weight.dtype``, keeps working.
    """

    def __init__(self, layer: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.layer = layer
        self.adapter = adapter

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("layer", "adapter"):  # not yet set (during __init__ or unpickling)
                raise
            return getattr(super().__getattr__("layer"), name)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.adapter(self.layer(*args, **kwargs))
