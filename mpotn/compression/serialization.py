"""Saving and reading compressed models (``save_pretrained`` /
[mpotn.load][mpotn.compression.model.load]).

A save directory holds

* ``mpotn_config.json`` -- format and version, the compression config, every
  compressed layer's ``spec()`` (its kind, sizes, factorization and bonds; see
  [mpotn.layers][]), the report, the base model's class and Hugging Face config,
  and the name and SHA-256 of the weights file; for a model whose MPO layers share
  central tensors (``mpotn.compression.sharing``), also ``shared_centrals``: the
  module names of each group of layers using one central tensor (an optional
  field, written only then, so that saves without sharing are as before and
  older saves read unchanged; the format version stays 1); for a model whose
  feed-forward blocks were made mixtures of experts
  (``mpotn.compression.experts``), also ``experts``: each block's name, output
  module and routing (another optional field), which a read rebuilds before it
  puts the layers back; for a model with bottleneck adapters
  (``mpotn.compression.bottleneck``), ``bottleneck_adapters``: each adapted
  module's name and the adapter's width (optional too, rebuilt the same way);
* ``model-<sha12>.safetensors`` -- the whole state dict (cores and the rest),
  each tensor in its own dtype and a shared tensor once (under the first of its
  names), with the SHA-256 of the rest of the config in
  its metadata (``mpotn_config_sha256``);
* for a Hugging Face model, its ``config.json`` (and ``generation_config.json``
  for a model that generates), and the tokenizer's files when one is given, so
  that ``AutoConfig`` and ``AutoTokenizer`` read the folder as they read any
  model's. mpotn itself rebuilds the model from
  ``mpotn_config.json`` alone (whose copy of the config the weights' digest
  covers); ``config.json`` is there for the tools that expect it.

A save is atomic ([mpotn.atomic.atomic_dir][]): every file is written into a
hidden folder beside the target, then that folder replaces the target in a
rename, so a crash at any point leaves the earlier save as it was; the
manifest ``mpotn_files.json`` lists every file the save wrote. What an
earlier save wrote and this one does not rewrite -- its tokenizer, the
reports ``mpotn compress`` put beside it -- is kept; its weights are not. A folder
holding files mpotn did not write (a Hugging Face model, say) is refused
unless ``overwrite=True``; with it the new files are moved in beside the
user's (the weights before ``mpotn_config.json``, so the config never names
weights that are not there), a file of the user's with the same name is kept,
with a warning, and only files the manifest lists are removed -- a Hugging
Face model's ``model-00001-of-00003.safetensors`` is never touched. A save
written before the manifest listed every file is recognised by its
``mpotn_config.json``, the weights whose content matches their name
(``model-`` and the first 12 hex digits of their SHA-256) and the reports and
tokenizer files those versions wrote beside it.

[read][mpotn.compression.serialization.read] rebuilds the model from the config
alone -- the original weights are not needed -- and treats the folder as
untrusted input: the config must have exactly the fields mpotn writes, every
path in it must stay inside the folder, the model class must be one of
transformers' own (nothing named in the file is imported), the weights must
match their SHA-256 and the config the SHA-256 in the weights (older saves
without it are read without that check), and every rebuilt layer must fit the
module it replaces. Each failure is one ``ValueError`` that names the file.

Nothing here knows [MPOModel][mpotn.compression.model.MPOModel]:
[save][mpotn.compression.serialization.save] takes any object with its attributes (``base_model``,
``compression_config``, ``original_params``, ``compressed_layers()``, ``report()``) and
[read][mpotn.compression.serialization.read] returns the rebuilt module with what the save recorded;
[mpotn.compression.model.MPOModel.from_pretrained][] (and
[mpotn.load][mpotn.compression.model.load]) wraps it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from mpotn.atomic import atomic_dir, check_writable, publish, written_files
from mpotn.compression.architectures import is_conv1d
from mpotn.compression.bottleneck import bottleneck_spec, rebuild_bottlenecks
from mpotn.compression.config import CompressionConfig, replace_module, tied_modules
from mpotn.compression.experts import SPEC_KEYS as EXPERT_KEYS
from mpotn.compression.experts import experts_spec, rebuild_experts
from mpotn.compression.hf_ties import keep_surviving_ties, tied_keys
from mpotn.compression.sharing import mark_shared_centrals, shared_central_groups, tie_centrals
from mpotn.devices import check_device
from mpotn.layers import (
    LAYER_KINDS,
    FactorizedEmbedding,
    FactorizedLinear,
    MPOEmbedding,
    MPOLinear,
    TiedMPOLinear,
    layer_from_spec,
    tie_layers,
)
from mpotn.methods import DECOMPOSITIONS

CONFIG_NAME = "mpotn_config.json"
FORMAT = "mpotn"
FORMAT_VERSION = 1
#: The fields of ``mpotn_config.json``, all required.
FIELDS = ("format", "format_version", "weights", "sha256", "dtype", "base_model", "compression",
          "original_params", "layers", "report")
#: Fields written only when they apply: ``shared_centrals``, the groups of MPO layers
#: sharing one central tensor (lists of module names; see ``mpotn.compression.sharing``),
#: ``experts``, the blocks made mixtures of experts (``mpotn.compression.experts``), and
#: ``bottleneck_adapters``, the modules followed by one (``mpotn.compression.bottleneck``).
OPTIONAL_FIELDS = ("shared_centrals", "experts", "bottleneck_adapters")
#: The dtypes a save may name, with safetensors' code for each.
DTYPES = {"float16": ("F16", torch.float16), "bfloat16": ("BF16", torch.bfloat16),
          "float32": ("F32", torch.float32), "float64": ("F64", torch.float64)}
#: Key of the weights file's metadata that holds the SHA-256 of the config.
DIGEST_KEY = "mpotn_config_sha256"
#: The config of an adapter save (``mpotn.compression.adapters``).
ADAPTER_NAME = "mpotn_adapter.json"
#: The files that make a folder a save of one kind, whole or adapter: a save never carries
#: them over from an earlier one (a whole save over an adapter leaves no adapter behind).
SAVE_FILES = re.compile(r"(?:mpotn_config|mpotn_adapter|config|generation_config)\.json"
                        r"|(?:model|adapter)-[0-9a-f]{12}\.safetensors")


def weights_pattern(prefix: str) -> re.Pattern[str]:
    """Names of content-addressed weights files: ``{prefix}-`` and the first 12 hex digits of
    their SHA-256 (the group)."""
    return re.compile(re.escape(prefix) + r"-([0-9a-f]{12})\.safetensors")


_WEIGHTS_NAME = weights_pattern("model")
_FIX = "the file was edited or damaged; save the model again with MPOModel.save_pretrained"


class SavedModel(NamedTuple):
    """What [read][mpotn.compression.serialization.read] returns: the rebuilt module and what the
    save recorded."""

    model: nn.Module
    config: CompressionConfig
    report: list[dict[str, Any]]
    original_params: int


#: Files of a save fetched from the Hub (weights, configs, tokenizer and chat template; never
#: code).
HUB_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
#: A model name on the Hub, with or without its owner (``gpt2``, ``google-bert/bert-base``).
HUB_NAME = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")


def is_hub_name(name: str) -> bool:
    """Whether ``name`` names a Hub model (``gpt2``, ``user/model``), not a path here."""
    return bool(HUB_NAME.fullmatch(name)) and not Path(name).exists()


def resolve_save(directory: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of a save: ``directory`` itself, or the snapshot of a Hub id.

    Raises
    ------
    ValueError
        If ``directory`` is neither a folder here nor a Hub id, looks like a Hub id
        but its owner part is a folder here (a mistyped path, not fetched), or the
        Hub (or the local cache, offline) has no such repository.
    """
    path = Path(directory)
    if path.is_dir() or not HUB_ID.fullmatch(str(directory)) or path.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub ids; {directory} is a "
                             "local path")
        return path
    owner = Path(str(directory).split("/")[0])
    if owner.is_dir():
        raise ValueError(f"{directory} is not a folder here, but {owner} is: read as a "
                         "mistyped path, not fetched as a Hub id; check the path (a Hub "
                         f"repository of that name loads from a folder without {owner})")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(str(directory), revision=revision,
                                      allow_patterns=list(HUB_FILES)))
    except (OSError, HFValidationError) as error:  # hub and cache errors are OSErrors
        raise ValueError(
            f"{directory} is not a folder here, and fetching it as a Hugging Face Hub id "
            f"failed ({type(error).__name__}: {error}); check the path or the repository "
            "name (offline, HF_HUB_OFFLINE=1, only repositories already in the cache load)"
        ) from error


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _base_model_spec(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    cls = type(model)
    settings = config.to_dict()
    name = settings.get("_name_or_path")
    if isinstance(name, str) and not is_hub_name(name):
        del settings["_name_or_path"]  # a folder of this machine, not for a shared save
    return {"class": cls.__name__, "module": cls.__module__, "config": settings}


def _config_digest(config: dict[str, Any]) -> str:
    """SHA-256 of the config without the fields that name the weights (canonical JSON)."""
    body = {k: v for k, v in config.items() if k not in ("weights", "sha256")}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


#: What versions before the manifest listed every file wrote beside a save without listing
#: it: ``mpotn compress``'s reports and an adapter's tokenizer.
LEGACY_FILES = ("report.md", "report.json", "errors.png", "entropy_heatmap.png",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json",
                "chat_template.jinja", "tokenizer.model", "spiece.model")


def earlier_save(directory: Path, config_name: str, weights: re.Pattern[str]) -> set[str]:
    """Names in ``directory`` that an earlier save proves mpotn wrote although its manifest
    may not list them: for a save written before the manifest listed every file (its
    manifest lacks ``config_name``), the config, the content-addressed weights files
    (named as ``weights`` says, its group the first hex digits of their SHA-256) whose
    content matches their name, and [LEGACY_FILES][mpotn.compression.serialization.LEGACY_FILES]."""
    config = directory / config_name
    listed = written_files(directory)
    if not config.is_file() or config.is_symlink() or config_name in listed:
        return set()
    legacy = {name for name in LEGACY_FILES if (directory / name).is_file()}
    return {config_name} | legacy | {
        path.name for path in directory.iterdir()
        if (match := weights.fullmatch(path.name)) and path.name not in listed
        and path.is_file() and not path.is_symlink() and _sha256(path).startswith(match.group(1))}


def check_save_target(directory: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse ``directory`` as a place to save in, before any work: a file, a symbolic link,
    or a folder holding files mpotn did not write (unless ``overwrite``; see
    [mpotn.atomic.check_writable][])."""
    directory = Path(directory)
    check_writable(directory, overwrite, earlier_save(directory, CONFIG_NAME, _WEIGHTS_NAME))


def write_weights(tensors: nn.Module | dict[str, torch.Tensor], folder: Path, prefix: str,
                  metadata: dict[str, str]) -> tuple[Path, str]:
    """Write ``tensors`` (a module's state, or a dict of tensors) as safetensors into
    ``folder``, named by content (``{prefix}-`` and the first 12 hex digits of its SHA-256);
    return the file and its SHA-256."""
    tmp = folder / f".{prefix}.safetensors"
    if isinstance(tensors, nn.Module):
        save_model(tensors, str(tmp), metadata=metadata)
    else:
        save_file(tensors, str(tmp), metadata=metadata)
    digest = _sha256(tmp)
    return publish(tmp, folder / f"{prefix}-{digest[:12]}.safetensors"), digest


def _write_hugging_face_files(base: nn.Module, folder: Path, tokenizer: Any | None) -> None:
    """``config.json`` (with the dtype of the weights, as transformers' ``save_pretrained``
    writes it), ``generation_config.json`` (for a model that generates) and the
    tokenizer's files, into ``folder``."""
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        settings = json.loads(config.to_json_string())
        settings["dtype"] = str(next(base.parameters()).dtype).removeprefix("torch.")
        (folder / "config.json").write_text(json.dumps(settings, indent=2, sort_keys=True)
                                            + "\n")
        generation = getattr(base, "generation_config", None)
        if generation is not None and base.can_generate():
            (folder / "generation_config.json").write_text(generation.to_json_string(),
                                                          encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def save(model: Any, directory: str | os.PathLike, overwrite: bool = False,
         tokenizer: Any | None = None) -> Path:
    """Write ``model`` (an [MPOModel][mpotn.compression.model.MPOModel]) to ``directory``
    atomically (see the module docstring).

    Parameters
    ----------
    model:
        The compressed model.
    directory:
        A new folder, an empty one or an earlier mpotn save.
    overwrite:
        Also write into a folder that holds files mpotn did not write (a Hugging
        Face model, say); they are left as they are (its own ``config.json`` and
        tokenizer files too, with a warning).
    tokenizer:
        A tokenizer to save beside the model (its ``save_pretrained`` files).

    Raises
    ------
    ValueError
        If ``directory`` is a file or a symbolic link, or holds files mpotn did
        not write and ``overwrite`` is false.
    """
    directory = Path(directory)
    base = model.base_model
    config = json.loads(json.dumps({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights": None,
        "sha256": None,
        "dtype": str(next(base.parameters()).dtype).removeprefix("torch."),
        "base_model": _base_model_spec(base),
        "compression": model.compression_config.to_dict(),
        "original_params": model.original_params,
        "layers": {name: layer.spec() for name, layer in model.compressed_layers().items()},
        "report": list(model.report()),
    }))
    shared = shared_central_groups(base)
    if shared:
        config["shared_centrals"] = shared
    if experts_spec(base):
        config["experts"] = experts_spec(base)
    if bottleneck_spec(base):
        config["bottleneck_adapters"] = bottleneck_spec(base)
    return write_save(directory, overwrite, config, base, CONFIG_NAME, "model", DIGEST_KEY,
                      lambda staging: _write_hugging_face_files(base, staging, tokenizer))


def write_save(directory: Path, overwrite: bool, config: dict[str, Any],
               tensors: nn.Module | dict[str, torch.Tensor], config_name: str, prefix: str,
               digest_key: str, extra: Callable[[Path], None]) -> Path:
    """Stage a save (a whole one or an adapter) and put it in place
    ([mpotn.atomic.atomic_dir][]): the content-addressed weights ``{prefix}-<sha12>``
    with the config's digest under ``digest_key`` in their metadata, what ``extra``
    writes, then ``config`` as ``config_name``, naming the weights; an earlier save's
    other files (reports, tokenizer) are carried over unless rewritten, but for
    [SAVE_FILES][mpotn.compression.serialization.SAVE_FILES]."""
    earlier = earlier_save(directory, config_name, weights_pattern(prefix))
    with atomic_dir(directory, overwrite, earlier, last=[config_name],
                    carry=lambda name: not SAVE_FILES.fullmatch(name)) as staging:
        weights, digest = write_weights(tensors, staging, prefix,
                                        {digest_key: _config_digest(config)})
        config["weights"], config["sha256"] = weights.name, digest
        extra(staging)
        (staging / config_name).write_text(json.dumps(config, indent=2))
    return directory


def is_saved_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``save_pretrained`` (has an mpotn config)."""
    return (Path(path) / CONFIG_NAME).is_file()


def _places(folder: Path) -> set[Path]:
    """Where the files of ``folder`` may really be: the folder itself and, for a snapshot of
    the Hugging Face cache (``<repo>/snapshots/<revision>``, whose files are symbolic
    links to ``<repo>/blobs/<sha>``), that repository's ``blobs`` folder, unless it is
    itself a link (which could lead anywhere)."""
    places = {folder.resolve()}
    blobs = folder.parent.parent / "blobs"
    if folder.parent.name == "snapshots" and blobs.is_dir() and not blobs.is_symlink():
        places.add(blobs.resolve())
    return places


def resolve_inside(folder: Path, name: Any, source: str) -> Path:
    """``folder / name`` for a name read from ``source``, refused unless it is a plain name
    that resolves inside ``folder`` (no separators, no ``..``, no absolute path, no
    symbolic link that leads out -- except, in a Hugging Face cache snapshot, to the
    repository's own ``blobs``)."""
    if (not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name
            or (folder / name).resolve().parent not in _places(folder)):
        raise ValueError(f"{source} names {name!r}, which is not a file inside {folder}; "
                         f"{_FIX}")
    return folder / name


def _is_count(value: Any, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _counts(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_count(v) for v in value)


def _check_layer(name: str, spec: Any, path: Path, names: dict[str, Any]) -> None:
    """Check one entry of ``layers`` against its kind's fields
    ([LAYER_KINDS][mpotn.layers.LAYER_KINDS]: the class's ``SPEC_FIELDS``) and types; a tied
    layer's ``tied_to`` must be one of the save's ``names``."""
    where = f"{path}: layer {name!r}"
    if not isinstance(spec, dict):
        raise ValueError(f"{where} is {type(spec).__name__}, not an object; {_FIX}")
    kind = spec.get("kind")
    if kind not in LAYER_KINDS:
        raise ValueError(f"{where} has the unknown kind {kind!r} (mpotn writes "
                         f"{', '.join(LAYER_KINDS)}); {_FIX}")
    fields = LAYER_KINDS[kind].SPEC_FIELDS
    if spec.keys() != fields:
        raise ValueError(f"{where} ({kind}) lacks {sorted(fields - spec.keys())} and has the "
                         f"unknown {sorted(spec.keys() - fields)}; {_FIX}")
    wrong = [key for key, value in spec.items() if not (
        key == "kind"
        or (key == "tied_to" and isinstance(value, str) and value in names)
        or (key in ("in_features", "out_features", "num_embeddings", "embedding_dim")
            and _is_count(value))
        or (key == "bias" and isinstance(value, bool))
        or (key == "padding_idx" and (value is None or _is_count(value, 0)))
        or (key in ("row_shape", "col_shape", "bond_dims", "rows", "cols") and _counts(value))
        or (key == "method" and value in DECOMPOSITIONS)
        or (key == "shapes" and isinstance(value, dict) and all(map(_counts, value.values())))
        or (key == "legs" and isinstance(value, dict) and all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in value.values())))]
    if wrong:
        raise ValueError(f"{where} has invalid {', '.join(f'{k}={spec[k]!r}' for k in wrong)} "
                         f"(sizes are whole numbers >= 1, bias true or false, the method one of "
                         f"{', '.join(DECOMPOSITIONS)}, tied_to another layer of the save); "
                         f"{_FIX}")


def _read_config(directory: Path) -> dict[str, Any]:
    """Read ``mpotn_config.json`` and check its fields, their types and the layers."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ValueError(
            f"{directory} is not an mpotn save: it has no {CONFIG_NAME} (save one with "
            "MPOModel.save_pretrained or `mpotn compress --out`)"
        )
    resolve_inside(directory, CONFIG_NAME, str(directory))
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); {_FIX}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object; {_FIX}")
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} is not an mpotn config (format {config.get('format')!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {config.get('format_version')}; this mpotn reads "
            f"version {FORMAT_VERSION}"
        )
    missing = set(FIELDS) - config.keys()
    extra = config.keys() - set(FIELDS) - set(OPTIONAL_FIELDS)
    if missing or extra:
        raise ValueError(f"{path} lacks the fields {sorted(missing)} and has the unknown fields "
                         f"{sorted(extra)}; {_FIX}")
    base = config["base_model"]
    checks = {
        "sha256": isinstance(config["sha256"], str),
        "dtype": config["dtype"] in DTYPES,
        "base_model": base is None or (isinstance(base, dict)
                                       and base.keys() == {"class", "module", "config"}
                                       and isinstance(base["class"], str)
                                       and isinstance(base["module"], str)
                                       and isinstance(base["config"], dict)),
        "compression": isinstance(config["compression"], dict),
        "original_params": _is_count(config["original_params"], 0),
        "layers": isinstance(config["layers"], dict),
        "report": isinstance(config["report"], list),
    }
    wrong = [key for key, ok in checks.items() if not ok]
    if wrong:
        raise ValueError(f"{path} has invalid {', '.join(f'{k}={config[k]!r:.80}' for k in wrong)}"
                         f" (dtype is one of {', '.join(DTYPES)}); {_FIX}")
    for name, spec in config["layers"].items():
        _check_layer(name, spec, path, config["layers"])
    _check_shared(config, path)
    _check_experts(config, path)
    _check_bottlenecks(config, path)
    return config


def _check_bottlenecks(config: dict[str, Any], path: Path) -> None:
    """``bottleneck_adapters``, when present: ``{module name: width >= 1}``."""
    spec = config.get("bottleneck_adapters")
    if spec is None:
        return
    if not (isinstance(spec, dict) and spec and all(
            isinstance(name, str) and isinstance(size, int) and not isinstance(size, bool)
            and size >= 1 for name, size in spec.items())):
        raise ValueError(f"{path} has invalid bottleneck_adapters={spec!r:.120} (module "
                         "names and widths >= 1); " + _FIX)


def _check_experts(config: dict[str, Any], path: Path) -> None:
    """``experts``, when present: ``{block: {output, experts, top_k, capacity_factor,
    router_loss_weight}}`` with names and numbers of the right types."""
    spec = config.get("experts")
    if spec is None:
        return

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    valid = isinstance(spec, dict) and spec and all(
        isinstance(block, str) and isinstance(entry, dict)
        and set(entry) == set(EXPERT_KEYS)
        and (entry["output"] is None or isinstance(entry["output"], str))
        and all(isinstance(entry[k], int) and not isinstance(entry[k], bool)
                for k in ("experts", "top_k"))
        and (entry["capacity_factor"] is None or number(entry["capacity_factor"]))
        and number(entry["router_loss_weight"])
        for block, entry in spec.items())
    if not valid:
        raise ValueError(f"{path} has invalid experts={spec!r:.120} (per block: "
                         f"{', '.join(EXPERT_KEYS)}); " + _FIX)


def _check_shared(config: dict[str, Any], path: Path) -> None:
    """``shared_centrals``, when present: lists of two or more names of the save's MPO
    layers (kind ``linear`` or ``embedding``), no name twice."""
    groups = config.get("shared_centrals")
    if groups is None:
        return
    layers = config["layers"]
    names = [name for group in groups for name in group] if isinstance(groups, list) and all(
        isinstance(group, list) for group in groups) else None
    if (not groups or names is None or any(len(group) < 2 for group in groups)
            or len(set(names)) != len(names)
            or not all(isinstance(name, str) and isinstance(layers.get(name), dict)
                       and layers[name].get("kind") in ("linear", "embedding")
                       for name in names)):
        raise ValueError(f"{path} has invalid shared_centrals={groups!r:.120} (groups of two "
                         "or more MPO layers of the save, each in one group); " + _FIX)


def _model_class(spec: dict[str, Any], path: Path) -> type[nn.Module]:
    """The transformers model class a save names; nothing named in the file is imported."""
    import transformers

    name, module = spec["class"], spec["module"]
    cls = None
    if name.isidentifier() and not name.startswith("_") and (
            module == "transformers" or module.startswith("transformers.")):
        cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(
            f"{path} names the model class {module}.{name}, which is not one of transformers' "
            "model classes; mpotn never imports a module named in a save. If you trust this "
            "save, pass an uncompressed instance of its architecture as "
            "load(directory, model=...)")
    return cls


#: The attention implementations a saved config may name: PyTorch's own. transformers
#: fetches and imports a Hub kernel for a name such as ``"org/repo"``, or for
#: ``"flash_attention_2"`` when the flash-attn package is missing.
OWN_ATTENTION = (None, "eager", "sdpa")


def _foreign_attention(settings: Any) -> list[Any]:
    """Attention implementations in a config (and its sub-configs) other than
    ``OWN_ATTENTION``, in any form (a name, or a per-module dict of names). A save never
    holds one (``config.to_dict()`` leaves them out): only an edit puts one there."""
    if isinstance(settings, list):
        return [value for item in settings for value in _foreign_attention(item)]
    if not isinstance(settings, dict):
        return []
    found = [value for key, value in settings.items() if "attn_implementation" in str(key)
             and not (value is None or (isinstance(value, str) and value in OWN_ATTENTION))]
    return found + [value for item in settings.values() for value in _foreign_attention(item)]


def _base_model(spec: dict[str, Any] | None, model: nn.Module | None, path: Path) -> nn.Module:
    if model is not None:
        return model
    if spec is None:
        raise ValueError(
            "this save was made from a model without a Hugging Face config; pass an "
            "uncompressed instance of its architecture as load(directory, model=...)"
        )
    foreign = _foreign_attention(spec.get("config"))
    if foreign:
        raise ValueError(f"{path}: the base model's config names the attention code "
                         f"{foreign[0]!r}, which transformers may fetch from the Hub, and "
                         "loading a save runs no code from elsewhere (a save names none: "
                         f"choose one after loading, model.set_attn_implementation); {_FIX}")
    cls = _model_class(spec, path)
    try:  # parameters without memory (meta); the weights file fills them
        with init_empty_weights(include_buffers=False):
            base = cls(cls.config_class.from_dict(spec["config"]))
        base.tie_weights()  # the context registers a copy of each tied tensor: tie again
        return base
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError,
            ImportError) as error:
        raise ValueError(f"{path}: the base model's config does not build a {cls.__name__} "
                         f"({error}); {_FIX}") from error


def _matrix(module: nn.Module) -> tuple[str, int, int] | None:
    """``(kind, rows, cols)`` of a linear layer or embedding, as its constructor takes them."""
    if isinstance(module, (nn.Linear, MPOLinear, TiedMPOLinear, FactorizedLinear)):
        return "linear", module.in_features, module.out_features
    if is_conv1d(module):  # weight in x out
        return "linear", *module.weight.shape
    if isinstance(module, (nn.Embedding, MPOEmbedding, FactorizedEmbedding)):
        return "embedding", module.num_embeddings, module.embedding_dim
    return None


def _layer(base: nn.Module, name: str, spec: dict[str, Any], dtype: torch.dtype,
           path: Path) -> nn.Module:
    """Build the layer ``spec`` describes and check that it fits the module it replaces."""
    try:
        target = base.get_submodule(name)
    except AttributeError as error:
        raise ValueError(f"{path}: the model has no module {name!r} to replace") from error
    try:
        layer = layer_from_spec(spec, dtype)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as error:
        raise ValueError(f"{path}: layer {name!r} cannot be built ({error}); {_FIX}") from error
    if _matrix(layer) != _matrix(target):
        raise ValueError(
            f"{path}: layer {name!r} is a {_matrix(layer)} (kind, in, out) but the model's "
            f"{type(target).__name__} there is {_matrix(target)}; {_FIX}")
    return layer


def _tensor_places(base: nn.Module) -> dict[int, list[tuple[str, nn.Module, str, bool]]]:
    """Every parameter and persistent buffer of ``base`` by tensor: ``(full name, owning
    module, attribute, is a parameter)`` for each name it has (a tied or shared tensor has
    several)."""
    places: dict[int, list[tuple[str, nn.Module, str, bool]]] = {}
    for prefix, module in base.named_modules(remove_duplicate=False):
        entries = [(key, t, True) for key, t in module._parameters.items()] + [
            (key, t, False) for key, t in module._buffers.items()
            if key not in module._non_persistent_buffers_set]
        for key, tensor, is_param in entries:
            if tensor is not None:
                name = f"{prefix}.{key}" if prefix else key
                places.setdefault(id(tensor), []).append((name, module, key, is_param))
    return places


def _load_weights(base: nn.Module, weights: Path, device: torch.device | None = None) -> None:
    """Put the tensors of ``weights`` in ``base``, each as the file holds it (its dtype),
    read straight onto ``device`` when given, else onto the device of the tensor it
    replaces (for one built without memory, on the meta device: that of the model's other
    parameters, given with ``model=``, else the CPU): one tensor for all the names of a
    tied or shared one, which the file stores once.

    Raises
    ------
    RuntimeError
        If a tensor is missing from the file, has another shape, or the file holds a
        tensor the model has no place for.
    """
    state = load_file(str(weights), device=str(device or "cpu"))
    home = next((t.device for t in base.parameters() if not t.is_meta), torch.device("cpu"))
    used: set[str] = set()
    for places in _tensor_places(base).values():
        present = [name for name, *_ in places if name in state]
        if not present:
            raise RuntimeError(f"{places[0][0]} is missing from the weights")
        value = state[present[0]]
        _, module, key, is_param = places[0]
        old = module._parameters[key] if is_param else module._buffers[key]
        if value.shape != old.shape:
            raise RuntimeError(f"{present[0]} has shape {tuple(value.shape)} in the weights "
                               f"and {tuple(old.shape)} in the model")
        value = value.to(device or (home if old.is_meta else old.device))
        new = nn.Parameter(value, requires_grad=old.requires_grad) if is_param else value
        for _, owner, attribute, _ in places:
            (owner._parameters if is_param else owner._buffers)[attribute] = new
        used.update(present)
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise RuntimeError(f"the weights hold tensors the model has no place for: "
                           f"{unexpected[:5]}")


def _stored_names(weights: Path) -> set[str]:
    with safe_open(str(weights), framework="pt") as handle:
        return set(handle.keys())


def _check_digest(weights: Path, config: dict[str, Any], path: Path) -> None:
    with safe_open(str(weights), framework="pt") as handle:
        recorded = (handle.metadata() or {}).get(DIGEST_KEY)
    if recorded is not None and recorded != _config_digest(config):
        raise ValueError(
            f"{path} was edited after it was saved: it no longer matches the SHA-256 recorded "
            f"in {weights.name} (an edited architecture, dtype or layer would load a different "
            "model); restore the file, or save the model again with MPOModel.save_pretrained")


def read(directory: str | os.PathLike, model: nn.Module | None = None,
         device: str | torch.device | None = None) -> SavedModel:
    """Rebuild a compressed module from a save directory, without the original weights.

    Nothing named in the save is imported, and no path in it may lead outside
    ``directory``; every parameter and buffer gets the dtype it was saved in. The
    architecture is built with its parameters on the meta device (accelerate's
    ``init_empty_weights``), so a load never holds the dense model's weights in
    memory: the weights file fills in each tensor, once for tied and shared ones. A
    model that generates gets the ``generation_config.json`` saved beside it.

    Parameters
    ----------
    directory:
        A folder written by ``save_pretrained``.
    model:
        An uncompressed instance of the architecture; needed only for models
        without a Hugging Face config, or whose class is not one of
        transformers' own (it is modified in place).
    device:
        Where to put the weights (``cpu``, ``cuda``, ``cuda:N``): the file is read
        straight onto it, so that a model for a GPU never passes through the CPU's
        memory whole. By default each tensor goes where the tensor it replaces is
        (the CPU for a model rebuilt from its config).

    Raises
    ------
    ValueError
        If ``device`` is not a device name or not here
        ([check_device][mpotn.devices.check_device]); if the folder is not an mpotn
        save, or its config is not what mpotn
        writes (a missing or unknown field, a wrong type, an unknown layer kind,
        a dtype other than float16, bfloat16, float32 or float64, a path out of
        the folder, a model class that is not transformers'), or its files
        disagree with each other (missing or altered weights, an edited config,
        layers that do not fit the model).
    """
    target = check_device(None if device is None else str(device), "device", trainer=False)
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    config = _read_config(directory)
    path = directory / CONFIG_NAME
    weights = resolve_inside(directory, config["weights"], f"{path} 'weights'")
    if not weights.is_file():
        raise ValueError(f"{directory}: {CONFIG_NAME} names {weights.name}, which is missing")
    if _sha256(weights) != config["sha256"]:
        raise ValueError(
            f"{directory}: {weights.name} does not match the SHA-256 in {CONFIG_NAME}; the "
            "weights were altered or belong to another save"
        )
    _check_digest(weights, config, path)  # before the config builds anything
    base = _base_model(config["base_model"], model, path)
    try:
        compression = CompressionConfig.from_dict(config["compression"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: 'compression' is invalid ({error}); {_FIX}") from error
    dtype = DTYPES[config["dtype"]][1]
    ties = tied_keys(base)
    with init_empty_weights(include_buffers=False):  # the structure; the file fills it
        try:
            rebuild_experts(base, config.get("experts", {}))
            rebuild_bottlenecks(base, config.get("bottleneck_adapters", {}))
        except ValueError as error:
            raise ValueError(f"{path}: {error}; {_FIX}") from error
        for name, spec in config["layers"].items():
            layer = _layer(base, name, spec, dtype, path)
            tied = tied_modules(base, base.get_submodule(name)) if isinstance(
                layer, MPOEmbedding) else []
            replace_module(base, name, layer)
            for other, _ in tied:  # compress shared the layer with the embeddings tied to it
                if other not in config["layers"]:
                    replace_module(base, other, layer)
    try:  # outside: init_empty_weights would register a new copy of each shared tensor
        tie_layers(base)
        tie_centrals(base, config.get("shared_centrals", []))
        keep_surviving_ties(base, ties, stored_apart=_stored_names(weights))
    except ValueError as error:
        raise ValueError(f"{path}: {error}; {_FIX}") from error
    try:
        _load_weights(base, weights, target)
    except RuntimeError as error:
        raise ValueError(
            f"{directory}: the weights disagree with {CONFIG_NAME}: {error}"
        ) from error
    if target is not None:  # buffers the file does not hold (position ids, ...)
        base.to(target)
    _read_generation_config(base, directory)
    mark_shared_centrals(base)  # the marks name the loaded tensors
    base.eval()
    return SavedModel(base, compression, config["report"], config["original_params"])


def _read_generation_config(base: nn.Module, directory: Path) -> None:
    """Give a model that generates the ``generation_config.json`` saved beside it (its end
    tokens, lengths and sampling settings; the config alone gives defaults)."""
    name = "generation_config.json"
    if not (directory / name).is_file() or not getattr(base, "can_generate", lambda: False)():
        return
    from transformers import GenerationConfig

    resolve_inside(directory, name, str(directory))
    try:
        base.generation_config = GenerationConfig.from_pretrained(str(directory), name)
    except (OSError, ValueError) as error:
        raise ValueError(f"{directory / name} is not a generation config ({error}); "
                         f"{_FIX}") from error
