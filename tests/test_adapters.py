"""Adapter saves: only what LFA trained, applied to the compressed base it was trained on,
with identical outputs and the same frozen parameters; a mismatched base is refused."""

import json
import warnings

import pytest
import torch
import transformers as tf

from mpotn import compress, load
from mpotn.compression.adapters import ADAPTER_NAME
from mpotn.finetune.strategies import apply_strategy

CONFIG = tf.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=48, num_labels=2)
IDS = torch.randint(1, 97, (3, 7), generator=torch.Generator().manual_seed(3))


def _base(folder, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed = compress(tf.BertForSequenceClassification(CONFIG),
                              targets=["attention", "ffn", "embeddings"], n=3, progress=False)
    compressed.save_pretrained(folder)
    return folder


def _fine_tuned(base):
    """The base loaded, LFA's parameters marked and moved (a stand-in for training)."""
    model = load(base)
    apply_strategy(model.base_model, "lfa")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    return model


def _logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = _base(tmp_path_factory.mktemp("base"))
    model = _fine_tuned(base)
    adapter = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(adapter, adapter_only=True)
    return base, model, adapter


def test_an_adapter_reloads_onto_its_base_with_identical_outputs_and_frozen_as_trained(trained):
    base, model, adapter = trained
    again = load(adapter, base=base)
    torch.testing.assert_close(_logits(again), _logits(model), atol=0, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in again.named_parameters() if p.requires_grad} == trainable
    recorded = json.loads((adapter / ADAPTER_NAME).read_text())
    assert recorded["base"]["name_or_path"] == str(base)
    assert set(recorded["trainable"]) == {n.removeprefix("base_model.") for n in trainable}


def test_an_adapter_holds_only_the_trained_tensors(trained):
    base, model, adapter = trained
    [weights] = adapter.glob("adapter-*.safetensors")
    [whole] = base.glob("model-*.safetensors")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable < 0.5 * sum(p.numel() for p in model.parameters())
    assert abs(weights.stat().st_size - 4 * trainable) < 8192  # float32 + header
    assert weights.stat().st_size < 0.5 * whole.stat().st_size


def test_an_adapter_without_its_base_or_on_another_base_is_refused(trained, tmp_path):
    _, _, adapter = trained
    with pytest.raises(ValueError, match=r"is an adapter of the compressed save '.*base.*'; "
                                         r"pass that save as base"):
        load(adapter)
    other = _base(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match=r"is not the base this adapter was trained on"):
        load(adapter, base=other)


def test_an_adapter_of_a_model_changed_outside_what_it_trains_is_refused(trained, tmp_path):
    base, _, _ = trained
    model = _fine_tuned(base)
    layer = model.base_model.bert.encoder.layer[0].intermediate.dense
    with torch.no_grad():
        layer.central.add_(1.0)  # central tensors are frozen under LFA
    with pytest.raises(ValueError, match=r"differs from the base .* outside what it trains "
                                         r"\(bert\.encoder\.layer\.0\.intermediate\.dense\.cores"):
        model.save_pretrained(tmp_path / "adapter", adapter_only=True)
    assert not (tmp_path / "adapter").exists()


def test_an_adapter_is_never_written_over_its_own_base(tmp_path):
    base = _base(tmp_path / "base")
    before = sorted(p.name for p in base.iterdir())
    model = _fine_tuned(base)
    for folder in (base, tmp_path / "." / "base"):
        with pytest.raises(ValueError, match=r"is the base save .* itself: an adapter written "
                                             r"there would replace the base it needs"):
            model.save_pretrained(folder, adapter_only=True, overwrite=True)
    assert sorted(p.name for p in base.iterdir()) == before
    load(base)  # still a whole save


def test_base_and_model_go_with_their_own_kind_of_save(trained, tmp_path):
    base, model, adapter = trained
    with pytest.raises(ValueError, match=r"is a whole save, not an adapter; base applies to "
                                         r"adapter saves"):
        load(base, base=base)
    given = tf.BertForSequenceClassification(CONFIG)  # the module the base is rebuilt in
    assert load(adapter, base=base, model=given).base_model is given
    with pytest.raises(ValueError, match=r"base applies to adapter_only=True saves"):
        model.save_pretrained(tmp_path / "whole", base=base)
    assert not (tmp_path / "whole").exists()


def test_an_adapter_saved_again_with_its_tokenizer_is_replaced_whole(trained, tmp_path):
    from mpotn.atomic import foreign_files, written_files
    from mpotn.compression.models import load_tokenizer

    _, model, _ = trained
    folder = tmp_path / "adapter"
    for _ in range(2):
        model.save_pretrained(folder, adapter_only=True, tokenizer=load_tokenizer())
    assert foreign_files(folder) == [] and "tokenizer_config.json" in written_files(folder)
    assert len(list(folder.glob("adapter-*.safetensors"))) == 1


@pytest.mark.parametrize("first_adapter", [True, False])
def test_a_save_over_one_of_the_other_kind_leaves_none_of_its_files(trained, tmp_path,
                                                                    first_adapter):
    """A whole save written where an adapter was (or the reverse) replaces it: no config or
    weights of the earlier kind stay behind to be loaded instead."""
    base, model, _ = trained
    folder = tmp_path / "save"
    for adapter_only in (first_adapter, not first_adapter):
        model.save_pretrained(folder, adapter_only=adapter_only)
    names = {path.name for path in folder.iterdir()}
    if first_adapter:  # now a whole save
        assert not {"mpotn_adapter.json"} & names and not list(folder.glob("adapter-*"))
        torch.testing.assert_close(_logits(load(folder)), _logits(model), atol=0, rtol=0)
    else:
        assert not {"mpotn_config.json", "config.json"} & names
        assert not list(folder.glob("model-*"))
        torch.testing.assert_close(_logits(load(folder, base=base)), _logits(model),
                                   atol=0, rtol=0)


def test_an_adapter_needs_a_base_save(tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = compress(tf.BertForSequenceClassification(CONFIG), targets=["ffn"], n=3,
                         progress=False)
    with pytest.raises(ValueError, match="adapter_only=True needs the compressed save"):
        model.save_pretrained(tmp_path, adapter_only=True)


def test_the_cli_refuses_adapter_only_for_a_model_that_is_not_a_compressed_save(tmp_path,
                                                                                capsys):
    from mpotn.cli import main

    code = main(["finetune", "--adapter-only", "--strategy", "lfa", "--max-steps", "1",
                 "--out", str(tmp_path / "run")])
    assert code == 2
    assert ("--adapter-only needs MODEL to be a compressed save, the adapter's base; the "
            "embedded model is not one") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
