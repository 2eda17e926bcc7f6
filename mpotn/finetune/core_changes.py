"""How far training moved each MPO layer's cores:
[snapshot_cores][mpotn.finetune.core_changes.snapshot_cores] before,
[core_changes][mpotn.finetune.core_changes.core_changes] after (the paper's Table 1 argument).

Training records these; [mpotn.analysis][] and the command line read them
from here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mpotn.compression.config import MPO_LAYERS
from mpotn.compression.models import layer_index, matrix_type
from mpotn.network import central_index
from mpotn.table import Table


def core_changes(before: dict[str, list[torch.Tensor]], model: nn.Module) -> Table:
    """How far training moved the central and the auxiliary tensors of each MPO layer.

    ``before`` maps module names to copies of their cores (``snapshot_cores``).
    Per matrix: ``central_change = ||C' - C|| / ||C||`` and
    ``auxiliary_change = ||A' - A|| / ||A||`` over all auxiliary tensors
    together (Frobenius norms; the paper's Table 1 argues that fine-tuning
    moves the auxiliary tensors more).

    Examples
    --------
    >>> from mpotn.layers import MPOLinear
    >>> model = nn.Sequential(MPOLinear(16, 16, n=3))
    >>> start = snapshot_cores(model)
    >>> with torch.no_grad():
    ...     _ = model[0].cores[0].mul_(2.0)
    >>> row = core_changes(start, model)[0]
    >>> row["central_change"], round(row["auxiliary_change"], 3) > 0
    (0.0, True)
    """
    rows = Table()
    for name, module in model.named_modules():
        if name not in before:
            continue
        cores = [c.detach() for c in module.cores]
        c = central_index(len(cores))
        # the copy may sit where the model was before training (a Trainer moved it since)
        start = [b.to(a.device) for a, b in zip(cores, before[name])]
        aux_delta = sum(float((a - b).norm()) ** 2 for k, (a, b) in
                        enumerate(zip(cores, start)) if k != c)
        aux_norm = sum(float(b.norm()) ** 2 for k, b in enumerate(start) if k != c)
        rows.append({
            "name": name,
            "type": matrix_type(name),
            "layer": layer_index(name),
            "central_change": float((cores[c] - start[c]).norm() / start[c].norm()),
            "auxiliary_change": math.sqrt(aux_delta / aux_norm) if aux_norm else 0.0,
        })
    return rows


def snapshot_cores(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Copies of the cores of every MPO layer, by module name (for
    [core_changes][mpotn.finetune.core_changes.core_changes]); a wrapper that hands on
    its layer's ``cores`` (a bottleneck adapter) is not a second layer."""
    return {name: [c.detach().clone() for c in module.cores]
            for name, module in model.named_modules() if isinstance(module, MPO_LAYERS)}
