"""save_pretrained / load: identical outputs, atomic writes, clear errors."""

import json

import pytest
import safetensors.torch
import torch
from torch import nn

import mpotn.compression.serialization as serialization
from mpotn.compression import compress, load
from mpotn.compression.models import load_model
from mpotn.compression.serialization import CONFIG_NAME


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    model = compress(load_model(), targets=["attention", "ffn", "embeddings"], ratio=0.5,
                     progress=False).eval()
    model.save_pretrained(folder)
    return model, folder


def outputs(model):
    ids = torch.randint(0, 30522, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


def test_load_rebuilds_the_model_from_config_alone_with_identical_outputs(saved):
    model, folder = saved
    again = load(folder)
    assert float((outputs(again) - outputs(model)).abs().max()) == 0.0
    assert type(again.base_model).__name__ == "BertModel"
    assert again.totals() == model.totals()
    assert list(again.report()) == list(model.report())


def test_load_reads_every_weight_straight_onto_the_device_asked_for(saved, load_onto_meta):
    """``device=`` reaches the safetensors reader and every tensor, the buffers the file
    does not hold too (the meta device stands in for a GPU; tied and shared tensors:
    test_families, test_sharing)."""
    _, folder = saved
    again = load_onto_meta(folder)
    assert load_onto_meta.asked == ["meta"]
    tensors = [*again.parameters(), *again.buffers()]
    assert len(tensors) > 100 and {t.device.type for t in tensors} == {"meta"}
    assert {t.device.type for t in load(folder).parameters()} == {"cpu"}
    assert load_onto_meta.asked == ["meta", "cpu"]


def test_load_refuses_a_device_that_is_not_here(saved, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda': no CUDA device is visible"):
        load(saved[1], device="cuda")
    with pytest.raises(ValueError, match="device='gpu' is not a device name"):
        load(saved[1], device="gpu")


def test_save_writes_config_and_one_content_addressed_weights_file(saved):
    _, folder = saved
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["format"] == "mpotn" and config["base_model"]["class"] == "BertModel"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [CONFIG_NAME, config["weights"], "config.json", "mpotn_files.json"])  # no generation
    from transformers import AutoConfig

    written = json.loads(json.dumps(AutoConfig.from_pretrained(folder).to_dict()))
    recorded = config["base_model"]["config"]
    assert {k: v for k, v in written.items() if k != "_name_or_path"} == {
        k: v for k, v in recorded.items() if k != "_name_or_path"}
    assert config["layers"]["embeddings.word_embeddings"]["row_shape"] == [6, 8, 10, 8, 8]


def test_a_crash_while_writing_weights_leaves_the_earlier_save_valid(saved, tmp_path,
                                                                     monkeypatch):
    model, _ = saved
    target = tmp_path / "save"
    model.save_pretrained(target)
    before = (target / CONFIG_NAME).read_text()

    def crash(module, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "save_model", crash)
    other = compress(load_model(), targets=["ffn"], max_bond=8, progress=False)
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(target)
    assert (target / CONFIG_NAME).read_text() == before
    assert float((outputs(load(target)) - outputs(model)).abs().max()) == 0.0


def test_a_crash_before_the_config_is_replaced_leaves_the_earlier_save_valid(
    saved, tmp_path, monkeypatch
):
    model, _ = saved
    target = tmp_path / "save"
    model.save_pretrained(target)
    before = sorted(p.name for p in target.iterdir())
    monkeypatch.setattr(serialization, "_write_hugging_face_files",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("killed")))
    other = compress(load_model(), targets=["ffn"], max_bond=8, progress=False)
    with pytest.raises(OSError, match="killed"):
        other.save_pretrained(target)  # after the new weights were written
    monkeypatch.undo()
    assert sorted(p.name for p in target.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["save"]
    assert float((outputs(load(target)) - outputs(model)).abs().max()) == 0.0
    other.save_pretrained(target)
    assert len(list(target.glob("model-*.safetensors"))) == 1
    assert load(target).totals() == other.totals()


def test_resaving_over_an_earlier_save_replaces_it(saved, tmp_path):
    model, _ = saved
    target = tmp_path / "save"
    model.save_pretrained(target)
    smaller = compress(load_model(), targets=["ffn"], max_bond=8, progress=False)
    smaller.save_pretrained(target)
    assert load(target).totals()["total_params"] == smaller.totals()["total_params"]


def test_non_hf_models_need_an_instance_of_their_architecture(tmp_path):
    compressed = compress(nn.Sequential(nn.Linear(16, 24)), targets=["0"], n=2, progress=False)
    compressed.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"pass an uncompressed instance .* model=\.\.\."):
        load(tmp_path)
    again = load(tmp_path, model=nn.Sequential(nn.Linear(16, 24)))
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert torch.equal(again(x), compressed.eval()(x))


def test_a_folder_that_is_not_an_mpotn_save_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"is not an mpotn save: it has no mpotn_config\.json"):
        load(tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        load(tmp_path / "missing")
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format": "peft"}))
    with pytest.raises(ValueError, match="is not an mpotn config"):
        load(tmp_path)


def test_files_that_disagree_with_the_config_are_clear_errors(saved, tmp_path):
    model, _ = saved
    target = tmp_path / "save"
    model.save_pretrained(target)
    config = json.loads((target / CONFIG_NAME).read_text())
    weights = target / config["weights"]
    # a changed weight: the hash no longer matches
    state = safetensors.torch.load_file(weights)
    state["pooler.dense.bias"] += 1
    safetensors.torch.save_file(state, weights)
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        load(target)
    # a plan that disagrees with the tensors' shapes
    model.save_pretrained(target)
    config = json.loads((target / CONFIG_NAME).read_text())
    config["layers"]["encoder.layer.0.intermediate.dense"]["bond_dims"][2] += 1
    (target / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mpotn_config\.json was edited after it was saved"):
        load(target)
    # the same edit of a save whose weights record no config hash (an older save)
    weights = target / config["weights"]
    safetensors.torch.save_file(safetensors.torch.load_file(weights), weights)
    config["sha256"] = serialization._sha256(weights)
    (target / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the weights disagree with mpotn_config\.json"):
        load(target)
    # missing weights
    weights.unlink() if weights.exists() else None
    for path in target.glob("model-*.safetensors"):
        path.unlink()
    with pytest.raises(ValueError, match="which is missing"):
        load(target)
