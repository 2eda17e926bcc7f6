"""``mpo``: the matrix product operator of Algorithm 1, truncated (``n = 2`` with the trivial
factorization ``(I, 1) x (1, J)`` is the truncated SVD: the ``svd`` method,
[mpotn.methods.svd][])."""

from __future__ import annotations

from typing import Any

import torch

from mpotn.methods.base import FactorNetwork, _check_ratio, _finish, register
from mpotn.mpo import MPO
from mpotn.network import core_name
from mpotn.truncation import TruncationPolicy, ratio_params


@register("mpo")
def mpo_method(matrix: torch.Tensor, *, n: int = 5, ratio: float | None = None,
               max_bond: int | None = None, allocation: str = "optimal",
               **options: Any) -> FactorNetwork:
    """Algorithm 1 and a truncation (``ratio`` with budget-optimal bonds, or ``max_bond``).

    ``ratio`` is a share of the matrix's own entries, as for every other method (so that
    methods compare at equal parameters); a padded MPO's Eq. 5 ratio is over the padded
    matrix, which is larger."""
    _check_ratio(ratio)
    params = None if ratio is None else ratio_params(ratio, matrix.numel())
    if params == 0:
        raise ValueError(f"ratio {ratio} of a {matrix.shape[0]} x {matrix.shape[1]} matrix "
                         f"is {ratio * matrix.numel():.2g} parameters, fewer than 1; raise "
                         "the ratio")
    policy = TruncationPolicy(max_bond=max_bond, params=params, allocation=allocation)
    mpo = MPO.from_matrix(matrix, n=n, **options).truncate_to(  # an SVD method asked for
        policy, svd=options.get("svd", "full"))                 # cuts too
    cores = mpo.gauge_cores("central")
    cores = [cores[0][0], *cores[1:-1], cores[-1][..., 0]]  # n >= 2: drop d_0 = d_n = 1
    names = [core_name(k, n) for k in range(n)]
    legs = {}
    for k, name in enumerate(names, start=1):
        axes = [f"bond_{k - 1}", f"row_{k}", f"col_{k}", f"bond_{k}"]
        legs[name] = tuple(axes[1 if k == 1 else 0: 3 if k == n else 4])
    roles = {name: "central" if name == "central" else "auxiliary" for name in names}
    return _finish("mpo", dict(zip(names, cores)), legs, mpo.row, mpo.col, matrix, roles,
                   n=n, bond_dims=list(mpo.bond_dims), mpo=mpo)
