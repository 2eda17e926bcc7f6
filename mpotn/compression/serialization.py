"""Saving and reading compressed models (``save_pretrained`` /
[mpotn.load][mpotn.compression.model.load]).

A save directory holds

* ``mpotn_config.json`` -- format and version, the compression config, every
  MPO layer's factorization and bonds, the report, the base model's class and
  Hugging Face config, and the name and SHA-256 of the weights file;
* ``model-<sha12>.safetensors`` -- the whole state dict (cores and the rest).

A save is atomic: the weights go to a new content-addressed file first, then
``mpotn_config.json`` is replaced in one rename, and only then are weights files
it no longer names removed. A crash at any point leaves the earlier save (its
config and the weights it names) valid. [read][mpotn.compression.serialization.read] rebuilds the
model from the config alone -- the original weights are not needed -- and checks that the
files agree with it.

Nothing here knows [MPOModel][mpotn.compression.model.MPOModel]:
[save][mpotn.compression.serialization.save] takes any object with its attributes (``base_model``,
``config``, ``original_params``, ``compressed_layers()``, ``report()``) and
[read][mpotn.compression.serialization.read] returns the rebuilt module with what the save recorded;
[mpotn.compression.model.MPOModel.from_pretrained][] (and
[mpotn.load][mpotn.compression.model.load]) wraps it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from mpotn.atomic import atomic_path, write_text
from mpotn.compression.config import FACTORIZED_LAYERS, CompressionConfig, replace_module
from mpotn.layers import FactorizedEmbedding, FactorizedLinear, MPOEmbedding, MPOLinear
from mpotn.methods import FactorNetwork
from mpotn.shapes import Factorization

CONFIG_NAME = "mpotn_config.json"
FORMAT = "mpotn"
FORMAT_VERSION = 1


class SavedModel(NamedTuple):
    """What [read][mpotn.compression.serialization.read] returns: the rebuilt module and what the
    save recorded."""

    model: nn.Module
    config: CompressionConfig
    report: list[dict[str, Any]]
    original_params: int


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _layer_spec(layer: nn.Module) -> dict[str, Any]:
    if isinstance(layer, FACTORIZED_LAYERS):
        spec = {"method": layer.method, "legs": {k: list(v) for k, v in layer.legs.items()},
                "shapes": {k: list(p.shape) for k, p in layer.factors.items()},
                "rows": [layer.row.size, *layer.row.factors],
                "cols": [layer.col.size, *layer.col.factors]}
        if isinstance(layer, FactorizedLinear):
            return {"kind": "factorized-linear", "bias": layer.bias is not None, **spec}
        return {"kind": "factorized-embedding", "padding_idx": layer.padding_idx, **spec}
    spec = {
        "row_shape": list(layer.row.factors),
        "col_shape": list(layer.col.factors),
        "bond_dims": list(layer.bond_dims),
    }
    if isinstance(layer, MPOLinear):
        return {"kind": "linear", "in_features": layer.in_features,
                "out_features": layer.out_features, "bias": layer.bias is not None, **spec}
    return {"kind": "embedding", "num_embeddings": layer.num_embeddings,
            "embedding_dim": layer.embedding_dim, "padding_idx": layer.padding_idx, **spec}


def _build_layer(spec: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    if spec["kind"].startswith("factorized"):
        network = FactorNetwork(
            spec["method"], {k: torch.zeros(v, dtype=dtype) for k, v in spec["shapes"].items()},
            {k: tuple(v) for k, v in spec["legs"].items()},
            Factorization(spec["rows"][0], tuple(spec["rows"][1:])),
            Factorization(spec["cols"][0], tuple(spec["cols"][1:])))
        if spec["kind"] == "factorized-linear":
            return FactorizedLinear(network, bias=spec["bias"])
        return FactorizedEmbedding(network, spec["padding_idx"])
    shapes = (spec["row_shape"], spec["col_shape"], spec["bond_dims"])
    if spec["kind"] == "linear":
        return MPOLinear(spec["in_features"], spec["out_features"], *shapes,
                         bias=spec["bias"], dtype=dtype)
    return MPOEmbedding(spec["num_embeddings"], spec["embedding_dim"], *shapes,
                        padding_idx=spec["padding_idx"], dtype=dtype)


def _base_model_spec(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    cls = type(model)
    return {"class": cls.__name__, "module": cls.__module__, "config": config.to_dict()}


def save(model: Any, directory: str | os.PathLike) -> Path:
    """Write ``model`` (an [MPOModel][mpotn.compression.model.MPOModel]) to ``directory``
    atomically (see the module docstring)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    base = model.base_model
    written = directory / "model.safetensors"
    with atomic_path(written) as tmp:
        save_model(base, str(tmp))
    digest = _sha256(written)
    weights = directory / f"model-{digest[:12]}.safetensors"
    os.replace(written, weights)
    dtype = next(base.parameters()).dtype
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights": weights.name,
        "sha256": digest,
        "dtype": str(dtype).removeprefix("torch."),
        "base_model": _base_model_spec(base),
        "compression": model.config.to_dict(),
        "original_params": model.original_params,
        "layers": {name: _layer_spec(layer)
                   for name, layer in model.compressed_layers().items()},
        "report": list(model.report()),
    }
    write_text(directory / CONFIG_NAME, json.dumps(config, indent=2))
    for stale in directory.glob("model-*.safetensors"):
        if stale.name != weights.name:
            stale.unlink()
    return directory


def is_saved_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``save_pretrained`` (has an mpotn config)."""
    return (Path(path) / CONFIG_NAME).is_file()


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ValueError(
            f"{directory} is not an mpotn save: it has no {CONFIG_NAME} (save one with "
            "MPOModel.save_pretrained or `mpotn compress --out`)"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} is not an mpotn config (format {config.get('format')!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {config.get('format_version')}; this mpotn reads "
            f"version {FORMAT_VERSION}"
        )
    return config


def _base_model(spec: dict[str, Any] | None, model: nn.Module | None) -> nn.Module:
    if model is not None:
        return model
    if spec is None:
        raise ValueError(
            "this save was made from a model without a Hugging Face config; pass an "
            "uncompressed instance of its architecture as load(directory, model=...)"
        )
    cls = getattr(importlib.import_module(spec["module"]), spec["class"])
    return cls(cls.config_class.from_dict(spec["config"]))


def read(directory: str | os.PathLike, model: nn.Module | None = None) -> SavedModel:
    """Rebuild a compressed module from a save directory, without the original weights.

    Parameters
    ----------
    directory:
        A folder written by ``save_pretrained``.
    model:
        An uncompressed instance of the architecture; needed only for models
        without a Hugging Face config (it is modified in place).

    Raises
    ------
    ValueError
        If the folder is not an mpotn save, or its files disagree with its
        config (missing or altered weights, shapes that differ from the plan).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    config = _read_config(directory)
    weights = directory / config["weights"]
    if not weights.is_file():
        raise ValueError(f"{directory}: {CONFIG_NAME} names {weights.name}, which is missing")
    if _sha256(weights) != config["sha256"]:
        raise ValueError(
            f"{directory}: {weights.name} does not match the SHA-256 in {CONFIG_NAME}; the "
            "weights were altered or belong to another save"
        )
    base = _base_model(config["base_model"], model)
    dtype = getattr(torch, config["dtype"])
    for name, spec in config["layers"].items():
        try:
            base.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"{directory}: the model has no module {name!r} to replace") from error
        replace_module(base, name, _build_layer(spec, dtype))
    try:
        load_model(base, str(weights), strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"{directory}: the weights disagree with {CONFIG_NAME}: {error}"
        ) from error
    base.eval()
    compression = CompressionConfig.from_dict(config["compression"])
    return SavedModel(base, compression, config["report"], config["original_params"])
