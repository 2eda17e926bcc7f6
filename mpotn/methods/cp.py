"""``cp``: a rank-``R`` CP decomposition by ALS (tensorly); its rank index is a hyperedge
shared by every factor."""

from __future__ import annotations

import warnings

import torch

from mpotn.methods.base import (
    FactorNetwork,
    _check_ratio,
    _finish,
    _tensorized,
    register,
    tensorly_torch,
)
from mpotn.truncation import ratio_params

#: The most work [cp_method][mpotn.methods.cp.cp_method] starts by default, in multiply-adds
#: of its ALS sweeps (see [als_work][mpotn.methods.cp.als_work]): about a minute on one core
#: with ``n = 3``, several with ``n = 5`` (small modes run slower per multiply-add).
#: Raise it per call with ``max_work=`` or for the session by setting this attribute.
MAX_WORK = 1.2e10


class WorkLimitError(ValueError):
    """A decomposition refused because its estimated work is above its limit."""


def als_work(entries: int, n: int, rank: int, iterations: int) -> int:
    """Multiply-adds of ``iterations`` ALS sweeps at ``rank`` on a tensorized matrix of
    ``entries`` entries: each sweep updates ``2n`` factors, each update costs about
    ``entries x rank``.

    Examples
    --------
    >>> als_work(384 * 1536, n=3, rank=100, iterations=10)
    3538944000
    """
    return 2 * n * entries * rank * iterations


@register("cp")
def cp_method(matrix: torch.Tensor, *, n: int = 3, ratio: float | None = None,
              rank: int | None = None, iterations: int = 100, seed: int = 0,
              max_work: float | None = None) -> FactorNetwork:
    """Rank-``R`` CP of the tensorized matrix by alternating least squares.

    Raises
    ------
    ValueError
        When neither ``rank`` nor ``ratio`` is given.
    WorkLimitError
        When the ALS sweeps would take more than ``max_work`` multiply-adds
        ([als_work][mpotn.methods.cp.als_work]; default
        [MAX_WORK][mpotn.methods.cp.MAX_WORK]): the message names the work, the limit and
        how to lower the one or raise the other.
    """
    from tensorly.decomposition import parafac

    _check_ratio(ratio, rank)
    tensor, row, col = _tensorized(matrix, n)
    per_rank = sum(tensor.shape)
    if rank is None:
        if ratio is None:
            raise ValueError("cp has no exact rank to default to: give rank or ratio")
        rank = max(1, ratio_params(ratio, matrix.numel()) // per_rank)
    limit = MAX_WORK if max_work is None else max_work
    work = als_work(tensor.numel(), n, rank, iterations)
    if work > limit:
        raise WorkLimitError(
            f"cp at rank {rank} on a {matrix.shape[0]} x {matrix.shape[1]} matrix (n={n}, "
            f"{iterations} iterations) needs about {work:.2g} multiply-adds of ALS, above the "
            f"limit of {limit:.2g} (1.2e10 takes about a minute); lower ratio, rank, "
            "iterations or n, or raise the limit: decompose(..., max_work=...) or "
            "mpotn.methods.cp.MAX_WORK = ...")
    if not bool(tensor.any()):  # ALS divides by the factors' Gram matrices: all zero here
        factors = [tensor.new_zeros(size, rank) for size in tensor.shape]
    else:
        with tensorly_torch(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Trying to compute SVD", UserWarning)
            try:
                weights, factors = parafac(tensor, rank=rank, n_iter_max=iterations,
                                           init="svd", random_state=seed, tol=1e-10)
            except torch.linalg.LinAlgError as error:
                raise ValueError(f"cp at rank {rank} on a {matrix.shape[0]} x "
                                 f"{matrix.shape[1]} matrix: ALS met a singular system "
                                 f"({error}); lower the rank or n") from error
        factors = [f.clone() for f in factors]
        factors[0] = factors[0] * weights[None, :]
    leg_names = [*(f"row_{k}" for k in range(1, n + 1)), *(f"col_{k}" for k in range(1, n + 1))]
    tensors = {f"factor_{m}": f for m, f in enumerate(factors, start=1)}
    legs = {f"factor_{m}": (leg, "rank") for m, leg in enumerate(leg_names, start=1)}
    return _finish("cp", tensors, legs, row, col, matrix, dict.fromkeys(tensors, "factor"),
                   n=n, rank=rank, iterations=iterations)
