"""Torch modules whose weight is a decomposition.

:mod:`mpotn.layers.mpo` holds :class:`MPOLinear` and :class:`MPOEmbedding`
(the weight is an MPO; central and auxiliary tensors are parameter groups) and
the truncation helper :func:`apply_policy`; :mod:`mpotn.layers.factorized`
holds :class:`FactorizedLinear` and :class:`FactorizedEmbedding` (the weight is
any :class:`~mpotn.methods.FactorNetwork`).
"""

from mpotn.layers.factorized import FactorizedEmbedding, FactorizedLinear
from mpotn.layers.mpo import TRUNCATION_KEYS, MPOEmbedding, MPOLinear, apply_policy

__all__ = [
    "TRUNCATION_KEYS",
    "FactorizedEmbedding",
    "FactorizedLinear",
    "MPOEmbedding",
    "MPOLinear",
    "apply_policy",
]
