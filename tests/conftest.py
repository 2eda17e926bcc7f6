"""Shared fixtures: the real all-MiniLM-L6-v2 weights, read once per session."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mpotn.models import default_model_path

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def minilm() -> dict[str, torch.Tensor]:
    """The embedded model's state dict (float32), straight from its safetensors."""
    return load_file(str(default_model_path() / "model.safetensors"))


@pytest.fixture(scope="session")
def ffn(minilm: dict[str, torch.Tensor]) -> torch.Tensor:
    """Layer 0's FFN up-projection as the paper's math matrix (in x out = 384 x 1536)."""
    return minilm["encoder.layer.0.intermediate.dense.weight"].T.contiguous()
