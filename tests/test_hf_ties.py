"""Transformers' weight ties survive compression, saves and merging: BERT's output bias
stays one tensor, and ``tie_weights()`` (called by the Trainer under FSDP and ZeRO-3)
works on a compressed model."""

import warnings

import pytest
import torch
import transformers as tf
from torch import nn

from mpotn import compress, load
from mpotn.compression.parameters import count_parameters

VOCAB = 60


def _bert() -> tf.BertForMaskedLM:
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32)
    return tf.BertForMaskedLM(config).eval()


def _compressed():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compress(_bert(), targets=["embeddings", "attention", "head"], n=3,
                        ratio=0.7, progress=False).eval()


def _input() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))


def test_the_output_bias_stays_one_parameter_after_compressing_the_head():
    dense = _bert()
    model = _compressed()
    head = model.cls.predictions
    assert head.decoder.bias is head.bias
    with torch.no_grad():
        head.bias.add_(2.0)  # training the bias moves what the output layer adds
    assert torch.equal(head.decoder.bias, head.bias)
    # the vocabulary-sized bias is counted once, as in the dense model
    counted = {n for n, _ in dense.named_parameters()}
    assert "cls.predictions.decoder.bias" not in counted
    assert "cls.predictions.bias" in counted
    assert model.num_parameters() == count_parameters(model.base_model.parameters())
    assert sum(p.numel() for p in model.base_model.parameters()
               if p.shape == (VOCAB,)) == VOCAB


def test_tie_weights_works_on_a_compressed_model_and_changes_nothing():
    model = _compressed()
    x = _input()
    with torch.no_grad():
        before = model(x).logits
    model.tie_weights()  # transformers' own; it used to fail on the compressed embedding
    assert model.base_model.all_tied_weights_keys == {
        "cls.predictions.decoder.bias": "cls.predictions.bias"}
    with torch.no_grad():
        assert float((model(x).logits - before).abs().max()) == 0.0


def test_the_tie_is_stored_once_and_made_again_on_load(tmp_path):
    model = _compressed()
    with torch.no_grad():
        model.cls.predictions.bias.add_(1.5)
        expected = model(_input()).logits
    model.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    head = loaded.cls.predictions
    assert head.decoder.bias is head.bias
    with torch.no_grad():
        assert float((loaded(_input()).logits - expected).abs().max()) == 0.0
    loaded.tie_weights()


def test_a_save_holding_the_two_biases_apart_loads_each(tmp_path):
    """An older save stored the decoder's bias apart from ``cls.predictions.bias``:
    each loads its own value, and the decoder adds the one it was trained with."""
    model = _compressed()
    head = model.cls.predictions
    head.decoder.bias = nn.Parameter(head.bias.detach() + 3.0)  # as old saves had it
    model.base_model._tied_weights_keys = {}
    with torch.no_grad():
        expected = model(_input()).logits
    model.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    head = loaded.cls.predictions
    assert head.decoder.bias is not head.bias
    assert float((head.decoder.bias - head.bias).detach().abs().min()) == pytest.approx(3.0)
    with torch.no_grad():
        assert float((loaded(_input()).logits - expected).abs().max()) == 0.0
    assert loaded.base_model.all_tied_weights_keys == {}
    loaded.tie_weights()
    assert loaded.cls.predictions.decoder.bias is not loaded.cls.predictions.bias
    dense = loaded.merge()  # keeps the two biases apart: the outputs do not change
    assert dense.cls.predictions.decoder.bias is not dense.cls.predictions.bias
    assert dense.all_tied_weights_keys == {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}
    with torch.no_grad():
        assert float((dense(_input()).logits - expected).abs().max()) < 1e-5


def test_a_tie_undone_before_compressing_stays_undone():
    """mpotn's own warning tells a user to untie a head to compress it alone."""
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1,
                                             n_head=2, bos_token_id=0, eos_token_id=0)).eval()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach() + 1.0)
    x = _input()
    with torch.no_grad():
        expected = model(x).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed = compress(model, targets=["attention"], n=3, progress=False)
    assert compressed.lm_head.weight is not compressed.transformer.wte.weight
    assert compressed.base_model.all_tied_weights_keys == {}
    compressed.tie_weights()
    dense = compressed.merge()
    assert dense.lm_head.weight is not dense.transformer.wte.weight
    assert dense.all_tied_weights_keys == {}
    with torch.no_grad():  # full-rank MPOs of the attention: the same function
        assert float((dense(x).logits - expected).abs().max()) < 1e-4


def test_a_merged_model_has_its_architectures_ties_back():
    model = _compressed()
    x = _input()
    with torch.no_grad():
        before = model(x).logits
    dense = model.merge()
    head = dense.cls.predictions
    assert head.decoder.weight is dense.bert.embeddings.word_embeddings.weight
    assert head.decoder.bias is head.bias
    assert dense.all_tied_weights_keys == {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias"}
    dense.tie_weights()
    with torch.no_grad():
        assert float((dense(x).logits - before).abs().max()) < 1e-5


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_tie_weights_works_when_the_tied_embedding_is_compressed(family):
    if family == "gpt2":
        base = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1,
                                                n_head=2, bos_token_id=0, eos_token_id=0))
    else:
        base = tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = compress(base, targets=["embeddings"], n=3, ratio=0.7, progress=False)
    model.tie_weights()
    assert model.base_model.all_tied_weights_keys == {}
    dense = model.merge()
    assert dense.get_output_embeddings().weight is dense.get_input_embeddings().weight
    assert dense.all_tied_weights_keys != {}
