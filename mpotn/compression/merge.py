"""Back to a dense model: [merge][mpotn.compression.merge.merge] replaces every compressed
layer by the ``nn.Linear`` / ``nn.Embedding`` (or ``Conv1D``) holding its dense weight, as
PEFT's ``merge_and_unload`` folds adapters into the base model.

The result is the plain model the compression started from, with the compressed (and
possibly fine-tuned) weights: a ``transformers`` model saves with ``save_pretrained`` and
loads with ``from_pretrained`` of its own class, needing no mpotn at all.
"""

from __future__ import annotations

import copy
import sys
import warnings

import torch
from torch import nn

from mpotn.compression.architectures import conv1d_class, is_conv1d
from mpotn.compression.bottleneck import bottleneck_spec
from mpotn.compression.config import COMPRESSED_LAYERS, replace_module
from mpotn.compression.experts import experts_spec
from mpotn.compression.hf_ties import restore_ties
from mpotn.layers import (
    FactorizedEmbedding,
    FactorizedLinear,
    MPOEmbedding,
    MPOLinear,
    TiedMPOLinear,
)

EMBEDDINGS = (MPOEmbedding, FactorizedEmbedding)
LINEARS = (MPOLinear, FactorizedLinear)


def merge(model: nn.Module) -> nn.Module:
    """Replace every compressed layer of ``model`` by a dense one with the same weight.

    Each [MPOLinear][mpotn.layers.mpo.MPOLinear] and
    [FactorizedLinear][mpotn.layers.factorized.FactorizedLinear] becomes an ``nn.Linear``,
    each [MPOEmbedding][mpotn.layers.mpo.MPOEmbedding] and
    [FactorizedEmbedding][mpotn.layers.factorized.FactorizedEmbedding] an ``nn.Embedding``
    (same ``padding_idx``), holding the layer's dense weight (copied: same values, dtype and
    device) and bias. A [TiedMPOLinear][mpotn.layers.mpo.TiedMPOLinear] head becomes an
    ``nn.Linear`` whose ``weight`` *is* the new embedding's parameter, tied as
    ``transformers`` ties it; the ties the compressed model kept are made again and each
    ``transformers`` model declares the ties it has
    ([restore_ties][mpotn.compression.hf_ties.restore_ties]: BERT's output bias is
    ``cls.predictions.bias`` again). A module shared by several parents (T5's ``shared``, also each
    stack's ``embed_tokens``) is replaced by one dense module everywhere.

    A ``transformers`` model whose architecture stores a matrix as a ``Conv1D`` (GPT-2's
    ``c_attn``, ``c_proj``, ``c_fc``; compression made them ``nn.Linear``) gets a ``Conv1D``
    there again (weight ``in x out``), so that its ``save_pretrained`` checkpoint loads into
    its class's ``from_pretrained``. Other modules get ``nn.Linear``.

    A model with mixtures of experts (``mpotn.compression.experts``) or bottleneck
    adapters (``mpotn.compression.bottleneck``) keeps them, their matrices made dense;
    transformers has no class for that structure, so ``merge`` warns that the result
    saves with mpotn only.

    New weights require a gradient when the layer's own parameters did (for a tied head:
    when the embedding's did), biases as the old bias did; each new layer is in the
    train / eval mode of the layer it replaces, and the model's mode does not change.

    Parameters
    ----------
    model:
        An [MPOModel][mpotn.compression.model.MPOModel], or a module holding compressed
        layers (as ``MPOModel.base_model`` does).

    Returns
    -------
    nn.Module
        The base model, changed **in place**: for a ``transformers`` base, a plain
        ``transformers`` model with dense weights; for a bare compressed layer (nothing
        to replace it in), a new ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding``. As after
        PEFT's ``merge_and_unload``, the ``MPOModel`` should not be used afterwards (its
        base model holds no compressed layer any more; its report and totals describe what
        was).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from mpotn.compression.compress import compress
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = compress(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)),
    ...                  targets=["0", "2"], n=3, ratio=0.5, progress=False).eval()
    >>> x = torch.randn(4, 32)
    >>> with torch.no_grad():
    ...     before = model(x)
    >>> dense = merge(model)
    >>> [type(layer).__name__ for layer in dense]
    ['Linear', 'ReLU', 'Linear']
    >>> with torch.no_grad():
    ...     float((dense(x) - before).abs().max()) < 1e-6
    True
    """
    # an MPOModel (which imports this module) is known by its compression config
    base = model.base_model if hasattr(model, "compression_config") else model
    if isinstance(base, COMPRESSED_LAYERS):  # a bare layer: nothing to replace it in
        return _dense_layer(base, {}, False)
    if experts_spec(base) or bottleneck_spec(base):
        warnings.warn("the model has mixtures of experts or bottleneck adapters, which merge "
                      "keeps (their matrices made dense); no transformers class loads that "
                      "structure, so save it with mpotn", stacklevel=2)
    layers = [(name, module) for name, module in base.named_modules()
              if isinstance(module, COMPRESSED_LAYERS)]
    conv_paths = _conv1d_paths(base) if any(
        isinstance(m, (*LINEARS, TiedMPOLinear)) for _, m in layers) else set()
    # embeddings first: a tied head takes the weight of its embedding's replacement
    layers.sort(key=lambda item: not isinstance(item[1], EMBEDDINGS))
    replaced: dict[int, nn.Module] = {}  # id of a compressed module -> its replacement
    new_layers = []
    for name, module in layers:
        conv = name in conv_paths
        layer = _dense_layer(module, replaced, conv)
        replaced[id(module)] = layer
        new_layers.append((name, layer))
    for name, layer in new_layers:
        replace_module(base, name, layer)
    if conv_paths:  # plain nn.Linear layers where the architecture has Conv1D
        for name, module in list(base.named_modules()):
            if name in conv_paths and type(module) is nn.Linear:
                replace_module(base, name, _dense_layer(module, replaced, True))
    restore_ties(base)
    return base


def _conv1d_paths(base: nn.Module) -> set[str]:
    """Module names at which ``base``'s architecture (a ``transformers`` model built from
    its config on the meta device) has a ``Conv1D``; empty for other modules."""
    modeling = sys.modules.get("transformers.modeling_utils")
    pretrained = getattr(modeling, "PreTrainedModel", None)
    config = getattr(base, "config", None)
    if pretrained is None or conv1d_class() is None or config is None or not isinstance(
            base, pretrained):
        return set()
    try:
        with torch.device("meta"):
            skeleton = type(base)(copy.deepcopy(config))
    except Exception as error:  # a third-party architecture may raise anything: fall back
        warnings.warn(f"merge: could not build a {type(base).__name__} from its config to "
                      f"find its Conv1D layers ({error}); every linear layer becomes "
                      f"nn.Linear", stacklevel=3)
        return set()
    return {name for name, module in skeleton.named_modules() if is_conv1d(module)}


def _requires_grad(params: list[torch.Tensor]) -> bool:
    """Whether a dense weight replacing ``params`` should be trained (``True`` when none)."""
    return not params or any(p.requires_grad for p in params)


def _parameter(tensor: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone().contiguous(), requires_grad=requires_grad)


def _dense_layer(module: nn.Module, replaced: dict[int, nn.Module], conv: bool
                 ) -> nn.Module:
    """The dense layer computing what ``module`` does; ``replaced`` maps compressed
    embeddings already merged to their ``nn.Embedding`` (for tied heads); ``conv``: make a
    ``Conv1D`` (weight ``in x out``) rather than an ``nn.Linear``."""
    bias = getattr(module, "bias", None)
    weights = [p for p in module.parameters() if p is not bias]
    if isinstance(module, TiedMPOLinear):
        embedding = replaced.get(id(module.embedding))
        if embedding is not None:
            weight = embedding.weight  # the same Parameter: the tie restored
        else:
            weights = list(module.embedding.parameters())
            with torch.no_grad():
                weight = _parameter(module.weight, _requires_grad(weights))
    else:
        with torch.no_grad():
            weight = _parameter(module.weight, _requires_grad(weights))
    with torch.device("meta"):  # no initialisation: every parameter is set below
        if isinstance(module, EMBEDDINGS):
            layer = nn.Embedding(module.num_embeddings, module.embedding_dim,
                                 padding_idx=module.padding_idx)
        elif conv:
            layer = conv1d_class()(module.out_features, module.in_features)
        else:
            layer = nn.Linear(module.in_features, module.out_features, bias=bias is not None)
    if conv and not isinstance(module, EMBEDDINGS):
        layer.weight = _parameter(weight.T, weight.requires_grad)  # a copy: W^T ties nothing
        layer.bias = (_parameter(bias, bias.requires_grad) if bias is not None else
                      nn.Parameter(torch.zeros(module.out_features, dtype=weight.dtype,
                                               device=weight.device)))
    else:
        layer.weight = weight
        if bias is not None:
            layer.bias = _parameter(bias, bias.requires_grad)
    layer.train(module.training)
    return layer
