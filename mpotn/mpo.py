r"""The matrix product operator of a matrix (SPEC §1).

An MPO writes an $I \times J$ matrix, with $I = i_1 \cdots i_n$ and
$J = j_1 \cdots j_n$, as a chain of $n$ cores contracted over the bonds
$d_1, \dots, d_{n-1}$ ($d_0 = d_n = 1$), Eq. 1:

$$
M[i_1 \dots i_n,\ j_1 \dots j_n]
  = \sum_{d_1 \dots d_{n-1}} \prod_{k=1}^{n} T_k[d_{k-1}, i_k, j_k, d_k]
$$

[MPO.from_matrix][mpotn.mpo.MPO.from_matrix] runs Algorithm 1: reshape ``M`` to
``(i_1..i_n, j_1..j_n)``, interleave to ``(i_1, j_1, i_2, j_2, ...)``, and
sweep left to right with SVDs, keeping ``U`` as the core and carrying
``diag(S) V^T`` on. The result is *left-canonical*: every core but the last
is an isometry, and the basis of every bond is ordered by singular value. Each
MPO keeps the exact singular values of every bond of the matrix it
represents, which is what every diagnostic is computed from.

[MPO.truncate][mpotn.mpo.MPO.truncate] is TT-rounding: a right-to-left SVD sweep that cuts each
bond to its requested size, then a left-to-right sweep that restores the
canonical form and the exact spectra. Each step is an orthogonal projection,
so $\|M - M'\|_F^2$ is at most the sum of the squared errors of the steps,
each of which is at most the Eq. 3 error $\epsilon_k$ read off the stored
spectrum: the Eq. 4 bound, with equality when a single bond is cut,

$$
\|M - M'\|_F \le \sqrt{\sum_k \epsilon_k^2}, \qquad
\epsilon_k = \sqrt{\sum_{i > d'_k} \lambda_{k,i}^2}.
$$

Examples
--------
>>> import torch
>>> m = torch.randn(64, 48, dtype=torch.float64)
>>> mpo = MPO.from_matrix(m, n=3)
>>> mpo.bond_dims, mpo.full_bond_dims
((1, 12, 16, 1), (1, 12, 16, 1))
>>> float((mpo.to_matrix() - m).norm() / m.norm()) < 1e-12
True
>>> small = mpo.truncate(max_bond=8)
>>> actual = float((small.to_matrix() - m).norm())
>>> actual <= mpo.estimated_error(small.bond_dims) + 1e-9
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import networkx as nx
import torch

from mpotn import diagnostics
from mpotn.contraction import ContractionCost, Contractor
from mpotn.linalg import truncated_svd
from mpotn.network import build_network, central_index, core_name, to_networkx
from mpotn.shapes import Factorization, full_bond_dims, plan_side
from mpotn.table import Table
from mpotn.truncation import (
    POLICY_KEYS,
    TruncationPolicy,
    _count,
    _is_integer,
    check_bond_request,
    dims_for_budget,
    dims_for_tolerance,
    params_of,
    ratio_params,
    uniform_dims_for_budget,
)
from mpotn.types import (
    GAUGES,
    SVD_METHODS,
    Allocation,
    Gauge,
    Side,
    SVDMethod,
)
from mpotn.types import ContractionMethod as Method

#: Every sweep runs in float64 and casts the cores back: float32 SVDs of the
#: large unfoldings lose the 1e-5 reconstruction target on real embeddings.
SWEEP_DTYPE = torch.float64


@lru_cache(maxsize=256)
def _contractor(row: Factorization, col: Factorization) -> Contractor:
    return Contractor(row, col)


def check_values(matrix: torch.Tensor) -> None:
    """Refuse a matrix without values: one on the meta device (a model built empty, e.g.
    under accelerate's ``init_empty_weights``, before its weights are loaded)."""
    if matrix.is_meta:
        raise ValueError(f"the {matrix.shape[0]} x {matrix.shape[1]} matrix is on the meta "
                         "device and has no values: load the model's weights before "
                         "decomposing it")


def _compute_dtype(matrix: torch.Tensor) -> torch.dtype:
    if matrix.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if matrix.is_complex():
        raise ValueError(
            f"matrix must be real (float16/bfloat16/float32/float64), got {matrix.dtype}; "
            "MPOs of complex matrices are not supported. Choose what to keep: .real (the "
            "real part), .abs() (the magnitudes), or decompose .real and .imag separately "
            "(.float() would silently drop the imaginary part)"
        )
    if matrix.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"matrix must be a floating-point tensor (float16/bfloat16/float32/"
            f"float64), got {matrix.dtype}; convert it with .float()"
        )
    return matrix.dtype


def _interleaved(matrix: torch.Tensor, row: Factorization, col: Factorization) -> torch.Tensor:
    """Zero-pad ``M`` and permute it to ``(i_1, j_1, ..., i_n, j_n)`` (Algorithm 1)."""
    padded = torch.nn.functional.pad(matrix, (0, col.padding, 0, row.padding))
    n = len(row.factors)
    tensor = padded.reshape(*row.factors, *col.factors)
    return tensor.permute([axis for k in range(n) for axis in (k, n + k)])


def bond_entropy(matrix: torch.Tensor, row: Factorization, col: Factorization, bond: int
                 ) -> float:
    """``S_k`` (Eq. 6) of bond ``k`` of the exact MPO of ``matrix`` along ``row`` x ``col``,
    from the singular values of the interleaved tensor cut after its ``k``-th ``(i, j)``
    pair (what Algorithm 1's sweep finds there), without building the MPO.

    Examples
    --------
    >>> from mpotn.shapes import Factorization
    >>> m = torch.randn(12, 10, dtype=torch.float64)
    >>> row, col = Factorization(12, (3, 4)), Factorization(10, (2, 5))
    >>> exact = MPO.from_matrix(m, 2, (3, 4), (2, 5)).entropy(1)
    >>> abs(bond_entropy(m, row, col, 1) - exact) < 1e-12
    True
    """
    tensor = _interleaved(matrix.detach().to(SWEEP_DTYPE), row, col)
    left = math.prod(row.factors[:bond]) * math.prod(col.factors[:bond])
    return diagnostics.entanglement_entropy(torch.linalg.svdvals(tensor.reshape(left, -1)))


def _left_sweep(cores: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Exact left-to-right SVD sweep of a right-canonical chain (center at core 0).

    Returns left-canonical cores and the singular values of bonds ``1..n-1``.
    """
    cores = list(cores)
    spectra = []
    for k in range(len(cores) - 1):
        dl, i, j, dr = cores[k].shape
        cut = truncated_svd(cores[k].reshape(dl * i * j, dr), dr, method="full")
        r = cut.S.numel()
        cores[k] = cut.U.reshape(dl, i, j, r)
        cores[k + 1] = torch.tensordot(cut.S[:, None] * cut.Vh, cores[k + 1], dims=1)
        spectra.append(cut.S)
    return cores, spectra


def _right_orthogonalize(cores: Sequence[torch.Tensor], center: int = 0) -> list[torch.Tensor]:
    """Right-to-left QR sweep: cores after ``center`` right-orthonormal, the rest moved into it."""
    cores = list(cores)
    for k in range(len(cores) - 1, center, -1):
        dl, i, j, dr = cores[k].shape
        q, r = torch.linalg.qr(cores[k].reshape(dl, i * j * dr).mT)
        cores[k] = q.mT.reshape(-1, i, j, dr)
        cores[k - 1] = torch.tensordot(cores[k - 1], r.mT, dims=1)
    return cores


class MPOStructure:
    """The structure of a chain of MPO cores, read off ``cores``, ``row`` and ``col``.

    Shared by [MPO][mpotn.mpo.MPO] (cores as tensors) and the MPO layers of
    [mpotn.layers.mpo][] (cores as parameters), so that both state bonds, the central
    and auxiliary tensors, parameter counts and the ratio of Eq. 5 the same way. A
    class using it sets ``cores`` (a sequence of ``T_k[d_{k-1}, i_k, j_k, d_k]``),
    ``row`` and ``col`` (the [Factorization][mpotn.shapes.Factorization] of each side).

    Examples
    --------
    >>> mpo = MPO.from_matrix(torch.randn(12, 10), n=2, row_shape=(3, 4), col_shape=(2, 5))
    >>> mpo.bond_dims, mpo.central_index, mpo.num_params, mpo.central_params
    ((1, 6, 1), 0, 156, 36)
    """

    cores: Sequence[torch.Tensor]
    row: Factorization
    col: Factorization

    @property
    def n(self) -> int:
        """Number of cores."""
        return len(self.cores)

    @property
    def row_shape(self) -> tuple[int, ...]:
        """``(i_1, ..., i_n)``."""
        return self.row.factors

    @property
    def col_shape(self) -> tuple[int, ...]:
        """``(j_1, ..., j_n)``."""
        return self.col.factors

    @property
    def local_dims(self) -> tuple[int, ...]:
        """``(i_1 j_1, ..., i_n j_n)``."""
        return tuple(i * j for i, j in zip(self.row_shape, self.col_shape))

    @property
    def bond_dims(self) -> tuple[int, ...]:
        """Kept bond dimensions ``(d_0, d_1, ..., d_n)``, ``d_0 = d_n = 1``."""
        return (1, *(int(c.shape[3]) for c in self.cores))

    @property
    def full_bond_dims(self) -> tuple[int, ...]:
        """Full bond dimensions of Eq. 2 for this factorization."""
        return full_bond_dims(self.row_shape, self.col_shape)

    @property
    def central_index(self) -> int:
        """0-based index ``(n - 1) // 2`` of the central tensor."""
        return central_index(self.n)

    @property
    def central_bond(self) -> int:
        """The central tensor's bond with the larger full dimension (Eq. 2).

        For ``n = 5`` that is bond 2 or 3 (ties go to the left one); it is the
        bond squeezing cuts and whose entropy is reported as *central*.

        Examples
        --------
        >>> import torch
        >>> MPO.from_matrix(torch.randn(768, 3072), row_shape=(3, 4, 4, 4, 4),
        ...                 col_shape=(4, 4, 8, 6, 4)).central_bond
        3
        """
        c = self.central_index
        candidates = [k for k in (c, c + 1) if 1 <= k <= self.n - 1]
        return max(candidates, key=lambda k: (self.full_bond_dims[k], -k))

    @property
    def central(self) -> torch.Tensor:
        """The central tensor."""
        return self.cores[self.central_index]

    @property
    def auxiliary(self) -> tuple[torch.Tensor, ...]:
        """The auxiliary tensors, in chain order."""
        c = self.central_index
        return tuple(core for k, core in enumerate(self.cores) if k != c)

    @property
    def core_names(self) -> tuple[str, ...]:
        """``auxiliary_k`` / ``central`` for each core."""
        return tuple(core_name(k, self.n) for k in range(self.n))

    # ----------------------------------------------------------- parameters
    @property
    def num_params(self) -> int:
        """Entries of all cores."""
        return sum(c.numel() for c in self.cores)

    @property
    def central_params(self) -> int:
        """Entries of the central tensor."""
        return self.central.numel()

    @property
    def auxiliary_params(self) -> int:
        """Entries of the auxiliary tensors."""
        return self.num_params - self.central_params

    @property
    def compression_ratio(self) -> float:
        """``rho`` of Eq. 5 (core entries over padded-matrix entries)."""
        return diagnostics.compression_ratio(self.bond_dims, self.row_shape, self.col_shape)


class MPO(MPOStructure):
    """A matrix as a chain of cores ``T_k[d_{k-1}, i_k, j_k, d_k]`` (Eq. 1).

    Build one with [from_matrix][mpotn.mpo.MPO.from_matrix] (Algorithm 1) or
    [from_cores][mpotn.mpo.MPO.from_cores]; the constructor takes already-canonical parts and is
    internal.

    Attributes
    ----------
    row, col:
        Factorizations of the two sides (with their zero-padding).
    singular_values:
        ``singular_values[k - 1]`` holds the singular values of bond ``k``
        (``k = 1..n-1``) of the matrix this MPO represents, descending, in
        float64.
    discarded:
        Per bond, the error of the sweep step that cut bond ``k`` when this MPO was
        made from its source (0 for an exact decomposition): a left-to-right
        decomposition's is Eq. 3's ``eps_k`` of its unfolding; a truncation's
        right-to-left rounding cuts an already truncated chain, so its steps' errors
        are not the source's ``eps_k`` bond by bond (their sum of squares is what
        Eq. 4 adds up).
    error_bound:
        A bound on ``||M_source - MPO||_F``: Eq. 4 over ``discarded``, plus the
        bound of the MPO it was truncated from.
    source_norm:
        ``||M_source||_F``, for relative errors.
    """

    def __init__(
        self,
        cores: Sequence[torch.Tensor],
        row: Factorization,
        col: Factorization,
        singular_values: Sequence[torch.Tensor],
        discarded: Sequence[float],
        error_bound: float,
        source_norm: float,
    ) -> None:
        self.cores = tuple(cores)
        self.row, self.col = row, col
        self.singular_values = tuple(singular_values)
        self.discarded = tuple(float(e) for e in discarded)
        self.error_bound = float(error_bound)
        self.source_norm = float(source_norm)
        self._contractor = _contractor(row, col)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_matrix(
        cls,
        matrix: torch.Tensor,
        n: int = 5,
        row_shape: Sequence[int] | None = None,
        col_shape: Sequence[int] | None = None,
        *,
        pad: bool = True,
        max_bond: int | None = None,
        bond_dims: Sequence[int] | Mapping[int, int] | None = None,
        svd: SVDMethod = "auto",
        seed: int = 0,
    ) -> MPO:
        """Decompose a matrix into ``n`` cores (Algorithm 1).

        Parameters
        ----------
        matrix:
            A 2-D float tensor ``I x J`` on any device. The sweep runs in
            float64; cores come back in float64 for float64 input and in
            float32 otherwise (float16/bfloat16 included).
        n:
            Number of cores (``n >= 2``; ``n = 2`` with ``row_shape=(I, 1)`` and
            ``col_shape=(1, J)`` is the truncated SVD: the ``svd`` method).
        row_shape, col_shape:
            Explicit factors ``(i_1..i_n)`` / ``(j_1..j_n)``; a product larger
            than the side zero-pads it. Chosen automatically when omitted.
        pad:
            Allow automatic zero-padding to a size that factors in balance.
        max_bond, bond_dims:
            Bond sizes to keep while decomposing: one maximum, or one value
            per inner bond ``1..n-1`` (or ``{k: d_k}`` for some bonds). Small
            targets use a randomized SVD (see ``svd``); the result is exact when
            neither is given.
        svd:
            ``"full"``, ``"randomized"`` or ``"auto"`` (randomized when the
            target is well below the unfolding's rank); see
            [mpotn.linalg][].
        seed:
            Seed of the randomized SVD's test matrices.

        Examples
        --------
        >>> import torch
        >>> mpo = MPO.from_matrix(torch.randn(768, 3072), row_shape=(3, 4, 4, 4, 4),
        ...                       col_shape=(4, 4, 8, 6, 4))
        >>> mpo.bond_dims
        (1, 12, 192, 384, 16, 1)
        """
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
            raise ValueError(
                "matrix must be a 2-D torch.Tensor, got "
                f"{type(matrix).__name__} with shape {getattr(matrix, 'shape', None)}"
            )
        if matrix.numel() == 0:
            raise ValueError(f"matrix is empty (shape {tuple(matrix.shape)})")
        check_values(matrix)
        if not _is_integer(n) or n < 2:
            raise ValueError(f"an MPO needs n >= 2 cores, got n={n!r}")
        if svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
        dtype = _compute_dtype(matrix)
        matrix = matrix.detach().to(SWEEP_DTYPE)
        if not torch.isfinite(matrix).all():
            raise ValueError("matrix contains NaN or infinite entries")
        row = plan_side(matrix.shape[0], n, row_shape, pad)
        col = plan_side(matrix.shape[1], n, col_shape, pad)
        full = full_bond_dims(row.factors, col.factors)
        if max_bond is not None and bond_dims is not None:
            raise ValueError("give max_bond or bond_dims, not both")
        if max_bond is not None:
            max_bond = _count("max_bond", max_bond)
            targets = (1, *(min(max_bond, d) for d in full[1:-1]), 1)
        elif bond_dims is not None:
            targets = check_bond_request(bond_dims, full, full)
        else:
            targets = full

        local = [i * j for i, j in zip(row.factors, col.factors)]
        rest = _interleaved(matrix, row, col).reshape(-1)
        cores, spectra, errors = [], [], []
        d = 1
        for k in range(n - 1):
            rest = rest.reshape(d * local[k], -1)
            cut = truncated_svd(rest, targets[k + 1], method=svd, generator_seed=seed + k)
            r = cut.S.numel()
            cores.append(cut.U.reshape(d, row.factors[k], col.factors[k], r))
            spectra.append(cut.S)
            errors.append(float(cut.error))
            rest = cut.S[:, None] * cut.Vh
            d = r
        cores.append(rest.reshape(d, row.factors[-1], col.factors[-1], 1))
        if any(errors):  # spectra of a truncated sweep are intermediate: recompute
            cores, spectra = _left_sweep(_right_orthogonalize(cores))
        norm = float(matrix.norm())
        cores = [c.to(dtype) for c in cores]
        return cls(cores, row, col, spectra, errors, diagnostics.error_bound(errors), norm)

    @classmethod
    def from_cores(
        cls, cores: Sequence[torch.Tensor], shape: tuple[int, int] | None = None,
        reference: torch.Tensor | None = None,
    ) -> MPO:
        """An MPO from arbitrary cores (e.g. fine-tuned, or fitted), brought to canonical
        form. The cores are read, not tracked by autograd.

        Parameters
        ----------
        cores:
            Tensors ``T_k[d_{k-1}, i_k, j_k, d_k]`` with ``d_0 = d_n = 1``.
        shape:
            The unpadded matrix shape ``(I, J)``; defaults to the full products. The
            spectra, norm and truncations are those of the padded matrix the cores
            give: cores fine-tuned in a layer (which reads only the ``I x J`` block)
            can make its padding nonzero, and that padding then counts.
        reference:
            The matrix ``M`` (``I x J``) the cores approximate, if any: then
            ``source_norm`` is ``||M||_F`` and ``error_bound`` the measured
            ``||M - MPO||_F`` (no Eq. 4 bound exists for cores not cut from ``M``'s own
            spectra). Without it the MPO is its own source: ``error_bound`` 0 and
            ``source_norm`` its norm.

        Examples
        --------
        >>> m = torch.randn(12, 10, dtype=torch.float64)
        >>> mpo = MPO.from_matrix(m, 2, (3, 4), (2, 5))
        >>> again = MPO.from_cores([c * 1.0 for c in mpo.cores], shape=(12, 10))
        >>> again.bond_dims, bool(torch.allclose(again.to_matrix(), m))
        ((1, 6, 1), True)
        >>> cut = MPO.from_cores(mpo.truncate(max_bond=2).cores, (12, 10), reference=m)
        >>> bool(abs(cut.error_bound - float((m - cut.to_matrix()).norm())) < 1e-9)
        True
        """
        cores = [torch.as_tensor(c).detach() for c in cores]
        if len(cores) < 2 or any(c.dim() != 4 for c in cores):
            raise ValueError("an MPO needs at least 2 four-way cores [d_left, i, j, d_right]")
        if cores[0].shape[0] != 1 or cores[-1].shape[3] != 1:
            raise ValueError("the boundary bonds d_0 and d_n must have size 1")
        for k in range(len(cores) - 1):
            if cores[k].shape[3] != cores[k + 1].shape[0]:
                raise ValueError(
                    f"bond_{k + 1}: core {k + 1} ends with size {cores[k].shape[3]} but "
                    f"core {k + 2} starts with {cores[k + 1].shape[0]}"
                )
        rows = tuple(int(c.shape[1]) for c in cores)
        cols = tuple(int(c.shape[2]) for c in cores)
        size = shape or (math.prod(rows), math.prod(cols))
        row = plan_side(size[0], len(cores), rows)
        col = plan_side(size[1], len(cores), cols)
        dtype = _compute_dtype(cores[0])
        canonical, spectra = _left_sweep(_right_orthogonalize([c.to(SWEEP_DTYPE) for c in cores]))
        norm = float(spectra[0].norm())
        canonical = [c.to(dtype) for c in canonical]
        mpo = cls(canonical, row, col, spectra, [0.0] * len(spectra), 0.0, norm)
        if reference is None:
            return mpo
        return cls(canonical, row, col, spectra, [0.0] * len(spectra),
                   mpo.reconstruction_error(reference.detach()), float(reference.norm()))

    # ------------------------------------------------------------- structure
    @property
    def shape(self) -> tuple[int, int]:
        """The (unpadded) matrix shape ``(I, J)``."""
        return (self.row.size, self.col.size)

    @property
    def padded_shape(self) -> tuple[int, int]:
        """``(prod i_k, prod j_k)``: the shape including zero-padding."""
        return (self.row.padded_size, self.col.padded_size)

    @property
    def smallest_ratio(self) -> float:
        """The lowest ``ratio`` (Eq. 5) this shape reaches: every bond at 1, over the padded
        matrix's entries.

        Examples
        --------
        >>> MPO.from_matrix(torch.randn(2, 384), n=2, row_shape=(2, 1),
        ...                 col_shape=(1, 384)).smallest_ratio
        0.5026041666666666
        """
        return self.smallest_params / (self.padded_shape[0] * self.padded_shape[1])

    @property
    def smallest_params(self) -> int:
        """Parameters of this shape with every bond at 1: no truncation goes below.

        Examples
        --------
        >>> MPO.from_matrix(torch.randn(2, 384), n=2, row_shape=(2, 1),
        ...                 col_shape=(1, 384)).smallest_params
        386
        """
        return params_of((1,) * (self.n + 1), self.local_dims)

    @property
    def dtype(self) -> torch.dtype:
        """The cores' dtype: that of the matrix the MPO was made from, float32 for a
        float16 or bfloat16 one (see [from_matrix][mpotn.mpo.MPO.from_matrix])."""
        return self.cores[0].dtype

    @property
    def device(self) -> torch.device:
        """The device the cores are on."""
        return self.cores[0].device

    # ------------------------------------------------------------ diagnostics
    def _check_bond(self, bond: int) -> None:
        if not _is_integer(bond) or not 1 <= bond <= self.n - 1:
            raise ValueError(f"bond must be an integer in 1..{self.n - 1}, got {bond!r}")

    def entropy(self, bond: int) -> float:
        """Entanglement entropy ``S_k`` of bond ``k`` (Eq. 6)."""
        self._check_bond(bond)
        return diagnostics.entanglement_entropy(self.singular_values[bond - 1])

    @property
    def entropies(self) -> tuple[float, ...]:
        """``(S_1, ..., S_{n-1})`` (Eq. 6)."""
        return tuple(self.entropy(k) for k in range(1, self.n))

    def truncation_error(self, bond: int, dim: int) -> float:
        """``eps_k`` of keeping ``dim`` values of bond ``k`` (Eq. 3)."""
        self._check_bond(bond)
        if dim < 0:
            raise ValueError(f"a kept dimension must be >= 0, got {dim}")
        return float(diagnostics.truncation_error(self.singular_values[bond - 1], dim))

    def estimated_error(self, bond_dims: Sequence[int]) -> float:
        """Eq. 4 bound on ``||self - self.truncate(bond_dims)||_F``.

        Parameters
        ----------
        bond_dims:
            ``(d_0, ..., d_n)`` or the ``n - 1`` inner dimensions.
        """
        inner = list(bond_dims)
        if len(inner) == self.n + 1:
            inner = inner[1:-1]
        if len(inner) != self.n - 1:
            raise ValueError(f"expected {self.n - 1} inner bond dimensions, got {len(inner)}")
        return diagnostics.error_bound(
            self.truncation_error(k, d) for k, d in enumerate(inner, start=1)
        )

    @property
    def norm(self) -> float:
        """``||MPO||_F``, read off the spectrum of bond 1 (scaled by its largest value, so
        that the squares do not underflow)."""
        values = self.singular_values[0].double()
        top = values.abs().max() if values.numel() else values.new_zeros(())
        return float(top * (values / top).norm()) if top > 0 else 0.0

    def reconstruction_error(self, matrix: torch.Tensor) -> float:
        """Actual ``||matrix - MPO||_F``, rebuilding the matrix."""
        if tuple(matrix.shape) != self.shape:
            raise ValueError(f"reference has shape {tuple(matrix.shape)}, the MPO {self.shape}")
        return float((matrix.to(self.device, self.dtype) - self.to_matrix()).norm())

    def diagnostics(self, reference: torch.Tensor | None = None) -> Table:
        """Every core, every bond and the totals as one table.

        Rows of kind ``core`` give shapes and parameters; rows of kind
        ``bond`` give the full (Eq. 2) and kept dimension, entropy (Eq. 6),
        the error of cutting one more dimension (Eq. 3) and the error
        discarded when this MPO was made; the ``total`` row gives parameters,
        the compression ratio (Eq. 5), the bound (Eq. 4) and, with a
        ``reference`` matrix, the actual error.

        Examples
        --------
        >>> m = torch.randn(12, 10, dtype=torch.float64)
        >>> table = MPO.from_matrix(m, 2, (3, 4), (2, 5)).truncate(max_bond=3).diagnostics(m)
        >>> [row["name"] for row in table]
        ['central', 'bond_1', 'auxiliary_2', 'total']
        >>> total = table[-1]
        >>> bool(abs(total["actual_error"] - total["error_bound"]) < 1e-9)  # one cut: Eq. 4
        True
        """
        blank = dict.fromkeys(
            ("shape", "dim", "full_dim", "entropy", "next_cut_error", "discarded",
             "params", "ratio", "error_bound", "actual_error")
        )
        rows = Table()
        for k, (name, core) in enumerate(zip(self.core_names, self.cores)):
            rows.append({**blank, "name": name, "kind": "core",
                         "shape": "x".join(map(str, core.shape)), "params": core.numel()})
            if k < self.n - 1:
                b = k + 1
                dim = self.bond_dims[b]
                rows.append({
                    **blank, "name": f"bond_{b}", "kind": "bond", "dim": dim,
                    "full_dim": self.full_bond_dims[b], "entropy": self.entropy(b),
                    "next_cut_error": self.truncation_error(b, dim - 1),
                    "discarded": self.discarded[k],
                })
        actual = None if reference is None else self.reconstruction_error(reference)
        rows.append({**blank, "name": "total", "kind": "total", "params": self.num_params,
                     "shape": f"{self.shape[0]}x{self.shape[1]}",
                     "ratio": self.compression_ratio, "error_bound": self.error_bound,
                     "actual_error": actual})
        return Table({"name": r.pop("name"), "kind": r.pop("kind"), **r} for r in rows)

    def summary(self, reference: torch.Tensor | None = None) -> dict[str, Any]:
        """Matrix-level numbers: shapes, bonds, parameters, Eq. 5, Eq. 4, entropies."""
        out: dict[str, Any] = {
            "shape": self.shape,
            "padded_shape": self.padded_shape,
            "n": self.n,
            "row_shape": self.row_shape,
            "col_shape": self.col_shape,
            "bond_dims": self.bond_dims,
            "full_bond_dims": self.full_bond_dims,
            "params": self.num_params,
            "central_params": self.central_params,
            "auxiliary_params": self.auxiliary_params,
            "matrix_params": self.shape[0] * self.shape[1],
            "compression_ratio": self.compression_ratio,
            "entropies": self.entropies,
            "central_bond": self.central_bond,
            "central_entropy": self.entropy(self.central_bond),
            "error_bound": self.error_bound,
            "relative_error_bound": self.error_bound / self.source_norm
            if self.source_norm else 0.0,
        }
        if reference is not None:
            actual = self.reconstruction_error(reference)
            out["actual_error"] = actual
            out["relative_actual_error"] = actual / self.source_norm if self.source_norm else 0.0
        return out

    # ------------------------------------------------------------- truncation
    def truncate(
        self,
        bond_dims: Sequence[int] | Mapping[int, int] | None = None,
        *,
        max_bond: int | None = None,
        tol: float | None = None,
        ratio: float | None = None,
        params: int | None = None,
        allocation: Allocation = "optimal",
        svd: SVDMethod = "full",
    ) -> MPO:
        """A truncated copy; this MPO is left intact. Give exactly one policy.

        Parameters
        ----------
        bond_dims:
            Kept dimension per inner bond: a sequence for bonds ``1..n-1``, or
            a mapping ``{k: d_k}`` naming only the bonds to cut.
        max_bond:
            One maximum for every bond.
        tol:
            Relative tolerance: the fewest parameters whose Eq. 4 bound of this cut
            is at most ``tol`` times this MPO's norm (``||M||_F`` for an exact MPO of
            ``M``; for one truncated already, the new cut's error adds to its
            ``error_bound``).
        ratio:
            Target compression ratio ``rho`` (Eq. 5).
        params:
            Parameter budget (core entries).
        allocation:
            For ``ratio`` / ``params``: ``"optimal"`` spends the budget where
            it lowers the Eq. 4 bound most; ``"uniform"`` scales every bond
            by the same factor.
        svd:
            SVD flavour of the rounding sweep (see [mpotn.linalg][]).

        Raises
        ------
        ValueError
            For no or several policies, a value the policy does not allow
            ([TruncationPolicy][mpotn.truncation.TruncationPolicy]: NaN, infinity, a string,
            a fraction for ``max_bond`` / ``params`` / a bond, ``ratio <= 0``,
            ``tol < 0``), bonds outside ``1..n-1`` or a budget smaller than the
            smallest MPO of this shape. Dimensions above a bond's current size
            are clamped with a warning naming the bond.
        """
        policy = TruncationPolicy(bond_dims, max_bond, tol, ratio, params, allocation)
        if policy.key is None:
            raise ValueError(f"give exactly one truncation policy: {', '.join(POLICY_KEYS)} "
                             "(got none)")
        return self.truncate_to(policy, svd)

    def truncate_to(self, policy: TruncationPolicy, svd: SVDMethod = "full") -> MPO:
        """A copy truncated by ``policy`` (validated when it was made); this MPO itself when
        the policy is full rank.

        Raises
        ------
        ValueError
            For bonds outside ``1..n-1`` or a budget smaller than the smallest
            MPO of this shape (see [truncate][mpotn.mpo.MPO.truncate]).
        """
        if policy.key is None:
            return self
        current, local = self.bond_dims, self.local_dims
        bond_dims, ratio, params = policy.bond_dims, policy.ratio, policy.params
        if bond_dims is not None:
            dims = check_bond_request(bond_dims, current, self.full_bond_dims)
        elif policy.max_bond is not None:
            dims = (1, *(min(policy.max_bond, d) for d in current[1:-1]), 1)
        elif policy.tol is not None:
            dims = dims_for_tolerance(
                self.singular_values, current, local, (policy.tol * self.norm) ** 2
            )
        else:
            if ratio is not None:
                if ratio < self.smallest_ratio:
                    raise ValueError(
                        f"ratio {ratio:g} is below the smallest MPO of this shape "
                        f"(ratio {self.smallest_ratio:.3g}, every bond at 1); ask for more"
                    )
                params = ratio_params(ratio, self.padded_shape[0] * self.padded_shape[1])
            if policy.allocation == "optimal":
                dims = dims_for_budget(self.singular_values, current, local, params)
            else:
                dims = uniform_dims_for_budget(current, local, params)
        return self._round(dims, svd)

    def _round(self, dims: Sequence[int], svd: SVDMethod) -> MPO:
        if tuple(dims) == self.bond_dims:  # nothing to cut: a copy sharing the cores
            return MPO(self.cores, self.row, self.col, self.singular_values,
                       [0.0] * (self.n - 1), self.error_bound, self.source_norm)
        cores = [c.to(SWEEP_DTYPE) for c in self.cores]
        errors = [0.0] * (self.n - 1)
        for k in range(self.n - 1, 0, -1):
            dl, i, j, dr = cores[k].shape
            # cut A^T, so that the kept part is A W W^T (a randomized cut keeps Q Q^T of
            # what it is given): each step then projects on the right and the step errors
            # add up in squares (Eq. 4) whatever the method
            cut = truncated_svd(cores[k].reshape(dl, i * j * dr).mT, dims[k], method=svd)
            errors[k - 1] = float(cut.error)
            cores[k] = cut.U.mT.reshape(-1, i, j, dr)
            cores[k - 1] = torch.tensordot(cores[k - 1], cut.Vh.mT * cut.S, dims=1)
        cores, spectra = _left_sweep(cores)
        cores = [c.to(self.dtype) for c in cores]
        bound = self.error_bound + diagnostics.error_bound(errors)
        return MPO(cores, self.row, self.col, spectra, errors, bound, self.source_norm)

    def gauge_cores(self, gauge: Gauge = "central") -> list[torch.Tensor]:
        """The cores in a chosen gauge; every gauge gives the same matrix.

        ``"left"``
            left-canonical, as Algorithm 1 leaves them: every core but the
            last is a left isometry and the last carries the norm.
        ``"central"``
            mixed-canonical around the central tensor: auxiliary tensors to its
            left are left isometries, to its right right isometries, and the
            central tensor carries the spectrum (``||central||_F = ||M||_F``).
            The gauge the paper's split implies -- the central tensor holds
            the information, the auxiliary tensors are light -- and the one in
            which training only the auxiliary tensors (LFA) works: on
            all-MiniLM-L6-v2 / SST-2 it reaches 81.4% against 72.5% in the left
            gauge (docs: concepts).

        Examples
        --------
        >>> mpo = MPO.from_matrix(torch.randn(64, 96), n=3)
        >>> central = mpo.gauge_cores("central")
        >>> round(float(central[1].norm()) / mpo.norm, 6)
        1.0
        """
        if gauge not in GAUGES:
            raise ValueError(f"gauge must be one of {GAUGES}, got {gauge!r}")
        if gauge == "left":
            return list(self.cores)
        cores = _right_orthogonalize([c.to(SWEEP_DTYPE) for c in self.cores],
                                     center=self.central_index)
        return [c.to(self.dtype) for c in cores]

    # ----------------------------------------------------------- contraction
    def to_matrix(self, padded: bool = False) -> torch.Tensor:
        """Rebuild ``M`` (``I x J``, or the padded matrix)."""
        return self._contractor.rebuild(self.cores, padded=padded)

    def apply(self, x: torch.Tensor, over: Side = "rows", method: Method = "auto") -> torch.Tensor:
        """``x @ M`` (``over="rows"``) or ``x @ M^T`` (``over="cols"``) without forming ``M``.

        ``method="auto"`` picks contraction or rebuild+matmul by modeled time
        ([contraction_cost][mpotn.mpo.MPO.contraction_cost]), or by measurement inside
        [autotuning][mpotn.contraction.autotuning].
        """
        return self._contractor.apply(x, self.cores, over=over, method=method)

    def contraction_cost(self, batch: int, over: Side = "rows") -> ContractionCost:
        """FLOPs and modeled times of [apply][mpotn.mpo.MPO.apply] on ``batch`` vectors, both ways;
        the choice."""
        return self._contractor.cost(batch, [c.shape for c in self.cores], over)

    def to(self, *args: Any, **kwargs: Any) -> MPO:
        """A copy with cores moved / cast like ``torch.Tensor.to``."""
        cores = [c.to(*args, **kwargs) for c in self.cores]
        spectra = [s.to(cores[0].device) for s in self.singular_values]
        return MPO(cores, self.row, self.col, spectra, self.discarded, self.error_bound,
                   self.source_norm)

    # --------------------------------------------------------------- network
    def network(self) -> list:
        """The cores as connected ``tensornetwork`` nodes (built on each call)."""
        return build_network(self.cores, backend="pytorch")

    def to_networkx(self) -> nx.Graph:
        """The network as a networkx graph with bond diagnostics on its edges."""
        bonds = {
            f"bond_{k}": {
                "full_dim": self.full_bond_dims[k],
                "entropy": self.entropy(k),
                "next_cut_error": self.truncation_error(k, self.bond_dims[k] - 1),
                "discarded": self.discarded[k - 1],
            }
            for k in range(1, self.n)
        }
        return to_networkx(self.cores, bond_attributes=bonds)

    def draw(self, path: str | Path, title: str | None = None) -> Path:
        """Draw the network to a PNG or SVG file (edge width: bond dim; colour: entropy)."""
        from mpotn.drawing import draw_network

        return draw_network(self.to_networkx(), path, title=title)

    def __repr__(self) -> str:
        return (
            f"MPO(shape={self.shape}, n={self.n}, row_shape={list(self.row_shape)}, "
            f"col_shape={list(self.col_shape)}, bond_dims={list(self.bond_dims)}, "
            f"params={self.num_params}, ratio={self.compression_ratio:.4g})"
        )
