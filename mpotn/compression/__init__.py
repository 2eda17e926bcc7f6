"""Compressing whole models: targets, [MPOModel][mpotn.compression.model.MPOModel], calibration,
saving, Hugging Face helpers.

* [mpotn.compression.config][] -- [CompressionConfig][mpotn.compression.config.CompressionConfig]
  and target selection;
* [mpotn.compression.parameters][] -- parameter counts and the set LFA trains;
* [mpotn.compression.model][] -- [MPOModel][mpotn.compression.model.MPOModel] and
  [load][mpotn.compression.model.load];
* [mpotn.compression.compress][] -- [plan][mpotn.compression.compress.plan] and
  [compress][mpotn.compression.compress.compress];
* [mpotn.compression.calibrate][] -- the input second moments of every target
  ([calibrate][mpotn.compression.calibrate.calibrate]), for calibrated truncation;
* [mpotn.compression.serialization][] -- the save format
  ([save][mpotn.compression.serialization.save], [read][mpotn.compression.serialization.read]);
* [mpotn.compression.adapters][] -- adapter saves: what fine-tuning trained, on a
  compressed base;
* ``mpotn.compression.sharing`` -- central tensors shared across layers
  (``share_centrals``, MPOBERT);
* ``mpotn.compression.deepen`` -- deeper models whose new layers share the central
  tensors (``deepen``, MPOBERT);
* ``mpotn.compression.bottleneck`` -- bottleneck adapters per layer
  (``add_bottleneck_adapters``, MPOBERT's optional adapters);
* ``mpotn.compression.experts`` -- feed-forward blocks made mixtures of experts that
  share their central tensors (``upcycle_experts``, MPOE);
* [mpotn.compression.lpaf][] -- a pruned model's matrices as truncated SVDs, whitened by
  their inputs, plain, or fitted to their kept entries
  ([factorize_pruned][mpotn.compression.lpaf.factorize_pruned], LPAF);
* [mpotn.compression.merge][] -- back to a dense model
  ([merge][mpotn.compression.merge.merge]);
* [mpotn.compression.models][] -- loading Hugging Face models, naming their matrices.

``mpotn.compression.compress`` as an attribute is the function (as ``mpotn.compress``
is); import from the module with ``from mpotn.compression.compress import ...``.
"""

from mpotn.compression.bottleneck import add_bottleneck_adapters
from mpotn.compression.compress import compress, plan
from mpotn.compression.config import (
    COMPRESSED_LAYERS,
    FACTORIZED_LAYERS,
    MPO_LAYERS,
    PRESET_TYPES,
    SETTING_KEYS,
    SUPPORTED,
    CompressionConfig,
    replace_module,
    select_targets,
    tied_modules,
)
from mpotn.compression.deepen import deepen
from mpotn.compression.experts import upcycle_experts
from mpotn.compression.lpaf import factorize_pruned
from mpotn.compression.merge import merge
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
from mpotn.compression.sharing import share_centrals, shared_central_groups

__all__ = [
    "COMPRESSED_LAYERS",
    "FACTORIZED_LAYERS",
    "MPO_LAYERS",
    "PRESET_TYPES",
    "SETTING_KEYS",
    "SUPPORTED",
    "CompressionConfig",
    "MPOModel",
    "WeightMatrix",
    "add_bottleneck_adapters",
    "compress",
    "count_parameters",
    "deepen",
    "factorize_pruned",
    "is_saved_model",
    "layer_index",
    "lfa_parameters",
    "load",
    "load_classifier",
    "load_model",
    "load_tokenizer",
    "matrix_type",
    "merge",
    "plan",
    "read",
    "replace_module",
    "save",
    "select_targets",
    "share_centrals",
    "shared_central_groups",
    "tied_modules",
    "upcycle_experts",
    "weight_matrices",
]
