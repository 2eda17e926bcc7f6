"""Bond diagnostics of SPEC §1 as plain functions of spectra and shapes.

Each function names the equation it computes:

* :func:`truncation_error` -- Eq. 3, ``eps_k = sqrt(sum_{i > d'_k} lambda_i^2)``
* :func:`error_bound` -- Eq. 4, ``sqrt(sum_k eps_k^2)``
* :func:`compression_ratio` -- Eq. 5
* :func:`entanglement_entropy` -- Eq. 6, ``S_k = -sum_j v_j ln v_j``

Examples
--------
>>> import torch
>>> lam = torch.tensor([3.0, 2.0, 1.0])
>>> round(float(truncation_error(lam, 1)), 4)  # sqrt(2^2 + 1^2)
2.2361
>>> round(float(entanglement_entropy(torch.ones(4))), 4)  # ln 4
1.3863
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def truncation_error(singular_values: torch.Tensor, dim: int) -> torch.Tensor:
    """Local truncation error of keeping ``dim`` values of a bond (Eq. 3).

    Parameters
    ----------
    singular_values:
        ``lambda_1 >= lambda_2 >= ...`` of the bond's unfolding.
    dim:
        The kept dimension ``d'_k``.
    """
    if dim < 0:
        raise ValueError(f"a kept dimension must be >= 0, got {dim}")
    return singular_values[dim:].norm()


def error_bound(errors: Sequence[float] | torch.Tensor) -> float:
    """Total bound ``sqrt(sum_k eps_k^2)`` on ``||M - MPO(M)||_F`` (Eq. 4).

    Examples
    --------
    >>> error_bound([3.0, 4.0])
    5.0
    """
    return math.sqrt(sum(float(e) ** 2 for e in errors))


def entanglement_entropy(singular_values: torch.Tensor) -> float:
    """Entanglement entropy of a bond (Eq. 6), natural log.

    ``v_j = lambda_j^2 / sum lambda^2``; terms with ``v_j = 0`` contribute 0.
    A zero spectrum has entropy 0.
    """
    weights = singular_values.double() ** 2
    total = weights.sum()
    if total <= 0:
        return 0.0
    v = weights / total
    v = v[v > 0]
    return float(-(v * v.log()).sum())


def core_params(
    bond_dims: Sequence[int], row_shape: Sequence[int], col_shape: Sequence[int]
) -> list[int]:
    """Number of entries ``d_{k-1} i_k j_k d_k`` of each core.

    Examples
    --------
    >>> core_params((1, 4, 1), (2, 2), (2, 2))
    [16, 16]
    """
    return [
        bond_dims[k] * i * j * bond_dims[k + 1]
        for k, (i, j) in enumerate(zip(row_shape, col_shape))
    ]


def compression_ratio(
    bond_dims: Sequence[int], row_shape: Sequence[int], col_shape: Sequence[int]
) -> float:
    """``rho = sum_k d_{k-1} i_k j_k d_k / prod_k i_k j_k`` (Eq. 5).

    ``rho > 1`` means the cores hold more numbers than the (padded) matrix.

    Examples
    --------
    >>> compression_ratio((1, 4, 1), (2, 2), (2, 2))
    2.0
    """
    size = math.prod(row_shape) * math.prod(col_shape)
    return sum(core_params(bond_dims, row_shape, col_shape)) / size
