"""Bottleneck adapters in every layer of a model (MPOBERT's optional adapters, SPEC §4).

[add_bottleneck_adapters][mpotn.compression.bottleneck.add_bottleneck_adapters] puts a
[BottleneckAdapter][mpotn.layers.bottleneck.BottleneckAdapter] after each matrix of the
chosen types (by default the attention output and the FFN output of every layer,
where Houlsby et al. put them: before the residual and the norm), each starting as
the identity. Lightweight fine-tuning trains them with the auxiliary tensors
([lfa_parameters][mpotn.compression.parameters.lfa_parameters]), and a save records
where they are (the optional ``bottleneck_adapters`` field of ``mpotn_config.json``;
[bottleneck_spec][mpotn.compression.bottleneck.bottleneck_spec] reads it off the
model) so that a load rebuilds them
([rebuild_bottlenecks][mpotn.compression.bottleneck.rebuild_bottlenecks]).

Examples
--------
>>> import torch
>>> from transformers import BertConfig, BertModel
>>> torch.manual_seed(0) and None
>>> bert = BertModel(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
...                             num_attention_heads=2, intermediate_size=48)).eval()
>>> ids = torch.randint(0, 97, (2, 5))
>>> before = bert(ids).last_hidden_state
>>> report = add_bottleneck_adapters(bert, size=8)
>>> len(report), report[0]["name"], report[0]["params"]
(4, 'encoder.layer.0.attention.output.dense', 552)
>>> torch.equal(bert(ids).last_hidden_state, before)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from mpotn.compression.architectures import layer_index, matrix_type
from mpotn.compression.config import layer_holder, replace_module
from mpotn.compression.parameters import count_parameters
from mpotn.layers.bottleneck import Adapted, BottleneckAdapter
from mpotn.table import Table

#: Matrix types an adapter follows by default: the attention output and the FFN output.
ADAPTER_TYPES = ("attn_out", "ffn_out")


def _width(module: nn.Module) -> int | None:
    """Output width of a matrix layer (``out_features``, or ``Conv1D``'s ``nf``)."""
    width = getattr(module, "out_features", getattr(module, "nf", None))
    return width if isinstance(width, int) else None


def add_bottleneck_adapters(model: nn.Module, size: int = 64,
                            types: Sequence[str] = ADAPTER_TYPES) -> Table:
    """Put a bottleneck adapter of width ``size`` after every matrix of ``types`` in the
    numbered layers, in place (each starts as the identity).

    Returns
    -------
    Table
        One row per adapter: ``name`` (the matrix it follows), ``type``, ``width`` and
        ``params``.

    Raises
    ------
    ValueError
        For a ``size`` below 1, or when no matrix of ``types`` is found (or they all
        have adapters already).
    """
    base = layer_holder(model)
    chosen = [(name, module) for name, module in base.named_modules()
              if layer_index(name) is not None and matrix_type(name) in types
              and _width(module) is not None and not isinstance(module, Adapted)
              and not name.endswith(".layer")]
    if not chosen:
        raise ValueError(f"no matrix of types {list(types)} without an adapter in the model's "
                         "numbered layers; the types are those of "
                         "mpotn.compression.architectures.matrix_type")
    report = Table()
    for name, module in chosen:
        adapter = BottleneckAdapter(_width(module), size)
        reference = next(iter(module.parameters()), None)
        if reference is not None:
            adapter.to(reference.device, reference.dtype)
        replace_module(base, name, Adapted(module, adapter))
        report.append({"name": name, "type": matrix_type(name), "width": _width(module),
                       "params": count_parameters(adapter.parameters())})
    return report


def bottleneck_spec(model: nn.Module) -> dict[str, int]:
    """``{module name: adapter width}`` of every adapted module of the model."""
    return {name: module.adapter.size for name, module in layer_holder(model).named_modules()
            if isinstance(module, Adapted)}


def rebuild_bottlenecks(model: nn.Module, spec: dict[str, Any]) -> None:
    """Wrap the modules ``spec`` (a ``bottleneck_spec``) names in untrained adapters: what
    a load does before it puts the saved layers and weights in.

    Raises
    ------
    ValueError
        If a name is not a matrix of the model.
    """
    base = layer_holder(model)
    for name, size in spec.items():
        try:
            module = base.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the adapter of {name!r} names no module of the model") from None
        if _width(module) is None:
            raise ValueError(f"{name!r} is a {type(module).__name__}, not a matrix an "
                             "adapter can follow")
        adapter = BottleneckAdapter(_width(module), size)
        replace_module(base, name, Adapted(module, adapter))
