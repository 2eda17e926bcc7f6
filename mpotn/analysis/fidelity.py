"""Sentence embeddings and how faithfully a compressed model keeps them.

all-MiniLM-L6-v2 is a sentence-embedding model: its output is the mean of the
last hidden states over the tokens of a sentence (mean pooling). Fidelity of a
compressed model is the cosine similarity between its sentence embeddings and
the original model's, sentence by sentence.

Examples
--------
>>> sentences, labels = sst2_dev()
>>> len(sentences), sum(labels)
(872, 444)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mpotn.compression.models import padding_tokenizer
from mpotn.data.local import sst2_sample


def sst2_dev() -> tuple[list[str], list[int]]:
    """Sentences and labels of the shipped SST-2 development set (872 rows)."""
    dev = sst2_sample().eval
    return dev["text"], dev["label"]


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
    are batched by length to keep padding small; padding tokens are excluded
    from the mean through the attention mask (a tokenizer without a padding
    token pads with its end-of-sequence token).
    """
    model.eval()
    tokenizer = padding_tokenizer(tokenizer)
    order = sorted(range(len(sentences)), key=lambda k: len(sentences[k]))
    out: list[torch.Tensor | None] = [None] * len(sentences)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = tokenizer([sentences[k] for k in chunk], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        for k, row in zip(chunk, pooled):
            out[k] = row
    return torch.stack(out)


def cosine_fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Mean and worst (minimum) cosine similarity, row by row."""
    cos = nn.functional.cosine_similarity(reference.double(), candidate.double(), dim=-1)
    return {"mean_cosine": float(cos.mean()), "worst_cosine": float(cos.min())}
