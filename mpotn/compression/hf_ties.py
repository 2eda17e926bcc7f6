"""Transformers' weight ties around the layers mpotn puts in a model.

A transformers model declares the tensors it shares (``_tied_weights_keys``, read by
its ``tie_weights``): BERT's output layer has the word embeddings' table as weight and
``cls.predictions.bias`` as bias; GPT-2's ``lm_head`` has ``wte``'s table. Once mpotn
replaces such a layer, some of those names no longer exist (an ``MPOEmbedding`` keeps
cores, not a ``weight``), and transformers' ``tie_weights`` -- which the Trainer calls
under FSDP, DeepSpeed ZeRO-3 and on TPUs -- would fail.
[keep_surviving_ties][mpotn.compression.hf_ties.keep_surviving_ties] leaves each
transformers model the ties whose two tensors still exist and ties them (a replaced
layer's bias is the model's shared bias again); mpotn ties the rest itself
([mpotn.layers.tie_layers][]). [restore_ties][mpotn.compression.hf_ties.restore_ties]
ties a merged model's kept ties again and declares the ties it has (its architecture's,
unless some were undone).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

from torch import nn
from transformers import PreTrainedModel

__all__ = ["keep_surviving_ties", "restore_ties", "tied_keys"]

#: What the attributes set here shadow (the class's declaration of its ties).
_DECLARED = "_tied_weights_keys"
#: transformers 5 declares ties by parameter name and ties them in ``tie_weights``; with
#: 4.x (another scheme) the models are left as transformers has them.
SUPPORTED = hasattr(PreTrainedModel, "get_expanded_tied_weights_keys")


def _transformers_models(model: nn.Module) -> Iterator[tuple[str, PreTrainedModel]]:
    for prefix, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, PreTrainedModel):
            yield prefix, module


def _tensors(module: nn.Module) -> dict[str, object]:
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def _actual(module: PreTrainedModel, pairs: dict[str, str]) -> dict[str, str]:
    """Of ``pairs`` (``{target: source}``), those whose two names hold one tensor now."""
    tensors = _tensors(module)
    return {target: source for target, source in pairs.items()
            if target in tensors and tensors.get(source) is tensors[target]}


def tied_keys(model: nn.Module) -> dict[str, dict[str, str]]:
    """Each transformers model in ``model`` (by module name, ``""`` for ``model``
    itself) and its ties, ``{target: source}`` by parameter name relative to it: those
    its class declares (and its config enables) whose two names hold one tensor now (a
    tie a user undid, or that transformers left undone for a checkpoint holding two
    different tensors, is not one).

    Examples
    --------
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20))
    >>> tied_keys(model)
    {'': {'lm_head.weight': 'transformer.wte.weight'}, 'transformer': {}}
    >>> model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    >>> tied_keys(model)[""]
    {}
    """
    if not SUPPORTED:
        return {}
    return {prefix: _actual(module, module.get_expanded_tied_weights_keys(all_submodels=False))
            for prefix, module in _transformers_models(model)}


def _declare(models: dict[str, PreTrainedModel]) -> None:
    for module in models.values():
        module.all_tied_weights_keys = module.get_expanded_tied_weights_keys(
            all_submodels=True)


def keep_surviving_ties(model: nn.Module, ties: dict[str, dict[str, str]],
                        stored_apart: Collection[str] = ()) -> None:
    """After mpotn replaced modules of ``model``: each transformers model in it keeps,
    of its ``ties`` ([tied_keys][mpotn.compression.hf_ties.tied_keys] taken before the
    replacement), those whose target and source tensors both still exist, and they are
    tied (the target becomes the source's ``nn.Parameter``). The kept ties become the
    model's ``_tied_weights_keys`` and ``all_tied_weights_keys``, so that its
    ``tie_weights()`` ties them again instead of failing on a replaced name.

    ``stored_apart``: full names that a weights file holds as separate tensors (an
    older save): a tie with both its names there is dropped, so each loads its own.

    Examples
    --------
    >>> import torch
    >>> from transformers import BertConfig, BertForMaskedLM
    >>> from mpotn.compression.compress import compress
    >>> config = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1,
    ...                     num_attention_heads=2, intermediate_size=16)
    >>> model = compress(BertForMaskedLM(config), targets=["embeddings", "head"],
    ...                  progress=False)  # calls keep_surviving_ties
    >>> head = model.cls.predictions
    >>> head.decoder.bias is head.bias  # still BERT's one output bias
    True
    >>> model.base_model.all_tied_weights_keys
    {'cls.predictions.decoder.bias': 'cls.predictions.bias'}
    >>> model.tie_weights()  # transformers' own, as FSDP or ZeRO-3 call it
    """
    if not SUPPORTED:
        return
    models = dict(_transformers_models(model))
    for prefix, pairs in ties.items():
        module = models.get(prefix)
        if module is None:
            continue
        tensors = _tensors(module)
        outer = f"{prefix}." if prefix else ""
        kept = {target: source for target, source in pairs.items()
                if target in tensors and source in tensors
                and not {outer + target, outer + source} <= set(stored_apart)}
        for target, source in kept.items():
            parent, _, attribute = target.rpartition(".")
            setattr(module.get_submodule(parent), attribute, tensors[source])
        setattr(module, _DECLARED, kept)
    _declare(models)


def restore_ties(model: nn.Module) -> None:
    """For a model whose replaced layers were all made dense again
    ([mpotn.compression.merge.merge][]): tie again what the compressed model kept tied
    (its ``_tied_weights_keys``; the merged layers hold copies of its biases), and let
    each transformers model declare the ties it has: its class's, or, when some are not
    there (a tie undone before compressing, or kept apart by an older save), those it
    has. No value changes."""
    if not SUPPORTED:
        return
    models = dict(_transformers_models(model))
    for module in models.values():
        kept = module.__dict__.pop(_DECLARED, None) or {}
        tensors = _tensors(module)
        for target, source in kept.items():
            parent, _, attribute = target.rpartition(".")
            setattr(module.get_submodule(parent), attribute, tensors[source])
        declared = module.get_expanded_tied_weights_keys(all_submodels=False)
        actual = _actual(module, declared)
        if actual != declared:
            setattr(module, _DECLARED, actual)
    _declare(models)
