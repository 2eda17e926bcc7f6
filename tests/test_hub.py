"""Pushing a compressed model to the Hugging Face Hub (the Hub replaced by a local fake)."""

import json
import shutil

import pytest
import torch
from transformers import BertConfig, BertModel

from mpotn.compression import compress, load
from mpotn.compression.hub import OLD_WEIGHTS
from mpotn.compression.serialization import CONFIG_NAME


class FakeHub:
    """``HfApi.create_repo`` and ``upload_folder`` that copy the folder to ``root/<repo>``."""

    def __init__(self, root):
        self.root, self.calls = root, []

    def create_repo(self, api, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, api, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def file_exists(self, api, repo_id, filename, revision=None):
        return (self.root / repo_id / filename).is_file()

    def upload_folder(self, api, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        target = self.root / repo_id
        shutil.copytree(folder_path, target, dirs_exist_ok=True)
        return f"https://huggingface.co/{repo_id}/commit/0"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import HfApi
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(
        api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: fake.upload_folder(api, **kw))
    monkeypatch.setattr(HfApi, "create_branch", lambda api, repo_id, **kw: fake.create_branch(
        api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "file_exists", lambda api, repo_id, filename, **kw:
                        fake.file_exists(api, repo_id, filename, **kw))
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # a user online,
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")  # logged in
    return fake


def tiny(name_or_path):
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=48)).eval()
    bert.config._name_or_path = name_or_path
    return compress(bert, targets=["ffn"], n=3, ratio=0.5, progress=False)


def test_push_uploads_a_save_that_loads_with_equal_outputs_and_a_model_card(hub):
    model = tiny("google/bert_uncased_L-2_H-128_A-2")
    commit = model.push_to_hub("me/tiny-mpo", private=True)
    assert commit == "https://huggingface.co/me/tiny-mpo/commit/0"
    (_, repo, created), (_, _, uploaded) = hub.calls
    assert repo == "me/tiny-mpo" and created == {"private": True, "exist_ok": True}
    assert uploaded["delete_patterns"] == [OLD_WEIGHTS]  # an earlier push's weights go
    folder = hub.root / "me/tiny-mpo"
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mpotn\n")
    assert "base_model: google/bert_uncased_L-2_H-128_A-2" in card
    assert 'mpotn.load("me/tiny-mpo")' in card
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        assert torch.equal(load(folder)(input_ids=ids).last_hidden_state,
                           model(input_ids=ids).last_hidden_state)


def test_a_push_keeps_the_model_card_already_in_the_repository(hub):
    card = hub.root / "me/tiny-mpo" / "README.md"
    card.parent.mkdir(parents=True)
    card.write_text("# The owner's card")
    tiny("google/bert_uncased_L-2_H-128_A-2").push_to_hub("me/tiny-mpo")
    assert card.read_text() == "# The owner's card"
    assert list(card.parent.glob("model-*.safetensors"))


def test_a_push_to_a_new_branch_creates_it_first(hub):
    tiny("x").push_to_hub("me/branches", revision="squeezed")
    assert [call[0] for call in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[1][2] == {"branch": "squeezed", "exist_ok": True}
    assert hub.calls[2][2]["revision"] == "squeezed"


def test_a_hub_name_without_owner_is_the_cards_base_model(hub):
    tiny("bert-base-uncased").push_to_hub("me/legacy")
    folder = hub.root / "me/legacy"
    assert "base_model: bert-base-uncased" in (folder / "README.md").read_text()
    saved = json.loads((folder / CONFIG_NAME).read_text())
    assert saved["base_model"]["config"]["_name_or_path"] == "bert-base-uncased"


def test_a_local_original_path_stays_out_of_the_save_and_the_card(hub, tmp_path):
    model = tiny(str(tmp_path))  # compressed from a folder of this machine
    model.push_to_hub("me/private-origin")
    folder = hub.root / "me/private-origin"
    saved = json.loads((folder / CONFIG_NAME).read_text())
    assert "_name_or_path" not in saved["base_model"]["config"]
    card = (folder / "README.md").read_text()
    assert "base_model:" not in card and str(tmp_path) not in card


def test_a_bad_repo_id_is_refused_before_anything_is_written(hub):
    with pytest.raises(ValueError, match="repo_id must be a Hub id"):
        tiny("x").push_to_hub("no-owner")
    assert hub.calls == []


def test_cli_compress_pushes_its_save(hub, tiny_bert, tmp_path, capsys):
    from mpotn.cli import main
    out = tmp_path / "out"
    assert main(["compress", str(tiny_bert), "--targets", "ffn", "--ratio", "0.5",
                 "--no-calibrate", "--out", str(out), "--push-to-hub", "me/cli-mpo",
                 "--private", "--no-progress"]) == 0
    assert "pushed to the Hub: https://huggingface.co/me/cli-mpo/commit/0" in \
        capsys.readouterr().out
    assert hub.calls[0][2]["private"] is True
    pushed = hub.root / "me/cli-mpo"
    assert (pushed / CONFIG_NAME).read_text() == (out / CONFIG_NAME).read_text()
    assert (pushed / "tokenizer.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--push-to-hub", "no-owner"], "--push-to-hub takes a Hub repository"),
    (["--private"], "--private applies to --push-to-hub"),
    (["--dry-run", "--push-to-hub", "me/x"], "--dry-run saves nothing"),
])
def test_cli_push_options_are_checked_before_compressing(hub, tmp_path, capsys, argv, message):
    from mpotn.cli import main
    assert main(["compress", "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and hub.calls == []


@pytest.mark.parametrize("offline", [True, False])
def test_cli_push_needs_the_network_and_a_login_before_compressing(hub, tmp_path, capsys,
                                                                   monkeypatch, offline):
    import huggingface_hub

    from mpotn.cli import main
    if offline:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["compress", "--out", str(tmp_path / "out"), "--push-to-hub", "me/x"]) == 2
    assert ("HF_HUB_OFFLINE is set" if offline else "needs a Hub login") in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists() and hub.calls == []


def test_a_failed_push_names_the_save_it_left(hub, tiny_bert, tmp_path, capsys, monkeypatch):
    from huggingface_hub import HfApi

    from mpotn.cli import main

    def refused(api, **kwargs):
        raise ConnectionError("connection reset")
    monkeypatch.setattr(HfApi, "upload_folder", refused)
    out = tmp_path / "out"
    assert main(["compress", str(tiny_bert), "--targets", "ffn", "--ratio", "0.5",
                 "--no-calibrate", "--out", str(out), "--push-to-hub", "me/cli-mpo",
                 "--no-progress"]) == 2
    assert (f"pushing to me/cli-mpo failed (connection reset); the save is in {out}"
            in capsys.readouterr().err)
    assert (out / CONFIG_NAME).is_file()


def test_push_deletes_only_remote_weights_named_as_mpotn_names_them(monkeypatch):
    from huggingface_hub import HfApi

    remote = ["README.md", ".gitattributes", "model-uncompressed.safetensors",
              "model-distilled-v2.safetensors", "model-00001-of-00002.safetensors",
              "model-8d5288f0b3aa.safetensors"]
    monkeypatch.setattr(HfApi, "list_repo_files", lambda self, *a, **k: remote)
    deletions = HfApi()._prepare_folder_deletions(  # huggingface_hub's own planner
        repo_id="me/m", repo_type="model", revision=None, path_in_repo="",
        delete_patterns=[OLD_WEIGHTS])
    assert [op.path_in_repo for op in deletions] == ["model-8d5288f0b3aa.safetensors"]
