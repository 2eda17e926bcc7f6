"""``tt``: a tensor train over the ``2n`` modes ``(i_1..i_n, j_1..j_n)`` of the tensorized matrix
(tensorly's TT-SVD)."""

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


@register("tt")
def tt_method(matrix: torch.Tensor, *, n: int = 3, ratio: float | None = None,
              rank: int | None = None) -> FactorNetwork:
    """TT-SVD of the tensorized matrix over its ``2n`` modes ``(i_1..i_n, j_1..j_n)``."""
    from tensorly.decomposition import tensor_train

    _check_ratio(ratio, rank)
    tensor, row, col = _tensorized(matrix, n)
    modes = tensor.shape

    def ranks(r: int) -> list[int]:
        out, left = [1], 1
        for k, size in enumerate(modes[:-1]):
            left *= size
            out.append(min(r, left, math.prod(modes[k + 1:])))
        return [*out, 1]

    def params(r: int) -> int:
        d = ranks(r)
        return sum(d[k] * size * d[k + 1] for k, size in enumerate(modes))

    top = max(ranks(tensor.numel()))
    if rank is None:
        budget = None if ratio is None else ratio_params(ratio, matrix.numel())
        rank = top if budget is None else _largest_rank(params, budget, top)
    with tensorly_torch():
        factors = tensor_train(tensor, rank=ranks(rank)).factors
    legs_names = [*(f"row_{k}" for k in range(1, n + 1)), *(f"col_{k}" for k in range(1, n + 1))]
    tensors, legs = {}, {}
    for k, (factor, leg) in enumerate(zip(factors, legs_names), start=1):
        name = f"tt_{k}"
        axes = (f"t_{k - 1}", leg, f"t_{k}")
        if k == 1:
            factor, axes = factor[0], axes[1:]
        if k == 2 * n:
            factor, axes = factor[..., 0], axes[:-1]
        tensors[name], legs[name] = factor, axes
    return _finish("tt", tensors, legs, row, col, matrix, dict.fromkeys(tensors, "factor"),
                   n=n, rank=rank, ranks=ranks(rank))
