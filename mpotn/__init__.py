"""mpotn: matrix product operators for compressing pre-trained language models.

The layers, bottom up: :mod:`mpotn.shapes` (factorizations, Eq. 2) and
:mod:`mpotn.linalg` (SVDs) -> :mod:`mpotn.diagnostics` (Eqs. 3-6) and
:mod:`mpotn.allocation` (truncation policies) -> :mod:`mpotn.network`
(the tensornetwork graph), :mod:`mpotn.contraction` (compiled contractions)
and :mod:`mpotn.mpo` (the MPO object) -> :mod:`mpotn.models` (Hugging Face
adapters) -> :mod:`mpotn.inspection` and :mod:`mpotn.cli`.
"""

from mpotn.contraction import ContractionCost
from mpotn.mpo import MPO
from mpotn.shapes import Factorization, factorize, full_bond_dims, pad_to_factorable
from mpotn.table import Table

__all__ = [
    "MPO",
    "ContractionCost",
    "Factorization",
    "Table",
    "factorize",
    "full_bond_dims",
    "pad_to_factorable",
]
__version__ = "0.1.0"
