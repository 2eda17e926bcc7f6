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
inputs, the inputs shifted right. Memory is ``I x I`` per linear layer whatever the
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

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mpotn.compression.architectures import CROSS_ATTENTION_INPUT
from mpotn.compression.models import padding_tokenizer
from mpotn.layers.masks import attention_mask_argument, mask_sources, real_rows, token_mask

#: Sentences used for calibration when a command is not told otherwise.
DEFAULT_SAMPLES = 256


@dataclass
class Calibration:
    """What one target saw: ``C = sum x^T x`` (``I x I``, or the diagonal for embeddings)."""

    covariance: torch.Tensor
    tokens: int


def text_batches(tokenizer: Any, texts: Sequence[str], batch_size: int = 32,
                 max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Tokenizer outputs for ``texts``, batched by length (little padding); a tokenizer
    without a padding token pads with its end-of-sequence token
    ([padding_tokenizer][mpotn.compression.models.padding_tokenizer])."""
    if not texts:
        raise ValueError("no texts to tokenize: give at least one sentence")
    tokenizer = padding_tokenizer(tokenizer)
    order = sorted(range(len(texts)), key=lambda k: len(texts[k]))
    return [
        dict(tokenizer([texts[k] for k in order[s:s + batch_size]], padding=True,
                       truncation=True, max_length=max_length, return_tensors="pt"))
        for s in range(0, len(order), batch_size)
    ]


def _device(model: nn.Module | Callable) -> torch.device | None:
    parameters = model.parameters() if isinstance(model, nn.Module) else iter(())
    first = next(parameters, None)
    return first.device if first is not None else None


def _with_decoder_inputs(model: nn.Module | Callable, batch: dict[str, Any]
                         ) -> dict[str, Any]:
    """``batch`` with decoder inputs for an encoder-decoder model given encoder inputs only:
    the inputs shifted right (what its labels would give), their mask shifted alike."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or "input_ids" not in batch or any(
            k in batch for k in ("decoder_input_ids", "decoder_inputs_embeds", "labels")):
        return batch
    shift = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if shift is None:
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model and the "
                         "calibration batches have no decoder_input_ids; add them")
    batch = {**batch, "decoder_input_ids": shift(labels=batch["input_ids"])}
    mask = batch.get("attention_mask")
    if mask is not None:
        batch["decoder_attention_mask"] = torch.cat([mask[:, :1].new_ones(mask.shape[0], 1),
                                                     mask[:, :-1]], dim=1)
    return batch


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
        ``{name: nn.Linear or nn.Embedding}`` to observe.
    progress:
        Show a progress bar over the batches.

    Returns
    -------
    dict
        ``{name: Calibration}``; a target the batches never reached raises.
    """
    device = _device(model)
    masks: dict[int, torch.Tensor | None] = {}  # id(target) -> its mask in this batch
    stats: dict[str, Calibration] = {}
    handles = []

    def observe(name: str, module: nn.Module) -> None:
        def hook(_module: nn.Module, inputs: tuple, _output: Any) -> None:
            embedding = isinstance(module, nn.Embedding)
            x = real_rows(inputs[0], masks.get(id(module)), embedding)
            if embedding:
                counts = torch.bincount(x, minlength=module.num_embeddings).to(torch.float64)
                update, tokens = counts, x.numel()
            else:
                rows = x.to(torch.float64)
                update, tokens = rows.T @ rows, rows.shape[0]
            if name in stats:
                stats[name].covariance += update
                stats[name].tokens += tokens
            else:
                stats[name] = Calibration(update, tokens)

        handles.append(module.register_forward_hook(hook))

    for name, module in targets.items():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise ValueError(f"cannot calibrate {name}: {type(module).__name__} is not "
                             "nn.Linear or nn.Embedding")
        observe(name, module)
    observed = {id(module) for module in targets.values()}
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
    try:
        for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) and device is not None
                     else v for k, v in batch.items()}
            batch = _with_decoder_inputs(model, batch)
            masks.update(dict.fromkeys(observed, batch.get("attention_mask")))
            masks.update(dict.fromkeys(decoder_side, batch.get("decoder_attention_mask")))
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        if isinstance(model, nn.Module):
            model.train(training)
    missing = [name for name in targets if name not in stats]
    if missing:
        raise ValueError(f"the calibration batches never reached {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}: check the inputs")
    return stats
