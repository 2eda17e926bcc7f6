r"""Choosing bond dimensions: the truncation policies.

All functions work on bond dimensions $(d_0, d_1, \dots, d_n)$ ($d_0 = d_n = 1$),
the local sizes $p_k = i_k j_k$ and the singular values $\lambda_{k,i}$ of each
inner bond $k$. They return *requested* dimensions: what each bond may keep.
Neighbouring bonds cap each other ($d_k \le d_{k-1} p_k$ and
$d_k \le p_{k+1} d_{k+1}$); [effective_dims][mpotn.truncation.effective_dims]
applies those caps, and parameter counts $\sum_k d_{k-1} p_k d_k$ use them.

Optimal allocation
    Greedy removal: starting from the current bonds, repeatedly shrink the
    bond whose next cut adds the least squared error per parameter saved.
    Keeping $d'_k$ values of bond $k$ costs $\epsilon_k^2 = \sum_{i > d'_k} \lambda_{k,i}^2$
    (Eq. 3) and the Eq. 4 bound is $\sqrt{\sum_k \epsilon_k^2}$, so each cut
    adds the squared singular values it drops. Removal stops once a parameter
    budget is met ([dims_for_budget][mpotn.truncation.dims_for_budget], which then
    grows back, one value at a time, the bonds that remove the most squared error
    per added parameter while the budget holds: the last cuts can free far more
    than needed), or once no cut keeps the Eq. 4 bound within a tolerance
    ([dims_for_tolerance][mpotn.truncation.dims_for_tolerance]).
Uniform allocation
    Scale every bond by the same factor
    ([uniform_dims_for_budget][mpotn.truncation.uniform_dims_for_budget]), the baseline the optimal
    allocation is measured against.

Which policy applies is a [TruncationPolicy][mpotn.truncation.TruncationPolicy]: at
most one of ``bond_dims``, ``max_bond``, ``tol``, ``ratio``, ``params`` (none:
full rank) and the ``allocation`` of a budget, validated once when it is made.

Examples
--------
>>> import torch
>>> spectra = [torch.tensor([4.0, 3.0, 0.1, 0.1]), torch.tensor([5.0, 1.0, 0.5, 0.2])]
>>> local = (4, 4, 4)
>>> dims_for_tolerance(spectra, (1, 4, 4, 1), local, tolerance_sq=0.2)
(1, 2, 3, 1)
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mpotn.types import ALLOCATIONS

#: The truncation policies, in the order [TruncationPolicy][mpotn.truncation.TruncationPolicy]
#: names them (also the keyword names of ``MPO.truncate``, ``compress`` and the CLI's flags).
POLICY_KEYS = ("bond_dims", "max_bond", "tol", "ratio", "params")


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _count(key: str, value: Any) -> int:
    if not _is_integer(value) or value < 1:
        raise ValueError(f"{key} must be >= 1 (an integer), got {value!r}")
    return int(value)


def _finite(key: str, value: Any, rule: str) -> float:
    if not _is_real(value) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number {rule}, got {value!r}")
    return float(value)


def ratio_params(ratio: float, entries: int) -> int:
    """The parameter budget of a compression ratio: ``floor(rho * entries)``, with a
    relative tolerance of ``1e-12`` so that floating-point rounding of the product cannot
    lose a parameter.

    Examples
    --------
    >>> 0.3 * 96 * 120, ratio_params(0.3, 96 * 120)
    (3455.9999999999995, 3456)
    """
    return math.floor(ratio * entries * (1 + 1e-12))


@dataclass(frozen=True)
class TruncationPolicy:
    """How far to truncate an MPO: at most one policy, validated when made.

    Attributes
    ----------
    bond_dims:
        Kept dimension per inner bond: a sequence for bonds ``1..n-1`` or a
        mapping ``{k: d_k}`` (integers >= 1; which bonds exist is checked by
        [MPO.truncate_to][mpotn.mpo.MPO.truncate_to], bond by bond).
    max_bond:
        One maximum for every bond, an integer >= 1.
    tol:
        Relative tolerance of the Eq. 4 bound, a finite number >= 0.
    ratio:
        Target compression ratio ``rho`` (Eq. 5), a finite number > 0.
    params:
        Parameter budget (core entries), an integer >= 1.
    allocation:
        For ``ratio`` / ``params``, one of [ALLOCATIONS][mpotn.types.ALLOCATIONS].

    Raises
    ------
    ValueError
        For several policies, or a value that is not allowed (NaN, infinity, a
        string, a fraction where an integer is needed, a value out of range),
        saying what is allowed.

    Examples
    --------
    >>> TruncationPolicy(ratio=0.5).describe(), TruncationPolicy().describe()
    ('ratio=0.5', 'full rank')
    >>> TruncationPolicy(max_bond=2.5)
    Traceback (most recent call last):
    ...
    ValueError: max_bond must be >= 1 (an integer), got 2.5
    """

    bond_dims: Sequence[int] | Mapping[int, int] | None = None
    max_bond: int | None = None
    tol: float | None = None
    ratio: float | None = None
    params: int | None = None
    allocation: str = "optimal"

    def __post_init__(self) -> None:
        given = [key for key in POLICY_KEYS if getattr(self, key) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one truncation policy ({', '.join(POLICY_KEYS)}), "
                             f"got {given}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        checked: dict[str, Any] = {}
        if self.bond_dims is not None:
            checked["bond_dims"] = _bond_dims(self.bond_dims)
        if self.max_bond is not None:
            checked["max_bond"] = _count("max_bond", self.max_bond)
        if self.params is not None:
            checked["params"] = _count("params", self.params)
        if self.tol is not None:
            tol = _finite("tol", self.tol, "(a relative error) >= 0")
            if tol < 0:
                raise ValueError(f"tol is a relative error and must be >= 0, got {self.tol!r}")
            checked["tol"] = tol
        if self.ratio is not None:
            ratio = _finite("ratio", self.ratio, "> 0 (Eq. 5: core entries over matrix entries)")
            if ratio <= 0:
                raise ValueError(f"ratio must be > 0 (Eq. 5: core entries over matrix entries), "
                                 f"got {self.ratio!r}")
            checked["ratio"] = ratio
        for key, value in checked.items():
            object.__setattr__(self, key, value)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], strict: bool = False
                      ) -> TruncationPolicy:
        """The policy of a settings mapping (a target's settings, a layer's keyword arguments).

        Keys other than the policies and ``allocation`` are ignored, or with
        ``strict`` a ``ValueError`` naming them; ``None`` values are unset and
        a missing or ``None`` allocation is ``"optimal"``.
        """
        fields = (*POLICY_KEYS, "allocation")
        unknown = sorted(set(settings) - set(fields))
        if strict and unknown:
            raise ValueError(f"unknown truncation settings {unknown}; use {fields}")
        chosen = {k: settings[k] for k in POLICY_KEYS if settings.get(k) is not None}
        return cls(**chosen, allocation=settings.get("allocation") or "optimal")

    @property
    def key(self) -> str | None:
        """The name of the policy that is set; ``None`` for full rank."""
        return next((k for k in POLICY_KEYS if getattr(self, k) is not None), None)

    def describe(self) -> str:
        """``"ratio=0.5"``, ``"max_bond=8"``, ... or ``"full rank"``."""
        return "full rank" if self.key is None else f"{self.key}={getattr(self, self.key)}"


def _bond_dims(value: Any) -> tuple[int, ...] | dict[int, int]:
    """A copy of a bond request; its entries are checked against the MPO by
    [check_bond_request][mpotn.truncation.check_bond_request]."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError("bond_dims must be a sequence of integers >= 1 (one per inner bond) "
                         f"or a mapping {{bond: integer >= 1}}, got {value!r}")
    return tuple(value)


def effective_dims(dims: Sequence[int], local: Sequence[int]) -> tuple[int, ...]:
    """Apply the neighbour caps ``d_k <= d_{k-1} p_k`` and ``d_k <= p_{k+1} d_{k+1}``.

    Examples
    --------
    >>> effective_dims((1, 100, 1), (4, 8))
    (1, 4, 1)
    """
    out = list(dims)
    for k in range(1, len(out) - 1):
        out[k] = min(out[k], out[k - 1] * local[k - 1])
    for k in range(len(out) - 2, 0, -1):
        out[k] = min(out[k], local[k] * out[k + 1])
    return tuple(out)


def params_of(dims: Sequence[int], local: Sequence[int]) -> int:
    """Total core entries ``sum_k d_{k-1} p_k d_k`` after the neighbour caps."""
    eff = effective_dims(dims, local)
    return sum(eff[k] * p * eff[k + 1] for k, p in enumerate(local))


def check_bond_request(
    dims: Sequence[int] | Mapping[int, int], current: Sequence[int], full: Sequence[int]
) -> tuple[int, ...]:
    """Validate requested inner-bond dimensions and clamp them to the current ones.

    Parameters
    ----------
    dims:
        One value per inner bond ``k = 1..n-1``, or ``{k: d_k}`` for some of them (the
        others keep their current dimension).
    current:
        The MPO's bond dimensions ``(d_0, ..., d_n)``.
    full:
        Full bond dimensions of Eq. 2, named in the warning.

    Returns
    -------
    tuple
        ``(1, d'_1, ..., d'_{n-1}, 1)``.
    """
    inner = len(current) - 2
    if isinstance(dims, Mapping):
        for k in dims:
            if not _is_integer(k) or not 1 <= k <= inner:
                raise ValueError(f"bond {k!r} does not exist: this MPO has bonds 1..{inner}")
        dims = [dims.get(k, current[k]) for k in range(1, inner + 1)]
    if len(dims) != inner:
        raise ValueError(
            f"expected {inner} bond dimensions (bonds 1..{inner}), got {len(dims)}: {list(dims)}"
        )
    out = [1]
    for k, d in enumerate(dims, start=1):
        if not _is_integer(d) or d < 1:
            raise ValueError(f"bond_{k}: a bond dimension must be an integer >= 1, got {d!r}")
        d = int(d)
        if d > current[k]:
            warnings.warn(
                f"bond_{k}: requested {d} exceeds its current dimension {current[k]} "
                f"(full dimension {full[k]}); clamped to {current[k]}",
                stacklevel=3,
            )
            d = current[k]
        out.append(d)
    out.append(1)
    return tuple(out)


def _tails(spectra: Sequence[torch.Tensor]) -> list[list[float]]:
    """``tails[k-1][d] = sum_{i >= d} lambda_i^2`` for bond ``k``."""
    tails = []
    for s in spectra:
        sq = (s.double() ** 2).flip(0).cumsum(0).flip(0).tolist()
        tails.append([*sq, 0.0])
    return tails


def _greedy(
    spectra: Sequence[torch.Tensor],
    dims: Sequence[int],
    local: Sequence[int],
    budget: int | None = None,
    tolerance_sq: float | None = None,
    steps: list[tuple[int, float]] | None = None,
) -> tuple[int, ...]:
    tails = _tails(spectra)
    dims = list(dims)
    error_sq = 0.0
    params = params_of(dims, local)
    while budget is None or params > budget:
        eff = effective_dims(dims, local)
        best = None
        for k in range(1, len(dims) - 1):
            new = min(dims[k], eff[k]) - 1
            if new < 1:
                continue
            cost = tails[k - 1][new] - tails[k - 1][dims[k]]
            if tolerance_sq is not None and error_sq + cost > tolerance_sq:
                continue
            trial = dims.copy()
            trial[k] = new
            saved = params - params_of(trial, local)
            if saved <= 0:
                continue
            key = (cost / saved, k)
            if best is None or key < best[0]:
                best = (key, k, new, cost, saved)
        if best is None:
            break
        _, k, new, cost, saved = best
        dims[k] = new
        if steps is not None:
            steps.append((saved, cost))
        error_sq += cost
        params -= saved
    if budget is not None and params > budget:
        raise ValueError(
            f"a budget of {budget} parameters is below the smallest MPO of this "
            f"shape ({params} parameters with every bond at 1); ask for at least {params}"
        )
    return tuple(dims)


def dims_for_budget(
    spectra: Sequence[torch.Tensor],
    dims: Sequence[int],
    local: Sequence[int],
    budget: int,
) -> tuple[int, ...]:
    """Bonds with at most ``budget`` parameters that minimise the Eq. 4 bound (greedy):
    removal down to the budget, then regrowth of what still fits (``_regrow``).

    Examples
    --------
    >>> import torch
    >>> spectra = [torch.tensor([4.0, 3.0, 0.1, 0.1]), torch.tensor([5.0, 1.0, 0.5, 0.2])]
    >>> dims_for_budget(spectra, (1, 4, 4, 1), (4, 4, 4), budget=40)
    (1, 2, 2, 1)
    """
    if budget < 1:
        raise ValueError(f"a parameter budget must be >= 1, got {budget}")
    return _regrow(spectra, _greedy(spectra, dims, local, budget=budget), dims, local, budget)


def _regrow(spectra: Sequence[torch.Tensor], dims: Sequence[int], upper: Sequence[int],
            local: Sequence[int], budget: int) -> tuple[int, ...]:
    """``dims`` with bonds grown back by one value at a time (at most to ``upper``),
    each time the one that removes the most squared error per added parameter, while
    the parameters stay within ``budget``."""
    tails = _tails(spectra)
    dims = list(effective_dims(dims, local))
    params = params_of(dims, local)
    while True:
        best = None
        for k in range(1, len(dims) - 1):
            if dims[k] >= min(upper[k], len(tails[k - 1]) - 1):
                continue
            trial = dims.copy()
            trial[k] += 1
            if effective_dims(trial, local)[k] == dims[k]:  # capped by a neighbour
                continue
            added = params_of(trial, local) - params
            gain = tails[k - 1][dims[k]] - tails[k - 1][dims[k] + 1]
            if added <= 0 or params + added > budget or gain <= 0:
                continue
            key = (-gain / added, k)
            if best is None or key < best[0]:
                best = (key, k, added)
        if best is None:
            return tuple(dims)
        _, k, added = best
        dims[k] += 1
        params += added


def greedy_path(
    spectra: Sequence[torch.Tensor], dims: Sequence[int], local: Sequence[int]
) -> list[tuple[int, float]]:
    """Every cut of the greedy down to bonds of 1: ``(freed parameters, added squared error)``.

    Examples
    --------
    >>> import torch
    >>> spectra = [torch.tensor([4.0, 3.0, 0.1, 0.1]), torch.tensor([5.0, 1.0, 0.5, 0.2])]
    >>> [(saved, round(cost, 2)) for saved, cost in greedy_path(spectra, (1, 4, 4, 1), (4, 4, 4))]
    [(20, 0.01), (20, 0.01), (12, 0.04), (12, 0.25), (12, 1.0), (8, 9.0)]
    """
    steps: list[tuple[int, float]] = []
    _greedy(spectra, dims, local, tolerance_sq=float("inf"), steps=steps)
    return steps


def dims_for_tolerance(
    spectra: Sequence[torch.Tensor],
    dims: Sequence[int],
    local: Sequence[int],
    tolerance_sq: float,
) -> tuple[int, ...]:
    """Fewest-parameter bonds (greedy) whose Eq. 4 bound squared is ``<= tolerance_sq``."""
    if tolerance_sq < 0:
        raise ValueError(f"a tolerance must be >= 0, got {tolerance_sq}")
    return _greedy(spectra, dims, local, tolerance_sq=tolerance_sq)


def uniform_dims_for_budget(
    dims: Sequence[int], local: Sequence[int], budget: int
) -> tuple[int, ...]:
    """Scale every bond by one factor ``s`` (the largest meeting ``budget``).

    Examples
    --------
    >>> uniform_dims_for_budget((1, 4, 4, 1), (4, 4, 4), budget=40)
    (1, 2, 2, 1)
    """
    if budget < 1:
        raise ValueError(f"a parameter budget must be >= 1, got {budget}")

    def scaled(s: float) -> tuple[int, ...]:
        inner = [max(1, min(d, math.floor(s * d + 0.5))) for d in dims[1:-1]]
        return (1, *inner, 1)

    lowest = scaled(0.0)
    if params_of(lowest, local) > budget:
        raise ValueError(
            f"a budget of {budget} parameters is below the smallest MPO of this "
            f"shape ({params_of(lowest, local)} parameters); ask for at least that"
        )
    lo, hi = 0.0, 1.0
    if params_of(scaled(hi), local) <= budget:
        return scaled(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params_of(scaled(mid), local) <= budget else (lo, mid)
    return scaled(lo)
