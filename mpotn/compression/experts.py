r"""Mixture-of-experts feed-forward blocks upcycled from a model's own (MPOE, SPEC §4).

MPOE (Gao et al., 2022) builds the experts of a mixture of experts from one
feed-forward block's MPO: every expert's MPO layers use the *same* central tensor
$C$ and own their auxiliary tensors, so an expert costs its auxiliary tensors and
biases instead of a full copy of the block. For the matrix $M$ of one expert $e$,

$$
M_e = \mathrm{MPO}(A_e, C, B_e),
$$

and the block computes the routed sum of
[MixtureOfExperts][mpotn.layers.experts.MixtureOfExperts].
[upcycle_experts][mpotn.compression.experts.upcycle_experts] turns each chosen
feed-forward block of a model into $E$ experts that start as copies of it (sparse
upcycling), their own tensors perturbed by ``noise`` so that they can diverge, and a
new router; with ``share_central=False`` the experts are full copies, the plain
mixture of experts baseline, from the same code. The model's ``attention_mask``
reaches the mixtures, so that padding tokens are not routed
([attach_token_masks][mpotn.layers.experts.attach_token_masks]).

Each mixture knows its structure, which
[experts_spec][mpotn.compression.experts.experts_spec] reads off the model so that a
save rebuilds it: [read][mpotn.compression.serialization.read] calls
[rebuild_experts][mpotn.compression.experts.rebuild_experts] before it puts the MPO
layers back, and ties the shared centrals again.

Examples
--------
>>> import torch
>>> from transformers import BertConfig, BertModel
>>> from mpotn.compression import compress
>>> torch.manual_seed(0) and None
>>> bert = BertModel(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
...                             num_attention_heads=2, intermediate_size=48))
>>> model = compress(bert, targets=["ffn"], n=3, progress=False)
>>> report = upcycle_experts(model, experts=4, top_k=2)
>>> [round(row["ffn_params_multiple"], 2) for row in report]
[1.57, 1.57]
>>> moe = model.get_submodule("encoder.layer.0.intermediate")
>>> first, last = moe.experts[0], moe.experts[3]
>>> first.intermediate.dense.central is last.intermediate.dense.central
True
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from mpotn.compression.architectures import feed_forward_blocks, layer_index
from mpotn.compression.config import MPO_LAYERS, layer_holder, replace_module
from mpotn.compression.parameters import count_parameters
from mpotn.compression.sharing import mark_shared_centrals
from mpotn.layers.experts import (
    CAPACITY_FACTOR,
    ROUTER_LOSS_WEIGHT,
    MixtureOfExperts,
    SplitFeedForward,
    attach_token_masks,
    check_routing,
)
from mpotn.table import Table

#: Keys of one block's entry in ``experts_spec`` (and in a save's ``experts`` field).
SPEC_KEYS = ("output", "experts", "top_k", "capacity_factor", "router_loss_weight")


def _hidden_size(base: nn.Module) -> int:
    config = getattr(base, "config", None)
    size = getattr(config, "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError("the model's config has no hidden_size, which the router's width "
                         "is; upcycle a transformers model")
    return size


def _expert_template(base: nn.Module, block: str, output: str | None) -> nn.Module:
    """The block as one expert: the module itself, or (BERT) its two matrix stages."""
    if output is None:
        return base.get_submodule(block)
    return SplitFeedForward(base.get_submodule(block), base.get_submodule(output))


def _own_tensors(expert: nn.Module, shared: bool) -> list[nn.Parameter]:
    """What each expert owns and ``noise`` perturbs: the auxiliary tensors of its MPO
    layers (``shared``) or every matrix (plain experts), biases and norms excluded."""
    tensors = []
    for module in expert.modules():
        if isinstance(module, MPO_LAYERS):
            tensors += [c for c in module.cores if not (shared and c is module.central)]
        else:
            tensors += [p for n, p in module.named_parameters(recurse=False)
                        if n == "weight" and p.dim() >= 2]
    return tensors


def _build(base: nn.Module, block: str, output: str | None, settings: dict[str, Any],
           share_central: bool, noise: float, generator: torch.Generator | None
           ) -> MixtureOfExperts:
    """One block's mixture, put in the model in place of the block."""
    template = _expert_template(base, block, output)
    experts = [template] + [copy.deepcopy(template) for _ in range(settings["experts"] - 1)]
    if share_central:
        layers = [[m for m in e.modules() if isinstance(m, MPO_LAYERS)] for e in experts]
        if not layers[0]:
            raise ValueError(f"{block} holds no MPO layer whose central tensor the experts "
                             "could share; compress its matrices first (targets "
                             "['ffn']), or pass share_central=False for plain experts")
        for copies in layers[1:]:
            for original, layer in zip(layers[0], copies):
                layer.cores[layer.central_index] = original.central
                layer._cache = None
    with torch.no_grad():
        for expert in experts[1:] if noise else []:
            for tensor in _own_tensors(expert, share_central):
                scale = float(tensor.detach().float().pow(2).mean().sqrt())
                tensor.add_(noise * scale * torch.randn(
                    tensor.shape, generator=generator, dtype=torch.float32
                ).to(tensor.device, tensor.dtype))
    moe = MixtureOfExperts(experts, _hidden_size(base), top_k=settings["top_k"],
                           capacity_factor=settings["capacity_factor"],
                           router_loss_weight=settings["router_loss_weight"],
                           router_std=getattr(base.config, "initializer_range", 0.02))
    if generator is not None:
        with torch.no_grad():
            moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=generator)
                                    * getattr(base.config, "initializer_range", 0.02))
    if output is not None:  # first: expert 1 holds the same output module
        parent = block.rpartition(".")[0]
        moe.split_output = output.removeprefix(f"{parent}.") if parent else output
        replace_module(base, output, nn.Identity())
    replace_module(base, block, moe)
    return moe


def upcycle_experts(model: nn.Module, experts: int = 4, top_k: int = 2, *,
                    capacity_factor: float | None = CAPACITY_FACTOR,
                    share_central: bool = True, noise: float = 0.01,
                    router_loss_weight: float = ROUTER_LOSS_WEIGHT,
                    layers: list[int] | None = None, seed: int | None = 0) -> Table:
    r"""Turn feed-forward blocks into routed experts that share their central tensors
    (MPOE); the model is changed in place.

    Parameters
    ----------
    model:
        A transformers model, compressed
        ([MPOModel][mpotn.compression.model.MPOModel], its feed-forward matrices MPO
        layers) for MPOE, or dense for ``share_central=False``.
    experts:
        $E$, experts per block.
    top_k:
        Experts per token: 1 is Switch Transformer's gate $p_e$ (an upcycled block
        then starts at about $1/E$ of its output, the router near uniform); 2 (the
        default) renormalises the two gates to sum to 1, so that experts that start
        alike start as the block itself (sparse upcycling).
    capacity_factor:
        See [MixtureOfExperts][mpotn.layers.experts.MixtureOfExperts]; ``None``: no
        limit.
    share_central:
        ``True``: every expert's MPO layer uses the block's central tensor (one
        ``nn.Parameter``) and owns its auxiliary tensors (MPOE). ``False``: full
        copies (the plain mixture of experts).
    noise:
        Experts ``2..E`` get additive noise on their own tensors (auxiliary tensors,
        or every matrix of a plain expert): ``T + noise * RMS(T) * N(0, 1)``, one
        scale per tensor, so that they can diverge; expert 1 keeps the block's values.
    router_loss_weight:
        Weight of the load-balancing loss in training.
    layers:
        Layer numbers whose blocks to upcycle (default: every layer's).
    seed:
        Seed of the perturbation and of the router's initial weights (``None``: the
        global generator).

    Returns
    -------
    Table
        One row per block: ``name``, ``experts``, ``top_k``, ``block_params`` (the
        block before), ``expert_params`` (what one extra expert adds),
        ``shared_params`` (the central tensors, once), ``router_params``,
        ``moe_params`` (all of it, each tensor once) and ``ffn_params_multiple``
        (``moe_params / block_params``).

    Raises
    ------
    ValueError
        For an invalid routing (``experts`` < 1, ``top_k`` outside ``1..experts``,
        ``capacity_factor`` not positive), a model without feed-forward blocks mpotn
        knows, a layer number without one, or ``share_central=True`` on a block
        without MPO layers.
    """
    check_routing(experts, top_k, capacity_factor)
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    base = layer_holder(model)
    blocks = feed_forward_blocks(base)
    if not blocks:
        raise ValueError(f"no feed-forward block found in {type(base).__name__}; mpotn knows "
                         "BERT-style intermediate/output layers and mlp, DenseReluDense and "
                         "ffn modules")
    if layers is not None:
        found = {layer_index(block) for block, _ in blocks}
        missing = sorted(set(layers) - found)
        if missing:
            raise ValueError(f"layers {missing} have no feed-forward block; the model's "
                             f"layers are {sorted(found)}")
        blocks = [(b, o) for b, o in blocks if layer_index(b) in layers]
    settings = {"experts": experts, "top_k": top_k, "capacity_factor": capacity_factor,
                "router_loss_weight": router_loss_weight}
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    report = Table()
    for block, output in blocks:
        template = _expert_template(base, block, output)
        before = count_parameters(template.parameters())
        moe = _build(base, block, output, settings, share_central, noise, generator)
        total = count_parameters(moe.parameters())
        router = moe.router.weight.numel()
        shared = (count_parameters({id(m.central): m.central for m in moe.modules()
                                    if isinstance(m, MPO_LAYERS)}.values())
                  if share_central else 0)
        extra = (total - router - before) // (experts - 1) if experts > 1 else before - shared
        report.append({"name": block, "experts": experts, "top_k": top_k,
                       "block_params": before, "expert_params": extra,
                       "shared_params": shared, "router_params": router,
                       "moe_params": total, "ffn_params_multiple": total / before})
    attach_token_masks(base)
    _unchunk(base)
    mark_shared_centrals(base)
    return report


def _unchunk(base: nn.Module) -> None:
    """Turn off BERT's feed-forward chunking (``chunk_size_feed_forward``): a mixture of
    experts reads its tokens' padding mask by position in the whole sequence."""
    chunked = [m for m in [base, getattr(base, "config", None), *base.modules()]
               if (getattr(m, "chunk_size_feed_forward", 0) or 0) > 0]
    if chunked:
        warnings.warn("feed-forward chunking (chunk_size_feed_forward) turned off: a mixture "
                      "of experts routes whole sequences", stacklevel=3)
    for module in chunked:
        module.chunk_size_feed_forward = 0


def experts_spec(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{block name: {output, experts, top_k, capacity_factor, router_loss_weight}}`` of
    the model's mixtures of experts, read off the modules themselves (so that it follows
    them when layers are copied or moved, as ``deepen`` does); empty when it has none."""
    spec = {}
    for name, module in layer_holder(model).named_modules():
        if isinstance(module, MixtureOfExperts):
            parent = name.rpartition(".")[0]
            output = module.split_output
            spec[name] = {
                "output": None if output is None else f"{parent}.{output}" if parent
                else output,
                "experts": module.num_experts, "top_k": module.top_k,
                "capacity_factor": module.capacity_factor,
                "router_loss_weight": module.router_loss_weight}
    return spec


def rebuild_experts(model: nn.Module, spec: dict[str, dict[str, Any]]) -> None:
    """Rebuild the expert structure ``spec`` (an ``experts_spec``) on the uncompressed
    architecture, with plain copies of each block and an untrained router: what a load
    does before it puts the saved layers (and their weights) in.

    Raises
    ------
    ValueError
        If a block or output named is not a module of the model, or a routing is
        invalid.
    """
    base = layer_holder(model)
    for block, settings in spec.items():
        check_routing(settings["experts"], settings["top_k"], settings["capacity_factor"])
        for name in filter(None, (block, settings["output"])):
            try:
                base.get_submodule(name)
            except AttributeError:
                raise ValueError(f"the experts of {block!r} name {name!r}, which is not a "
                                 "module of the model") from None
        _build(base, block, settings["output"], settings, False, 0.0, None)
    attach_token_masks(base)
    _unchunk(base)
