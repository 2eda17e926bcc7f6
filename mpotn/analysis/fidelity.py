"""Sentence embeddings, perplexity, and how faithfully a compressed model keeps them.

all-MiniLM-L6-v2 is a sentence-embedding model: its output is the mean of the
last hidden states over the tokens of a sentence (mean pooling). Fidelity of a
compressed model is the cosine similarity between its sentence embeddings and
the original model's, sentence by sentence. A causal language model (GPT-2,
Llama, Qwen2, ...) is also judged the way SVD-LLM and ASVD judge one: by its
perplexity on held-out text against the original's
([FidelityProbe][mpotn.analysis.fidelity.FidelityProbe]). Inputs go to the
model's device; nothing here moves a model.

Examples
--------
>>> sentences, labels = sst2_dev()
>>> len(sentences), sum(labels)
(872, 444)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mpotn.compression.models import model_device, padding_tokenizer
from mpotn.data.local import sst2_sample


def sst2_dev() -> tuple[list[str], list[int]]:
    """Sentences and labels of the shipped SST-2 development set (872 rows)."""
    dev = sst2_sample().eval
    return dev["text"], dev["label"]


def _length_batches(model: nn.Module, tokenizer: Any, texts: list[str], batch_size: int,
                    max_length: int) -> Iterator[tuple[list[int], Any]]:
    """``(indices into texts, tokenized batch on the model's device)``, texts batched by
    length to keep padding small, padded on the right (so that each text keeps the
    positions it has alone, whatever its batch; a tokenizer without a padding token pads
    with its end-of-sequence token)."""
    tokenizer = padding_tokenizer(tokenizer)
    device = model_device(model)
    order = sorted(range(len(texts)), key=lambda k: len(texts[k]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield chunk, tokenizer([texts[k] for k in chunk], padding=True, truncation=True,
                               max_length=max_length, return_tensors="pt",
                               padding_side="right").to(device)


@torch.no_grad()
def sentence_embeddings(
    model: nn.Module,
    tokenizer: Any,
    sentences: list[str],
    batch_size: int = 64,
    max_length: int = 128,
) -> torch.Tensor:
    """Mean-pooled last hidden states, one row per sentence (in input order).

    The last of the model's ``hidden_states``, so that a model with a head (a
    classifier, a causal LM) is compared by its body's output too. Sentences
    are batched by length to keep padding small and padded on the right; padding
    tokens are excluded from the mean through the attention mask (a tokenizer
    without a padding token pads with its end-of-sequence token). The batches go to
    the model's device, and so do the embeddings (float32, whatever the model's
    dtype: float16 sums overflow).
    """
    model.eval()
    out: list[torch.Tensor | None] = [None] * len(sentences)
    for chunk, batch in _length_batches(model, tokenizer, sentences, batch_size, max_length):
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1].float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        for k, row in zip(chunk, pooled):
            out[k] = row
    return torch.stack(out)


def cosine_fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Mean and worst (minimum) cosine similarity, row by row."""
    cos = nn.functional.cosine_similarity(reference.double(), candidate.double(), dim=-1)
    return {"mean_cosine": float(cos.mean()), "worst_cosine": float(cos.min())}


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is one of transformers' causal language models (a class of
    ``AutoModelForCausalLM``: ``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...), whose
    perplexity [perplexity][mpotn.analysis.fidelity.perplexity] measures."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    batch_size: int = 16,
    max_length: int = 128,
) -> float:
    r"""Perplexity of a causal language model on ``texts``: $\exp$ of the mean negative
    log-likelihood of every token given the tokens before it, over all texts' tokens
    but each text's first (which nothing predicts) and padding.

    Each text is scored on its own (right-padded in batches of ``batch_size``,
    truncated to ``max_length`` tokens), in eval mode, on the model's device; the
    log-likelihoods are summed in float64.

    Raises
    ------
    ValueError
        If no text has two tokens, so that no token is predicted.
    """
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=model_device(model))
    tokens = 0
    for _, batch in _length_batches(model, tokenizer, texts, batch_size, max_length):
        logits = model(**batch, use_cache=False).logits[:, :-1]
        targets = batch["input_ids"][:, 1:]
        predicted = batch["attention_mask"][:, 1:].bool()
        losses = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                             reduction="none").view_as(targets)
        nll += losses[predicted].double().sum()
        tokens += int(predicted.sum())
    if tokens == 0:
        raise ValueError(f"none of the {len(texts)} texts has two tokens: perplexity needs "
                         "a token to predict from the ones before it")
    return float(torch.exp(nll / tokens))


class FidelityProbe:
    """The original model's outputs on held-out sentences, kept to judge a compressed
    version of it: compute it before compressing in place, then
    [measure][mpotn.analysis.fidelity.FidelityProbe.measure] the compressed model.

    Parameters
    ----------
    original:
        The model before compression.
    tokenizer:
        Its tokenizer.
    sentences:
        Held-out sentences (not the calibration text).

    Attributes
    ----------
    embeddings:
        The original's [sentence_embeddings][mpotn.analysis.fidelity.sentence_embeddings].
    perplexity:
        The original's [perplexity][mpotn.analysis.fidelity.perplexity] on the sentences
        for a causal language model ([is_causal_lm][mpotn.analysis.fidelity.is_causal_lm]),
        else ``None``.

    Examples
    --------
    >>> from transformers import BertConfig, BertModel
    >>> from mpotn.compression.models import load_tokenizer
    >>> _ = torch.manual_seed(0)
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1,
    ...                              num_attention_heads=2, intermediate_size=64))
    >>> probe = FidelityProbe(model, load_tokenizer(), ["a fine film .", "dull ."])
    >>> round(probe.measure(model)["mean_cosine"], 6), probe.perplexity
    (1.0, None)
    """

    def __init__(self, original: nn.Module, tokenizer: Any, sentences: list[str]) -> None:
        self.tokenizer, self.sentences = tokenizer, sentences
        self.embeddings = sentence_embeddings(original, tokenizer, sentences)
        self.perplexity = (perplexity(original, tokenizer, sentences)
                           if is_causal_lm(original) else None)

    def measure(self, model: nn.Module) -> dict[str, float]:
        """``mean_cosine`` and ``worst_cosine`` of ``model``'s sentence embeddings against
        the original's ([cosine_fidelity][mpotn.analysis.fidelity.cosine_fidelity]) and,
        for a causal language model, its ``perplexity`` and the ``original_perplexity``."""
        measured = cosine_fidelity(self.embeddings.to(model_device(model)),
                                   sentence_embeddings(model, self.tokenizer, self.sentences))
        if self.perplexity is not None:
            measured |= {"perplexity": perplexity(model, self.tokenizer, self.sentences),
                         "original_perplexity": self.perplexity}
        return measured
