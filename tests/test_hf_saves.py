"""A compressed save is a Hugging Face folder: ``config.json`` and the tokenizer beside
mpotn's files, ``model.config`` the transformers config, Hub ids where folders go."""

import warnings

import pytest
import torch
import transformers as tf

from mpotn import compress, load
from mpotn.compression import CompressionConfig, MPOModel
from mpotn.compression.models import load_tokenizer


def _gpt2() -> tf.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2,
                           id2label={0: "neg", 1: "pos"})
    return tf.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2-mpo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed = compress(_gpt2(), targets=["attention", "ffn", "embeddings"], n=3,
                              ratio=0.6, progress=False)
    compressed.save_pretrained(folder, tokenizer=load_tokenizer(None))
    return folder, compressed


def test_a_save_is_read_by_auto_config_and_auto_tokenizer(saved):
    folder, _ = saved
    config = tf.AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.n_embd, config.id2label) == ("gpt2", 32, {0: "neg",
                                                                                1: "pos"})
    assert tf.GenerationConfig.from_pretrained(folder).to_dict() == (
        _gpt2().generation_config.to_dict())
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    expected = load_tokenizer(None)("a compressed model")["input_ids"]
    assert tokenizer("a compressed model")["input_ids"] == expected
    names = {p.name for p in folder.iterdir()}
    assert {"mpotn_config.json", "config.json", "generation_config.json",
            "tokenizer_config.json"} <= names


def test_model_config_is_the_transformers_config_and_the_plan_has_its_own_name(saved):
    folder, compressed = saved
    for model in (compressed, load(folder), MPOModel.from_pretrained(folder)):
        assert isinstance(model.config, tf.GPT2Config)
        assert model.config.id2label == {0: "neg", 1: "pos"}
        assert isinstance(model.compression_config, CompressionConfig)
        assert model.compression_config.ratio == 0.6
    ids = torch.tensor([[5, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(load(folder)(input_ids=ids).logits,
                                   compressed.eval()(input_ids=ids).logits, atol=0, rtol=0)


def test_a_hub_id_is_fetched_with_snapshot_download_and_read_like_a_folder(saved, monkeypatch):
    import huggingface_hub

    folder, _ = saved
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = load("someone/gpt2-mpo", revision="v1")
    assert model.config.model_type == "gpt2"
    assert calls == [("someone/gpt2-mpo", "v1",
                      ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"])]


def test_a_missing_hub_id_offline_and_a_revision_for_a_folder_are_clear_errors(saved,
                                                                                 monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **options):  # what the Hub client raises offline, cache empty
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match=r"no-such-user/no-such-model is not a folder here, and "
                                         r"fetching it as a Hugging Face Hub id failed"):
        load("no-such-user/no-such-model")
    with pytest.raises(ValueError, match=r"revision='main' applies to Hub ids"):
        load(saved[0], revision="main")


def test_a_mistyped_path_is_not_fetched_from_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def fetched(repo_id, **options):
        raise AssertionError(f"{repo_id} fetched from the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetched)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError, match=r"runs/modle is not a folder here, but runs is: read "
                                         r"as a mistyped path, not fetched as a Hub id"):
        load("runs/modle")


def hub_cache_snapshot(folder, cache, repo_id: str):
    """``folder`` laid out as the Hub client caches a download: ``snapshots/<revision>/file``
    links to ``../../blobs/<sha256>``; returns the repository's cache folder."""
    import hashlib
    import os
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / blob)
        os.symlink(f"../../blobs/{blob}", snapshot / file.name)
    return repo


def test_a_hub_id_in_the_real_cache_layout_loads_offline(saved, tmp_path, monkeypatch):
    import huggingface_hub.constants

    folder, compressed = saved
    hub_cache_snapshot(folder, tmp_path, "someone/gpt2-mpo")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    ids = torch.tensor([[5, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(load("someone/gpt2-mpo")(input_ids=ids).logits,
                                   compressed.eval()(input_ids=ids).logits, atol=0, rtol=0)


def test_a_config_that_links_out_of_the_folder_is_refused(saved, tmp_path):
    import os
    import shutil

    folder, _ = saved
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (tmp_path / "elsewhere.json").write_bytes((copy / "mpotn_config.json").read_bytes())
    (copy / "mpotn_config.json").unlink()
    os.symlink(tmp_path / "elsewhere.json", copy / "mpotn_config.json")
    with pytest.raises(ValueError, match=r"names 'mpotn_config\.json', which is not a file "
                                         r"inside"):
        load(copy)


def test_a_snapshot_whose_blobs_folder_links_elsewhere_is_refused(saved, tmp_path):
    import os
    import shutil

    folder, _ = saved
    repo = hub_cache_snapshot(folder, tmp_path / "cache", "someone/gpt2-mpo")
    shutil.move(repo / "blobs", tmp_path / "elsewhere")  # the files live outside the repo
    os.symlink(tmp_path / "elsewhere", repo / "blobs")
    [snapshot] = (repo / "snapshots").iterdir()
    with pytest.raises(ValueError, match=r"which is not a file inside"):
        load(snapshot)


def test_generation_settings_set_on_the_model_are_saved_and_loaded_back(tmp_path):
    """Setting ``generation_config`` on the compressed model reaches the wrapped one, its
    save and the loaded model: end tokens, lengths, sampling."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed = compress(_gpt2(), targets=["ffn"], n=3, progress=False)
    compressed.generation_config = tf.GenerationConfig(max_new_tokens=3, eos_token_id=[2, 5],
                                                       do_sample=True, temperature=0.6)
    assert compressed.base_model.generation_config.max_new_tokens == 3
    compressed.save_pretrained(tmp_path)
    again = load(tmp_path)
    settings = again.generation_config
    assert (settings.max_new_tokens, settings.eos_token_id, settings.do_sample,
            settings.temperature) == (3, [2, 5], True, 0.6)
    ids = torch.tensor([[7, 8, 9]])
    assert again.generate(ids, do_sample=False).shape == (1, 6)  # 3 new tokens, as saved


def test_resizing_a_compressed_embedding_is_refused_before_any_change():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed = compress(_gpt2(), targets=["embeddings"], n=3, progress=False)
    with pytest.raises(ValueError, match="MPOEmbedding embedding cannot change its "
                                         r"vocabulary; resize the dense model \(merge\(\)"):
        compressed.resize_token_embeddings(120)
    assert compressed.config.vocab_size == 97


def test_a_hook_that_patches_forward_stays_on_the_wrapper():
    """accelerate's hooks (mixed precision, offloading) set ``forward`` on the module they
    wrap: on the compressed model itself, not on the model it wraps."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed = compress(_gpt2(), targets=["ffn"], n=3, progress=False)
    ids = torch.tensor([[7, 8, 9]])
    before = compressed(input_ids=ids).logits
    add_hook_to_module(compressed, ModelHook())
    torch.testing.assert_close(compressed(input_ids=ids).logits, before)
    assert "forward" not in vars(compressed.base_model)
