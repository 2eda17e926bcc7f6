"""``tucker``: a Tucker core with one factor per mode (tensorly; HOSVD with ``iterations=0``,
HOOI otherwise)."""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    """Tucker of the tensorized matrix: HOSVD (``iterations=0``) or HOOI (more).

    ``rank`` gives every mode that rank (at most its size); ``ratio`` takes, of one rank
    per mode ([mode_ranks][mpotn.methods.tucker.mode_ranks]) and the largest one rank for
    all modes within the budget, the one whose HOSVD is closer to the tensor (neither wins
    everywhere: per mode is better on a 48 x 80 random matrix, one rank on MiniLM's word
    embedding); neither: full rank."""
    import tensorly as tl
    from tensorly.decomposition import tucker

    _check_ratio(ratio, rank)
    tensor, row, col = _tensorized(matrix, n)
    modes = tensor.shape
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0 (0: HOSVD), got {iterations}")
    hosvd = None  # the chosen ranks' HOSVD, when choosing them computed it
    if rank is not None:
        ranks = [min(rank, size) for size in modes]
    elif ratio is not None:
        budget = ratio_params(ratio, matrix.numel())
        top = _largest_rank(lambda r: tucker_params(modes, [min(r, size) for size in modes]),
                            budget, max(modes))
        options = [mode_ranks(tensor, budget), [min(top, size) for size in modes]]
        with tensorly_torch():
            fits = [tucker(tensor, rank=option, n_iter_max=0, init="svd") for option in options]
            errors = [float((tl.tucker_to_tensor(fit) - tensor).norm()) for fit in fits]
        best = errors.index(min(errors))
        ranks, hosvd = options[best], fits[best]
    else:
        ranks = list(modes)
    if hosvd is not None and iterations == 0:
        core, factors = hosvd
    else:
        with tensorly_torch():
            core, factors = tucker(tensor, rank=ranks, n_iter_max=iterations, init="svd")
    leg_names = [*(f"row_{k}" for k in range(1, n + 1)), *(f"col_{k}" for k in range(1, n + 1))]
    tensors = {"core": core}
    legs = {"core": tuple(f"r_{m}" for m in range(1, 2 * n + 1))}
    for m, (factor, leg) in enumerate(zip(factors, leg_names), start=1):
        tensors[f"factor_{m}"], legs[f"factor_{m}"] = factor, (leg, f"r_{m}")
    roles = {name: "central" if name == "core" else "auxiliary" for name in tensors}
    return _finish("tucker", tensors, legs, row, col, matrix, roles, n=n, rank=rank,
                   ranks=ranks, iterations=iterations)


def tucker_params(modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Entries of a Tucker network: the core and one factor per mode."""
    return math.prod(ranks) + sum(size * r for size, r in zip(modes, ranks))


def mode_ranks(tensor: torch.Tensor, budget: int) -> list[int]:
    """One rank per mode within ``budget`` parameters, greedily: from rank 1 everywhere,
    raise the mode whose next HOSVD singular value squared (its share of the HOSVD error
    bound, the sum over modes of the discarded ones) is largest per added parameter.

    Examples
    --------
    >>> t = torch.zeros(4, 4, 4, dtype=torch.float64)
    >>> t[:2, :2, 0] = torch.eye(2, dtype=torch.float64)  # rank 2, 2, 1
    >>> mode_ranks(t, 40)
    [2, 2, 1]
    """
    modes = list(tensor.shape)
    spectra = [torch.linalg.svdvals(tensor.movedim(m, 0).reshape(size, -1).double()) ** 2
               for m, size in enumerate(modes)]
    ranks = [1] * len(modes)
    while True:
        now, best = tucker_params(modes, ranks), None
        for m, spectrum in enumerate(spectra):
            if ranks[m] >= len(spectrum) or float(spectrum[ranks[m]]) == 0.0:
                continue
            grown = [*ranks[:m], ranks[m] + 1, *ranks[m + 1:]]
            cost = tucker_params(modes, grown)
            gain = float(spectrum[ranks[m]]) / (cost - now)
            if cost <= budget and (best is None or gain > best[0]):
                best = (gain, m)
        if best is None:
            return ranks
        ranks[best[1]] += 1
