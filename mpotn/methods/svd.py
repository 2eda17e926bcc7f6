"""``svd``: the truncated SVD, as the MPO with ``n = 2`` and the trivial factorization
``(I, 1) x (1, J)``.

Its one bond is the rank: the unfolding Algorithm 1 cuts is ``M`` itself, so the
truncation is Eckart-Young's best rank-``r`` approximation. An ``mpo`` with ``n = 2``
and automatic shapes is something else: balanced factors ``(i_1, i_2) x (j_1, j_2)``,
whose unfolding ``M[(i_1 j_1), (i_2 j_2)]`` makes it a sum of Kronecker products.

Examples
--------
>>> import torch
>>> matrix = torch.randn(48, 80, dtype=torch.float64)
>>> net = decompose(matrix, "svd", max_bond=10)
>>> s = torch.linalg.svdvals(matrix)
>>> bool(abs(net.relative_error - float(s[10:].norm() / s.norm())) < 1e-12)
True
>>> svd_shapes(48, 80)
(2, (48, 1), (1, 80))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mpotn.methods.base import FactorNetwork, decompose, register


def svd_shapes(rows: int, cols: int) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """``(n, row_shape, col_shape)`` of the truncated SVD of a ``rows x cols`` matrix as an
    MPO: two cores, rows ``(I, 1)`` and columns ``(1, J)``."""
    return 2, (rows, 1), (1, cols)


@register("svd")
def svd_method(matrix: torch.Tensor, *, ratio: float | None = None,
               max_bond: int | None = None, n: int | None = None, **options: Any
               ) -> FactorNetwork:
    """The truncated SVD at ``ratio`` or ``max_bond`` (full rank when neither is given).

    ``n`` is not used: the truncated SVD always has two cores (``compress`` passes
    its ``n`` to every method). Other ``options`` go to the ``mpo`` method
    ([mpo_method][mpotn.methods.mpo.mpo_method]); ``details["rank"]`` is the rank kept.
    """
    cores, row_shape, col_shape = svd_shapes(*matrix.shape)
    net = decompose(matrix, "mpo", n=cores, row_shape=row_shape, col_shape=col_shape,
                    ratio=ratio, max_bond=max_bond, **options)
    return dataclasses.replace(net, method="svd",
                               details={**net.details, "rank": net.details["bond_dims"][1]})
