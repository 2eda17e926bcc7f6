"""Torch modules whose weight is a decomposition, and the registry of their kinds.

[mpotn.layers.mpo][] holds [MPOLinear][mpotn.layers.mpo.MPOLinear] and
[MPOEmbedding][mpotn.layers.mpo.MPOEmbedding] (the weight is an MPO; central and auxiliary tensors
are parameter groups; a [TruncationPolicy][mpotn.truncation.TruncationPolicy] cuts them);
[TiedMPOLinear][mpotn.layers.mpo.TiedMPOLinear] is an output layer whose weight is an
``MPOEmbedding``'s table (a tied language-model head);
[mpotn.layers.factorized][] holds [FactorizedLinear][mpotn.layers.factorized.FactorizedLinear] and
[FactorizedEmbedding][mpotn.layers.factorized.FactorizedEmbedding] (the weight is any
[FactorNetwork][mpotn.methods.base.FactorNetwork]); [mpotn.layers.experts][] holds
[MixtureOfExperts][mpotn.layers.experts.MixtureOfExperts] (routed feed-forward experts,
MPOE), [mpotn.layers.bottleneck][] the
[BottleneckAdapter][mpotn.layers.bottleneck.BottleneckAdapter] (Houlsby adapters), and
[mpotn.layers.lstm][] the [MPOLSTM][mpotn.layers.lstm.MPOLSTM] (an ``nn.LSTM`` whose
matrices are MPOs, MPO-LSTM).

Every layer class describes itself: ``spec()`` is a JSON-ready ``dict`` of its
structure (``kind`` and the keys of its ``SPEC_FIELDS``) and the classmethod
``from_spec(spec, dtype)`` builds an untrained layer of that structure.
[LAYER_KINDS][mpotn.layers.LAYER_KINDS] maps each ``kind`` to its class, and
[layer_from_spec][mpotn.layers.layer_from_spec] builds whichever a spec names; saving and
loading ([mpotn.compression.serialization][]) go through them alone. A new layer kind is a
class with ``KIND``, ``SPEC_FIELDS``, ``spec`` and ``from_spec``, added to ``LAYER_KINDS``.

Examples
--------
>>> layer = MPOLinear(6, 4, n=2)
>>> again = layer_from_spec(layer.spec())
>>> type(again).__name__, again.bond_dims == layer.bond_dims
('MPOLinear', True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mpotn.layers.bottleneck import Adapted, BottleneckAdapter
from mpotn.layers.experts import MixtureOfExperts
from mpotn.layers.factorized import FactorizedEmbedding, FactorizedLinear
from mpotn.layers.lstm import MPOLSTM
from mpotn.layers.mpo import MPOEmbedding, MPOLinear, TiedMPOLinear

#: ``{kind: layer class}``: every layer kind a save may name, in the order errors list them.
LAYER_KINDS: dict[str, type[nn.Module]] = {
    layer.KIND: layer for layer in (MPOLinear, MPOEmbedding, TiedMPOLinear, FactorizedLinear,
                                    FactorizedEmbedding)
}


def layer_from_spec(spec: dict[str, Any], dtype: torch.dtype | None = None) -> nn.Module:
    """The untrained layer ``spec`` (a layer's ``spec()``) describes, in ``dtype``.

    Raises
    ------
    ValueError
        If ``spec["kind"]`` is not one of [LAYER_KINDS][mpotn.layers.LAYER_KINDS].
    """
    kind = spec.get("kind")
    if kind not in LAYER_KINDS:
        raise ValueError(f"unknown layer kind {kind!r}; known: {', '.join(LAYER_KINDS)}")
    return LAYER_KINDS[kind].from_spec(spec, dtype)


def tie_layers(model: nn.Module) -> None:
    """Link every [TiedMPOLinear][mpotn.layers.mpo.TiedMPOLinear] of ``model`` to the embedding
    its ``tied_to`` names (after a load, or after its embedding was replaced).

    Raises
    ------
    ValueError
        If ``tied_to`` names no module of ``model``, or one that is not an
        ``MPOEmbedding`` of the layer's shape.
    """
    for name, layer in model.named_modules():
        if isinstance(layer, TiedMPOLinear):
            try:
                embedding = model.get_submodule(layer.tied_to)
            except AttributeError:
                raise ValueError(f"{name} is tied to {layer.tied_to!r}, which is not a module "
                                 "of the model") from None
            layer.tie(embedding)


__all__ = [
    "LAYER_KINDS",
    "MPOLSTM",
    "Adapted",
    "BottleneckAdapter",
    "FactorizedEmbedding",
    "FactorizedLinear",
    "MPOEmbedding",
    "MPOLinear",
    "MixtureOfExperts",
    "TiedMPOLinear",
    "layer_from_spec",
    "tie_layers",
]
