r"""Calibrated (activation-aware) MPO truncation (SPEC §7).

Eq. 3-4 bound the error of the *weights*. What a compressed layer loses is the
error of its *outputs* on the inputs it sees. For $y = x M$ ($M = W^T$,
$I \times J$) and calibration inputs $X$ ($N \times I$), Eq. 7 is

$$
E(M') = \|X (M - M')\|_F^2 = \mathrm{tr}\big((M - M')^T C (M - M')\big),
\qquad C = X^T X.
$$

With $C = L L^T$, $E(M') = \|L^T (M - M')\|_F^2$: truncating the whitened
matrix $L^T M$ minimises Eq. 7. An MPO keeps its structure when $L$ is a
Kronecker product along the row factorization $I = i_1 \cdots i_n$
($C \approx C_1 \otimes \cdots \otimes C_n$, the nearest Kronecker product of
Van Loan-Pitsianis, computed by [kronecker_factors][mpotn.calibration.kronecker_factors]): then
$L^T M$ is an MPO whose core $k$ has $L_k^T$ applied to its row leg. So
[calibrated_mpo][mpotn.calibration.calibrated_mpo] whitens each row leg, runs Algorithm 1 and any
truncation on the whitened matrix (Eq. 3-4 now bound the output error under
the Kronecker approximation of $C$), then applies $L_k^{-T}$ to each row
leg. Bond dimensions and parameter counts are exactly those of a plain MPO.

With the trivial factorization ``(I, 1) x (1, J)`` ($n = 2$, the plain SVD)
the Kronecker approximation is exact ($C_1 = C$) and this is SVD-LLM's
truncation-aware whitening: the optimum of Eq. 7 at each rank for the damped
covariance $C + \delta I$ (``damp`` below; without damping a singular $C$ has
no Cholesky factor).

A covariance is either dense (``I x I``) or diagonal (a vector of length
``I``): an embedding lookup's inputs are one-hot rows, so its ``C`` is the
diagonal of token counts.

Examples
--------
>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.randn(500, 48, dtype=torch.float64, generator=g) * torch.linspace(0.1, 3, 48)
>>> m = torch.randn(48, 64, dtype=torch.float64, generator=g)
>>> cov = x.T @ x
>>> plain = calibrated_mpo(m, torch.ones(48, dtype=torch.float64), n=3, ratio=0.3)
>>> calibrated = calibrated_mpo(m, cov, n=3, ratio=0.3)
>>> calibrated.mpo.num_params <= 0.3 * 48 * 64
True
>>> output_error(m, calibrated.mpo.to_matrix(), cov) < output_error(m, plain.mpo.to_matrix(), cov)
True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mpotn.mpo import MPO, _compute_dtype, _right_orthogonalize
from mpotn.shapes import Factorization, plan_side

#: Default damping: ``damp * mean(diag C_k)`` is added to each Kronecker factor
#: before its Cholesky factorization (padded rows and unused input directions
#: make ``C`` singular).
DAMP = 1e-2


def _check_covariance(covariance: torch.Tensor, size: int) -> None:
    if not isinstance(covariance, torch.Tensor):
        raise ValueError(f"covariance must be a torch.Tensor, got {type(covariance).__name__}")
    expected = (size,) if covariance.dim() == 1 else (size, size)
    if tuple(covariance.shape) != expected:
        raise ValueError(
            f"covariance for a matrix with {size} rows (inputs) must have shape ({size}, {size}) "
            f"or ({size},) (diagonal), got {tuple(covariance.shape)}"
        )
    if not torch.isfinite(covariance).all():
        raise ValueError("covariance contains NaN or infinite entries")


def _padded(covariance: torch.Tensor, padded_size: int) -> torch.Tensor:
    extra = padded_size - covariance.shape[0]
    if extra == 0:  # no copy
        return covariance
    if covariance.dim() == 1:
        return torch.nn.functional.pad(covariance, (0, extra))
    return torch.nn.functional.pad(covariance, (0, extra, 0, extra))


def _contract_except(tensor: torch.Tensor, vectors: Sequence[torch.Tensor], skip: int
                     ) -> torch.Tensor:
    """Contract every mode of ``tensor`` but ``skip`` with its vector."""
    out = tensor
    for k in range(len(vectors) - 1, -1, -1):  # from the last mode, so indices stay valid
        if k != skip:
            out = torch.tensordot(out, vectors[k], dims=([k], [0]))
    return out


@dataclass(frozen=True)
class KroneckerCovariance:
    """``C ~ C_1 (x) ... (x) C_n`` along a row factorization.

    Attributes
    ----------
    factors:
        ``C_k`` (``i_k x i_k``, or a vector of length ``i_k`` for a diagonal ``C``),
        symmetric with a positive trace; ``i_1`` is the slowest index.
    kept:
        The share of ``||C||_F^2`` the Kronecker product captures,
        ``<C, K>^2 / (||C||_F^2 ||K||_F^2)`` (1 when ``C`` is one exactly).
    """

    factors: tuple[torch.Tensor, ...]
    kept: float

    @property
    def diagonal(self) -> bool:
        return self.factors[0].dim() == 1


def kronecker_factors(covariance: torch.Tensor, row: Factorization, iterations: int = 25
                      ) -> KroneckerCovariance:
    """The nearest Kronecker product of ``C`` along ``row`` (Van Loan-Pitsianis).

    ``C`` (zero-padded to ``row.padded_size``) is rearranged so that each
    factor's two indices form one mode, ``T[(i_1 i'_1), ..., (i_n i'_n)]``,
    and its best rank-1 approximation is found by the higher-order power
    method, started from the partial traces. For ``n = 2`` factors this is
    the SVD construction of Van Loan and Pitsianis.

    Examples
    --------
    >>> import torch
    >>> a, b = torch.randn(3, 3, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    >>> c = torch.kron(a @ a.T, b @ b.T)
    >>> k = kronecker_factors(c, Factorization(12, (3, 4)))
    >>> round(k.kept, 10), bool(torch.allclose(torch.kron(*k.factors), c))
    (1.0, True)
    """
    _check_covariance(covariance, row.size)
    sizes = row.factors
    n = len(sizes)
    cov = _padded(covariance.to(torch.float64), row.padded_size)
    if sum(i > 1 for i in sizes) == 1 and bool(cov.any()):  # one factor is C itself,
        # exactly (the SVD's (I, 1)): no rearranged copy of C (whitening adds its Cholesky
        # factor alone)
        one = torch.ones((1,) * cov.dim(), dtype=torch.float64, device=cov.device)
        return KroneckerCovariance(tuple(cov if i > 1 else one for i in sizes), 1.0)
    if cov.dim() == 1:
        tensor = cov.reshape(sizes)
        vectors = [torch.ones(i, dtype=torch.float64, device=cov.device) for i in sizes]
    else:
        tensor = cov.reshape(*sizes, *sizes)
        tensor = tensor.permute([a for k in range(n) for a in (k, n + k)])
        tensor = tensor.reshape([i * i for i in sizes])
        vectors = [torch.eye(i, dtype=torch.float64, device=cov.device).reshape(-1)
                   for i in sizes]
    norm = float(tensor.norm())
    if norm == 0:  # every input was zero: any fit has zero output error; whiten by nothing
        warnings.warn("the covariance is zero (the layer's calibration inputs were all zero): "
                      "its whitening is the identity, so its fit minimises the weight error",
                      stacklevel=2)
        return KroneckerCovariance(tuple(v if cov.dim() == 1 else v.reshape(i, i)
                                         for v, i in zip(vectors, sizes)), 1.0)
    for k in range(n):  # partial traces: a start with the right sign
        vectors[k] = _contract_except(tensor, vectors, k)
        vectors[k] = vectors[k] / vectors[k].norm()
    for _ in range(iterations if n > 1 else 0):
        previous = [v.clone() for v in vectors]
        for k in range(n):
            v = _contract_except(tensor, vectors, k)
            vectors[k] = v / v.norm()
        if max(float((v - p).norm()) for v, p in zip(vectors, previous)) < 1e-12:
            break
    scale = float(_contract_except(tensor, vectors, n - 1) @ vectors[-1])
    factors = []
    sign = 1.0
    for v, i in zip(vectors, sizes):
        f = v if cov.dim() == 1 else v.reshape(i, i)
        trace = float(f.sum() if cov.dim() == 1 else f.trace())
        if trace < 0:
            f, sign = -f, -sign
        if cov.dim() == 2:
            f = (f + f.T) / 2
        factors.append(f)
    scale *= sign
    factors = [f * abs(scale) ** (1 / n) for f in factors]
    kept = min(1.0, (scale / norm) ** 2) if scale > 0 else 0.0
    return KroneckerCovariance(tuple(factors), kept)


@dataclass(frozen=True)
class Whitening:
    """Row-leg whitening ``L = L_1 (x) ... (x) L_n`` with ``C_k + delta_k I = L_k L_k^T``.

    ``apply`` maps ``M`` to ``L^T M`` and ``restore_cores`` applies
    ``L_k^{-T}`` to the row leg of each core, so that an MPO of ``L^T M``
    becomes an MPO of ``M`` with the same bonds.
    """

    row: Factorization
    factors: tuple[torch.Tensor, ...]  # L_k (lower triangular), or sqrt of a diagonal
    kept: float

    @classmethod
    def from_covariance(cls, covariance: torch.Tensor, row: Factorization, damp: float = DAMP
                        ) -> Whitening:
        """Kronecker-factor ``C`` along ``row`` and take each factor's Cholesky factor."""
        if not math.isfinite(damp) or damp < 0:
            raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
        kron = kronecker_factors(covariance, row)
        out = []
        for f in kron.factors:
            if kron.diagonal:
                delta = max(damp * float(f.mean()), 1e-12 * float(f.max()))
                out.append((f.clamp_min(0) + delta).sqrt())
                continue
            delta = damp * float(f.trace()) / f.shape[0]
            damped, added = f.clone(), 0.0  # one copy: the damping goes on its diagonal
            for _ in range(8):  # grow the damping until the factor is positive definite
                damped.diagonal().add_(max(delta, 1e-12) - added)
                added = max(delta, 1e-12)
                factor, info = torch.linalg.cholesky_ex(damped)
                if int(info) == 0:
                    break
                delta = max(10 * delta, 1e-10 * float(f.diagonal().abs().max()))
            else:
                raise ValueError("a Kronecker factor of the covariance is not positive "
                                 "semi-definite even after damping; check the calibration data")
            out.append(factor)
        return cls(row, tuple(out), kron.kept)

    @property
    def diagonal(self) -> bool:
        return self.factors[0].dim() == 1

    def _rows(self, matrix: torch.Tensor, inverse: bool) -> torch.Tensor:
        sizes = self.row.factors
        tensor = matrix.reshape(*sizes, -1)
        for k, f in enumerate(self.factors):
            shape = [1] * (len(sizes) + 1)
            shape[k] = sizes[k]
            if self.diagonal:
                tensor = tensor / f.reshape(shape) if inverse else tensor * f.reshape(shape)
                continue
            op = torch.linalg.inv(f).T if inverse else f.T
            tensor = torch.movedim(torch.tensordot(op, tensor, dims=([1], [k])), 0, k)
        return tensor.reshape(matrix.shape)

    def apply(self, matrix: torch.Tensor) -> torch.Tensor:
        """``L^T M`` for ``M`` of shape ``(row.padded_size, J)``."""
        return self._rows(matrix.to(torch.float64), inverse=False)

    def undo(self, matrix: torch.Tensor) -> torch.Tensor:
        """``L^{-T} W`` for ``W`` of shape ``(row.padded_size, J)``."""
        return self._rows(matrix.to(torch.float64), inverse=True)

    def restore_cores(self, cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Apply ``L_k^{-T}`` to the row leg (axis 1) of core ``k``."""
        out = []
        for core, f in zip(cores, self.factors):
            core = core.to(torch.float64)
            if self.diagonal:
                out.append(core / f.reshape(1, -1, 1, 1))
                continue
            inv_t = torch.linalg.inv(f).T
            out.append(torch.einsum("ab,xbjy->xajy", inv_t, core))
        return out

    def restore(self, whitened: MPO, shape: tuple[int, int], dtype: torch.dtype,
                reference: torch.Tensor | None = None) -> MPO:
        """The MPO of ``M`` (canonical form, same bonds) from an MPO of ``L^T M``; with
        ``reference`` (``M``), its ``error_bound`` is the measured ``||M - MPO||_F`` and
        its ``source_norm`` ``||M||_F`` (see [MPO.from_cores][mpotn.mpo.MPO.from_cores])."""
        cores = self.restore_cores(whitened.cores)
        return MPO.from_cores([c.to(dtype) for c in cores], shape=shape, reference=reference)


@dataclass
class CalibratedMPO:
    """The result of [calibrated_mpo][mpotn.calibration.calibrated_mpo].

    Attributes
    ----------
    mpo:
        The MPO of ``M`` (canonical form; same bonds as ``whitened``); its
        ``error_bound`` is its measured weight error ``||M - MPO||_F``.
    whitened:
        The (truncated) MPO of the whitened matrix ``L^T M``; its
        ``error_bound / source_norm`` estimates the relative output error.
    full_whitened:
        The untruncated MPO of ``L^T M``: its spectra drive every truncation.
    whitening:
        The row-leg whitening used.
    """

    mpo: MPO
    whitened: MPO
    full_whitened: MPO
    whitening: Whitening

    @property
    def estimated_output_error(self) -> float:
        """Relative output error ``||L^T (M - M')|| / ||L^T M||`` (Eq. 4 on the whitened MPO)."""
        norm = self.full_whitened.norm
        return self.whitened.error_bound / norm if norm else 0.0


def whitened_decomposition(
    matrix: torch.Tensor,
    covariance: torch.Tensor,
    n: int = 5,
    row_shape: Sequence[int] | None = None,
    col_shape: Sequence[int] | None = None,
    *,
    pad: bool = True,
    damp: float = DAMP,
    svd: str = "auto",
) -> tuple[MPO, Whitening]:
    """The full-rank MPO of the whitened ``L^T M`` and the whitening ``L`` (the first step
    of [calibrated_mpo][mpotn.calibration.calibrated_mpo], for a caller that truncates and
    restores later); the arguments are ``calibrated_mpo``'s.

    Examples
    --------
    >>> import torch
    >>> m, x = torch.randn(16, 8, dtype=torch.float64), torch.randn(32, 16, dtype=torch.float64)
    >>> full, whitening = whitened_decomposition(m, x.T @ x, n=2)
    >>> bool(torch.allclose(full.to_matrix(), whitening.apply(m)))
    True
    """
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        raise ValueError("matrix must be a 2-D torch.Tensor")
    _check_covariance(covariance, matrix.shape[0])
    row = plan_side(matrix.shape[0], n if row_shape is None else len(row_shape), row_shape, pad)
    col = plan_side(matrix.shape[1], len(row.factors), col_shape, pad)
    whitening = Whitening.from_covariance(covariance, row, damp)
    padded = torch.nn.functional.pad(matrix.detach().to(torch.float64),
                                     (0, col.padding, 0, row.padding))
    full = MPO.from_matrix(whitening.apply(padded), len(row.factors), row.factors,
                           col.factors, pad=False, svd=svd)
    return full, whitening


def calibrated_mpo(
    matrix: torch.Tensor,
    covariance: torch.Tensor,
    n: int = 5,
    row_shape: Sequence[int] | None = None,
    col_shape: Sequence[int] | None = None,
    *,
    pad: bool = True,
    damp: float = DAMP,
    svd: str = "auto",
    **policy: Any,
) -> CalibratedMPO:
    """An MPO of ``matrix`` truncated to minimise the output error of Eq. 7.

    Parameters
    ----------
    matrix:
        ``M`` (``I x J``; rows are the layer's inputs).
    covariance:
        ``C = X^T X`` of the layer's inputs (``I x I``), or its diagonal.
    n, row_shape, col_shape, pad, svd:
        As in [MPO.from_matrix][mpotn.mpo.MPO.from_matrix]; ``row_shape=(I, 1), col_shape=(1, J)``
        gives SVD-LLM's whitened SVD.
    damp:
        Relative damping of each Kronecker factor before its Cholesky factor.
    **policy:
        At most one truncation policy of [MPO.truncate][mpotn.mpo.MPO.truncate] (``ratio``,
        ``params``, ``max_bond``, ``bond_dims``, ``tol``; ``allocation``),
        applied to the whitened MPO: ``tol`` is then a relative *output* error.
    """
    full, whitening = whitened_decomposition(matrix, covariance, n, row_shape, col_shape,
                                             pad=pad, damp=damp, svd=svd)
    active = {k: v for k, v in policy.items() if v is not None and k != "allocation"}
    whitened = full.truncate(**policy) if active else full
    restored = whitening.restore(whitened, tuple(matrix.shape), _compute_dtype(matrix), matrix)
    return CalibratedMPO(restored, whitened, full, whitening)


def output_spectra_mpo(
    matrix: torch.Tensor,
    covariance: torch.Tensor,
    n: int,
    row_shape: Sequence[int] | None = None,
    col_shape: Sequence[int] | None = None,
    *,
    pad: bool = True,
    damp: float = DAMP,
    svd: str = "auto",
) -> MPO:
    r"""The untruncated MPO of the exactly whitened matrix $L^T M$ ($C + \delta I = L L^T$,
    one Cholesky factor, as SVD-LLM's) in the factorization given.

    Truncating it at some bonds and un-whitening the product densely,
    $L^{-T} \mathrm{MPO}(L^T M)$, has a relative output error (Eq. 7, for the damped
    $C$) of exactly what Eq. 4 gives on its spectra; an MPO of $M$ itself at those
    bonds, fitted to the same outputs ([refine][mpotn.calibration.refine]), does not
    keep the structure of that product and reaches a comparable error, not the same.
    So its spectra are the output-error cost of each bond cut, in the units of a
    whitened SVD's: what one model-wide budget compares across calibrated matrices.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> m = torch.randn(16, 12, dtype=torch.float64, generator=g)
    >>> x = torch.randn(200, 16, dtype=torch.float64, generator=g)
    >>> full = output_spectra_mpo(m, x.T @ x, n=2, damp=0.0)
    >>> cut = full.truncate(max_bond=4)
    >>> lower = torch.linalg.cholesky(x.T @ x)
    >>> dense = torch.linalg.solve(lower.T, cut.to_matrix())  # L^{-T} MPO(L^T M)
    >>> round(output_error(m, dense, x.T @ x) / (cut.error_bound / full.norm), 6)
    1.0
    """
    _check_covariance(covariance, matrix.shape[0])
    rows = matrix.shape[0]
    whitening = Whitening.from_covariance(covariance, plan_side(rows, 2, (rows, 1)), damp)
    return MPO.from_matrix(whitening.apply(matrix.detach()), n, row_shape, col_shape,
                           pad=pad, svd=svd)


def output_error(matrix: torch.Tensor, approximation: torch.Tensor, covariance: torch.Tensor
                 ) -> float:
    r"""Relative output error (Eq. 7), with $D = M - M'$.

    $$
    \sqrt{\mathrm{tr}(D^T C D) \,/\, \mathrm{tr}(M^T C M)}
    $$

    Examples
    --------
    >>> import torch
    >>> m = torch.randn(8, 5, dtype=torch.float64)
    >>> output_error(m, m, torch.eye(8, dtype=torch.float64))
    0.0
    """
    _check_covariance(covariance, matrix.shape[0])
    m = matrix.detach().to(torch.float64)
    d = m - approximation.detach().to(m.device, torch.float64)
    cov = covariance.to(m.device, torch.float64)

    def energy(a: torch.Tensor) -> float:
        if cov.dim() == 1:
            return float((cov[:, None] * a * a).sum())
        return float((a * (cov @ a)).sum())

    total = energy(m)
    return math.sqrt(max(energy(d), 0.0) / total) if total > 0 else 0.0


def compensated_matrix(matrix: torch.Tensor, covariance: torch.Tensor, cross: torch.Tensor,
                       damp: float = DAMP) -> torch.Tensor:
    r"""The matrix to fit when a layer's inputs differ from the reference's (Eq. 7').

    A layer $y = x M$ of a model whose earlier layers are already compressed
    sees inputs $X$ where the original saw $X_0$ (the same tokens). Fitting
    the original's outputs $X_0 M$ from the inputs it will see,

    $$
    \|X M' - X_0 M\|_F^2 = \|X (M' - M^*)\|_F^2 + \text{const},
    \qquad M^* = C^{-1} X^T X_0 M, \quad C = X^T X,
    $$

    is Eq. 7 with $M^*$ in place of $M$: every calibrated fit applies unchanged.
    Computed as $M + (C + \delta I)^{-1} (X^T X_0 - C) M$ with
    $\delta = d \, \mathrm{tr}(C) / I$ (``d`` is ``damp``), so that $M^* = M$ exactly
    when $X = X_0$ and a direction the inputs never take keeps $M$.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x0 = torch.randn(200, 6, dtype=torch.float64, generator=g)
    >>> x = x0 + 0.1 * torch.randn(200, 6, dtype=torch.float64, generator=g)
    >>> m = torch.randn(6, 4, dtype=torch.float64, generator=g)
    >>> torch.equal(compensated_matrix(m, x0.T @ x0, x0.T @ x0), m)
    True
    >>> best = compensated_matrix(m, x.T @ x, x.T @ x0, damp=0.0)
    >>> torch.allclose(best, torch.linalg.lstsq(x, x0 @ m).solution)
    True
    """
    _check_covariance(covariance, matrix.shape[0])
    if covariance.dim() != 2 or cross.shape != covariance.shape:
        raise ValueError("compensated_matrix needs a dense covariance and a cross moment of the "
                         f"same shape, got {tuple(covariance.shape)} and {tuple(cross.shape)}")
    if not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    m = matrix.detach().to(torch.float64)
    cov = covariance.to(m.device, torch.float64)
    shift = (cross.to(m.device, torch.float64) - cov) @ m
    delta = damp * float(cov.trace()) / cov.shape[0]
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    if delta > 0:
        return m + torch.linalg.solve(cov + delta * eye, shift)
    return m + torch.linalg.pinv(cov, hermitian=True) @ shift  # C may be singular


def paired_output_error(matrix: torch.Tensor, approximation: torch.Tensor,
                        covariance: torch.Tensor, cross: torch.Tensor,
                        reference: torch.Tensor) -> float:
    r"""Relative error of $X M'$ against the reference's outputs $X_0 M$.

    $$
    \sqrt{\|X M' - X_0 M\|_F^2 \,/\, \|X_0 M\|_F^2}
    $$

    from $C = X^T X$ (``covariance``), $X^T X_0$ (``cross``) and $C_0 = X_0^T X_0$
    (``reference``): with $X = X_0$ it is [output_error][mpotn.calibration.output_error].

    Examples
    --------
    >>> import torch
    >>> x0 = torch.randn(50, 4, dtype=torch.float64)
    >>> x, m = 2 * x0, torch.randn(4, 3, dtype=torch.float64)
    >>> c, c0 = x.T @ x, x0.T @ x0
    >>> round(paired_output_error(m, m / 2, c, x.T @ x0, c0), 12)
    0.0
    """
    m = matrix.detach().to(torch.float64)
    a = approximation.detach().to(m.device, torch.float64)
    cov, cross, ref = (t.to(m.device, torch.float64) for t in (covariance, cross, reference))
    total = float((m * (ref @ m)).sum())
    error = float((a * (cov @ a)).sum()) - 2 * float((a * (cross @ m)).sum()) + total
    return math.sqrt(max(error, 0.0) / total) if total > 0 else 0.0


def _left_env(cores: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Contraction of cores ``0..k-1`` as ``(P, Q, d_{k-1})`` (rows, columns, bond)."""
    env = torch.ones(1, 1, 1, dtype=cores[0].dtype, device=cores[0].device)
    for core in cores[:k]:
        p, q, _ = env.shape
        _, i, j, r = core.shape
        env = torch.einsum("pqa,aijb->piqjb", env, core).reshape(p * i, q * j, r)
    return env


def _right_env(cores: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Contraction of cores ``k+1..n-1`` as ``(d_k, R, S)``."""
    env = torch.ones(1, 1, 1, dtype=cores[0].dtype, device=cores[0].device)
    for core in reversed(cores[k + 1:]):
        _, r, s = env.shape
        left, i, j, _ = core.shape
        env = torch.einsum("aijb,brs->airjs", core, env).reshape(left, i * r, j * s)
    return env


def refine(
    mpo: MPO,
    matrix: torch.Tensor,
    covariance: torch.Tensor,
    sweeps: int = 2,
    cg_steps: int = 20,
) -> MPO:
    """Lower the output error of Eq. 7 by alternating least squares over the cores.

    With every core but ``T_k`` fixed, ``M'`` is linear in ``T_k``, so Eq. 7
    is a least-squares problem in ``T_k`` whose normal equations contract
    ``C`` with the left and right environments. Each sweep visits the cores
    left to right and back (DMRG's single-site sweep), solving each problem
    by conjugate gradients started from the current core (so Eq. 7 never
    increases) and moving the orthogonality centre along with the sweep.
    Bond dimensions, and so the parameter count, do not change. The result's
    ``error_bound`` is its measured weight error ``||M - MPO||_F`` (the sweeps leave
    Eq. 4 behind).

    Parameters
    ----------
    mpo:
        The starting MPO (e.g. a plain or a whitened truncation of ``matrix``).
    matrix, covariance:
        ``M`` and ``C = X^T X`` (dense ``I x I``, or its diagonal).
    sweeps:
        Number of back-and-forth sweeps.
    cg_steps:
        Conjugate-gradient iterations per core.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(1)
    >>> x = torch.randn(300, 16, dtype=torch.float64, generator=g) @ torch.randn(
    ...     16, 16, dtype=torch.float64, generator=g)
    >>> m = torch.randn(16, 24, dtype=torch.float64, generator=g)
    >>> start = MPO.from_matrix(m, n=3).truncate(max_bond=3)
    >>> better = refine(start, m, x.T @ x)
    >>> better.bond_dims == start.bond_dims
    True
    >>> output_error(m, better.to_matrix(), x.T @ x) < output_error(m, start.to_matrix(), x.T @ x)
    True
    """
    _check_covariance(covariance, matrix.shape[0])
    if sweeps < 0 or cg_steps < 1:
        raise ValueError(f"sweeps must be >= 0 and cg_steps >= 1, got {sweeps}, {cg_steps}")
    device = mpo.cores[0].device
    row, col = mpo.row, mpo.col
    target = torch.nn.functional.pad(matrix.detach().to(device, torch.float64),
                                     (0, col.padding, 0, row.padding))
    cov = _padded(covariance.to(device, torch.float64), row.padded_size)
    mask = torch.zeros(col.padded_size, dtype=torch.float64, device=device)
    mask[: col.size] = 1.0

    def weigh(d: torch.Tensor) -> torch.Tensor:  # C D on the real columns
        return (cov[:, None] * d if cov.dim() == 1 else cov @ d) * mask

    ridge = 1e-10 * float(cov.sum() if cov.dim() == 1 else cov.trace()) / row.padded_size
    cores = [c.to(torch.float64) for c in mpo.cores]
    n = len(cores)
    # left-canonical now: move the centre to core 0 for the first left-to-right pass
    cores = _right_orthogonalize(cores, center=0)
    order = [*range(n), *range(n - 2, 0, -1)]
    for _ in range(sweeps):
        for step, k in enumerate(order):
            left, right = _left_env(cores, k), _right_env(cores, k)
            p, q, _ = left.shape
            _, r, s = right.shape
            _, i, j, _ = cores[k].shape

            def phi(v: torch.Tensor, left: torch.Tensor = left, right: torch.Tensor = right,
                    shape: tuple = (p, i, r, q, j, s)) -> torch.Tensor:
                out = torch.einsum("pqa,aijb,brs->pirqjs", left, v, right)
                return out.reshape(shape[0] * shape[1] * shape[2], -1)

            def phi_t(y: torch.Tensor, left: torch.Tensor = left, right: torch.Tensor = right,
                      shape: tuple = (p, i, r, q, j, s)) -> torch.Tensor:
                return torch.einsum("pqa,pirqjs,brs->aijb", left, y.reshape(shape), right)

            def hessian(v: torch.Tensor) -> torch.Tensor:
                return phi_t(weigh(phi(v))) + ridge * v

            x = cores[k]
            residual = phi_t(weigh(target)) - hessian(x)
            direction = residual.clone()
            rs = float((residual * residual).sum())
            for _ in range(cg_steps):
                if rs == 0.0:
                    break
                hd = hessian(direction)
                alpha = rs / float((direction * hd).sum())
                x = x + alpha * direction
                residual = residual - alpha * hd
                rs_new = float((residual * residual).sum())
                direction = residual + (rs_new / rs) * direction
                rs = rs_new
            forward = step < n - 1  # moving right: leave core k left-orthonormal
            dl, _, _, dr = x.shape
            if forward and k < n - 1:
                qm, rm = torch.linalg.qr(x.reshape(dl * i * j, dr))
                cores[k] = qm.reshape(dl, i, j, -1)
                cores[k + 1] = torch.tensordot(rm, cores[k + 1], dims=1)
            elif not forward and k > 0:
                qm, rm = torch.linalg.qr(x.reshape(dl, i * j * dr).mT)
                cores[k] = qm.mT.reshape(-1, i, j, dr)
                cores[k - 1] = torch.tensordot(cores[k - 1], rm.mT, dims=1)
            else:
                cores[k] = x
    return MPO.from_cores([c.to(mpo.dtype) for c in cores], shape=mpo.shape, reference=matrix)
