"""``tucker``: a Tucker core with one factor per mode (tensorly; HOSVD with ``iterations=0``,
HOOI otherwise)."""

from __future__ import annotations

import math

import torch

from mpotn.methods.base import (
    FactorNetwork,
    _check_ratio,
    _finish,
    _largest_rank,
    _tensorized,
    register,
    tensorly_torch,
)
from mpotn.truncation import ratio_params


@register("tucker")
def tucker_method(matrix: torch.Tensor, *, n: int = 3, ratio: float | None = None,
                  rank: int | None = None, iterations: int = 0) -> FactorNetwork:
    """Tucker of the tensorized matrix: HOSVD (``iterations=0``) or HOOI (more)."""
    from tensorly.decomposition import tucker

    _check_ratio(ratio)
    tensor, row, col = _tensorized(matrix, n)
    modes = tensor.shape

    def ranks(r: int) -> list[int]:
        return [min(r, size) for size in modes]

    def params(r: int) -> int:
        d = ranks(r)
        return math.prod(d) + sum(size * dk for size, dk in zip(modes, d))

    if rank is None:
        budget = None if ratio is None else ratio_params(ratio, matrix.numel())
        rank = max(modes) if budget is None else _largest_rank(params, budget, max(modes))
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0 (0: HOSVD), got {iterations}")
    with tensorly_torch():
        core, factors = tucker(tensor, rank=ranks(rank), n_iter_max=iterations, init="svd")
    leg_names = [*(f"row_{k}" for k in range(1, n + 1)), *(f"col_{k}" for k in range(1, n + 1))]
    tensors = {"core": core}
    legs = {"core": tuple(f"r_{m}" for m in range(1, 2 * n + 1))}
    for m, (factor, leg) in enumerate(zip(factors, leg_names), start=1):
        tensors[f"factor_{m}"], legs[f"factor_{m}"] = factor, (leg, f"r_{m}")
    roles = {name: "central" if name == "core" else "auxiliary" for name in tensors}
    return _finish("tucker", tensors, legs, row, col, matrix, roles, n=n, rank=rank,
                   ranks=ranks(rank), iterations=iterations)
