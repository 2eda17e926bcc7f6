"""mpotn: matrix product operators for compressing pre-trained language models.

The package is layered; every import points down, never up, and no import
cycle exists (``tests/test_architecture.py`` parses every module's imports,
function-level ones included, and checks both):

0. **core** (flat modules): [mpotn.types][] (allowed values),
   [mpotn.shapes][] (factorizations, Eq. 2), [mpotn.linalg][] (SVDs),
   [mpotn.diagnostics][] (Eqs. 3-6), [mpotn.truncation][] (the truncation
   policy and choosing bond dimensions), [mpotn.network][] (the tensornetwork graph),
   [mpotn.contraction][] (compiled contractions), [mpotn.mpo][] (the MPO
   object), [mpotn.calibration][] (truncation that minimises the output
   error, Eq. 7) and [mpotn.budget][] (one parameter budget for a whole
   model); the utilities [mpotn.table][], [mpotn.atomic][] and
   [mpotn.drawing][] sit here too because the core uses them
   (``MPO.diagnostics`` returns a table, ``MPO.draw`` draws). The task
   package [mpotn.data][] (specs, metrics, local and GLUE-layout files, the
   hub, unlabelled text) imports only core and counts as core.
1. [mpotn.methods][] -- decompositions as registered plug-ins (``mpo``,
   ``svd``, ``tt``, ``tucker``, ``cp``) and [FactorNetwork][mpotn.methods.base.FactorNetwork].
2. [mpotn.layers][] -- torch modules: MPO layers (and the output layer tied to an MPO
   embedding), factorized layers, and the registry of their kinds (saves go through
   each layer's ``spec()``).
3. [mpotn.compression][] -- targets and the matrix types of each architecture family,
   [MPOModel][mpotn.compression.model.MPOModel],
   [compress][mpotn.compression.compress.compress], calibration statistics, saving and loading,
   Hugging Face helpers.
4. [mpotn.finetune][] -- strategies, the Trainer wrapper, squeezing, healing.
5. [mpotn.analysis][] -- inspection, comparison, fidelity, reports.
6. [mpotn.cli][] -- the ``mpotn`` command, one module per subcommand.

This module re-exports the main names of every tier and belongs to none:
nothing inside the package imports ``mpotn`` itself. See the architecture page
of the documentation for one line per module and the path of a matrix from
[compress][mpotn.compression.compress.compress] to ``forward``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported on first use (below), so that ``mpotn --help`` stays fast
    from mpotn.compression.compress import compress
    from mpotn.compression.config import CompressionConfig
    from mpotn.compression.model import MPOModel, load
    from mpotn.contraction import ContractionCost
    from mpotn.layers import MPOEmbedding, MPOLinear
    from mpotn.mpo import MPO
    from mpotn.shapes import Factorization, factorize, full_bond_dims, pad_to_factorable
    from mpotn.table import Table

#: Where each re-exported name lives; ``import mpotn`` imports none of them (nor torch).
_EXPORTS = {
    "compress": "mpotn.compression.compress",
    "CompressionConfig": "mpotn.compression.config",
    "MPOModel": "mpotn.compression.model",
    "load": "mpotn.compression.model",
    "ContractionCost": "mpotn.contraction",
    "MPOEmbedding": "mpotn.layers",
    "MPOLinear": "mpotn.layers",
    "MPO": "mpotn.mpo",
    "Factorization": "mpotn.shapes",
    "factorize": "mpotn.shapes",
    "full_bond_dims": "mpotn.shapes",
    "pad_to_factorable": "mpotn.shapes",
    "Table": "mpotn.table",
}


def __getattr__(name: str) -> Any:
    """The re-exported names, imported from their module on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mpotn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


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
