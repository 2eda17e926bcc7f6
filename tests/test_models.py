"""Loading models (embedded, local folder, hub id) and listing their matrices."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AlbertConfig, AlbertModel, DistilBertConfig, DistilBertModel

from mpotn.compression.models import (
    default_model_path,
    layer_index,
    load_classifier,
    load_model,
    matrix_type,
    resolve_model,
    weight_matrices,
)


def test_embedded_model_loads_offline_with_its_real_weights(minilm):
    model = load_model()
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    torch.testing.assert_close(
        model.embeddings.word_embeddings.weight, minilm["embeddings.word_embeddings.weight"]
    )


def test_minilm_matrices_are_listed_in_the_papers_orientation():
    matrices = weight_matrices(load_model())
    by_name = {m.name: m for m in matrices}
    assert len(matrices) == 3 + 6 * 6 + 1
    assert by_name["encoder.layer.0.intermediate.dense"].shape == (384, 1536)  # in x out
    assert by_name["encoder.layer.0.output.dense"].shape == (1536, 384)
    assert by_name["embeddings.word_embeddings"].shape == (30522, 384)
    types = [m.type for m in matrices if m.layer == 3]
    assert types == ["query", "key", "value", "attn_out", "ffn_in", "ffn_out"]


def test_albert_shared_layer_is_listed_once():
    config = AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=4,
                          num_attention_heads=2, intermediate_size=64)
    matrices = weight_matrices(AlbertModel(config))
    names = [m.name for m in matrices]
    assert len(names) == len({id(m.matrix.untyped_storage()) for m in matrices})
    assert "encoder.embedding_hidden_mapping_in" in names
    assert sum(m.type == "ffn_in" for m in matrices) == 1  # one shared layer group


def test_distilbert_names_are_typed_and_layered():
    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    matrices = weight_matrices(DistilBertModel(config))
    typed = {(m.layer, m.type) for m in matrices if m.layer is not None}
    assert typed == {(k, t) for k in (0, 1)
                     for t in ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")}


def test_type_and_layer_parsing():
    assert matrix_type("transformer.layer.1.ffn.lin1") == "ffn_in"
    assert matrix_type("some.custom.proj") == "proj"
    assert layer_index("h.7.mlp.c_fc") == 7
    assert layer_index("embeddings.word_embeddings") is None


def test_local_folder_loads_and_a_folder_without_config_is_a_clear_error(tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(default_model_path(), folder)
    assert resolve_model(folder) == str(folder)
    assert isinstance(load_model(folder), torch.nn.Module)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"not a model folder \(no config\.json\)"):
        load_model(tmp_path / "empty")


def test_unknown_hub_id_offline_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = "from mpotn.compression.models import load_model; load_model('nobody/no-such-model')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "could not load model 'nobody/no-such-model'" in result.stderr


def test_hub_id_resolves_through_the_hub_cache_offline(tmp_path):
    """The real hub code path, served from a local HF cache laid out as the hub writes it."""
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(default_model_path() / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    code = (
        "from mpotn.compression.models import load_model, weight_matrices\n"
        "m = load_model('sentence-transformers/all-MiniLM-L6-v2')\n"
        "print(len(weight_matrices(m)), sum(p.numel() for p in m.parameters()))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["40", "22713216"]


def test_load_pretrained_keeps_the_head_its_config_names(tmp_path):
    """A classifier comes back as a classifier; an unknown architecture name falls back to
    AutoModel without importing anything named in the folder."""
    import json

    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from mpotn.analysis.fidelity import sentence_embeddings
    from mpotn.compression.models import load_pretrained, load_tokenizer

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    model = load_pretrained(tmp_path / "clf")
    assert type(model) is BertForSequenceClassification and model.classifier.out_features == 3
    embeddings = sentence_embeddings(model, load_tokenizer(), ["a fine film .", "dull ."])
    assert embeddings.shape == (2, 32)

    saved = json.loads((tmp_path / "clf" / "config.json").read_text())
    saved["architectures"] = ["evil.Payload"]
    (tmp_path / "clf" / "config.json").write_text(json.dumps(saved))
    assert type(load_pretrained(tmp_path / "clf")) is BertModel


def test_a_decoder_classifier_without_padding_id_pads_with_its_end_token(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=11, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                               bos_token_id=10, eos_token_id=10)).save_pretrained(tmp_path)
    classifier = load_classifier(tmp_path, num_labels=2)
    assert classifier.config.pad_token_id == 10
    ids = torch.tensor([[1, 2, 3, 10], [4, 5, 6, 7]])  # the first row padded with the end id
    with torch.no_grad():
        batch = classifier(input_ids=ids).logits
        alone = classifier(input_ids=ids[:1, :3]).logits
    assert torch.allclose(batch[0], alone[0], atol=1e-5)  # read at its last real token


def test_several_end_tokens_give_the_first_as_padding_id(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, bos_token_id=1, eos_token_id=[2, 3],
                                 pad_token_id=None)).save_pretrained(tmp_path)
    assert load_classifier(tmp_path, num_labels=2).config.pad_token_id == 2


def test_a_task_model_pads_with_the_id_its_tokenizer_pads_with(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from mpotn.data import sst2_sample
    from mpotn.finetune.training import TrainingConfig, prepare_model

    words = ["a", "b", "<unk>", "<end>"]
    inner = Tokenizer(models.WordLevel({w: k for k, w in enumerate(words)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<end>").save_pretrained(tmp_path)
    torch.manual_seed(0)  # the model's own end id (0) is not the tokenizer's (3)
    GPT2LMHeadModel(GPT2Config(vocab_size=4, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path)
    model, tokenizer = prepare_model(tmp_path, sst2_sample(), TrainingConfig(strategy="full"))
    assert tokenizer.pad_token is None and model.config.pad_token_id == 3


def test_a_folder_without_a_tokenizer_is_a_clear_error_not_an_empty_tokenizer(tmp_path):
    from transformers import BertConfig, BertModel

    from mpotn.compression.models import load_tokenizer

    BertModel(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=48)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"holds no tokenizer \(none of tokenizer\.json, "
                                         r"tokenizer_config\.json.*save the tokenizer beside"):
        load_tokenizer(tmp_path)
    load_tokenizer().save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path)("a great movie")["input_ids"] == [101, 1037, 2307, 3185, 102]


def test_a_tokenizer_config_without_its_vocabulary_or_damaged_files_are_clear_errors(tmp_path):
    from mpotn.compression.models import load_tokenizer

    load_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="could not load a tokenizer for"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()  # tokenizer_config.json alone
    with pytest.raises(ValueError, match=r"has only its 5 special tokens, so it reads every "
                                         r"word as unknown: its vocabulary file is missing"):
        load_tokenizer(tmp_path)


def test_the_tokenizer_of_a_save_is_not_read_through_a_link_out_of_it(tmp_path):
    """A save reads nothing outside its folder: a tokenizer file linked to one outside it is
    refused (a folder mpotn did not write may link its files anywhere)."""
    import shutil

    from mpotn.atomic import write_output
    from mpotn.compression.models import load_tokenizer

    outside, save, own = tmp_path / "outside", tmp_path / "save", tmp_path / "own"
    for folder in (outside, save, own):
        load_tokenizer().save_pretrained(folder)
    write_output(save / "report.md", "mpotn wrote this folder")
    for folder in (save, own):
        (folder / "tokenizer.json").unlink()
        (folder / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    with pytest.raises(ValueError, match=r"names 'tokenizer\.json', which is not a file inside"):
        load_tokenizer(save)
    assert len(load_tokenizer(own)) == 30522
    shutil.rmtree(outside)
