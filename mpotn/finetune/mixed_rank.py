"""Mixed-rank fine-tuning: LPAF's third stage, as mpotn defines it (SPEC §4).

Right after [factorize_pruned][mpotn.compression.lpaf.factorize_pruned] every
factorized layer computes ``x L^T`` where the pruned model computed ``x A^T``; training
all layers at once at low rank starts from the sum of their errors. Mixed-rank
fine-tuning lets each factorized layer, at each optimizer step, compute with its
pruned full-rank matrix ``A`` instead, with a probability ``p_t`` that falls linearly
from ``p`` at the first step to 0 once the ``anneal`` share of the steps is done (the
progressive module replacing of BERT-of-Theseus, Xu et al. 2020, applied to ranks).
The full-rank matrices are frozen and the layer's bias is shared by both paths, so the
low-rank factors train in a network whose other layers are partly still full rank,
and the last ``1 - anneal`` share of the steps trains the factorized model alone.

The choice is drawn per step and layer from a generator seeded with ``seed`` and the
step, so a resumed run makes the same choices. Each full-rank matrix is a
non-persistent buffer of its layer (``mixed_rank_dense``): it moves and is replicated
with the model (several GPUs included; each process builds its own, so
``DistributedDataParallel`` is told not to broadcast them), but saves and parameter
counts are those of the factorized model, and it is freed once the probability reaches 0 or at
[close][mpotn.finetune.mixed_rank.MixedRank.close]. The swap is a forward hook, which
cannot skip the layer's own forward: a swapped layer still computes its factors'
output (at ratio 0.25, about a quarter of the full-rank product's work) and discards it.
[finetune][mpotn.finetune.training.finetune] takes ``mixed_rank=MixedRank(...)``.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from mpotn.compression import compress
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Linear(8, 8))
>>> dense = {"0": model[0].weight.detach().clone()}
>>> model = compress(model, targets="0", structure="svd", ratio=0.3, progress=False)
>>> mixing = MixedRank(model, dense, p=1.0, anneal=0.5)
>>> x = torch.randn(2, 8)
>>> mixing.step(0, 10), mixing.full_rank  # p_0 = 1: the full-rank matrix
(1.0, ['0'])
>>> bool(torch.allclose(model(x), x @ dense["0"].T + model.base_model[0].bias))
True
>>> mixing.step(5, 10), mixing.full_rank  # annealed: the factors alone
(0.0, [])
>>> mixing.close()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mpotn.compression.config import MPO_LAYERS
from mpotn.compression.model import MPOModel
from mpotn.finetune.schedules import step_callback

#: The name of the buffer that holds a layer's full-rank matrix while it trains.
BUFFER = "mixed_rank_dense"


class MixedRank:
    """Swap factorized layers for their full-rank matrices at random while training.

    Parameters
    ----------
    model:
        The factorized model (an [MPOModel][mpotn.compression.model.MPOModel] or the
        module it wraps); forward hooks are added to its layers named in ``dense``.
    dense:
        ``{layer name: full-rank weight (out x in)}``, as
        [factorize_pruned][mpotn.compression.lpaf.factorize_pruned] returns.
    p:
        Probability that a layer computes with its full-rank matrix at the first step.
    anneal:
        Share of the steps over which that probability falls to 0.
    seed:
        Seeds the choices (with the step).

    Raises
    ------
    ValueError
        For ``p`` or ``anneal`` out of ``[0, 1]`` / ``(0, 1]``, a name that is not an
        MPO linear layer of ``model``, or a weight of another shape.
    """

    def __init__(self, model: nn.Module, dense: Mapping[str, torch.Tensor], p: float = 0.5,
                 anneal: float = 0.5, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0 or not 0.0 < anneal <= 1.0:
            raise ValueError(f"need 0 <= p <= 1 and 0 < anneal <= 1, got p={p}, "
                             f"anneal={anneal}")
        base = model.base_model if isinstance(model, MPOModel) else model
        self.layers: dict[str, nn.Module] = {}
        for name, weight in dense.items():
            try:
                layer = base.get_submodule(name) if name else base
            except AttributeError:
                raise ValueError(f"{name!r} is not a module of the model; pass the factorized "
                                 "model the full-rank weights were taken from") from None
            if not isinstance(layer, MPO_LAYERS) or not hasattr(layer, "in_features"):
                raise ValueError(f"{name!r} is not an MPO linear layer of the model "
                                 f"({type(layer).__name__}); pass the factorized model")
            if tuple(weight.shape) != (layer.out_features, layer.in_features):
                raise ValueError(f"{name}: a full-rank weight of shape {tuple(weight.shape)} "
                                 f"for a {layer.in_features} -> {layer.out_features} layer")
            self.layers[name] = layer
        for name, layer in self.layers.items():
            layer.register_buffer(BUFFER, dense[name].detach().to(
                layer.central.device, layer.central.dtype), persistent=False)
        # every process holds the same matrices: DistributedDataParallel need not broadcast
        # them from the first one before each forward pass (it reads this list when it wraps)
        self._base = base
        self._ignored = [f"{name}.{BUFFER}" if name else BUFFER for name in self.layers]
        base._ddp_params_and_buffers_to_ignore = [
            *getattr(base, "_ddp_params_and_buffers_to_ignore", []), *self._ignored]
        self.p, self.anneal, self.seed = p, anneal, seed
        self.full_rank: list[str] = []
        self._hooks = [layer.register_forward_hook(self._hook(name))
                       for name, layer in self.layers.items()]

    def _hook(self, name: str) -> Any:
        def swap(layer: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
            if not layer.training or name not in self.full_rank:
                return None
            return nn.functional.linear(args[0], getattr(layer, BUFFER), layer.bias)
        return swap

    def settings(self) -> dict[str, Any]:
        """The settings, plain JSON (what a resumed run must match)."""
        return {"mixed_rank_p": self.p, "mixed_rank_anneal": self.anneal,
                "mixed_rank_seed": self.seed, "mixed_rank_layers": list(self.layers)}

    def step(self, step: int, total: int) -> float:
        """Draw which layers compute at full rank during optimizer step ``step`` of
        ``total``; returns that step's probability ``p_t``."""
        probability = self.p * max(0.0, 1.0 - step / (self.anneal * total))
        if probability == 0.0:  # annealed: the full-rank matrices are not needed again
            self._free()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        draws = torch.rand(len(self.layers), generator=generator, dtype=torch.float64)
        self.full_rank = [name for name, u in zip(self.layers, draws.tolist(), strict=True)
                          if u < probability]
        return probability

    def callback(self) -> Any:
        """A ``transformers.TrainerCallback`` that calls
        [step][mpotn.finetune.mixed_rank.MixedRank.step] before every optimizer step."""
        return step_callback(self.step)

    def _free(self) -> None:
        for layer in self.layers.values():
            layer._buffers.pop(BUFFER, None)
        ignored = [n for n in getattr(self._base, "_ddp_params_and_buffers_to_ignore", [])
                   if n not in self._ignored]
        if ignored:
            self._base._ddp_params_and_buffers_to_ignore = ignored
        elif hasattr(self._base, "_ddp_params_and_buffers_to_ignore"):
            del self._base._ddp_params_and_buffers_to_ignore

    def close(self) -> None:
        """Remove the hooks and the full-rank matrices: every layer computes with its
        factors again."""
        for hook in self._hooks:
            hook.remove()
        self._free()
        self._hooks, self.full_rank = [], []
