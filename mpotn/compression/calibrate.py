"""Calibration: the second moment ``C = X^T X`` of every target matrix's inputs (SPEC §7).

[calibrate][mpotn.compression.calibrate.calibrate] runs the model on calibration batches (tokenizer
outputs; task text, no labels) with a forward hook on each target and accumulates, in
float64 on the module's own device, the sum of ``x^T x`` over every real
token (padding excluded through the batch's ``attention_mask``). Memory is
``I x I`` per linear layer whatever the number of tokens. An embedding's
inputs are one-hot rows, so its ``C`` is diagonal: the token counts.

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

#: Sentences used for calibration when a command is not told otherwise.
DEFAULT_SAMPLES = 256


@dataclass
class Calibration:
    """What one target saw: ``C = sum x^T x`` (``I x I``, or the diagonal for embeddings)."""

    covariance: torch.Tensor
    tokens: int


def text_batches(tokenizer: Any, texts: Sequence[str], batch_size: int = 32,
                 max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Tokenizer outputs for ``texts``, batched by length (little padding)."""
    if not texts:
        raise ValueError("no texts to tokenize: give at least one sentence")
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
        model's device. An ``attention_mask`` of the inputs' leading shape
        selects the real tokens.
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
    state: dict[str, Any] = {"mask": None}
    stats: dict[str, Calibration] = {}
    handles = []

    def observe(name: str, module: nn.Module) -> None:
        def hook(_module: nn.Module, inputs: tuple, _output: Any) -> None:
            x = inputs[0]
            mask = state["mask"]
            if mask is not None and tuple(mask.shape) == tuple(x.shape[: mask.dim()]):
                x = x[mask.to(x.device).bool()]
            if isinstance(module, nn.Embedding):
                ids = x.reshape(-1)
                counts = torch.bincount(ids, minlength=module.num_embeddings).to(torch.float64)
                update, tokens = counts, ids.numel()
            else:
                rows = x.reshape(-1, x.shape[-1]).to(torch.float64)
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
    training = model.training if isinstance(model, nn.Module) else False
    if isinstance(model, nn.Module):
        model.eval()
    try:
        for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) and device is not None
                     else v for k, v in batch.items()}
            state["mask"] = batch.get("attention_mask")
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
