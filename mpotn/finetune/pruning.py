"""Gradual pruning while fine-tuning, by movement or magnitude: LPAF's first stage (SPEC §4).

LPAF (low-rank prune-and-factorize) starts from the observation that fine-tuned
matrices are nearly full rank, so that factorizing them directly loses much; pruning
them first with a *first-order* criterion leaves a sparsity pattern of low rank,
which a factorization then keeps. This module is that pruning stage: movement
pruning (Sanh, Wolf & Rush, 2020), applied to a model's matrices while it is
fine-tuned.

Every target matrix ``W`` gets scores ``S`` of its shape. The forward pass uses
``W' = W ⊙ M`` with ``M = Top_v(S)``, the mask of the fraction ``v`` (the density) of
entries with the highest scores in that matrix. The straight-through estimator
passes the mask's gradient to the scores, ``∂L/∂S = (∂L/∂W') ⊙ W``, so that under
plain gradient descent ``S = -η Σ_t (∂L/∂W')_t ⊙ W_t``: entries that training moves
away from zero gain score, whatever their size (magnitude pruning, the zeroth-order
criterion, keeps the largest ``|W|`` instead; ``criterion="magnitude"`` gives it, with
the same schedule, as the baseline LPAF measures against). The scores are trained with
the model, by the same optimizer, with no weight decay.

The sparsity ``s = 1 - v`` follows the cubic schedule of Zhu & Gupta (2018) that
movement pruning uses: 0 (nothing pruned, while the scores gather) for the first
``warmup`` share of the steps, then

    s_t = s_f (1 - (1 - (t - t_w) / (T - t_w - t_c))^3),

reaching the final sparsity ``s_f`` with the last ``cooldown`` share of the steps
still to go, which train the pruned model with its mask fixed.
[GradualPruning][mpotn.finetune.pruning.GradualPruning] attaches the mask (and the
scores) as a ``torch.nn.utils.parametrize`` parametrization of each target's
``weight``, sets the masks from the schedule at every step (as a ``Trainer`` callback,
or by hand with [GradualPruning.step][mpotn.finetune.pruning.GradualPruning.step]), and
[GradualPruning.finalize][mpotn.finetune.pruning.GradualPruning.finalize] writes
``W ⊙ M`` into the weights and removes the rest, leaving plain ``nn.Linear`` layers
with zeros. [finetune][mpotn.finetune.training.finetune] does all of this with
``pruning=GradualPruning(...)``.

Examples
--------
>>> import torch
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
>>> pruning = GradualPruning(model, sparsity=0.75, targets="0|2", warmup=0.0,
...                          cooldown=0.2)
>>> optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
>>> for t in range(10):
...     _ = pruning.step(t, 10)  # the sparsity of step t: 0.0, 0.25, 0.43, ..., 0.75
...     loss = model(torch.randn(16, 8)).pow(2).mean()
...     loss.backward()
...     optimizer.step()
...     optimizer.zero_grad()
>>> [round(row["sparsity"], 2) for row in pruning.finalize()]
[0.75, 0.75]
>>> int((model[0].weight == 0).sum())  # 48 of 64 entries pruned, written into the weight
48
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from mpotn.compression.architectures import is_linear
from mpotn.compression.config import CompressionConfig, select_targets
from mpotn.finetune.schedules import step_callback
from mpotn.table import Table


def _cooldown_start(total: int, cooldown: float) -> int:
    """The first step of the cool-down: the last ``cooldown`` share of ``total``, the last
    step at least."""
    return total - max(1, round(cooldown * total))


def cubic_sparsity(step: int, total: int, sparsity: float, warmup: float = 0.0,
                   cooldown: float = 0.0) -> float:
    """The sparsity at optimizer step ``step`` of ``total`` (Zhu & Gupta, 2018).

    0 for the first ``warmup * total`` steps, ``sparsity`` for the last
    ``cooldown * total`` steps (the last step at least, even where the rounded warm-up
    reaches into the cool-down), and between them
    ``s_f (1 - (1 - progress)^3)`` with ``progress = (step - start) / (end - start)``
    rising from 0 at the first step after the warm-up (``start``) towards 1 at the
    first step of the cool-down (``end``).

    Examples
    --------
    >>> [round(cubic_sparsity(t, 10, 0.9, warmup=0.2, cooldown=0.2), 3) for t in range(10)]
    [0.0, 0.0, 0.0, 0.379, 0.633, 0.787, 0.867, 0.896, 0.9, 0.9]
    """
    start, end = round(warmup * total), _cooldown_start(total, cooldown)
    if step >= end:  # before the warm-up test: rounding can put start past end
        return sparsity
    if step < start:
        return 0.0
    progress = (step - start) / (end - start)
    return sparsity * (1.0 - (1.0 - progress) ** 3)


class PruningMask(nn.Module):
    """A parametrization ``W -> W ⊙ M`` whose mask ``M`` keeps the top-ranked entries.

    With ``movement`` the entries are ranked by ``scores`` (an ``nn.Parameter`` of the
    weight's shape, float32 whatever the weight's dtype so that small steps add up, zero
    at first), which get the gradient ``(∂L/∂W') ⊙ W`` through a straight-through
    estimator; without, by ``|W|``. ``mask`` (a boolean buffer, all true at first) is set
    by [set_density][mpotn.finetune.pruning.PruningMask.set_density]; once ``fixed`` (a
    boolean buffer, so that a checkpoint keeps it) is set, neither the mask nor the
    scores change again.
    """

    def __init__(self, weight: torch.Tensor, movement: bool = True) -> None:
        super().__init__()
        self.scores = (nn.Parameter(torch.zeros_like(weight, dtype=torch.float32))
                       if movement else None)
        self.register_buffer("mask", torch.ones_like(weight, dtype=torch.bool))
        self.register_buffer("fixed", torch.zeros((), dtype=torch.bool, device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        gate = self.mask.to(weight.dtype)
        if self.scores is not None and not self.fixed:  # value: the mask; the scores: its
            gate = gate + (self.scores - self.scores.detach()).to(weight.dtype)  # gradient
        return weight * gate

    @torch.no_grad()
    def set_density(self, density: float, weight: torch.Tensor) -> None:
        """Keep the ``round(density * numel)`` entries of highest score (of largest
        ``|weight|`` without scores), the others masked; nothing changes once ``fixed``."""
        if self.fixed:
            return
        rank_by = (self.scores if self.scores is not None else weight.abs()).flatten()
        keep = round(density * rank_by.numel())
        mask = torch.zeros(rank_by.numel(), dtype=torch.bool, device=self.mask.device)
        if keep > 0:
            mask[torch.topk(rank_by, keep, sorted=False).indices] = True
        self.mask.copy_(mask.view_as(self.mask))


#: The pruning criteria: first-order (movement) and zeroth-order (magnitude).
CRITERIA = ("movement", "magnitude")

#: Share of ``||W||_F^2`` that ``energy_rank_share`` keeps.
ENERGY = 0.9


class GradualPruning:
    """Gradual pruning of a model's matrices while it trains, by movement (Sanh et al.,
    2020) or by magnitude (Zhu & Gupta, 2018).

    Parameters
    ----------
    model:
        The model; its target matrices get a [PruningMask][mpotn.finetune.pruning.PruningMask]
        parametrization at once (their ``weight`` becomes ``W ⊙ M``).
    sparsity:
        Final share of each target matrix's entries set to zero, in ``[0, 1)``.
    criterion:
        One of [CRITERIA][mpotn.finetune.pruning.CRITERIA]: ``"movement"`` (first-order
        scores) or ``"magnitude"`` (``|W|``).
    targets, exclude:
        Which matrices, in the forms of
        [CompressionConfig][mpotn.compression.config.CompressionConfig] (presets such as
        ``"attention"`` and ``"ffn"``, suffixes, or a regular expression); only
        ``nn.Linear`` and Conv1D layers are pruned.
    warmup, cooldown:
        Shares of the steps before the cubic schedule starts and after it ends.

    Raises
    ------
    ValueError
        For a sparsity or share out of range, an unknown criterion, a model already
        being pruned, or targets that select no ``nn.Linear`` / Conv1D layer.
    """

    def __init__(self, model: nn.Module, sparsity: float, criterion: str = "movement",
                 targets: str | Sequence[str] = ("attention", "ffn"),
                 exclude: str | Sequence[str] | None = None, *,
                 warmup: float = 0.1, cooldown: float = 0.2) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity is the share of entries pruned, in [0, 1); got "
                             f"{sparsity}")
        if min(warmup, cooldown) < 0.0 or warmup + cooldown >= 1.0:
            raise ValueError(f"warmup and cooldown are shares of the steps, >= 0 and summing "
                             f"to less than 1; got {warmup} and {cooldown}")
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; choose from {CRITERIA}")
        if any(isinstance(m, PruningMask) for m in model.modules()):
            raise ValueError("the model is already being pruned: finalize() that pruning first")
        config = CompressionConfig(targets=list(targets) if not isinstance(targets, str)
                                   else targets, exclude=exclude)
        self.modules = {name: module for name, module in select_targets(model, config)
                        if is_linear(module)}
        if not self.modules:
            raise ValueError(f"targets {targets!r} select no nn.Linear or Conv1D layer to prune")
        self.sparsity, self.criterion = sparsity, criterion
        self.warmup, self.cooldown = warmup, cooldown
        for module in self.modules.values():
            parametrize.register_parametrization(
                module, "weight", PruningMask(module.weight, criterion == "movement"))

    def scores(self) -> list[nn.Parameter]:
        """Every target's movement scores (train them with the model, without weight
        decay); none with ``criterion="magnitude"``."""
        masks = [m.parametrizations.weight[0] for m in self.modules.values()]
        return [mask.scores for mask in masks if mask.scores is not None]

    def settings(self) -> dict[str, Any]:
        """The pruning's settings and targets, plain JSON (what a resumed run must match)."""
        return {"criterion": self.criterion, "final_sparsity": self.sparsity,
                "warmup": self.warmup,
                "cooldown": self.cooldown, "pruned_matrices": list(self.modules)}

    def step(self, step: int, total: int) -> float:
        """Set every mask for optimizer step ``step`` of ``total``; returns the sparsity.
        From the first step of the cool-down on, the masks are fixed: the scores stop
        training and later steps change nothing."""
        sparsity = cubic_sparsity(step, total, self.sparsity, warmup=self.warmup,
                                  cooldown=self.cooldown)
        fix = step >= _cooldown_start(total, self.cooldown)
        for module in self.modules.values():
            mask = module.parametrizations.weight[0]
            mask.set_density(1.0 - sparsity, module.parametrizations.weight.original)
            if fix:
                mask.fixed.fill_(True)
        return sparsity

    def callback(self) -> Any:
        """A ``transformers.TrainerCallback`` that calls
        [step][mpotn.finetune.pruning.GradualPruning.step] before every optimizer step."""
        return step_callback(self.step)

    def finalize(self) -> Table:
        """Write ``W ⊙ M`` into each target's weight and remove its scores and mask.

        Returns one row per matrix: ``name``, ``shape``, ``sparsity`` (share of zero
        entries), ``rank`` (its numerical rank, ``torch.linalg.matrix_rank``; below full
        only where whole rows or columns are pruned) and ``rank_share`` (over the smaller
        dimension), and ``energy_rank_share``: the fewest singular values that hold
        ``ENERGY`` of ``||W||_F^2``, over the smaller dimension (what a truncated SVD needs
        to keep most of the matrix). The pruning's targets stay in ``modules``.
        """
        rows = []
        for name, module in self.modules.items():
            if not parametrize.is_parametrized(module, "weight"):
                raise ValueError(f"{name} is no longer pruned: finalize() runs once")
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            weight = module.weight.detach()
            rows.append({"name": name, "shape": tuple(weight.shape),
                         "sparsity": float((weight == 0).double().mean()),
                         **rank_measures(weight)})
        return Table(rows)


def rank_measures(matrix: torch.Tensor) -> dict[str, float]:
    """``rank`` (numerical, ``torch.linalg.matrix_rank`` in float64), ``rank_share`` (over
    the smaller dimension) and ``energy_rank_share``: the fewest singular values holding
    ``ENERGY`` of ``||matrix||_F^2``, over the smaller dimension.

    Examples
    --------
    >>> import torch
    >>> rank_measures(torch.diag(torch.tensor([3.0, 1.0, 1.0, 0.0])))  # 9 + 1 of 11: 0.91
    {'rank': 3, 'rank_share': 0.75, 'energy_rank_share': 0.5}
    """
    matrix = matrix.detach().double()
    values = torch.linalg.svdvals(matrix)
    rank = int(torch.linalg.matrix_rank(matrix))
    kept = torch.cumsum(values**2, 0) / (values**2).sum().clamp_min(1e-300)
    energy = int((kept < ENERGY).sum()) + 1
    smaller = min(matrix.shape)
    return {"rank": rank, "rank_share": rank / smaller,
            "energy_rank_share": min(energy, smaller) / smaller}


def pruning_summary(rows: Table) -> dict[str, float]:
    """``sparsity`` (zeros over all entries), ``mean_rank_share`` and
    ``mean_energy_rank_share`` of the rows of
    [GradualPruning.finalize][mpotn.finetune.pruning.GradualPruning.finalize]."""
    sizes = [math.prod(r["shape"]) for r in rows]
    return {"sparsity": math.fsum(r["sparsity"] * n for r, n in zip(rows, sizes, strict=True))
            / sum(sizes),
            "mean_rank_share": math.fsum(r["rank_share"] for r in rows) / len(rows),
            "mean_energy_rank_share": math.fsum(r["energy_rank_share"] for r in rows)
            / len(rows)}
