"""Adapter saves, PEFT-style: only what fine-tuning trained, on top of a compressed base.

Lightweight fine-tuning (SPEC §2, LFA) trains the auxiliary tensors, biases,
norms and the task head: about 5% of a compressed model. An adapter folder
holds those tensors alone, with a reference to the compressed base save they
were trained on:

* ``mpotn_adapter.json`` -- format and version, the base (the name it was given
  as and the SHA-256 of its weights file), the trained parameters' names, and
  the name and SHA-256 of the adapter's weights;
* ``adapter-<sha12>.safetensors`` -- the trained tensors, with the SHA-256 of
  the rest of the config in their metadata.

[save_adapter][mpotn.compression.adapters.save_adapter] refuses a model that
differs from its base anywhere outside what it trains (a squeezed or further
compressed model is saved whole), so base plus adapter is the model, exactly.
[read_adapter][mpotn.compression.adapters.read_adapter] takes the base from
the caller -- a save folder or Hub id, never a path read from the adapter --
refuses one whose weights are not the recorded base's, applies the tensors and
freezes every other parameter, so the model comes back as it was trained.
Writes are atomic and remove only adapter files mpotn can prove it wrote, as
[mpotn.compression.serialization][] does for whole saves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from mpotn.compression.serialization import (
    _FIX,
    ADAPTER_NAME,
    CONFIG_NAME,
    SavedModel,
    _config_digest,
    _read_config,
    _sha256,
    read,
    resolve_inside,
    resolve_save,
    write_save,
)

ADAPTER_FORMAT = "mpotn-adapter"
ADAPTER_VERSION = 1
#: The fields of ``mpotn_adapter.json``, all required.
ADAPTER_FIELDS = ("format", "format_version", "weights", "sha256", "base", "trainable")
_DIGEST_KEY = "mpotn_adapter_sha256"


def is_adapter(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by
    [save_adapter][mpotn.compression.adapters.save_adapter]."""
    return (Path(path) / ADAPTER_NAME).is_file()


def _base_weights(base: str | os.PathLike) -> tuple[Path, str]:
    """The weights file of the compressed save ``base`` (a folder or Hub id) and its SHA-256
    as the save records it (checked when the base is read)."""
    folder = resolve_save(base)
    config = _read_config(folder)
    weights = resolve_inside(folder, config["weights"], f"{folder / CONFIG_NAME} 'weights'")
    return weights, config["sha256"]


def _differences(model: nn.Module, weights: Path) -> list[str]:
    """Tensors of the base file that ``model`` lacks, or holds with other values where no
    trainable parameter is (or with another shape or dtype). A shared tensor is trainable
    under each of its names: the base file keeps it under one of them."""
    trained = {name for name, p in model.named_parameters(remove_duplicate=False)
               if p.requires_grad}
    state = model.state_dict()
    different = []
    with safe_open(str(weights), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            mine = state.get(name)
            theirs = handle.get_tensor(name)
            if mine is None or mine.shape != theirs.shape or mine.dtype != theirs.dtype or (
                    name not in trained and not torch.equal(mine.cpu(), theirs)):
                different.append(name)
    return different


def save_adapter(model: nn.Module, directory: str | os.PathLike, base: str | os.PathLike,
                 overwrite: bool = False, tokenizer: Any | None = None) -> Path:
    """Write the trainable parameters of ``model`` (a compressed module, e.g. an
    ``MPOModel``'s ``base_model`` after ``apply_strategy(model, "lfa")``) as an adapter of the
    compressed save ``base``.

    Parameters
    ----------
    model:
        The fine-tuned module; its parameters that require a gradient are the adapter.
    directory:
        A new folder, an empty one or an earlier adapter save.
    base:
        The compressed save (folder or Hub id) ``model`` was loaded from before training.
    overwrite:
        Also write into a folder that holds files mpotn did not write (they are
        kept).
    tokenizer:
        A tokenizer to save beside the adapter (its ``save_pretrained`` files).

    Raises
    ------
    ValueError
        If nothing in ``model`` is trainable, ``base`` is not a readable mpotn save or is
        ``directory`` itself, or
        ``model`` differs from ``base`` outside its trainable parameters (a squeezed,
        recompressed or otherwise edited model: save it whole instead).

    Examples
    --------
    >>> import tempfile
    >>> from torch import nn
    >>> from mpotn.compression.compress import compress
    >>> from mpotn.compression.model import load
    >>> folder = tempfile.mkdtemp()
    >>> compress(nn.Sequential(nn.Linear(32, 64)), targets=["0"], n=3, progress=False
    ...          ).save_pretrained(folder)
    >>> model = load(folder, model=nn.Sequential(nn.Linear(32, 64)))
    >>> model.base_model[0].freeze_auxiliary()
    >>> adapter = save_adapter(model.base_model, tempfile.mkdtemp(), folder)  # central, bias
    >>> again = load(adapter, base=folder, model=nn.Sequential(nn.Linear(32, 64)))
    >>> x = torch.randn(2, 32)
    >>> torch.equal(again.base_model(x), model.base_model(x))
    True
    """
    directory = Path(directory)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    if not trained:
        raise ValueError("nothing in the model is trainable, so an adapter would be empty; an "
                         "adapter holds what fine-tuning trains (apply_strategy(model, 'lfa') "
                         "marks it)")
    weights, digest = _base_weights(base)
    if directory.resolve() == weights.parent.resolve():
        raise ValueError(f"{directory} is the base save {base} itself: an adapter written "
                         "there would replace the base it needs; choose another folder")
    different = _differences(model, weights)
    if different:
        shown = ", ".join(different[:3]) + (f" and {len(different) - 3} more"
                                            if len(different) > 3 else "")
        raise ValueError(
            f"the model differs from the base {base} outside what it trains ({shown}), so base "
            "plus adapter would not be this model; save it whole (adapter_only=False), or "
            "pass the compressed save it was loaded from and fine-tuned as base")
    config: dict[str, Any] = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_VERSION,
        "weights": None,
        "sha256": None,
        "base": {"name_or_path": str(base), "sha256": digest},
        "trainable": sorted(trained),
    }
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters()
               if name in trained}

    def save_tokenizer(staging: Path) -> None:
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))

    return write_save(directory, overwrite, config, tensors, ADAPTER_NAME, "adapter", _DIGEST_KEY,
                      save_tokenizer)


def _read_adapter_config(directory: Path) -> dict[str, Any]:
    path = resolve_inside(directory, ADAPTER_NAME, str(directory))
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid UTF-8 JSON ({error}); {_FIX}") from error
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not an mpotn adapter config; {_FIX}")
    if config.get("format_version") != ADAPTER_VERSION:
        raise ValueError(f"{path} has format version {config.get('format_version')!r}; this "
                         f"mpotn reads version {ADAPTER_VERSION}")
    if set(config) != set(ADAPTER_FIELDS):
        raise ValueError(f"{path} lacks {sorted(set(ADAPTER_FIELDS) - set(config))} and has "
                         f"the unknown {sorted(set(config) - set(ADAPTER_FIELDS))}; {_FIX}")
    base, trainable = config["base"], config["trainable"]
    if not (isinstance(config["sha256"], str) and isinstance(base, dict)
            and base.keys() == {"name_or_path", "sha256"}
            and all(isinstance(v, str) for v in base.values())
            and isinstance(trainable, list) and trainable
            and all(isinstance(n, str) for n in trainable)):
        raise ValueError(f"{path} has an invalid sha256, base or trainable field; {_FIX}")
    return config


def read_adapter(directory: str | os.PathLike, base: str | os.PathLike | None,
                 device: str | torch.device | None = None, model: nn.Module | None = None
                 ) -> SavedModel:
    """The compressed save ``base`` with the adapter in ``directory`` applied, frozen as it
    was trained (only the adapter's parameters require a gradient), in eval mode, on
    ``device`` as [read][mpotn.compression.serialization.read] places it; ``model`` is
    the module ``read`` rebuilds ``base`` in, for a base without a Hugging Face config.

    Raises
    ------
    ValueError
        If ``base`` is not given (the message names the recorded base: mpotn never
        follows a path read from a save), is not the save the adapter was trained on
        (its weights' SHA-256 differs), or the adapter's files are damaged or do not
        fit the base.
    """
    directory = Path(directory)
    config = _read_adapter_config(directory)
    recorded = config["base"]
    if base is None:
        raise ValueError(
            f"{directory} is an adapter of the compressed save {recorded['name_or_path']!r}; "
            "pass that save as base (mpotn.load(adapter, base=...) or --base); mpotn does not "
            "follow paths read from a save")
    weights, digest = _base_weights(base)
    if digest != recorded["sha256"]:
        raise ValueError(
            f"{base} is not the base this adapter was trained on: its weights have SHA-256 "
            f"{digest[:12]}..., the adapter's base ({recorded['name_or_path']!r}) "
            f"{recorded['sha256'][:12]}...; pass the compressed save it was fine-tuned from")
    path = directory / ADAPTER_NAME
    file = resolve_inside(directory, config["weights"], f"{path} 'weights'")
    if not file.is_file() or _sha256(file) != config["sha256"]:
        raise ValueError(f"{directory}: {file.name} is missing or does not match the SHA-256 "
                         f"in {ADAPTER_NAME}; {_FIX}")
    with safe_open(str(file), framework="pt") as handle:
        if (handle.metadata() or {}).get(_DIGEST_KEY) != _config_digest(config):
            raise ValueError(f"{path} was edited after it was saved; {_FIX}")
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    if set(tensors) != set(config["trainable"]):
        raise ValueError(f"{directory}: the adapter's tensors are not the ones {ADAPTER_NAME} "
                         f"lists; {_FIX}")
    saved = read(weights.parent, model, device)
    parameters = dict(saved.model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            target = parameters.get(name)
            if target is None or target.shape != tensor.shape or target.dtype != tensor.dtype:
                raise ValueError(f"{directory}: the adapter's {name} does not fit the base "
                                 f"{base}; {_FIX}")
            target.copy_(tensor)
    for name, parameter in parameters.items():
        parameter.requires_grad_(name in tensors)
    return saved
