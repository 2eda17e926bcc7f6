"""``cp``: a rank-``R`` CP decomposition by ALS (tensorly); its rank index is a hyperedge
shared by every factor."""

from __future__ import annotations

import math
import warnings

import torch

from mpotn.methods.base import (
    FactorNetwork,
    _check_ratio,
    _finish,
    _tensorized,
    register,
    tensorly_numpy,
)


@register("cp")
def cp_method(matrix: torch.Tensor, *, n: int = 3, ratio: float | None = None,
              rank: int | None = None, iterations: int = 100, seed: int = 0) -> FactorNetwork:
    """Rank-``R`` CP of the tensorized matrix by alternating least squares."""
    from tensorly.decomposition import parafac

    _check_ratio(ratio)
    tensor, row, col = _tensorized(matrix, n)
    per_rank = sum(tensor.shape)
    if rank is None:
        if ratio is None:
            raise ValueError("cp has no exact rank to default to: give rank or ratio")
        rank = max(1, math.floor(ratio * matrix.numel() / per_rank))
    with tensorly_numpy(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Trying to compute SVD", UserWarning)  # rank > mode
        weights, factors = parafac(tensor, rank=rank, n_iter_max=iterations, init="svd",
                                   random_state=seed, tol=1e-10)
    factors = [f.copy() for f in factors]
    factors[0] = factors[0] * weights[None, :]
    leg_names = [*(f"row_{k}" for k in range(1, n + 1)), *(f"col_{k}" for k in range(1, n + 1))]
    tensors = {f"factor_{m}": f for m, f in enumerate(factors, start=1)}
    legs = {f"factor_{m}": (leg, "rank") for m, leg in enumerate(leg_names, start=1)}
    return _finish("cp", tensors, legs, row, col, matrix, dict.fromkeys(tensors, "factor"),
                   n=n, rank=rank, iterations=iterations)
