"""Compressing a model: replace its weight matrices by MPO layers (SPEC §1-2).

:func:`plan` is the dry run and :func:`compress` the replacement; what to
replace, and with which settings, is a
:class:`~mpotn.compression.config.CompressionConfig` (targets by preset,
suffix or regular expression, as PEFT chooses them). A module shared by
several parents (ALBERT's layer group) is decomposed once and stays shared.

Examples
--------
>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
>>> compressed = compress(model, targets=["0", "2"], n=3, ratio=0.5, progress=False)
>>> [r["name"] for r in compressed.report()]
['0', '2']
>>> compressed.totals()["total_params"] < compressed.totals()["original_params"]
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mpotn.compression.config import CompressionConfig, replace_module, select_targets
from mpotn.compression.model import MPOModel
from mpotn.compression.models import layer_index, matrix_type
from mpotn.compression.parameters import count_parameters
from mpotn.layers import (
    FactorizedEmbedding,
    FactorizedLinear,
    MPOEmbedding,
    MPOLinear,
    apply_policy,
)
from mpotn.methods import decompose
from mpotn.mpo import MPO
from mpotn.table import Table


def _policy(settings: dict[str, Any]) -> str:
    for key in ("max_bond", "tol", "ratio", "params", "bond_dims"):
        if settings[key] is not None:
            return f"{key}={settings[key]}"
    return "full rank"


def _matrix(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach()
    return weight if isinstance(module, nn.Embedding) else weight.T


def _factorized(name: str, module: nn.Module, matrix: torch.Tensor, settings: dict[str, Any]
                ) -> tuple[nn.Module, dict[str, Any]]:
    """A non-MPO layer for one target (``settings["method"]``) and its report row."""
    others = [k for k in ("max_bond", "tol", "params", "bond_dims") if settings[k] is not None]
    if others:
        raise ValueError(f"method {settings['method']!r} is truncated by ratio only, got "
                         f"{others}")
    network = decompose(matrix, settings["method"], n=settings["n"], ratio=settings["ratio"])
    if isinstance(module, nn.Embedding):
        layer = FactorizedEmbedding(network, module.padding_idx)
    else:
        layer = FactorizedLinear(network, bias=module.bias is not None)
        if module.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(module.bias)
    ranks = network.details.get("ranks", [network.details.get("rank")])
    return layer, {
        "name": name,
        "type": matrix_type(name),
        "layer": layer_index(name),
        "method": network.method,
        "shape": f"{matrix.shape[0]}x{matrix.shape[1]}",
        "factorization": " x ".join("·".join(map(str, f.factors))
                                    for f in (network.row, network.col)),
        "bond_dims": ",".join(map(str, ranks)),
        "params": network.num_params,
        "original_params": matrix.numel(),
        "ratio": network.compression_ratio,
        "central_entropy": float("nan"),
        "relative_bound": float("nan"),
        "relative_error": network.relative_error,
    }


def plan(model: nn.Module, config: CompressionConfig | None = None, **kwargs: Any) -> Table:
    """The dry run: what :func:`compress` would replace, with sizes, changing nothing."""
    config = config or CompressionConfig(**kwargs)
    rows = Table()
    for name, module in select_targets(model, config):
        settings = config.settings_for(name, module)
        matrix = _matrix(module)
        rows.append({
            "name": name,
            "module": type(module).__name__,
            "type": matrix_type(name),
            "shape": f"{matrix.shape[0]}x{matrix.shape[1]}",
            "params": matrix.numel(),
            "n": settings["n"],
            "policy": _policy(settings),
        })
    return rows


def compress(
    model: nn.Module,
    config: CompressionConfig | None = None,
    *,
    progress: bool = True,
    **kwargs: Any,
) -> MPOModel:
    """Replace the selected matrices of ``model`` by MPO layers, in place.

    Parameters
    ----------
    model:
        A Hugging Face model or any module built of ``nn.Linear`` / ``nn.Embedding``.
    config:
        What and how; keyword arguments build one when omitted
        (``compress(model, targets=["ffn"], ratio=0.5)``).
    progress:
        Show a progress bar over the matrices.

    Returns
    -------
    MPOModel
        The model (wrapping the same, modified ``model``) with its report.
    """
    if config is not None and kwargs:
        raise ValueError("give a CompressionConfig or keyword settings, not both")
    config = config or CompressionConfig(**kwargs)
    original = count_parameters(model.parameters())
    selected = select_targets(model, config)
    records = []
    for name, module in tqdm(selected, desc="compressing", unit="matrix", disable=not progress):
        settings = config.settings_for(name, module)
        matrix = _matrix(module)
        if settings["method"] != "mpo":
            layer, record = _factorized(name, module, matrix, settings)
            replace_module(model, name, layer)
            records.append(record)
            continue
        full = MPO.from_matrix(matrix, n=settings["n"], row_shape=settings["row_shape"],
                               col_shape=settings["col_shape"], pad=settings["pad"],
                               svd=settings["svd"])
        truncation = {k: settings[k] for k in ("max_bond", "tol", "ratio", "params",
                                               "bond_dims", "allocation")}
        build = MPOEmbedding.from_embedding if isinstance(module, nn.Embedding) else (
            MPOLinear.from_linear)
        cut = apply_policy(full, truncation)
        layer = build(module, mpo=cut, gauge=settings["gauge"])
        replace_module(model, name, layer)
        norm = full.norm or 1.0
        records.append({
            "name": name,
            "type": matrix_type(name),
            "layer": layer_index(name),
            "shape": f"{matrix.shape[0]}x{matrix.shape[1]}",
            "factorization": " x ".join("·".join(map(str, s))
                                        for s in (full.row_shape, full.col_shape)),
            "bond_dims": ",".join(map(str, layer.bond_dims[1:-1])),
            "full_bond_dims": ",".join(map(str, full.full_bond_dims[1:-1])),
            "params": sum(c.numel() for c in layer.cores),
            "original_params": matrix.numel(),
            "ratio": layer.compression_ratio,
            "central_entropy": full.entropy(full.central_bond),
            "relative_bound": cut.error_bound / norm,
            "relative_error": cut.reconstruction_error(matrix) / norm,
        })
    return MPOModel(model, config, records, original)
