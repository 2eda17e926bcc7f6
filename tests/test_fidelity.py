"""Fidelity of a compressed model: perplexity of causal LMs, inputs on the model's device,
and ``mpotn compress`` measuring it against the original without loading it twice."""

import json
import math

import pytest
import torch
from torch import nn

from mpotn.analysis.fidelity import (
    FidelityProbe,
    is_causal_lm,
    perplexity,
    sentence_embeddings,
)
from mpotn.cli import main
from mpotn.compression.models import load_tokenizer
from mpotn.devices import resolve_device


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2,
                                      n_positions=128)).eval()


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A 2-layer GPT-2 (random weights) with the embedded WordPiece tokenizer, as a folder."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    _tiny_gpt2().save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    return folder


def test_perplexity_is_the_exp_of_transformers_own_loss_over_every_predicted_token():
    model, tokenizer = _tiny_gpt2(), load_tokenizer()
    texts = ["a fine film .", "an awful , boring , overlong mess of a movie .", "dull ."]
    losses, counts = [], []
    with torch.no_grad():
        for text in texts:  # one at a time, no padding: transformers' mean over shifted tokens
            batch = tokenizer(text, return_tensors="pt")
            losses.append(float(model(**batch, labels=batch["input_ids"]).loss))
            counts.append(batch["input_ids"].shape[1] - 1)
    expected = math.exp(sum(loss * n for loss, n in zip(losses, counts)) / sum(counts))
    # batched with right padding: the padding predicts nothing and is predicted by nothing
    assert perplexity(model, tokenizer, texts, batch_size=2) == pytest.approx(expected, rel=1e-5)
    tokenizer.padding_side = "left"  # as Llama's and Qwen2's: scored right-padded all the same
    assert perplexity(model, tokenizer, texts, batch_size=2) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, tokenizer, texts[:1]) == pytest.approx(math.exp(losses[0]),
                                                                    rel=1e-5)
    assert 20_000 < expected < 45_000  # untrained over 30,522 tokens: about uniform


def test_a_sentences_embedding_is_its_own_whatever_its_batch_and_padding_side():
    """A causal LM's positions are absolute: padded on the left, a sentence's embedding
    would depend on the longer ones in its batch."""
    tokenizer = load_tokenizer()
    tokenizer.padding_side = "left"
    model = _tiny_gpt2()
    sentences = ["a", "a great movie", "not a great movie at all , sadly", "fine"]
    together = sentence_embeddings(model, tokenizer, sentences, batch_size=4)
    alone = sentence_embeddings(model, tokenizer, sentences, batch_size=1)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    assert together.dtype == torch.float32
    half = sentence_embeddings(model.half(), tokenizer, sentences)
    assert half.dtype == torch.float32 and bool(torch.isfinite(half).all())


def test_perplexity_without_a_token_to_predict_is_a_clear_error(word_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=7, n_embd=8, n_layer=1, n_head=2))
    assert perplexity(model, word_tokenizer, ["a", "b c"]) > 0  # "b c": one token predicted
    with pytest.raises(ValueError, match="none of the 2 texts has two tokens"):
        perplexity(model, word_tokenizer, ["a", "b"])


class _InputDevices(nn.Module):
    """A model on the meta device (standing in for a GPU) that records where its inputs
    are, then stops."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(3, device="meta"))
        self.seen: set[str] = set()

    def forward(self, **batch):
        self.seen |= {v.device.type for v in batch.values() if isinstance(v, torch.Tensor)}
        raise StopIteration("recorded")


@pytest.mark.parametrize("measure", [sentence_embeddings, perplexity])
def test_fidelity_sends_the_inputs_to_the_models_device(measure):
    model = _InputDevices()
    with pytest.raises(StopIteration, match="recorded"):
        measure(model, load_tokenizer(), ["a fine film .", "dull ."])
    assert model.seen == {"meta"}


def test_only_causal_language_models_get_a_perplexity(tiny_bert):
    from transformers import AutoModel, BertForSequenceClassification

    gpt = _tiny_gpt2()
    bert = AutoModel.from_pretrained(tiny_bert)
    assert is_causal_lm(gpt) and not is_causal_lm(bert)
    assert not is_causal_lm(BertForSequenceClassification(bert.config))
    probe = FidelityProbe(gpt, load_tokenizer(), ["a fine film .", "dull ."])
    measured = probe.measure(gpt)
    assert measured["perplexity"] == measured["original_perplexity"] == probe.perplexity
    assert measured["mean_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert FidelityProbe(bert, load_tokenizer(), ["dull ."]).perplexity is None


def test_default_device_is_cuda_when_present_else_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        resolve_device("cuda")


def test_compress_cli_reports_a_causal_lms_perplexity_from_one_load(tiny_gpt2, tmp_path,
                                                                    capsys, monkeypatch):
    """The original's outputs are kept before compressing in place: the model is loaded
    once, and the report carries the measured fidelity."""
    import mpotn.compression.models as models

    loads = []
    load = models.load_pretrained
    monkeypatch.setattr(models, "load_pretrained", lambda *a: loads.append(a) or load(*a))
    out = tmp_path / "gpt2-svd"
    assert main(["compress", str(tiny_gpt2), "--targets", "ffn", "--ratio", "0.3",
                 "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert len(loads) == 1
    assert "as GPT2LMHeadModel (its config's architecture) on cpu" in printed
    fidelity = json.loads((out / "report.json").read_text())["fidelity"]
    assert set(fidelity) == {"mean_cosine", "worst_cosine", "perplexity",
                             "original_perplexity"}
    ratio = fidelity["perplexity"] / fidelity["original_perplexity"]
    assert f"{fidelity['original_perplexity']:.2f} ({ratio:.2f}x)" in printed
    assert 0 < fidelity["worst_cosine"] <= fidelity["mean_cosine"] < 1
    assert f"perplexity {fidelity['perplexity']:.4f}" in (out / "report.md").read_text()


class _Measured:
    """A fidelity probe that reports fixed numbers."""

    sentences = ["a fine film ."] * 128

    def __init__(self, measured):
        self.measured = measured

    def measure(self, model):
        return self.measured


@pytest.mark.parametrize("measured, warned", [
    ({"mean_cosine": 0.95}, []),
    ({"mean_cosine": 0.85}, ["mean cosine 0.8500 < 0.9"]),
    ({"mean_cosine": 0.8996}, ["mean cosine 0.8996 < 0.9"]),  # not "0.90 < 0.9"
    ({"mean_cosine": math.nan}, ["mean cosine nan < 0.9"]),  # overflowing float16
    ({"mean_cosine": 0.99, "perplexity": 14.0, "original_perplexity": 10.0}, []),
    ({"mean_cosine": 0.99, "perplexity": 16.0, "original_perplexity": 10.0},
     ["perplexity 1.6000x the original's > 1.5x"]),
    ({"mean_cosine": 0.8, "perplexity": math.nan, "original_perplexity": 10.0},
     ["mean cosine 0.8000 < 0.9 and perplexity nanx the original's > 1.5x"]),
])
def test_compress_warns_when_the_model_is_not_usable_as_it_is(measured, warned, capsys):
    from mpotn.cli.common import check_fidelity

    measured = {"worst_cosine": 0.5, **measured}
    assert check_fidelity(None, _Measured(measured), calibrated=True) is measured
    printed = capsys.readouterr().out
    assert ("WARNING" in printed) == bool(warned)
    assert all(f"WARNING: {w}: this model is not usable as it is; heal it" in printed
               for w in warned)
    check_fidelity(None, _Measured(measured), calibrated=False)
    assert ("calibrate it (--calibrate), heal it" in capsys.readouterr().out) == bool(warned)
    check_fidelity(None, _Measured(measured), before={**measured, "mean_cosine": 0.5,
                                                       "perplexity": 99.0})
    printed = capsys.readouterr().out  # after healing: both values, and heal longer
    assert "mean cosine 0.5000 -> " in printed
    assert ("perplexity on those sentences: 99.00 -> " in printed) == ("perplexity" in measured)
    assert ("this model is not usable as it is; heal it longer (more --steps or --samples) "
            "or fine-tune it" in printed) == bool(warned)


@pytest.mark.parametrize("command", ["compress", "inspect"])
def test_cli_refuses_a_device_that_is_not_here_before_loading(command, tmp_path, capsys,
                                                              monkeypatch):
    import mpotn.compression.models as models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "load_model", None)  # loading would fail another way
    monkeypatch.setattr(models, "load_pretrained", None)
    assert main([command, "--device", "cuda", "--out", str(tmp_path / "o")]) != 0
    assert "--device cuda: no CUDA device is visible" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_heal_cli_checks_a_causal_lms_perplexity_before_and_after(tiny_gpt2, tmp_path,
                                                                  capsys):
    """The teacher keeps its head, so healing a compressed GPT-2 reports its perplexity."""
    compressed = tmp_path / "gpt2-svd"
    assert main(["compress", str(tiny_gpt2), "--targets", "ffn", "--ratio", "0.3",
                 "--device", "cpu", "--out", str(compressed), "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "healed"
    assert main(["heal", str(compressed), "--teacher", str(tiny_gpt2), "--out", str(out),
                 "--steps", "2", "--batch-size", "4", "--max-length", "16", "--samples", "16",
                 "--heldout", "4", "--device", "cpu", "--no-progress"]) == 0
    fidelity = json.loads((out / "fidelity.json").read_text())
    assert fidelity["before"]["original_perplexity"] == fidelity["after"][
        "original_perplexity"] > 0
    printed = capsys.readouterr().out
    assert (f"perplexity on those sentences: {fidelity['before']['perplexity']:.2f} -> "
            f"{fidelity['after']['perplexity']:.2f}") in printed
