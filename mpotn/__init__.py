"""mpotn: matrix product operators for compressing pre-trained language models.

The package is layered; every import points down, never up (a test,
``tests/test_architecture.py``, checks it):

0. **core** (flat modules): :mod:`mpotn.types` (allowed values),
   :mod:`mpotn.shapes` (factorizations, Eq. 2), :mod:`mpotn.linalg` (SVDs),
   :mod:`mpotn.diagnostics` (Eqs. 3-6), :mod:`mpotn.truncation` (choosing
   bond dimensions), :mod:`mpotn.network` (the tensornetwork graph),
   :mod:`mpotn.contraction` (compiled contractions), :mod:`mpotn.mpo` (the MPO
   object); the utilities :mod:`mpotn.table`, :mod:`mpotn.atomic` and
   :mod:`mpotn.drawing` sit here too because the core uses them
   (``MPO.diagnostics`` returns a table, ``MPO.draw`` draws). The task
   package :mod:`mpotn.data` (specs, metrics, local files, the hub) imports
   only core and sits at the same level.
1. :mod:`mpotn.methods` -- decompositions as registered plug-ins (``mpo``,
   ``tt``, ``tucker``, ``cp``) and :class:`~mpotn.methods.FactorNetwork`.
2. :mod:`mpotn.layers` -- torch modules: MPO and factorized layers.
3. :mod:`mpotn.compression` -- targets, :class:`MPOModel`, :func:`compress`,
   saving and loading, Hugging Face helpers.
4. :mod:`mpotn.finetune` -- strategies, the Trainer wrapper, squeezing.
5. :mod:`mpotn.analysis` -- inspection, comparison, fidelity, reports.
6. :mod:`mpotn.cli` -- the ``mpotn`` command, one module per subcommand.
"""

from mpotn.compression.compress import compress
from mpotn.compression.config import CompressionConfig
from mpotn.compression.model import MPOModel, load
from mpotn.contraction import ContractionCost
from mpotn.layers import MPOEmbedding, MPOLinear
from mpotn.mpo import MPO
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
