"""Router statistics in the training logs of models with mixtures of experts.

[RouterLogging][mpotn.finetune.router_logs.RouterLogging], which mpotn's fine-tuning
and healing Trainers use, adds to each training log of a model with
[MixtureOfExperts][mpotn.layers.experts.MixtureOfExperts] layers the means, over the
training forward passes since the previous log (each micro-batch under gradient
accumulation), of
[router_stats][mpotn.layers.experts.router_stats]: ``router_aux_loss`` (Switch's
load-balancing loss, 1 when the load is even) and ``router_dropped`` (the share of token
assignments over capacity). They reach the run's history (``history.csv``) beside the
loss, so that a user sees the load balance while training.

A Trainer with this mixin refuses to train a model with mixtures of experts on several
GPUs of one process (``torch.nn.DataParallel``): its replicas would keep the load-balancing
loss to themselves, and training would go on without it. One process per GPU
(``accelerate launch`` or ``torchrun``) keeps it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mpotn.layers.experts import MixtureOfExperts, router_stats


class RouterLogging:
    """Mixin (before ``transformers.Trainer``): call ``record_router(model)`` in each
    training step's ``compute_loss``; the next training log (one with ``loss``) gets
    ``router_aux_loss`` and ``router_dropped``, the means over the recorded steps."""

    _router_sums: dict[str, torch.Tensor] | None = None
    _router_steps = 0

    def train(self, *args: Any, **kwargs: Any) -> Any:
        gpus = self.args.n_gpu  # type: ignore[attr-defined]
        if gpus > 1 and any(isinstance(m, MixtureOfExperts)
                            for m in self.model.modules()):  # type: ignore[attr-defined]
            raise ValueError(
                f"this model has mixtures of experts and the Trainer would spread one "
                f"process over {gpus} GPUs (torch.nn.DataParallel), whose replicas keep the "
                "load-balancing loss to themselves; run one process per GPU "
                "(accelerate launch --multi_gpu ..., or torchrun), or choose one GPU "
                "(CUDA_VISIBLE_DEVICES=0)")
        return super().train(*args, **kwargs)  # type: ignore[misc]

    def record_router(self, model: nn.Module) -> None:
        """Add the router statistics of ``model``'s last forward pass, if it has any (as
        tensors: nothing waits for the device until the log)."""
        stats = router_stats(model)
        if stats is None:
            return
        sums = self._router_sums
        self._router_sums = stats if sums is None else {
            key: sums[key] + value for key, value in stats.items()}
        self._router_steps += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._router_sums and "loss" in logs:
            logs = {**logs, **{f"router_{key}": float(value) / self._router_steps
                               for key, value in self._router_sums.items()}}
            self._router_sums, self._router_steps = None, 0
        super().log(logs, *args, **kwargs)  # type: ignore[misc]
