"""Calibration: the second moment ``C = X^T X`` of every target matrix's inputs (SPEC §7).

[calibrate][mpotn.compression.calibrate.calibrate] runs the model on calibration batches (tokenizer
outputs; task text, no labels) with a forward hook on each target and accumulates, in
float64 on the module's own device, the sum of ``x^T x`` over every real
token. Padding is excluded through the ``attention_mask`` that reaches each target:
the innermost module above it that takes one decides ([mpotn.layers.masks][]), so
that T5's decoder uses its own, except that cross-attention keys and values take
the encoder's (they read its tokens) and, in an encoder-decoder, a matrix outside
both stacks (an untied ``lm_head``) the decoder's. An input that is not one row per
token (a pooler's) counts every row, and position ids count once per sentence. An
encoder-decoder model given encoder inputs only gets its labels' usual decoder
inputs, the inputs shifted right; a model that would build a key-value cache runs
with ``use_cache=False``. Memory is ``I x I`` per linear layer whatever the
number of tokens. An embedding's inputs are one-hot rows, so its ``C``
is diagonal: the token counts.

Examples
--------
>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 3))
>>> batches = [{"input": torch.randn(5, 4)}]
>>> stats = calibrate(lambda input: model(input), batches, {"0": model[0]})
>>> stats["0"].covariance.shape, stats["0"].tokens
(torch.Size([4, 4]), 5)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mpotn.compression.architectures import CROSS_ATTENTION_INPUT, in_expert
from mpotn.compression.models import model_device, padding_tokenizer
from mpotn.layers.masks import attention_mask_argument, mask_sources, real_rows, token_mask


@dataclass
class Calibration:
    """What one target saw: ``C = sum x^T x`` (``I x I``, or the diagonal for embeddings)."""

    covariance: torch.Tensor
    tokens: int


def text_batches(tokenizer: Any, texts: Sequence[str], batch_size: int = 32,
                 max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Tokenizer outputs for ``texts``, batched by length (little padding), padded on the
    right (each text keeps the positions it has alone); a tokenizer without a padding
    token pads with its end-of-sequence token
    ([padding_tokenizer][mpotn.compression.models.padding_tokenizer]).

    Examples
    --------
    >>> from mpotn.compression.models import load_tokenizer
    >>> batches = text_batches(load_tokenizer(), ["a fine film .", "dull .", "so long and dull ."],
    ...                        batch_size=2)
    >>> [tuple(b["input_ids"].shape) for b in batches]  # shortest texts together
    [(2, 6), (1, 7)]
    """
    if not texts:
        raise ValueError("no texts to tokenize: give at least one sentence")
    tokenizer = padding_tokenizer(tokenizer)
    order = sorted(range(len(texts)), key=lambda k: len(texts[k]))
    return [
        dict(tokenizer([texts[k] for k in order[s:s + batch_size]], padding=True,
                       padding_side="right", truncation=True, max_length=max_length,
                       return_tensors="pt"))
        for s in range(0, len(order), batch_size)
    ]


def _with_decoder_inputs(model: nn.Module | Callable, batch: dict[str, Any]
                         ) -> dict[str, Any]:
    """``batch`` with decoder inputs for an encoder-decoder model given encoder inputs only:
    the inputs shifted right (what its labels would give), with the inputs' mask: the
    positions whose outputs predict a real token (so that a sentence counts the same
    tokens in a padded batch as alone). A left-padded batch's labels are its real tokens
    moved to the front first, so that each decoder row starts, as alone, at its start
    token."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or "input_ids" not in batch or any(
            k in batch for k in ("decoder_input_ids", "decoder_inputs_embeds", "labels")):
        return batch
    shift = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if shift is None:
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model and the "
                         "calibration batches have no decoder_input_ids; add them")
    labels, mask = batch["input_ids"], batch.get("attention_mask")
    if mask is not None:  # real tokens first, in their order (a right-padded batch is kept)
        order = torch.argsort((mask == 0).to(torch.int32), dim=1, stable=True)
        labels, mask = labels.gather(1, order), mask.gather(1, order)
    batch = {**batch, "decoder_input_ids": shift(labels=labels)}
    if mask is not None:
        batch["decoder_attention_mask"] = mask
    return batch


def _without_cache(model: nn.Module | Callable[..., Any], batch: dict[str, Any]
                   ) -> dict[str, Any]:
    """``batch`` with ``use_cache=False`` for a model whose configuration would build a
    key-value cache (a decoder's default) and whose ``forward`` names ``use_cache``: a
    calibration pass reads each layer's inputs once, and a cache would hold every layer's
    keys and values until the pass ends."""
    if "use_cache" in batch or not getattr(getattr(model, "config", None), "use_cache", False):
        return batch
    try:
        names = inspect.signature(model.forward if isinstance(model, nn.Module) else model
                                  ).parameters
    except (TypeError, ValueError):  # a callable without a signature: leave it its defaults
        return batch
    return {**batch, "use_cache": False} if "use_cache" in names else batch


def prepared(model: nn.Module | Callable[..., Any], batch: Mapping[str, Any],
             device: torch.device | None) -> dict[str, Any]:
    """``batch`` as the model takes it: its tensors on ``device`` (unless ``None``),
    decoder inputs added for an encoder-decoder model given encoder inputs only, and
    ``use_cache=False`` for a model that would otherwise build a key-value cache."""
    return _without_cache(model, _with_decoder_inputs(model, {
        k: v.to(device) if isinstance(v, torch.Tensor) and device is not None else v
        for k, v in batch.items()}))


class UnpairedInputsError(ValueError):
    """A target ran differently in a model and in its reference on the same batch (a
    routed expert sees other tokens), so its inputs cannot be paired token by token."""


def _weight_sharing_embeddings(model: nn.Module | Callable[..., Any],
                               targets: Mapping[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """``(target name, embedding)`` for every other ``nn.Embedding`` of ``model`` that
    holds an embedding target's weight: T5's ``encoder.embed_tokens`` and
    ``decoder.embed_tokens`` for its ``shared``, which transformers 5 builds as separate
    modules and never calls. Their inputs count as the target's."""
    if not isinstance(model, nn.Module):
        return []
    weights = {id(m.weight): name for name, m in targets.items() if isinstance(m, nn.Embedding)}
    own = {id(m) for m in targets.values()}
    return [(weights[id(m.weight)], m) for m in model.modules()
            if isinstance(m, nn.Embedding) and id(m) not in own and id(m.weight) in weights]


class _StopForwardError(Exception):
    """Raised by a hook to end a forward pass whose remaining layers nothing observes."""


def _observe(
    model: nn.Module | Callable[..., Any],
    batches: Iterable[Mapping[str, torch.Tensor]],
    targets: Mapping[str, nn.Module],
    on_rows: Callable[[str, torch.Tensor, nn.Module, torch.Tensor], None],
    *,
    progress: bool = False,
    calls: Mapping[str, int] | None = None,
) -> int:
    """Run ``model`` on ``batches`` and hand every call's real input rows of each target
    to ``on_rows(name, rows, module, source)``: token ids for an embedding, ``N x I``
    activations for a linear layer (padding removed as
    [calibrate][mpotn.compression.calibrate.calibrate] describes); ``source`` is the
    input tensor they come from. With ``calls``, a batch's forward pass stops once
    every target has run that many times. Returns the number of batches."""
    device = model_device(model) if isinstance(model, nn.Module) else None
    masks: dict[int, torch.Tensor | None] = {}  # id(target) -> its mask in this batch
    counts = dict.fromkeys(targets, 0)
    handles = []

    def observe(name: str, module: nn.Module) -> None:
        embedding = isinstance(module, nn.Embedding)
        flattened = not in_expert(name)  # an expert sees routed tokens, not the batch's

        def hook(_module: nn.Module, inputs: tuple, _output: Any) -> None:
            rows = real_rows(inputs[0], masks.get(id(module)), embedding, flattened)
            on_rows(name, rows, module, inputs[0])
            counts[name] += 1
            if calls is not None and all(counts[n] >= c for n, c in calls.items()):
                raise _StopForwardError

        handles.append(module.register_forward_hook(hook))

    for name, module in targets.items():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise ValueError(f"cannot calibrate {name}: {type(module).__name__} is not "
                             "nn.Linear or nn.Embedding")
        observe(name, module)
    aliases = _weight_sharing_embeddings(model, targets)
    for name, module in aliases:
        observe(name, module)
    observed = {id(module) for module in targets.values()} | {id(m) for _, m in aliases}
    # cross-attention keys and values read the encoder's tokens wherever they sit
    encoder_side = {id(m) for name, m in targets.items() if CROSS_ATTENTION_INPUT.search(name)}
    sources = (mask_sources(model, lambda m: id(m) in observed)
               if isinstance(model, nn.Module) else [])
    inner = {id(m) for source in sources if source is not model for m in source.modules()}
    # in an encoder-decoder, what no stack holds (an untied lm_head) reads the decoder's
    decoder_side = (observed - inner - encoder_side
                    if getattr(getattr(model, "config", None), "is_encoder_decoder", False)
                    else set())

    handed = observed - encoder_side - decoder_side  # what the sources' masks decide

    def hand_mask(source: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        usable, mask = token_mask(attention_mask_argument(source, args, kwargs))
        if usable:
            masks.update({id(m): mask for m in source.modules() if id(m) in handed})

    handles += [source.register_forward_pre_hook(hand_mask, with_kwargs=True)
                for source in sources]
    training = model.training if isinstance(model, nn.Module) else False
    if isinstance(model, nn.Module):
        model.eval()
    seen = 0
    try:
        for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
            seen += 1
            batch = prepared(model, batch, device)
            masks.update(dict.fromkeys(observed, batch.get("attention_mask")))
            masks.update(dict.fromkeys(decoder_side, batch.get("decoder_attention_mask")))
            counts.update(dict.fromkeys(counts, 0))
            with suppress(_StopForwardError):  # the rest of the model changes nothing observed
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        if isinstance(model, nn.Module):
            model.train(training)
    return seen


def _check_reached(targets: Iterable[str], seen: Mapping[str, Any], batches: int) -> None:
    if not batches:
        raise ValueError("the calibration is empty (no batches: an empty list, or a "
                         "generator already used up?); give at least one batch, or "
                         "calibration=None")
    missing = [name for name in targets if name not in seen]
    if missing:
        raise ValueError(f"the calibration batches never reached {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}: check the inputs")


@torch.no_grad()
def calibrate(
    model: nn.Module | Callable[..., Any],
    batches: Iterable[Mapping[str, torch.Tensor]],
    targets: Mapping[str, nn.Module],
    *,
    progress: bool = False,
) -> dict[str, Calibration]:
    """Accumulate each target's input second moment over ``batches``.

    Parameters
    ----------
    model:
        The model, called as ``model(**batch)``.
    batches:
        Model-input dicts (e.g. tokenizer outputs); tensors are moved to the
        model's device. Their ``attention_mask`` (or the one the innermost module
        above a target that takes one is called with) selects the real tokens.
    targets:
        ``{name: nn.Linear or nn.Embedding}`` to observe. Another ``nn.Embedding``
        of the model that holds an embedding target's weight (T5's
        ``encoder.embed_tokens`` for ``shared``) counts as that target.
    progress:
        Show a progress bar over the batches.

    Returns
    -------
    dict
        ``{name: Calibration}`` in the order the targets first ran; a target the
        batches never reached raises.
    """
    stats: dict[str, Calibration] = {}

    def accumulate(name: str, x: torch.Tensor, module: nn.Module, _source: torch.Tensor
                   ) -> None:
        if isinstance(module, nn.Embedding):
            counts = torch.bincount(x, minlength=module.num_embeddings)
            update, tokens = counts.to(torch.float64), x.numel()
        else:
            rows = x.to(torch.float64)
            update, tokens = rows.T @ rows, rows.shape[0]
        if name in stats:
            stats[name].covariance += update
            stats[name].tokens += tokens
        else:
            stats[name] = Calibration(update, tokens)

    _check_reached(targets, stats, _observe(model, batches, targets, accumulate,
                                            progress=progress))
    return stats


@dataclass
class PairedCalibration:
    """What one linear target saw in a model and in its reference, token by token.

    Attributes
    ----------
    covariance:
        ``C = X^T X`` of the model's inputs ``X`` (``I x I``).
    cross:
        ``X^T X_0`` with the reference's inputs ``X_0`` for the same tokens.
    reference:
        ``C_0 = X_0^T X_0``.
    tokens:
        The number of rows.
    """

    covariance: torch.Tensor
    cross: torch.Tensor
    reference: torch.Tensor
    tokens: int


@torch.no_grad()
def calibrate_paired(
    model: nn.Module | Callable[..., Any],
    batches: Iterable[Mapping[str, torch.Tensor]],
    targets: Mapping[str, nn.Linear],
    reference: Callable[[], AbstractContextManager[Any]],
) -> dict[str, PairedCalibration]:
    """Second and cross moments of each target's inputs in ``model`` and in its reference.

    Each batch runs twice: inside ``reference()`` (a context in which ``model`` is the
    reference, e.g. the original model before compression), and outside it until every
    target has run as often as in the reference. The ``k``-th call of a target in one
    run is paired with its ``k``-th call in the other, row by row, so that
    ``cross = X^T X_0`` compares the inputs the same tokens give in both. This is what
    fitting a matrix to the reference's outputs from the model's inputs needs
    (``compress(..., sequential=True)``).

    Parameters
    ----------
    model:
        The model, called as ``model(**batch)``.
    batches:
        Model-input dicts, iterated once.
    targets:
        ``{name: nn.Linear}``, modules of ``model`` both inside and outside
        ``reference()``.
    reference:
        Returns a context manager that makes ``model`` the reference while it is
        open.

    Returns
    -------
    dict
        ``{name: PairedCalibration}``.

    Raises
    ------
    UnpairedInputsError
        When a target runs a different number of times, or on a different number
        of rows, in the two runs of a batch (a routed expert); a ``ValueError``.

    Examples
    --------
    >>> import contextlib
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    >>> @contextlib.contextmanager
    ... def doubled():  # the "reference": the first layer's outputs doubled
    ...     model[0].weight.mul_(2); model[0].bias.mul_(2)
    ...     yield
    ...     model[0].weight.div_(2); model[0].bias.div_(2)
    >>> paired = calibrate_paired(lambda input: model(input), [{"input": torch.randn(4, 3)}],
    ...                           {"1": model[1]}, doubled)
    >>> torch.allclose(paired["1"].cross, 2 * paired["1"].covariance)
    True
    """
    for linear in targets.values():
        if not isinstance(linear, nn.Linear):
            raise ValueError("calibrate_paired takes nn.Linear targets, got "
                             f"{type(linear).__name__}")
    stats: dict[str, PairedCalibration] = {}
    count = 0
    for batch in batches:
        count += 1
        _pair_batch(model, batch, targets, reference, stats)
    _check_reached(targets, stats, count)
    return stats


def _pair_batch(model: nn.Module | Callable[..., Any], batch: Mapping[str, torch.Tensor],
                targets: Mapping[str, nn.Linear],
                reference: Callable[[], AbstractContextManager[Any]],
                stats: dict[str, PairedCalibration]) -> None:
    """Add one batch's paired moments to ``stats``. The reference runs whole; the model
    stops once each target has run as often as in the reference."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (source, rows): q, k, v share theirs

    def keep(name: str, x: torch.Tensor, _module: nn.Module, source: torch.Tensor) -> None:
        same = next((rows for s, rows in kept if s is source and rows.shape == x.shape), None)
        if same is None:
            kept.append((source, x))
        seen[name].append(x if same is None else same)

    with reference():
        _observe(model, [batch], targets, keep)
    calls = {name: len(rows) for name, rows in seen.items()}
    pending = {name: iter(rows) for name, rows in seen.items()}

    def pair(name: str, x: torch.Tensor, _module: nn.Module, _source: torch.Tensor) -> None:
        x0 = next(pending[name], None)
        if x0 is None or x0.shape != x.shape:
            raise UnpairedInputsError(
                f"{name} ran differently in the model and in its reference on the same "
                "batch (a routed expert?); cannot pair its inputs")
        x, x0 = x.to(torch.float64), x0.to(torch.float64)
        update = (x.T @ x, x.T @ x0, x0.T @ x0)
        if name in stats:
            s = stats[name]
            s.covariance += update[0]
            s.cross += update[1]
            s.reference += update[2]
            s.tokens += x.shape[0]
        else:
            stats[name] = PairedCalibration(*update, x.shape[0])

    _observe(model, [batch], targets, pair, calls=calls)
    if any(next(rows, None) is not None for rows in pending.values()):
        raise UnpairedInputsError("a target ran more often in the reference than in the "
                                  "model on the same batch; cannot pair its inputs")
