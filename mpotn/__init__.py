"""mpotn: matrix product operators for compressing pre-trained language models.

The layers, bottom up: :mod:`mpotn.shapes` (factorizations, Eq. 2) and
:mod:`mpotn.linalg` (SVDs) -> :mod:`mpotn.diagnostics` (Eqs. 3-6) and
:mod:`mpotn.allocation` (truncation policies) -> :mod:`mpotn.network`
(the tensornetwork graph), :mod:`mpotn.contraction` (compiled contractions)
and :mod:`mpotn.mpo` (the MPO object) -> :mod:`mpotn.layers` (torch modules)
-> :mod:`mpotn.models`, :mod:`mpotn.compress` and :mod:`mpotn.serialization`
(Hugging Face adapters, compression, saving), :mod:`mpotn.data` and
:mod:`mpotn.evaluation` (tasks, metrics, fidelity) -> :mod:`mpotn.inspection`,
:mod:`mpotn.reports` and :mod:`mpotn.cli`.
"""

from mpotn.compress import CompressionConfig, MPOModel, compress
from mpotn.contraction import ContractionCost
from mpotn.layers import MPOEmbedding, MPOLinear
from mpotn.mpo import MPO
from mpotn.serialization import load
from mpotn.shapes import Factorization, factorize, full_bond_dims, pad_to_factorable
from mpotn.table import Table

__all__ = [
    "MPO",
    "CompressionConfig",
    "ContractionCost",
    "Factorization",
    "MPOEmbedding",
    "MPOLinear",
    "MPOModel",
    "Table",
    "compress",
    "factorize",
    "full_bond_dims",
    "load",
    "pad_to_factorable",
]
__version__ = "0.1.0"
