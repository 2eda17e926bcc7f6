"""Torch modules whose weight is a decomposition.

[mpotn.layers.mpo][] holds [MPOLinear][mpotn.layers.mpo.MPOLinear] and
[MPOEmbedding][mpotn.layers.mpo.MPOEmbedding] (the weight is an MPO; central and auxiliary tensors
are parameter groups) and the truncation helper [apply_policy][mpotn.layers.mpo.apply_policy];
[mpotn.layers.factorized][] holds [FactorizedLinear][mpotn.layers.factorized.FactorizedLinear] and
[FactorizedEmbedding][mpotn.layers.factorized.FactorizedEmbedding] (the weight is any
[FactorNetwork][mpotn.methods.base.FactorNetwork]).
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
