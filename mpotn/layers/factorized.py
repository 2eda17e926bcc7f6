"""Torch modules whose weight is any [FactorNetwork][mpotn.methods.base.FactorNetwork].

[FactorizedLinear][mpotn.layers.factorized.FactorizedLinear] and
[FactorizedEmbedding][mpotn.layers.factorized.FactorizedEmbedding] hold the tensors of a
decomposition made by a registered method (``tucker``, ``cp``, ``tt``, ``mpo``, ``svd``; see
[mpotn.methods][]) as parameters, by node name; the forward pass contracts or rebuilds, whichever
opt_einsum counts fewer FLOPs for.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from mpotn.methods import FactorNetwork, decompose
from mpotn.shapes import Factorization


class _FactorizedWeight(nn.Module):
    """Shared machinery: the network's tensors as parameters (``factors``), by node name.

    ``legs`` keeps the network's node order and ``network()`` looks every parameter up
    by its name in that order, so the order ``factors`` lists its keys in (an
    ``nn.ParameterDict`` may sort them: ``factor_10`` before ``factor_2``) never pairs
    a tensor with another node's legs.
    """

    #: The layer's kind in a save (see [mpotn.layers.LAYER_KINDS][]).
    KIND: ClassVar[str]
    #: The keys of ``spec()``, all needed by ``from_spec``.
    SPEC_FIELDS: ClassVar[frozenset[str]]
    #: The keys every factorized layer's spec ends with: the network's structure.
    NETWORK_FIELDS = frozenset({"method", "legs", "shapes", "rows", "cols"})

    def __init__(self, network: FactorNetwork) -> None:
        super().__init__()
        self.method = network.method
        self.legs = {name: tuple(network.legs[name]) for name in network.nodes}
        self.row, self.col = network.row, network.col
        self.factors = nn.ParameterDict(
            [(name, nn.Parameter(t.detach().clone())) for name, t in network.nodes.items()])

    def network(self) -> FactorNetwork:
        """The current parameters as a [FactorNetwork][mpotn.methods.base.FactorNetwork] (no
        copy), nodes in the order of ``legs``."""
        return FactorNetwork(self.method, {name: self.factors[name] for name in self.legs},
                             self.legs, self.row, self.col)

    def _network_spec(self) -> dict[str, Any]:
        """The network's structure, as ``spec()`` ends: method, legs and shape of every
        tensor, and the two sides (size, then factors)."""
        return {"method": self.method, "legs": {k: list(v) for k, v in self.legs.items()},
                "shapes": {k: list(p.shape) for k, p in self.factors.items()},
                "rows": [self.row.size, *self.row.factors],
                "cols": [self.col.size, *self.col.factors]}

    @staticmethod
    def _network_from_spec(spec: dict[str, Any], dtype: torch.dtype | None) -> FactorNetwork:
        """A network of zeros with the structure ``spec`` describes (weights load later)."""
        return FactorNetwork(
            spec["method"], {k: torch.zeros(v, dtype=dtype) for k, v in spec["shapes"].items()},
            {k: tuple(v) for k, v in spec["legs"].items()},
            Factorization(spec["rows"][0], tuple(spec["rows"][1:])),
            Factorization(spec["cols"][0], tuple(spec["cols"][1:])))


class FactorizedLinear(_FactorizedWeight):
    """A linear layer whose ``in x out`` matrix is any
    [FactorNetwork][mpotn.methods.base.FactorNetwork].

    The network's tensors are the parameters (``factors``, by node name); the
    forward pass contracts the input with them or rebuilds the weight,
    whichever opt_einsum counts fewer FLOPs for. Made by
    [from_linear][mpotn.layers.factorized.FactorizedLinear.from_linear] with a registered method
    (``tucker``, ``cp``, ``tt``, ``mpo``, ``svd``) or from a decomposition already computed.

    Examples
    --------
    >>> linear = nn.Linear(48, 64)
    >>> layer = FactorizedLinear.from_linear(linear, "tucker", n=2)
    >>> x = torch.randn(3, 48)
    >>> bool(torch.allclose(layer(x), linear(x), atol=1e-5))
    True
    """

    KIND = "factorized-linear"
    SPEC_FIELDS = frozenset({"kind", "bias"}) | _FactorizedWeight.NETWORK_FIELDS

    def __init__(self, network: FactorNetwork, bias: bool = True) -> None:
        super().__init__(network)
        self.in_features, self.out_features = network.shape
        sample = next(iter(network.nodes.values()))
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=sample.dtype,
                                             device=sample.device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str = "tucker", **options: Any
                    ) -> FactorizedLinear:
        """Decompose ``linear.weight.T`` with ``method`` (see
        [mpotn.methods.decompose][mpotn.methods.base.decompose])."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        network = decompose(linear.weight.detach().T, method, **options)
        layer = cls(network, bias=linear.bias is not None)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def spec(self) -> dict[str, Any]:
        """What rebuilds this layer's structure (its entry in a save's ``layers``): kind
        ``"factorized-linear"``, bias or not, and the network's structure."""
        return {"kind": self.KIND, "bias": self.bias is not None, **self._network_spec()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype | None = None
                  ) -> FactorizedLinear:
        """An untrained layer of the structure ``spec`` describes, in ``dtype``."""
        return cls(cls._network_from_spec(spec, dtype), bias=spec["bias"])

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``out x in`` weight (rebuilt)."""
        return self.network().rebuild().mT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.network().apply(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)  # as under autocast

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"method={self.method!r}, params={sum(p.numel() for p in self.factors.values())}")


class FactorizedEmbedding(_FactorizedWeight):
    """An embedding table stored as any [FactorNetwork][mpotn.methods.base.FactorNetwork] (rebuilt
    per call)."""

    KIND = "factorized-embedding"
    SPEC_FIELDS = frozenset({"kind", "padding_idx"}) | _FactorizedWeight.NETWORK_FIELDS

    def __init__(self, network: FactorNetwork, padding_idx: int | None = None) -> None:
        super().__init__(network)
        self.num_embeddings, self.embedding_dim = network.shape
        self.padding_idx = padding_idx

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, method: str = "tucker", **options: Any
                       ) -> FactorizedEmbedding:
        """Decompose ``embedding.weight`` (``vocab x dim``) with ``method``."""
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(
                f"from_embedding needs an nn.Embedding, got {type(embedding).__name__}")
        return cls(decompose(embedding.weight.detach(), method, **options),
                   embedding.padding_idx)

    def spec(self) -> dict[str, Any]:
        """What rebuilds this layer's structure (its entry in a save's ``layers``): kind
        ``"factorized-embedding"``, ``padding_idx``, and the network's structure."""
        return {"kind": self.KIND, "padding_idx": self.padding_idx, **self._network_spec()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype | None = None
                  ) -> FactorizedEmbedding:
        """An untrained layer of the structure ``spec`` describes, in ``dtype``."""
        return cls(cls._network_from_spec(spec, dtype), spec["padding_idx"])

    @property
    def weight(self) -> torch.Tensor:
        return self.network().rebuild()

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        weight = next(iter(self.parameters()))
        # in the factors' dtype, as nn.Embedding (which autocast leaves alone)
        with torch.autocast(weight.device.type, enabled=False):
            return nn.functional.embedding(indices, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, method={self.method!r}"
