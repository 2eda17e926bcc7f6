r"""A routed mixture of feed-forward experts (Switch / GShard style; MPOE, SPEC §4).

[MixtureOfExperts][mpotn.layers.experts.MixtureOfExperts] replaces one feed-forward
block by $E$ experts and a router $W_r$ (``hidden x E``, no bias). For the tokens
$x_t$ of a batch it computes router probabilities $p_t = \mathrm{softmax}(x_t W_r)$,
sends each token to its ``top_k`` experts, and returns

$$
y_t = \sum_{e \in \mathrm{top}_k(p_t)} g_{t,e}\, \mathrm{FFN}_e(x_t),
$$

with gate $g_{t,e} = p_{t,e}$ for ``top_k = 1`` (Switch Transformer) and the top-k
probabilities renormalised to sum to 1 for ``top_k >= 2`` (GShard, Mixtral).
With ``capacity_factor`` $c$, an expert takes at most
$\lceil c \cdot T k / E \rceil$ of the $T$ tokens of a training batch (first
choices before second choices, in token order); a token over capacity gets
nothing from that expert (its residual connection carries it, as in Switch).
``None`` means no limit, and evaluation has none. Padding tokens are not routed
(their output is zero) and count neither for capacity nor for the loss below, as
in Mixtral's load-balancing loss: [attach_token_masks][mpotn.layers.experts.attach_token_masks]
hands each mixture the ``attention_mask`` its model was called with. Each forward pass
also stores in ``dropped`` the share of its $T k$ assignments that were over capacity
(Switch Transformer's dropped tokens; 0 in evaluation).

Each forward pass stores the load-balancing loss of Switch Transformer,

$$
\mathcal{L}_{\mathrm{aux}} = E \sum_{e=1}^{E} f_e P_e ,
$$

$f_e$ the share of the $T k$ assignments that chose expert $e$ and $P_e$ its mean
router probability, in ``aux_loss`` (1 when the load is even, up to $E$ when one
expert takes everything); [router_loss][mpotn.layers.experts.router_loss] sums
``router_loss_weight`` times it over a model, and mpotn's fine-tuning and healing add
that to the task loss ([add_router_loss][mpotn.layers.experts.add_router_loss]). The
experts are any modules mapping ``(..., hidden)`` to ``(..., hidden)``; in MPOE they
are feed-forward blocks whose MPO layers share one central tensor and own their
auxiliary tensors ([upcycle_experts][mpotn.compression.experts.upcycle_experts]).

Examples
--------
>>> import torch
>>> from torch import nn

>>> torch.manual_seed(0) and None
>>> ffn = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
>>> moe = MixtureOfExperts([ffn], hidden_size=8)
>>> x = torch.randn(2, 5, 8)
>>> with torch.no_grad():
...     same = torch.equal(moe(x), ffn(x))
>>> same, float(moe.aux_loss)
(True, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mpotn.layers.masks import attention_mask_argument, mask_sources, token_mask

#: Switch Transformer's weight of the load-balancing loss.
ROUTER_LOSS_WEIGHT = 0.01
#: Switch Transformer's training capacity factor.
CAPACITY_FACTOR = 1.25


class Router(nn.Linear):
    """The router $W_r$: an ``nn.Linear`` that scores in float32 whatever its weight's
    dtype or autocast (Switch Transformer's selective precision: half-precision scores
    change choices; in a bfloat16 model 2 of 512 top-1 choices flipped).

    Examples
    --------
    >>> router = Router(4, 2, bias=False, dtype=torch.bfloat16)
    >>> router(torch.randn(3, 4, dtype=torch.bfloat16)).dtype
    torch.float32
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return nn.functional.linear(x.float(), self.weight.float(), bias)


class SplitFeedForward(nn.Module):
    """A feed-forward block whose output matrix lives in another module, as one expert.

    BERT-style layers compute the block as ``intermediate`` (input matrix and
    activation) and then ``output.dense`` inside ``output``, which also adds the
    residual and normalises. An expert holds the two matrix stages only:
    ``forward(x) = output.dense(intermediate(x))``; the residual and the norm stay in
    the layer's own ``output``, whose ``dense`` becomes ``nn.Identity``. The attribute
    names keep the module paths (``...intermediate.dense``, ``...output.dense``) that
    [matrix_type][mpotn.compression.architectures.matrix_type] reads.
    """

    def __init__(self, intermediate: nn.Module, dense: nn.Module) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.output = nn.Module()
        self.output.dense = dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.intermediate(x))


class MixtureOfExperts(nn.Module):
    """Routed experts in place of one feed-forward block (see the module docstring).

    Parameters
    ----------
    experts:
        The ``E`` expert modules, each mapping ``(..., hidden_size)`` to
        ``(..., hidden_size)``.
    hidden_size:
        Width of the tokens the router reads.
    top_k:
        Experts per token (1: Switch; 2: GShard).
    capacity_factor:
        Capacity per expert as a multiple of an even share of the token
        assignments; ``None``: no limit.
    router_loss_weight:
        Weight of ``aux_loss`` in [router_loss][mpotn.layers.experts.router_loss].
    router_std:
        Standard deviation of the router's initial weights.

    Raises
    ------
    ValueError
        If there are no experts, ``top_k`` is not between 1 and ``E``, or
        ``capacity_factor`` is not positive.
    """

    def __init__(self, experts: Sequence[nn.Module], hidden_size: int, top_k: int = 1,
                 capacity_factor: float | None = CAPACITY_FACTOR,
                 router_loss_weight: float = ROUTER_LOSS_WEIGHT, router_std: float = 0.02
                 ) -> None:
        super().__init__()
        check_routing(len(experts), top_k, capacity_factor)
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.router_loss_weight = router_loss_weight
        reference = next(iter(self.experts[0].parameters()), None)
        place = {} if reference is None else {"device": reference.device,
                                              "dtype": reference.dtype}
        self.router = Router(hidden_size, len(experts), bias=False, **place)
        nn.init.normal_(self.router.weight, std=router_std)
        self.aux_loss: torch.Tensor | None = None
        #: Share of the last forward pass's token assignments over capacity (a detached
        #: scalar tensor on the tokens' device; ``None`` before any routed token).
        self.dropped: torch.Tensor | None = None
        #: ``(batch, length)`` mask of the real tokens (1) of the current forward pass, set
        #: by the hooks of ``attach_token_masks``; ``None``: every token is real.
        self.token_mask: torch.Tensor | None = None
        #: For a block whose output matrix lives beside it (BERT's ``output.dense``): that
        #: module's path relative to the block's parent, made ``nn.Identity`` there.
        self.split_output: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        """The state without the last forward pass's ``aux_loss`` (a tensor of its graph,
        which ``copy.deepcopy`` cannot copy), ``token_mask`` and ``dropped``: a copy
        should not keep them."""
        return {**super().__getstate__(), "aux_loss": None, "token_mask": None,
                "dropped": None}

    @property
    def num_experts(self) -> int:
        """``E``."""
        return len(self.experts)

    def capacity(self, tokens: int) -> int:
        r"""Most token assignments one expert takes: $\lceil c\, T k / E \rceil$ while
        training; all ``tokens`` when ``capacity_factor`` is ``None`` and in evaluation
        (so that an example's output does not depend on the rest of its batch)."""
        if self.capacity_factor is None or not self.training:
            return tokens
        share = self.capacity_factor * tokens * self.top_k / self.num_experts
        return min(tokens, math.ceil(round(share, 9)))  # 1.1 * 100 * 2 / 4 is 55, not 55.0..1

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router output for ``(T, hidden)`` tokens: gates ``(T, k)`` (zero where a token
        is over an expert's capacity), chosen experts ``(T, k)`` and the load-balancing
        loss (a scalar); the share of assignments over capacity goes to ``dropped``. The
        scores are the ``router`` module's (a [Router][mpotn.layers.experts.Router]:
        float32 whatever the model's dtype or autocast; its hooks run, and a wrapper such
        as PEFT's LoRA adds its update, without autocast too, in its weights' dtype)."""
        with torch.autocast(tokens.device.type, enabled=False):
            logits = self.router(tokens.float()).float()
        probs = torch.softmax(logits, dim=-1)
        top, chosen = probs.topk(self.top_k, dim=-1)
        gates = top if self.top_k == 1 else top / top.sum(-1, keepdim=True)
        one_hot = nn.functional.one_hot(chosen, self.num_experts)  # (T, k, E)
        share = one_hot.float().mean(dim=(0, 1))
        loss = self.num_experts * (share * probs.mean(0)).sum()
        # place of each assignment in its expert's queue: first choices, then second ...
        order = one_hot.transpose(0, 1).reshape(-1, self.num_experts)  # (k T, E)
        place = (order.cumsum(0) - 1).reshape(self.top_k, -1, self.num_experts)
        place = (place.transpose(0, 1) * one_hot).sum(-1)  # (T, k)
        kept = place < self.capacity(tokens.shape[0])
        self.dropped = 1 - kept.float().mean().detach()
        return gates * kept, chosen, loss

    def real_tokens(self, shape: torch.Size) -> torch.Tensor | None:
        """Indices of the real tokens among the ``prod(shape[:-1])`` tokens of an input of
        ``shape``, from ``token_mask`` (its last ``length`` columns, so that a mask that
        also covers cached tokens fits); ``None`` when there is no mask.

        Raises
        ------
        ValueError
            If the mask is not ``(batch, >= length)`` for a ``(batch, length, hidden)``
            input.
        """
        mask = self.token_mask
        if mask is None:
            return None
        if len(shape) != 3 or mask.dim() != 2 or mask.shape[0] != shape[0] \
                or mask.shape[1] < shape[1]:
            raise ValueError(f"the attention mask {tuple(mask.shape)} does not fit the "
                             f"tokens {tuple(shape[:-1])} of this mixture of experts; call "
                             "the model with the attention_mask of its input_ids")
        return torch.nonzero(mask[:, mask.shape[1] - shape[1]:].reshape(-1),
                             as_tuple=True)[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        tokens = hidden.reshape(-1, shape[-1])
        real = self.real_tokens(shape)
        if real is not None:
            real = real.to(tokens.device)
        routed = tokens if real is None else tokens[real]
        out = None
        self.aux_loss = self.dropped = None
        if routed.shape[0]:
            gates, chosen, self.aux_loss = self.route(routed)
            for e, expert in enumerate(self.experts):
                token, slot = torch.nonzero((chosen == e) & (gates > 0), as_tuple=True)
                if token.numel() == 0:
                    continue
                y = expert(routed[token]) * gates[token, slot, None].to(tokens.dtype)
                if out is None:
                    out = y.new_zeros(tokens.shape[0], y.shape[-1])
                out = out.index_add(0, token if real is None else real[token], y)
        if out is None:  # no real token, or every token over capacity
            out = tokens.new_zeros(tokens.shape)
        return out.reshape(*shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, "
                f"capacity_factor={self.capacity_factor}")


def check_routing(experts: int, top_k: int, capacity_factor: float | None) -> None:
    """Refuse a routing that cannot work, saying what to change.

    Raises
    ------
    ValueError
        If ``experts`` < 1, ``top_k`` is not in ``1..experts``, or ``capacity_factor``
        is not ``None`` or positive.
    """
    if not isinstance(experts, int) or experts < 1:
        raise ValueError(f"experts must be a whole number >= 1, got {experts!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be a whole number from 1 to the number of experts "
                         f"({experts}), got {top_k!r}")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be positive (Switch trains at 1.25) or None "
                         f"for no limit, got {capacity_factor!r}")


def _set_token_masks(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                     ) -> None:
    """Forward pre-hook: hand a 2-D (or absent) ``attention_mask`` to the mixtures below
    ``module``; a 4-D one (an attention bias built from it) leaves theirs as they are."""
    usable, mask = token_mask(attention_mask_argument(module, args, kwargs))
    if usable:
        for m in module.modules():
            if isinstance(m, MixtureOfExperts):
                m.token_mask = mask


def _clear_token_masks(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    """Forward hook: forget the masks of the mixtures below ``module`` after its call,
    unless it trains with gradients: gradient checkpointing runs the layers again in the
    backward pass, outside this call, and they must route as they did (the next call
    sets the masks anew)."""
    if module.training and torch.is_grad_enabled():
        return
    for m in module.modules():
        if isinstance(m, MixtureOfExperts):
            m.token_mask = None


def attach_token_masks(model: nn.Module) -> int:
    """Let the model's mixtures of experts skip padding tokens.

    Every module above a [MixtureOfExperts][mpotn.layers.experts.MixtureOfExperts]
    whose ``forward`` takes an ``attention_mask`` gets two hooks: before its call it
    hands a 2-D (``batch x length``) mask, or ``None``, to the mixtures below it (so the
    innermost such module decides, e.g. T5's decoder stack with its own mask), and
    after its call it clears them (in training with gradients it keeps them until the
    next call, for gradient checkpointing's second forward pass). A 4-D mask (an
    attention bias) is left alone. Calling it again adds nothing.

    Returns
    -------
    int
        The number of modules hooked now.

    Examples
    --------
    >>> from torch import nn
    >>> class Encoder(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.ffn = MixtureOfExperts([nn.Linear(4, 4), nn.Linear(4, 4)], 4)
    ...     def forward(self, hidden, attention_mask=None):
    ...         return self.ffn(hidden)
    >>> encoder = Encoder()
    >>> attach_token_masks(encoder), attach_token_masks(encoder)
    (1, 0)
    >>> mask = torch.tensor([[1, 1, 0]])
    >>> out = encoder.eval()(torch.randn(1, 3, 4), attention_mask=mask)
    >>> float(out[0, 2].detach().abs().sum()), encoder.ffn.token_mask is None
    (0.0, True)
    """
    hooked = 0
    for module in mask_sources(model, lambda m: isinstance(m, MixtureOfExperts)):
        if _set_token_masks not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_set_token_masks, with_kwargs=True)
            module.register_forward_hook(_clear_token_masks, always_call=True)
            hooked += 1
    return hooked


def router_loss(model: nn.Module) -> torch.Tensor | None:
    """``router_loss_weight * aux_loss`` summed over the model's
    [MixtureOfExperts][mpotn.layers.experts.MixtureOfExperts] layers, from their last
    forward pass; ``None`` when the model has none (or none has run)."""
    losses = [m.router_loss_weight * m.aux_loss for m in model.modules()
              if isinstance(m, MixtureOfExperts) and m.aux_loss is not None]
    return _on_first(losses).sum() if losses else None


def _on_first(values: list[torch.Tensor]) -> torch.Tensor:
    """Scalars stacked on the first one's device (layers may sit on several GPUs)."""
    return torch.stack([v.to(values[0].device) for v in values])


def router_stats(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The mean, over the model's [MixtureOfExperts][mpotn.layers.experts.MixtureOfExperts]
    layers that routed tokens in their last forward pass, of their load-balancing loss
    (``aux_loss``: 1 when even) and of their share of assignments over capacity
    (``dropped``), as detached scalar tensors on the first layer's device (reading them,
    ``float``, waits for the device); ``None`` when there is no such layer.

    Examples
    --------
    >>> torch.manual_seed(0) and None
    >>> moe = MixtureOfExperts([nn.Linear(4, 4), nn.Linear(4, 4)], 4, capacity_factor=None)
    >>> _ = moe(torch.randn(3, 4))
    >>> stats = router_stats(moe)
    >>> sorted(stats), float(stats["dropped"]), router_stats(nn.Linear(2, 2))
    (['aux_loss', 'dropped'], 0.0, None)
    """
    routed = [m for m in model.modules()
              if isinstance(m, MixtureOfExperts) and m.aux_loss is not None]
    if not routed:
        return None
    return {"aux_loss": _on_first([m.aux_loss.detach() for m in routed]).mean(),
            "dropped": _on_first([m.dropped for m in routed]).mean()}


def add_router_loss(loss: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``loss`` plus [router_loss][mpotn.layers.experts.router_loss]; ``loss`` itself for a
    model without experts."""
    extra = router_loss(model)
    return loss if extra is None else loss + extra.to(loss.device, loss.dtype)
