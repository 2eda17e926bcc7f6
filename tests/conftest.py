"""Shared fixtures: the real all-MiniLM-L6-v2 weights, read once per session."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mpotn.compression.models import default_model_path

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_t5(seed: int = 0):
    """A random two-layer T5 (encoder, decoder with cross-attention) of width 32."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48,
                                               num_layers=2, num_heads=2,
                                               decoder_start_token_id=0))


@pytest.fixture(scope="session")
def minilm() -> dict[str, torch.Tensor]:
    """The embedded model's state dict (float32), straight from its safetensors."""
    return load_file(str(default_model_path() / "model.safetensors"))


@pytest.fixture(scope="session")
def ffn(minilm: dict[str, torch.Tensor]) -> torch.Tensor:
    """Layer 0's FFN up-projection as the paper's math matrix (in x out = 384 x 1536)."""
    return minilm["encoder.layer.0.intermediate.dense.weight"].T.contiguous()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory):
    """A 2-layer, 32-wide BERT (random weights) with the embedded tokenizer, as a model folder.

    Small enough that fine-tuning and squeezing tests take seconds; its
    vocabulary is MiniLM's, so the real tokenizer and SST-2 sample work with it.
    """
    from transformers import BertConfig, BertModel

    from mpotn.compression.models import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def load_onto_meta(monkeypatch):
    """``load_onto_meta(folder)``: ``mpotn.load(folder, device="meta")``, the meta device
    standing in for a GPU this machine does not have (the safetensors reader, which cannot
    read onto it, reads onto the CPU; ``read`` moves each tensor on). The devices the
    reader was asked for are in ``load_onto_meta.asked``."""
    import safetensors.torch

    import mpotn.compression.serialization as serialization
    from mpotn.compression import load

    asked: list[str] = []
    monkeypatch.setattr(serialization, "check_device",
                        lambda name, *args, **kwargs: name and torch.device(name))
    monkeypatch.setattr(serialization, "load_file", lambda path, device: asked.append(device)
                        or safetensors.torch.load_file(path))

    def load_meta(folder):
        return load(folder, device="meta")

    load_meta.asked = asked
    return load_meta


@pytest.fixture
def word_tokenizer():
    """A word-level fast tokenizer of 7 words with an end-of-sequence token, no padding
    token and no special tokens added to a text, as GPT-2's is."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "a", "longer", "sentence", "b", "c", "<unk>"]
    inner = Tokenizer(models.WordLevel({w: k for k, w in enumerate(words)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<|endoftext|>")


@pytest.fixture
def kill_at_step():
    """``kill(monkeypatch, step)``: kill the next Trainer run as it starts optimizer step
    ``step + 1`` (a ``KeyboardInterrupt``, as a user's Ctrl-C)."""
    from transformers import Trainer

    def kill(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
        original = Trainer.training_step

        def training_step(self, *args, **kwargs):
            if self.state.global_step == step:
                raise KeyboardInterrupt(f"killed at step {step}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Trainer, "training_step", training_step)

    return kill
