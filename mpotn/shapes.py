r"""Factorizations of matrix dimensions and the full bond dimensions they imply.

An MPO of an $I \times J$ matrix needs $I = i_1 \cdots i_n$ and $J = j_1 \cdots j_n$.
This module finds balanced factorizations (large factors towards the centre,
so the central tensor holds most parameters), pads a dimension with zeros to a
nearby 5-smooth size that factors better (30522 -> 30720), and computes the full bond
dimensions of SPEC Eq. 2 (the bonds of an exact MPO):

$$
d_k = \min\Big(\prod_{m \le k} i_m j_m,\ \prod_{m > k} i_m j_m\Big), \qquad d_0 = d_n = 1.
$$

Examples
--------
>>> factorize(768, 5)
(3, 4, 4, 4, 4)
>>> full_bond_dims((3, 4, 4, 4, 4), (4, 4, 8, 6, 4))
(1, 12, 192, 384, 16, 1)
>>> pad_to_factorable(30522, 5)
30720
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

#: Default largest relative padding considered by
#: [pad_to_factorable][mpotn.shapes.pad_to_factorable].
MAX_PADDING = 0.05

#: A factorization is *balanced* when its largest factor is at most this many
#: times the ideal factor ``dim ** (1 / n)`` (rounded up).
BALANCE_LIMIT = 2.0


@dataclass(frozen=True)
class Factorization:
    """Factors of one matrix side.

    Attributes
    ----------
    size:
        The original dimension (``I`` or ``J``).
    factors:
        ``(i_1, ..., i_n)``; their product is ``padded_size``.
    """

    size: int
    factors: tuple[int, ...]

    @property
    def padded_size(self) -> int:
        """Product of the factors (``>= size``; larger only when zero-padded)."""
        return math.prod(self.factors)

    @property
    def padding(self) -> int:
        """Number of zero rows (or columns) added to reach ``padded_size``."""
        return self.padded_size - self.size


def _prime_factors(dim: int) -> list[int]:
    factors, p = [], 2
    while p * p <= dim:
        while dim % p == 0:
            factors.append(p)
            dim //= p
        p += 1
    if dim > 1:
        factors.append(dim)
    return factors


@lru_cache(maxsize=4096)
def _best_multiset(dim: int, n: int) -> tuple[int, ...]:
    """The most balanced multiset of ``n`` factors of ``dim`` (ascending).

    Balance is the variance of ``log f`` around ``log(dim) / n``; ties go to
    the multiset with the smaller largest factor.
    """
    target = math.log(dim) / n
    best: tuple[float, int, tuple[int, ...]] | None = None

    def search(rest: int, slots: int, low: int, chosen: list[int]) -> None:
        nonlocal best
        if slots == 1:
            if rest >= low:
                combo = (*chosen, rest)
                score = sum((math.log(f) - target) ** 2 for f in combo)
                key = (round(score, 12), max(combo), combo)
                if best is None or key < best:
                    best = key
            return
        f = low
        while f ** slots <= rest:
            if rest % f == 0:
                search(rest // f, slots - 1, f, [*chosen, f])
            f += 1

    search(dim, n, 1, [])
    assert best is not None  # (1, ..., 1, dim) always qualifies
    return best[2]


def centre_heavy(factors: Sequence[int]) -> tuple[int, ...]:
    """Arrange factors so that the large ones sit in the middle of the chain, the
    largest at the central tensor's index ``(n - 1) // 2``
    ([central_index][mpotn.network.central_index]; for an even ``n`` the left one of
    the two middle cores).

    Examples
    --------
    >>> centre_heavy([2, 3, 4, 5, 6])
    (2, 4, 6, 5, 3)
    >>> centre_heavy([1, 2, 3, 4])
    (2, 4, 3, 1)
    """
    n = len(factors)
    order = []  # positions from the outside in: 0, n-1, 1, n-2, ... (n-1, 0, ... if n even)
    lo, hi = 0, n - 1
    while lo <= hi:
        order.append(lo)
        if hi != lo:
            order.append(hi)
        lo, hi = lo + 1, hi - 1
    if n % 2 == 0:  # the innermost position filled last is then (n - 1) // 2
        order = [n - 1 - pos for pos in order]
    arranged = [0] * n
    for pos, f in zip(order, sorted(factors)):
        arranged[pos] = f
    return tuple(arranged)


def is_balanced(factors: Sequence[int]) -> bool:
    """Whether the largest factor is within [BALANCE_LIMIT][mpotn.shapes.BALANCE_LIMIT] of ideal.

    A factor of 1 (an index of size one) is unbalanced when ``dim >= 2**n``.
    """
    dim, n = math.prod(factors), len(factors)
    ideal = math.ceil(dim ** (1 / n) - 1e-9)
    trivial = dim >= 2**n and min(factors) == 1
    return not trivial and max(factors) <= BALANCE_LIMIT * ideal


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of cores n must be an integer >= 1, got {n!r}")


def factorize(dim: int, n: int) -> tuple[int, ...]:
    """Split ``dim`` into ``n`` balanced factors, the large ones in the centre.

    Parameters
    ----------
    dim:
        The dimension to factor (positive).
    n:
        Number of factors (the number of MPO cores).

    Raises
    ------
    ValueError
        If ``dim`` has no balanced factorization (a prime, or a large prime
        factor); the message proposes a padded size.

    Examples
    --------
    >>> factorize(3072, 5)
    (4, 4, 8, 6, 4)
    """
    _check_n(n)
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"a dimension must be a positive integer, got {dim!r}")
    factors = centre_heavy(_best_multiset(dim, n))
    if n > 1 and not is_balanced(factors):
        raise ValueError(
            f"{dim} does not factor into {n} balanced factors (best is "
            f"{list(factors)}); allow zero-padding (pad=True) or pad to "
            f"{pad_to_factorable(dim, n)}, or pass explicit shapes"
        )
    return factors


def pad_to_factorable(dim: int, n: int, max_padding: float = MAX_PADDING) -> int:
    """Size ``>= dim`` to zero-pad to so that ``n`` balanced factors exist.

    A size that already factors in balance is kept. Otherwise the smallest
    5-smooth size (prime factors 2, 3, 5 only, the sizes FFT and GEMM kernels
    like) within ``dim * (1 + max_padding)`` that factors in balance is taken,
    failing that the smallest balanced size in that range, and failing that
    (small dimensions, many factors) the smallest balanced size up to the
    next power of two.

    Examples
    --------
    >>> pad_to_factorable(30522, 5), pad_to_factorable(768, 5), pad_to_factorable(7, 2)
    (30720, 768, 8)
    >>> pad_to_factorable(13, 5), pad_to_factorable(97, 5)
    (16, 108)
    """
    _check_n(n)
    if n == 1 or is_balanced(_best_multiset(dim, n)):
        return dim
    upper = max(dim + 1, math.ceil(dim * (1 + max_padding)))
    balanced = [
        size
        for size in range(dim + 1, upper + 1)
        if max(_prime_factors(size)) <= BALANCE_LIMIT * math.ceil(size ** (1 / n))
        and is_balanced(_best_multiset(size, n))
    ]
    smooth = [size for size in balanced if max(_prime_factors(size)) <= 5]
    if smooth or balanced:
        return (smooth or balanced)[0]
    # a small dimension (13 into 5 factors): the first balanced size up to the next power
    # of two, which always factors in balance
    return next(size for size in range(upper + 1, 2 ** math.ceil(math.log2(dim)) + 1)
                if is_balanced(_best_multiset(size, n)))


def plan_side(
    size: int, n: int, shape: Sequence[int] | None = None, pad: bool = True
) -> Factorization:
    """Factorization of one side of a matrix, explicit or automatic.

    Parameters
    ----------
    size:
        The matrix dimension on this side.
    n:
        Number of cores.
    shape:
        Explicit factors; their product must be ``>= size`` (the excess is
        zero-padding).
    pad:
        Allow zero-padding when choosing factors automatically.
    """
    _check_n(n)
    if shape is not None:
        factors = tuple(int(f) for f in shape)
        if len(factors) != n:
            raise ValueError(
                f"explicit shape {list(factors)} has {len(factors)} factors but n={n}"
            )
        if any(f < 1 for f in factors):
            raise ValueError(f"shape factors must be >= 1, got {list(factors)}")
        if math.prod(factors) < size:
            raise ValueError(
                f"shape {list(factors)} multiplies to {math.prod(factors)}, "
                f"smaller than the dimension {size}; factors must multiply to "
                f"at least {size}"
            )
        return Factorization(size, factors)
    target = pad_to_factorable(size, n) if pad else size
    return Factorization(size, factorize(target, n))


def full_bond_dims(
    row_shape: Sequence[int], col_shape: Sequence[int]
) -> tuple[int, ...]:
    r"""Full (exact) bond dimensions $(d_0, d_1, \dots, d_n)$ of SPEC Eq. 2.

    $$
    d_k = \min\Big(\prod_{m \le k} i_m j_m,\ \prod_{m > k} i_m j_m\Big), \qquad d_0 = d_n = 1.
    $$

    Examples
    --------
    >>> full_bond_dims((5, 10, 10, 10, 6), (2, 2, 4, 4, 2))
    (1, 10, 200, 480, 12, 1)
    """
    if len(row_shape) != len(col_shape):
        raise ValueError(
            f"row and column shapes need the same number of factors, got "
            f"{list(row_shape)} and {list(col_shape)}"
        )
    local = [i * j for i, j in zip(row_shape, col_shape)]
    total = math.prod(local)
    dims, left = [1], 1
    for p in local[:-1]:
        left *= p
        dims.append(min(left, total // left))
    dims.append(1)
    return tuple(dims)
