"""Torch modules whose weight is a decomposition.

[mpotn.layers.mpo][] holds [MPOLinear][mpotn.layers.mpo.MPOLinear] and
[MPOEmbedding][mpotn.layers.mpo.MPOEmbedding] (the weight is an MPO; central and auxiliary tensors
are parameter groups; a [TruncationPolicy][mpotn.truncation.TruncationPolicy] cuts them);
[mpotn.layers.factorized][] holds [FactorizedLinear][mpotn.layers.factorized.FactorizedLinear] and
[FactorizedEmbedding][mpotn.layers.factorized.FactorizedEmbedding] (the weight is any
[FactorNetwork][mpotn.methods.base.FactorNetwork]).
"""

from mpotn.layers.factorized import FactorizedEmbedding, FactorizedLinear
from mpotn.layers.mpo import MPOEmbedding, MPOLinear

__all__ = [
    "FactorizedEmbedding",
    "FactorizedLinear",
    "MPOEmbedding",
    "MPOLinear",
]
