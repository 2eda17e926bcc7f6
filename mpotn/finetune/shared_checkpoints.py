"""Trainer checkpoints of models whose tensors have several names.

A central tensor shared by many layers
([share_centrals][mpotn.compression.sharing.share_centrals], the experts of
[upcycle_experts][mpotn.compression.experts.upcycle_experts]) or a layer repeated
ALBERT-style is one tensor under several state-dict names. The Trainer's own
checkpoint (``save_pretrained``) refuses such tensors unless the model declares them
tied. [SharedTensorCheckpoints][mpotn.finetune.shared_checkpoints.SharedTensorCheckpoints],
which mpotn's fine-tuning and healing Trainers use, saves each tensor once, under its
first name, and a resume loads it back into the one tensor all its names share.

Examples
--------
>>> from torch import nn
>>> shared = nn.Linear(2, 2)
>>> model = nn.Sequential(shared, nn.ReLU(), shared)
>>> kept, aliases = distinct_state_dict(model)
>>> sorted(kept), aliases
(['0.bias', '0.weight'], {'2.weight': '0.weight', '2.bias': '0.bias'})
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn


def distinct_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``model``'s state dict with each tensor once, under its first name, and the other
    names of each kept tensor (``{alias: kept name}``)."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
            kept[name] = tensor.detach()
    return kept, aliases


class SharedTensorCheckpoints:
    """Mixin (before ``transformers.Trainer``) for the checkpoints of models with shared
    tensors: each is saved once, under its first name, and a resume, which loads the
    weights by name without strictness, fills it for all its names; the names a
    checkpoint leaves out because they alias a saved tensor are not reported missing.

    Such a checkpoint is for resuming the run: ``from_pretrained`` of the model class
    alone would not know the other names (and would initialise them afresh); mpotn's
    own saves ([save][mpotn.compression.serialization.save]) restore the sharing."""

    def _save(self, output_dir: str | os.PathLike | None = None,
              state_dict: dict[str, torch.Tensor] | None = None) -> None:
        kept, aliases = distinct_state_dict(self.model)
        if aliases:  # the Trainer's own state dict (FSDP, DeepSpeed) loses the aliases too
            state_dict = kept if state_dict is None else {
                name: tensor for name, tensor in state_dict.items() if name not in aliases}
        super()._save(output_dir, state_dict=state_dict)  # type: ignore[misc]

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        aliases = distinct_state_dict(self.model)[1]
        missing = [name for name in load_result.missing_keys if name not in aliases]
        super()._issue_warnings_after_load(  # type: ignore[misc]
            load_result._replace(missing_keys=missing))
