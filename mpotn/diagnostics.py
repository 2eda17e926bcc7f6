r"""Bond diagnostics of SPEC §1 as plain functions of spectra and shapes.

Each function names the equation it computes from the singular values
$\lambda_1 \ge \lambda_2 \ge \dots$ of a bond's unfolding and the shapes of the
cores $T_k[d_{k-1}, i_k, j_k, d_k]$:

* [truncation_error][mpotn.diagnostics.truncation_error] -- Eq. 3, the error of
  keeping $d'_k$ values of bond $k$: $\epsilon_k = \sqrt{\sum_{i > d'_k} \lambda_i^2}$;
* [error_bound][mpotn.diagnostics.error_bound] -- Eq. 4, the bound on the whole
  truncation: $\|M - \mathrm{MPO}(M)\|_F \le \sqrt{\sum_k \epsilon_k^2}$;
* [compression_ratio][mpotn.diagnostics.compression_ratio] -- Eq. 5, core entries
  over matrix entries: $\rho = \sum_k d_{k-1} i_k j_k d_k \,/\, \prod_k i_k j_k$;
* [entanglement_entropy][mpotn.diagnostics.entanglement_entropy] -- Eq. 6,
  $S_k = -\sum_j v_j \ln v_j$ with $v_j = \lambda_j^2 / \sum_i \lambda_i^2$.

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
    r"""Local truncation error of keeping ``dim`` values of a bond (Eq. 3).

    $$
    \epsilon_k = \sqrt{\sum_{i > d'_k} \lambda_i^2}
    $$

    Parameters
    ----------
    singular_values:
        $\lambda_1 \ge \lambda_2 \ge \dots$ of the bond's unfolding.
    dim:
        The kept dimension $d'_k$.
    """
    if dim < 0:
        raise ValueError(f"a kept dimension must be >= 0, got {dim}")
    return singular_values[dim:].norm()


def error_bound(errors: Sequence[float] | torch.Tensor) -> float:
    r"""Total bound on the error of a truncation from its local errors (Eq. 4).

    $$
    \|M - \mathrm{MPO}(M)\|_F \le \sqrt{\sum_k \epsilon_k^2}
    $$

    Examples
    --------
    >>> error_bound([3.0, 4.0])
    5.0
    """
    return math.sqrt(sum(float(e) ** 2 for e in errors))


def entanglement_entropy(singular_values: torch.Tensor) -> float:
    r"""Entanglement entropy of a bond (Eq. 6), natural log.

    $$
    S_k = -\sum_j v_j \ln v_j, \qquad v_j = \frac{\lambda_j^2}{\sum_i \lambda_i^2}
    $$

    Terms with $v_j = 0$ contribute 0. A zero spectrum has entropy 0. The values are
    divided by the largest first (``v`` does not change), so that their squares neither
    underflow nor overflow.

    Examples
    --------
    >>> round(entanglement_entropy(torch.tensor([1e-170, 1e-170], dtype=torch.float64)), 6)
    0.693147
    """
    values = singular_values.double().abs()
    if values.numel() == 0 or not values.max() > 0:
        return 0.0
    weights = (values / values.max()) ** 2
    total = weights.sum()
    if total <= 0:
        return 0.0
    v = weights / total
    v = v[v > 0]
    return float(-(v * v.log()).sum())


def core_params(
    bond_dims: Sequence[int], row_shape: Sequence[int], col_shape: Sequence[int]
) -> list[int]:
    r"""Number of entries $d_{k-1} i_k j_k d_k$ of each core $T_k$.

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
    r"""Compression ratio: core entries over (padded) matrix entries (Eq. 5).

    $$
    \rho = \frac{\sum_k d_{k-1} i_k j_k d_k}{\prod_k i_k j_k}
    $$

    $\rho > 1$ means the cores hold more numbers than the (padded) matrix.

    Examples
    --------
    >>> compression_ratio((1, 4, 1), (2, 2), (2, 2))
    2.0
    """
    size = math.prod(row_shape) * math.prod(col_shape)
    return sum(core_params(bond_dims, row_shape, col_shape)) / size
