"""Torch modules whose weight is an MPO: [MPOLinear][mpotn.layers.mpo.MPOLinear] and
[MPOEmbedding][mpotn.layers.mpo.MPOEmbedding], and
[TiedMPOLinear][mpotn.layers.mpo.TiedMPOLinear], an output layer that reads an
``MPOEmbedding``'s cores (a tied language-model head).

The cores are parameters, grouped as the ``central`` tensor and the
``auxiliary`` tensors (SPEC §2: lightweight fine-tuning trains only the
auxiliary ones); the bias of a linear layer stays a plain parameter. The
layers' structure (bonds, central and auxiliary tensors, parameter counts, the
ratio of Eq. 5) is [MPOStructure][mpotn.mpo.MPOStructure]'s, as an
[MPO][mpotn.mpo.MPO]'s is, and ``spec()`` / ``from_spec()`` describe and rebuild
it for saves (see [mpotn.layers][]).

In eval mode, when no gradient is needed, the rebuilt weight is cached and
reused until a core changes (an optimizer step, ``load_state_dict``, or any
in-place edit of a core; an edit through ``core.data`` bypasses the version
counter PyTorch keeps, so call ``clear_cache()`` after one). A weight cached
under ``torch.inference_mode`` is used only there.

[MPOLinear][mpotn.layers.mpo.MPOLinear]'s forward pass chooses between contracting the input with
the cores and rebuilding the weight (one fused matmul with the bias), once
per batch size, grad mode and core shapes, then looks the choice up (see
[mpotn.contraction][]). The choice is by *modeled time*, not by FLOP count:
[Contractor.cost][mpotn.contraction.Contractor.cost] charges each way's FLOPs
at a rate that depends on the summed index size, plus its memory traffic and
per-step overhead. When the weight is cached, contracting is weighed against
the matmul with the cached weight alone; otherwise, with autotuning on
([autotuning][mpotn.contraction.autotuning] or ``MPOTN_AUTOTUNE=1``), both
ways are timed once and the faster is kept. [MPOEmbedding][mpotn.layers.mpo.MPOEmbedding] indexes
the cached table when there is one, and otherwise gathers rows through
[Contractor.lookup][mpotn.contraction.Contractor.lookup] (modeled time).
[TiedMPOLinear][mpotn.layers.mpo.TiedMPOLinear] multiplies by the embedding's cached table
when there is one, and otherwise contracts or rebuilds by modeled time (decided once per
batch size and core shapes, without autotuning). Compiled contraction
expressions are cached per shape.

Examples
--------
>>> import torch
>>> from torch import nn
>>> dense = nn.Linear(64, 48)
>>> layer = MPOLinear.from_linear(dense, n=3)
>>> x = torch.randn(5, 64)
>>> with torch.no_grad():
...     float((layer(x) - dense(x)).abs().max()) < 1e-5
True
>>> layer.freeze_central(); layer.num_trainable() == layer.auxiliary_params + 48
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from mpotn.contraction import Contractor, autotune_enabled
from mpotn.mpo import MPO, MPOStructure
from mpotn.shapes import full_bond_dims, plan_side
from mpotn.truncation import TruncationPolicy
from mpotn.types import Gauge


class _MPOWeight(MPOStructure, nn.Module):
    """Shared machinery: cores as parameters, groups, freezing, cached rebuild.

    The structure (``bond_dims``, ``central``, ``auxiliary``, parameter counts,
    ``compression_ratio``, ...) is [MPOStructure][mpotn.mpo.MPOStructure]'s, as for an
    [MPO][mpotn.mpo.MPO].

    Parameters
    ----------
    rows, cols:
        Sizes of the matrix's two sides (``I``, ``J``).
    row_shape, col_shape:
        Factors of ``rows`` / ``cols`` (products may exceed them: zero-padding);
        chosen automatically when omitted.
    bond_dims:
        ``(1, d_1, ..., d_{n-1}, 1)``; the full bonds of Eq. 2 when omitted.
    n:
        Number of cores when the shapes are chosen automatically.
    """

    #: The layer's kind in a save (see [mpotn.layers.LAYER_KINDS][]).
    KIND: ClassVar[str]
    #: The keys of [spec][mpotn.layers.mpo.MPOLinear.spec], all needed by ``from_spec``.
    SPEC_FIELDS: ClassVar[frozenset[str]]

    def __init__(
        self,
        rows: int,
        cols: int,
        row_shape: Sequence[int] | None,
        col_shape: Sequence[int] | None,
        bond_dims: Sequence[int] | None,
        n: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        n = len(row_shape) if row_shape is not None else n
        row, col = plan_side(rows, n, row_shape), plan_side(cols, n, col_shape)
        bond_dims = bond_dims or full_bond_dims(row.factors, col.factors)
        n = len(row.factors)
        if n < 2:
            raise ValueError(f"an MPO layer needs n >= 2 cores (a chain with a bond), got n={n}; "
                             "a dense matrix is nn.Linear")
        if len(bond_dims) != n + 1 or bond_dims[0] != 1 or bond_dims[-1] != 1:
            raise ValueError(
                f"bond_dims must be (1, d_1, ..., d_{n - 1}, 1) with {n + 1} entries, "
                f"got {list(bond_dims)}"
            )
        self.row, self.col = row, col
        self.contractor = Contractor(row, col)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(bond_dims[k], i, j, bond_dims[k + 1], dtype=dtype,
                                     device=device))
            for k, (i, j) in enumerate(zip(row.factors, col.factors))
        )
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self._methods: dict[tuple, str] = {}

    @classmethod
    def _from_matrix(cls, matrix: torch.Tensor, mpo: MPO | None, gauge: Gauge,
                     truncation: dict[str, Any], decomposition: dict[str, Any],
                     **options: Any) -> Any:
        """A layer of ``matrix``'s shape holding ``mpo`` (or Algorithm 1 on ``matrix``),
        truncated by ``truncation`` (keyword arguments of
        [TruncationPolicy][mpotn.truncation.TruncationPolicy]) and stored in ``gauge``;
        ``decomposition`` goes to [MPO.from_matrix][mpotn.mpo.MPO.from_matrix] and
        ``options`` (``bias``, ``padding_idx``) to the constructor."""
        policy = TruncationPolicy.from_settings(truncation, strict=True)
        if mpo is None:  # bonds known up front are kept while decomposing (randomized: svd)
            mpo = MPO.from_matrix(matrix, **decomposition, max_bond=policy.max_bond,
                                  bond_dims=policy.bond_dims)
        mpo = mpo.truncate_to(policy, svd=decomposition["svd"])
        layer = cls(*matrix.shape, mpo.row_shape, mpo.col_shape, mpo.bond_dims,
                    dtype=matrix.dtype, device=matrix.device, **options)
        with torch.no_grad():
            for param, core in zip(layer.cores, mpo.gauge_cores(gauge)):
                param.copy_(core)
        return layer

    def _structure_spec(self) -> dict[str, list[int]]:
        """The factorization and bonds, as [spec][mpotn.layers.mpo.MPOLinear.spec] ends."""
        return {"row_shape": list(self.row.factors), "col_shape": list(self.col.factors),
                "bond_dims": list(self.bond_dims)}

    def num_trainable(self) -> int:
        """Parameters of this module that require a gradient."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def freeze_central(self, frozen: bool = True) -> None:
        """Stop (or with ``frozen=False`` resume) training the central tensor."""
        self.central.requires_grad_(not frozen)

    def freeze_auxiliary(self, frozen: bool = True) -> None:
        """Stop (or with ``frozen=False`` resume) training the auxiliary tensors."""
        for core in self.auxiliary:
            core.requires_grad_(not frozen)

    def mpo(self) -> MPO:
        """The current cores as a canonical [MPO][mpotn.mpo.MPO] (for diagnostics)."""
        return MPO.from_cores([c.detach() for c in self.cores], (self.row.size, self.col.size))

    def load_mpo(self, mpo: MPO, gauge: Gauge = "central") -> None:
        """Take ``mpo``'s cores (in ``gauge``) as this layer's parameters.

        Bond dimensions may change: this is how a bond of a trained layer is
        cut (``layer.load_mpo(layer.mpo().truncate(...))``). Each core keeps
        its trainable / frozen state; dtype and device stay.

        Examples
        --------
        >>> layer = MPOLinear(16, 16, n=3)
        >>> layer.load_mpo(layer.mpo().truncate(bond_dims={1: 2}))
        >>> layer.bond_dims
        (1, 2, 4, 1)

        Raises
        ------
        ValueError
            If the MPO's factorization differs from this layer's, or this layer's
            central tensor is shared with other layers
            (``mpotn.compression.sharing.share_centrals``): new cores
            here would silently give this layer its own copy.
        """
        shared = getattr(self, "_shared_central", None)
        if shared is not None and shared[0] is self.central:
            raise ValueError(
                f"this layer's central tensor is shared by {shared[1]} layers; load_mpo would "
                "give this layer its own copy and silently unshare it. Cut a bond of the shared "
                "central for the whole group with mpotn.compression.sharing.cut_shared_bond "
                "(squeezing does)")
        if mpo.row_shape != self.row.factors or mpo.col_shape != self.col.factors:
            raise ValueError(
                f"the MPO is {list(mpo.row_shape)} x {list(mpo.col_shape)} but this layer is "
                f"{list(self.row.factors)} x {list(self.col.factors)}"
            )
        old = self.cores[0]
        self.cores = nn.ParameterList(
            nn.Parameter(core.detach().to(device=old.device, dtype=old.dtype).clone(),
                         requires_grad=previous.requires_grad)
            for core, previous in zip(mpo.gauge_cores(gauge), self.cores)
        )
        self._cache = None

    def _init_random(self, variance: float) -> None:
        """Cores whose product has entries of about ``variance`` (Gaussian)."""
        inner = math.prod(self.bond_dims[1:-1])
        std = (variance / inner) ** (1 / (2 * self.n))
        with torch.no_grad():
            for core in self.cores:
                core.normal_(0.0, std)

    # ------------------------------------------------------------ forward
    def _core_tensors(self) -> list[nn.Parameter]:
        """The cores in chain order, read from the ``ParameterList``'s registry.

        Indexing a ``ParameterList`` goes through a string attribute lookup per
        core; on the forward path of a small batch that is a measurable share.
        """
        return list(self.cores._parameters.values())

    def _cache_usable(self, cores: list[nn.Parameter] | None = None) -> bool:
        cores = self._core_tensors() if cores is None else cores
        return not self.training and not (
            torch.is_grad_enabled() and any(c.requires_grad for c in cores)
        )

    def matrix(self) -> torch.Tensor:
        """The ``I x J`` matrix, cached in eval mode until a core changes."""
        cores = self._core_tensors()
        if not self._cache_usable(cores):
            self._cache = None
            return self.contractor.rebuild(cores)
        key = (torch.is_inference_mode_enabled(),
               *((c.data_ptr(), c._version, c.dtype, c.device) for c in cores))
        if self._cache is None or self._cache[0] != key:
            kind = cores[0].device.type  # in the cores' dtype, also under autocast
            with torch.no_grad(), torch.autocast(kind, enabled=False):
                self._cache = (key, self.contractor.rebuild(cores))
        return self._cache[1]

    def clear_cache(self) -> None:
        """Drop the weight cached in eval mode (needed only after editing a core through
        ``.data``, which PyTorch does not count as a change)."""
        self._cache = None

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self.clear_cache()  # .to(), .half(), ... invalidate the cached matrix
        self._methods.clear()  # and the contract-or-rebuild choices timed on the old ones
        return super()._apply(fn, recurse)


class MPOLinear(_MPOWeight):
    """A linear layer ``y = x M + b`` whose ``in x out`` matrix ``M = W^T`` is an MPO.

    Parameters
    ----------
    in_features, out_features:
        Sizes of the input and output.
    row_shape, col_shape:
        Factors of ``in_features`` / ``out_features`` (products may exceed
        them: zero-padding); chosen automatically when omitted.
    bond_dims:
        ``(1, d_1, ..., d_{n-1}, 1)``; the full bonds of Eq. 2 when omitted.
    n:
        Number of cores when the shapes are chosen automatically.
    bias:
        Whether to learn an additive bias.
    """

    KIND = "linear"
    SPEC_FIELDS = frozenset({"kind", "in_features", "out_features", "bias", "row_shape",
                             "col_shape", "bond_dims"})

    def __init__(
        self,
        in_features: int,
        out_features: int,
        row_shape: Sequence[int] | None = None,
        col_shape: Sequence[int] | None = None,
        bond_dims: Sequence[int] | None = None,
        *,
        n: int = 5,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, row_shape, col_shape, bond_dims, n, dtype,
                         device)
        self.in_features, self.out_features = in_features, out_features
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        )
        self._init_random(1 / (3 * in_features))  # the variance of nn.Linear's init

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        n: int = 5,
        row_shape: Sequence[int] | None = None,
        col_shape: Sequence[int] | None = None,
        *,
        svd: str = "auto",
        mpo: MPO | None = None,
        gauge: Gauge = "central",
        **truncation: Any,
    ) -> MPOLinear:
        """Decompose a pre-trained ``nn.Linear`` (its ``W^T``) into an MPO layer.

        Parameters
        ----------
        linear:
            The layer to replace; its bias is copied.
        n, row_shape, col_shape, svd:
            As in [MPO.from_matrix][mpotn.mpo.MPO.from_matrix].
        mpo:
            An MPO of ``linear.weight.T`` computed already (skips the decomposition).
        gauge:
            How the cores are stored ([MPO.gauge_cores][mpotn.mpo.MPO.gauge_cores]): ``"central"``
            (the central tensor carries the spectrum, auxiliary tensors are
            isometries; what LFA needs) or ``"left"`` (Algorithm 1 as printed).
        **truncation:
            One of ``bond_dims``, ``max_bond``, ``tol``, ``ratio``, ``params``
            (and ``allocation``), as in [MPO.truncate][mpotn.mpo.MPO.truncate]; full rank if none.
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        layer = cls._from_matrix(
            linear.weight.detach().T, mpo, gauge, truncation,
            {"n": n, "row_shape": row_shape, "col_shape": col_shape, "svd": svd},
            bias=linear.bias is not None)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def spec(self) -> dict[str, Any]:
        """What rebuilds this layer's structure (its entry in a save's ``layers``): kind
        ``"linear"``, sizes, bias or not, factorization and bonds; see
        [from_spec][mpotn.layers.mpo.MPOLinear.from_spec].

        Examples
        --------
        >>> MPOLinear(6, 4, n=2).spec()  # doctest: +NORMALIZE_WHITESPACE
        {'kind': 'linear', 'in_features': 6, 'out_features': 4, 'bias': True,
         'row_shape': [3, 2], 'col_shape': [2, 2], 'bond_dims': [1, 4, 1]}
        """
        return {"kind": self.KIND, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None,
                **self._structure_spec()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype | None = None) -> MPOLinear:
        """An untrained layer of the structure [spec][mpotn.layers.mpo.MPOLinear.spec]
        describes, its parameters in ``dtype`` (the weights are loaded afterwards)."""
        return cls(spec["in_features"], spec["out_features"], spec["row_shape"],
                   spec["col_shape"], spec["bond_dims"], bias=spec["bias"], dtype=dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``out x in`` weight, as ``nn.Linear`` stores it (rebuilt)."""
        return self.matrix().mT

    def _method(self, batch: int, cores: list[nn.Parameter]) -> str:
        """Contract or rebuild for this batch size: decided once per situation, then looked up."""
        grad = torch.is_grad_enabled() and any(c.requires_grad for c in cores)
        cached = not self.training and not grad
        key = (batch, cached, grad, autotune_enabled(), tuple(c.shape for c in cores))
        method = self._methods.get(key)
        if method is None:
            cost = self.contractor.cost(batch, [c.shape for c in cores])
            if cached:  # the weight is (or will be) cached: only the matmul remains
                method = "contract" if cost.contract_seconds < cost.dense_seconds else "rebuild"
            elif autotune_enabled():
                method = self.contractor.tuned_method(batch, cores, bias=self.bias is not None)
            else:
                method = cost.method
            self._methods[key] = method
        return method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cores = self._core_tensors()
        method = self._method(math.prod(x.shape[:-1]), cores)
        if method == "rebuild":  # one fused GEMM with the bias, as nn.Linear does
            return nn.functional.linear(x, self.matrix().mT, self.bias)
        y = self.contractor.apply(x, cores, method="contract")
        return y if self.bias is None else y + self.bias.to(y.dtype)  # as under autocast

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"row_shape={list(self.row.factors)}, col_shape={list(self.col.factors)}, "
            f"bond_dims={list(self.bond_dims)}, bias={self.bias is not None}"
        )


class MPOEmbedding(_MPOWeight):
    """An embedding table (``num_embeddings x embedding_dim``) stored as an MPO.

    ``padding_idx`` is kept for reference only: the row it names is a product
    of shared cores, so its gradient cannot be masked as ``nn.Embedding`` does.
    """

    KIND = "embedding"
    SPEC_FIELDS = frozenset({"kind", "num_embeddings", "embedding_dim", "padding_idx",
                             "row_shape", "col_shape", "bond_dims"})

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        row_shape: Sequence[int] | None = None,
        col_shape: Sequence[int] | None = None,
        bond_dims: Sequence[int] | None = None,
        *,
        n: int = 5,
        padding_idx: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, row_shape, col_shape, bond_dims, n,
                         dtype, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self._init_random(1.0)  # nn.Embedding's N(0, 1)

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        n: int = 5,
        row_shape: Sequence[int] | None = None,
        col_shape: Sequence[int] | None = None,
        *,
        svd: str = "auto",
        mpo: MPO | None = None,
        gauge: Gauge = "central",
        **truncation: Any,
    ) -> MPOEmbedding:
        """Decompose a pre-trained ``nn.Embedding`` (``vocab x dim``) into an MPO layer.

        Arguments as in [MPOLinear.from_linear][mpotn.layers.mpo.MPOLinear.from_linear].
        ``max_norm``, ``scale_grad_by_freq`` and ``sparse`` embeddings are not supported.
        """
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(
                f"from_embedding needs an nn.Embedding, got {type(embedding).__name__}"
            )
        if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
            raise ValueError(
                "embeddings with max_norm, scale_grad_by_freq or sparse gradients cannot "
                "be decomposed; rebuild the nn.Embedding without them first"
            )
        return cls._from_matrix(
            embedding.weight.detach(), mpo, gauge, truncation,
            {"n": n, "row_shape": row_shape, "col_shape": col_shape, "svd": svd},
            padding_idx=embedding.padding_idx)

    def spec(self) -> dict[str, Any]:
        """What rebuilds this layer's structure (its entry in a save's ``layers``): kind
        ``"embedding"``, sizes, ``padding_idx``, factorization and bonds."""
        return {"kind": self.KIND, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx,
                **self._structure_spec()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype | None = None
                  ) -> MPOEmbedding:
        """An untrained layer of the structure [spec][mpotn.layers.mpo.MPOEmbedding.spec]
        describes, its parameters in ``dtype``."""
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["row_shape"],
                   spec["col_shape"], spec["bond_dims"], padding_idx=spec["padding_idx"],
                   dtype=dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``num_embeddings x embedding_dim`` table (rebuilt)."""
        return self.matrix()

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        cores = self._core_tensors()
        # in the cores' dtype, as nn.Embedding (which autocast leaves alone), in every mode
        with torch.autocast(cores[0].device.type, enabled=False):
            if self._cache_usable(cores):
                return nn.functional.embedding(indices, self.matrix())
            return self.contractor.lookup(indices, cores)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, row_shape={list(self.row.factors)}, "
            f"col_shape={list(self.col.factors)}, bond_dims={list(self.bond_dims)}"
        )


class TiedMPOLinear(nn.Module):
    """An output layer ``y = x E^T + b`` whose weight is the table ``E`` of an
    [MPOEmbedding][mpotn.layers.mpo.MPOEmbedding]: a language model's head tied to its input
    embedding (GPT-2's ``lm_head`` and ``wte``, T5's ``lm_head`` and ``shared``).

    It owns no cores: it reads the embedding's, so compressing, fine-tuning or
    squeezing the embedding changes both, as tying does in the dense model, and
    the shared matrix is counted once. The embedding is referenced, not held as
    a submodule (its parameters appear once in ``state_dict``); a save records
    its module name (``tied_to``) and [tie_layers][mpotn.layers.tie_layers]
    links the two again after loading.

    Parameters
    ----------
    tied_to:
        Module name of the embedding in the model.
    in_features, out_features:
        ``embedding_dim`` and ``num_embeddings`` of the embedding.
    bias:
        Whether to learn an additive bias (of ``out_features``).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> table = nn.Embedding(40, 12)
    >>> embedding = MPOEmbedding.from_embedding(table, n=2)
    >>> head = TiedMPOLinear("wte", 12, 40, bias=False)
    >>> head.tie(embedding)
    >>> x = torch.randn(3, 12)
    >>> with torch.no_grad():
    ...     float((head(x) - x @ table.weight.T).abs().max()) < 1e-5
    True
    """

    KIND = "tied-linear"
    SPEC_FIELDS = frozenset({"kind", "tied_to", "in_features", "out_features", "bias"})

    def __init__(self, tied_to: str, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None
                 ) -> None:
        super().__init__()
        self.tied_to, self.in_features, self.out_features = tied_to, in_features, out_features
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        )
        self._embedding: tuple[MPOEmbedding, ...] = ()  # a reference, not a submodule
        self._methods: dict[tuple, str] = {}  # contract or rebuild, per batch and core shapes

    @classmethod
    def from_linear(cls, linear: nn.Linear, embedding: MPOEmbedding, tied_to: str
                    ) -> TiedMPOLinear:
        """The layer replacing ``linear`` (whose weight was ``embedding``'s table), tied to
        ``embedding`` (the module named ``tied_to``); the bias is copied."""
        layer = cls(tied_to, linear.in_features, linear.out_features, linear.bias is not None,
                    dtype=linear.weight.dtype, device=linear.weight.device)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        layer.tie(embedding)
        return layer

    def tie(self, embedding: nn.Module) -> None:
        """Read the weight from ``embedding`` from now on.

        Raises
        ------
        ValueError
            If ``embedding`` is not an ``MPOEmbedding`` of ``out_features x in_features``.
        """
        if not isinstance(embedding, MPOEmbedding) or (
                embedding.num_embeddings, embedding.embedding_dim) != (
                self.out_features, self.in_features):
            raise ValueError(
                f"a tied output layer of {self.in_features} -> {self.out_features} needs an "
                f"MPOEmbedding of {self.out_features} x {self.in_features} at {self.tied_to!r}, "
                f"got {type(embedding).__name__}"
                + (f" of {embedding.num_embeddings} x {embedding.embedding_dim}"
                   if isinstance(embedding, MPOEmbedding) else ""))
        self._embedding = (embedding,)

    @property
    def embedding(self) -> MPOEmbedding:
        """The embedding whose table is the weight."""
        if not self._embedding:
            raise RuntimeError(f"this output layer is not tied to its embedding "
                               f"{self.tied_to!r} yet; call mpotn.layers.tie_layers(model)")
        return self._embedding[0]

    def spec(self) -> dict[str, Any]:
        """Kind ``"tied-linear"``, the embedding's module name, sizes and bias or not.

        Examples
        --------
        >>> TiedMPOLinear("wte", 12, 40).spec()  # doctest: +NORMALIZE_WHITESPACE
        {'kind': 'tied-linear', 'tied_to': 'wte', 'in_features': 12, 'out_features': 40,
         'bias': False}
        """
        return {"kind": self.KIND, "tied_to": self.tied_to, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype | None = None
                  ) -> TiedMPOLinear:
        """An untied layer of the structure [spec][mpotn.layers.mpo.TiedMPOLinear.spec]
        describes; [tie_layers][mpotn.layers.tie_layers] links it to its embedding."""
        return cls(spec["tied_to"], spec["in_features"], spec["out_features"], spec["bias"],
                   dtype=dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``out x in`` weight: the embedding's table (rebuilt or cached)."""
        return self.embedding.matrix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding = self.embedding
        cores = embedding._core_tensors()
        shapes = tuple(c.shape for c in cores)
        key = (math.prod(x.shape[:-1]), shapes)
        method = self._methods.get(key)
        if method is None:  # decided once per batch size and core shapes, then looked up
            method = self._methods[key] = embedding.contractor.cost(
                key[0], shapes, over="cols").method
        if method == "rebuild" or embedding._cache_usable(cores):
            return nn.functional.linear(x, embedding.matrix(), self.bias)
        y = embedding.contractor.apply(x, cores, over="cols", method="contract")
        return y if self.bias is None else y + self.bias.to(y.dtype)  # as under autocast

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"tied_to={self.tied_to!r}, bias={self.bias is not None}")
