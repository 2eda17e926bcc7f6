"""Compressing whole models: targets, :class:`MPOModel`, saving, Hugging Face helpers.

* :mod:`mpotn.compression.config` -- :class:`CompressionConfig` and target selection;
* :mod:`mpotn.compression.parameters` -- parameter counts and the set LFA trains;
* :mod:`mpotn.compression.model` -- :class:`MPOModel` and :func:`load`;
* :mod:`mpotn.compression.compress` -- :func:`plan` and :func:`compress`;
* :mod:`mpotn.compression.serialization` -- the save format (:func:`save`, :func:`read`);
* :mod:`mpotn.compression.models` -- loading Hugging Face models, naming their matrices.

``mpotn.compression.compress`` as an attribute is the function (as ``mpotn.compress``
is); import from the module with ``from mpotn.compression.compress import ...``.
"""

from mpotn.compression.compress import compress, plan
from mpotn.compression.config import (
    FACTORIZED_LAYERS,
    MPO_LAYERS,
    PRESET_TYPES,
    SETTING_KEYS,
    SUPPORTED,
    CompressionConfig,
    replace_module,
    select_targets,
)
from mpotn.compression.model import MPOModel, load
from mpotn.compression.models import (
    WeightMatrix,
    layer_index,
    load_classifier,
    load_model,
    load_tokenizer,
    matrix_type,
    weight_matrices,
)
from mpotn.compression.parameters import count_parameters, lfa_parameters
from mpotn.compression.serialization import is_saved_model, read, save

__all__ = [
    "FACTORIZED_LAYERS",
    "MPO_LAYERS",
    "PRESET_TYPES",
    "SETTING_KEYS",
    "SUPPORTED",
    "CompressionConfig",
    "MPOModel",
    "WeightMatrix",
    "compress",
    "count_parameters",
    "is_saved_model",
    "layer_index",
    "lfa_parameters",
    "load",
    "load_classifier",
    "load_model",
    "load_tokenizer",
    "matrix_type",
    "plan",
    "read",
    "replace_module",
    "save",
    "select_targets",
    "weight_matrices",
]
