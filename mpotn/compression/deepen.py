r"""Deeper models at almost no parameter cost (MPOBERT, SPEC §4; issue 14).

With the central tensors shared across layers
([share_centrals][mpotn.compression.sharing.share_centrals]), a new layer costs only
what is specific to it: its auxiliary tensors, biases and norms.
[deepen][mpotn.compression.deepen.deepen] inserts such layers into the encoder stack
(``model.base_model.<...>.layer``, the one ``nn.ModuleList`` of
``config.num_hidden_layers`` layers): each new layer is a copy of its neighbour (the
paper's stable initialisation: auxiliary tensors, biases and norms copied), and its
MPO layers use the *same* central ``nn.Parameter`` as the neighbour's, so the new
layers join the sharing groups
([shared_central_groups][mpotn.compression.sharing.shared_central_groups]) and #To
grows only by their non-central parameters.

``config.num_hidden_layers`` (and every submodule's ``layer_idx``, and a config's
per-layer settings such as ``layer_types``) follows, ``config.layer_origins`` lists
the original layer each layer descends from
([layer_origins][mpotn.compression.deepen.layer_origins]), so a save
rebuilds the deeper architecture and [load][mpotn.compression.model.load] restores it,
sharing included.

Healing afterwards -- distilling the original model into the deeper one so that it
starts close to it -- is [heal][mpotn.finetune.heal.heal] (``mpotn heal MODEL --teacher
ORIGINAL``), which compares a deeper student at matched hidden states
([matched_layers][mpotn.finetune.heal.matched_layers]: after each original layer and
its copies).

Examples
--------
>>> import torch
>>> from transformers import BertConfig, BertModel
>>> from mpotn.compression import compress, share_centrals
>>> torch.manual_seed(0) and None
>>> bert = BertModel(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3,
...                             num_attention_heads=2, intermediate_size=48))
>>> model = compress(bert, targets=["attention", "ffn"], n=3, progress=False)
>>> _ = share_centrals(model, init="layer")
>>> before = model.totals()["total_params"]
>>> report = deepen(model, depth=6)
>>> len(model.encoder.layer), model.config.num_hidden_layers
(6, 6)
>>> [(row["layer"], row["copy_of"]) for row in report]
[(1, 0), (3, 2), (5, 4)]
>>> layers = model.mpo_layers()
>>> layers["encoder.layer.5.output.dense"].central is layers["encoder.layer.0.output.dense"].central
True
>>> model.totals()["total_params"] - before == sum(row["params"] for row in report)
True
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from mpotn.compression.architectures import layer_index
from mpotn.compression.config import MPO_LAYERS, layer_holder
from mpotn.compression.parameters import count_parameters, lfa_parameters
from mpotn.compression.sharing import shared_central_groups, tie_centrals
from mpotn.table import Table

#: Where the new layers go: ``"interleave"`` spreads them evenly, each after the
#: original layer it copies; ``"append"`` puts them all after the last layer, copies of it.
PLACEMENTS = ("interleave", "append")


def _has_mpo(module: nn.Module) -> bool:
    return any(isinstance(m, MPO_LAYERS) for m in module.modules())


def find_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name (relative to ``base_model``) and the ``nn.ModuleList`` of the layer stack:
    the one whose children are the numbered layers (``...layer.N``, ``...layers.N``) of
    one class, as many as ``config.num_hidden_layers``, holding MPO layers.

    Raises
    ------
    ValueError
        When no such list, or more than one (encoder-decoder models), is found.
    """
    base = layer_holder(model)
    expected = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    found = []
    for name, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if layer_index(f"{name}.0") is None or not name.split(".")[-1].startswith("layer"):
            continue
        if len({type(layer) for layer in module}) != 1 or not _has_mpo(module):
            continue
        if expected is not None and len(module) != expected:
            continue
        found.append((name, module))
    if len(found) != 1:
        what = "none" if not found else ", ".join(repr(name) for name, _ in found)
        raise ValueError(
            "deepen needs one stack of compressed layers, an nn.ModuleList named '...layer' "
            "or '...layers' of config.num_hidden_layers layers of one class holding MPO "
            f"layers (BERT, RoBERTa, ELECTRA, ...); found {what}. Compress the model's "
            "layers first; encoder-decoder models are not supported")
    return found[0]


#: Settings of a transformers config with one entry per layer: ``layer_types`` (full or
#: sliding-window attention, as Qwen2 and Gemma2 have it), ``no_rope_layers``.
PER_LAYER_SETTINGS = ("layer_types", "no_rope_layers")


def layer_origins(model: nn.Module) -> list[int] | None:
    """The layer of the original model each layer of ``model``'s stack descends from, as
    [deepen][mpotn.compression.deepen.deepen] records it in ``config.layer_origins``
    (``[0, 0, 1, 1, 2, 2]`` for 3 -> 6 interleaved); ``None`` for a model never deepened,
    or one whose config has no such list. A distributed wrapper's ``module`` is looked
    through.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> layer_origins(SimpleNamespace(config=SimpleNamespace(layer_origins=[0, 1, 1])))
    [0, 1, 1]
    """
    config = getattr(layer_holder(getattr(model, "module", model)), "config", None)
    origins = getattr(config, "layer_origins", None)
    return list(origins) if isinstance(origins, (list, tuple)) else None


def _placement(layers: int, depth: int, placement: str) -> list[tuple[int, bool]]:
    """``(original index, is a copy)`` per position of the deeper stack."""
    extra = depth - layers
    if placement == "append":
        return [(i, False) for i in range(layers)] + [(layers - 1, True)] * extra
    order = []
    for i in range(layers):  # layer i gets the extra layers with index in [i e / L, (i+1) e / L)
        order.append((i, False))
        order += [(i, True)] * ((i + 1) * extra // layers - i * extra // layers)
    return order


def _check_shared(base: nn.Module, name: str, stack: nn.ModuleList) -> None:
    grouped = {n for names in shared_central_groups(base) for n in names}
    alone = [f"{name}.{i}.{sub}" for i, layer in enumerate(stack)
             for sub, m in layer.named_modules() if isinstance(m, MPO_LAYERS)
             and f"{name}.{i}.{sub}" not in grouped]
    if alone:
        raise ValueError(
            f"deepen needs every MPO layer of the stack to share its central tensor, but "
            f"{len(alone)} do not ({', '.join(alone[:3])}{', ...' if len(alone) > 3 else ''});"
            " call share_centrals(model, init='layer') or init='fit' first")


def _copy_layer(layer: nn.Module) -> tuple[nn.Module, int]:
    """A deep copy of ``layer`` whose MPO layers use ``layer``'s central Parameters (not
    copies of them) and whose config objects are the model's; the number of centrals."""
    from transformers import PretrainedConfig

    keep: dict[int, Any] = {}
    for module in layer.modules():
        for value in vars(module).values():
            if isinstance(value, PretrainedConfig):
                keep[id(value)] = value
        if isinstance(module, MPO_LAYERS):
            keep[id(module.central)] = module.central
    new = copy.deepcopy(layer, memo=dict(keep))
    shared = 0
    for source, target in zip(layer.modules(), new.modules()):
        if isinstance(source, MPO_LAYERS):
            target.cores[target.central_index] = source.central  # re-point, never duplicate
            target._cache = None
            shared += 1
    return new, shared


def _renumber_records(model: nn.Module, name: str, moves: dict[int, int]) -> None:
    """Rename the compression report's rows of the stack's layers to their new positions."""
    records = getattr(model, "records", None)
    if records is None or all(old == new for old, new in moves.items()):
        return
    prefix = f"{name}." if name else ""
    for row in records:
        row_name = row.get("name")
        if not isinstance(row_name, str) or not row_name.startswith(prefix):
            continue
        head, _, rest = row_name[len(prefix):].partition(".")
        if head.isdigit() and int(head) in moves:
            row["name"] = f"{prefix}{moves[int(head)]}" + (f".{rest}" if rest else "")
            if "layer" in row:
                row["layer"] = layer_index(row["name"])


def deepen(model: nn.Module, depth: int, placement: str = "interleave") -> Table:
    r"""Insert layers into the encoder stack of a compressed model whose central tensors are
    shared, so that it has ``depth`` layers (MPOBERT); the model is changed in place.

    Each new layer is a deep copy of its neighbour -- auxiliary tensors, biases, norms
    and any uncompressed weight copied (the paper's stable initialisation) -- except the
    central tensors: each of its MPO layers holds the neighbour's shared central
    ``nn.Parameter`` itself, so the new layers join the sharing groups and #To grows by
    their auxiliary tensors, biases and norms only. ``config.num_hidden_layers``, the
    ``layer_idx`` of every submodule and the config's
    [PER_LAYER_SETTINGS][mpotn.compression.deepen.PER_LAYER_SETTINGS] (a copy keeps its
    neighbour's: sliding-window or full attention) are updated, and the compression
    report's rows
    renamed to their layers' new positions (the new layers have none: they were copied,
    not compressed). ``original_params`` stays the shallower original's.

    Heal the deeper model afterwards by distillation from the original
    ([heal][mpotn.finetune.heal.heal], ``mpotn heal MODEL --teacher ORIGINAL``), which
    compares teacher layer ``j`` with student layer ``round(j L_s / L_t)``.

    Parameters
    ----------
    model:
        A compressed model ([MPOModel][mpotn.compression.model.MPOModel], or a module
        holding MPO layers) whose stack's MPO layers all share their central tensors
        ([share_centrals][mpotn.compression.sharing.share_centrals]); BERT, RoBERTa,
        ELECTRA and other models with one stack ``...layer`` of
        ``config.num_hidden_layers`` layers.
    depth:
        The number of layers afterwards, at least the current number (equal: nothing
        changes).
    placement:
        ``"interleave"`` (default): the new layers spread evenly, original layer $i$
        of $L$ followed by $\lfloor (i+1)e/L \rfloor - \lfloor ie/L \rfloor$ copies of
        itself for $e$ = ``depth`` $- L$ new layers (3 -> 6: every layer followed by
        one copy). ``"append"``: all after the last layer, copies of it.

    Returns
    -------
    Table
        One row per new layer: its position ``layer``, its module ``name``, the
        position of the layer it copies (``copy_of``), the ``params`` it adds,
        of which ``lfa_params`` are auxiliary tensors, biases and norms (#Pr) and
        ``dense_params`` uncompressed weights, and ``shared_centrals``, the number
        of its MPO layers using a shared central tensor.

    Raises
    ------
    ValueError
        For ``depth`` below the current number of layers, an unknown ``placement``,
        a model without one stack of compressed layers, or a stack with an MPO
        layer whose central tensor is not shared.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise ValueError(f"depth must be a whole number, got {depth!r}")
    base = layer_holder(model)
    name, stack = find_stack(base)
    layers = len(stack)
    if depth < layers:
        raise ValueError(f"deepen only adds layers: depth={depth} is below the model's "
                         f"{layers} layers")
    _check_shared(base, name, stack)
    report = Table()
    if depth == layers:
        return report
    originals = list(stack)
    new_layers: list[nn.Module] = []
    moves: dict[int, int] = {}
    order = _placement(layers, depth, placement)
    for position, (index, is_copy) in enumerate(order):
        if not is_copy:
            moves[index] = position
            new_layers.append(originals[index])
            continue
        layer, shared = _copy_layer(originals[index])
        new_layers.append(layer)
        centrals = {id(m.central) for m in layer.modules() if isinstance(m, MPO_LAYERS)}
        added = count_parameters(p for p in layer.parameters() if id(p) not in centrals)
        lfa = count_parameters(p for _, p in lfa_parameters(layer, head=False))
        report.append({"layer": position, "name": f"{name}.{position}",
                       "copy_of": moves[index], "params": added, "lfa_params": lfa,
                       "dense_params": added - lfa, "shared_centrals": shared})
    del stack[:]
    stack.extend(new_layers)
    for position, layer in enumerate(stack):
        for module in layer.modules():
            value = getattr(module, "layer_idx", None)
            if isinstance(value, int) and not isinstance(value, bool):
                module.layer_idx = position
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = depth
    if config is not None:  # deepened twice: origins of the first model
        origins = layer_origins(base)
        origins = origins if origins and len(origins) == layers else list(range(layers))
        config.layer_origins = [origins[index] for index, _ in order]
    for key in PER_LAYER_SETTINGS:  # each copy keeps its source layer's
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == layers:
            setattr(config, key, [values[index] for index, _ in order])
    tie_centrals(base, shared_central_groups(base))  # records how many layers share each
    _renumber_records(model, name, moves)
    return report
