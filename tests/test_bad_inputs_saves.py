"""Issue 11, saves and loads: bad inputs and faults give exact results, clear errors, no
lost files and no code run.

Grouped as the issue groups them; every case is its own test, named ``test_saves_*`` (what
a save writes or removes) or ``test_load_*`` (what reading a save or a checkpoint does).
"""

import json
import os
import re
import shutil
import sys

import pytest
import safetensors.torch
import torch
from transformers import BertConfig, BertModel

import mpotn.compression.serialization as serialization
from mpotn.atomic import MANIFEST_NAME
from mpotn.cli import main
from mpotn.compression import compress, load
from mpotn.compression.serialization import CONFIG_NAME
from mpotn.finetune.squeeze import SqueezeConfig, Squeezer
from mpotn.finetune.training import TrainingConfig, save_model


def tiny_bert(**changes) -> BertModel:
    torch.manual_seed(0)
    settings = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
                "num_attention_heads": 2, "intermediate_size": 64,
                "max_position_embeddings": 32, **changes}
    return BertModel(BertConfig(**settings))


def compressed(dtype: torch.dtype = torch.float32):
    model = compress(tiny_bert(), targets=["attention", "ffn", "embeddings"], max_bond=4,
                     progress=False)
    return model.to(dtype).eval()


def outputs(model) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A compressed tiny BERT and its save (copy the folder before changing it)."""
    folder = tmp_path_factory.mktemp("save")
    model = compressed()
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture
def saved(original, tmp_path):
    folder = tmp_path / "save"
    shutil.copytree(original[1], folder)
    return folder


def edit(folder, change) -> None:
    """Apply ``change`` to the parsed config and write it back."""
    config = json.loads((folder / CONFIG_NAME).read_text())
    change(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def as_older_save(folder) -> None:
    """Drop the config hash from the weights' metadata, as saves before it were written."""
    config = json.loads((folder / CONFIG_NAME).read_text())
    weights = folder / config["weights"]
    safetensors.torch.save_file(safetensors.torch.load_file(weights), weights)
    config["sha256"] = serialization._sha256(weights)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- silent wrong results


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_load_restores_every_parameters_dtype_and_outputs(dtype, tmp_path):
    model = compressed(dtype)
    model.save_pretrained(tmp_path)
    again = load(tmp_path)
    saved_tensors = dict(model.base_model.state_dict())
    loaded_tensors = dict(again.base_model.state_dict())
    assert saved_tensors.keys() == loaded_tensors.keys()
    assert {k: t.dtype for k, t in loaded_tensors.items()} == {
        k: t.dtype for k, t in saved_tensors.items()}
    assert {p.dtype for p in again.parameters()} == {dtype}
    assert torch.equal(outputs(again), outputs(model))


@pytest.mark.parametrize("field, value", [("hidden_act", "relu"), ("layer_norm_eps", 1e-3),
                                          ("num_attention_heads", 4)])
def test_load_detects_an_edited_architecture(saved, field, value):
    edit(saved, lambda c: c["base_model"]["config"].__setitem__(field, value))
    with pytest.raises(ValueError, match=r"mpotn_config\.json was edited after it was saved"):
        load(saved)


# ------------------------------------------------------------------ files that are not ours


def hugging_face_shards(folder) -> dict[str, bytes]:
    """A sharded Hugging Face model's files in ``folder``, with their contents."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {f"model-0000{i}-of-00003.safetensors": f"shard {i}".encode() for i in (1, 2, 3)}
    files["model.safetensors.index.json"] = b'{"weight_map": {}}'
    files["config.json"] = b'{"model_type": "bert"}'
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return files


def test_saves_refuse_a_folder_holding_another_model(original, tmp_path):
    files = hugging_face_shards(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"holds files mpotn did not write \(config\.json, "
                                         r"model-00001-of-00003\.safetensors.*\(--overwrite\)"):
        original[0].save_pretrained(tmp_path / "hf")
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == files


def test_saves_with_overwrite_keep_every_hugging_face_shard(original, tmp_path):
    folder = tmp_path / "hf"
    files = hugging_face_shards(folder)
    with pytest.warns(UserWarning, match=r"already holds config\.json, which mpotn did not "
                                         r"write: kept as they are"):
        original[0].save_pretrained(folder, overwrite=True)
    with pytest.raises(ValueError, match=r"holds files mpotn did not write \(config\.json"):
        original[0].save_pretrained(folder)  # the user's files are still there
    with pytest.warns(UserWarning, match="already holds config.json"):
        compress(tiny_bert(), targets=["ffn"], max_bond=2, progress=False).save_pretrained(
            folder, overwrite=True)
    for name, content in files.items():
        assert (folder / name).read_bytes() == content
    weights = json.loads((folder / CONFIG_NAME).read_text())["weights"]
    assert names(folder) == sorted([*files, CONFIG_NAME, MANIFEST_NAME, weights])
    assert json.loads((folder / MANIFEST_NAME).read_text())["files"] == [weights, CONFIG_NAME]


def test_saves_never_replace_a_hugging_face_model_safetensors(original, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"the user's single-file model")
    original[0].save_pretrained(tmp_path, overwrite=True)
    assert (tmp_path / "model.safetensors").read_bytes() == b"the user's single-file model"
    assert torch.equal(outputs(load(tmp_path)), outputs(original[0]))


def test_saves_remove_only_weights_whose_content_matches_their_name(saved):
    lookalike = saved / "model-0123456789ab.safetensors"
    lookalike.write_bytes(b"not written by mpotn")
    before = json.loads((saved / CONFIG_NAME).read_text())["weights"]
    other = compress(tiny_bert(), targets=["ffn"], max_bond=2, progress=False)
    with pytest.raises(ValueError, match=r"did not write \(model-0123456789ab\.safetensors\)"):
        other.save_pretrained(saved)
    other.save_pretrained(saved, overwrite=True)
    assert lookalike.read_bytes() == b"not written by mpotn"
    assert not (saved / before).exists()


def test_saves_run_folder_with_a_users_file_is_refused_then_kept(original, tmp_path):
    model, _ = original
    tokenizer = type("Tokenizer", (), {"save_pretrained": lambda self, d: None})()
    directory = tmp_path / "run" / "model"
    save_model(model, tokenizer, directory)
    (directory / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files mpotn did not write \(notes\.txt\)"):
        save_model(model, tokenizer, directory)
    save_model(compress(tiny_bert(), targets=["ffn"], max_bond=2, progress=False), tokenizer,
               directory, overwrite=True)
    assert (directory / "notes.txt").read_text() == "mine"
    assert len(list(directory.glob("model-*.safetensors"))) == 1
    assert load(directory).totals()["compressed_matrices"] == 2
    assert "notes.txt" not in json.loads((directory / MANIFEST_NAME).read_text())["files"]


def test_saves_run_folder_with_only_mpotn_files_is_replaced(original, tmp_path):
    model, _ = original
    tokenizer = type("Tokenizer", (), {"save_pretrained": lambda self, d: None})()
    directory = tmp_path / "model"
    save_model(model, tokenizer, directory)
    save_model(compress(tiny_bert(), targets=["ffn"], max_bond=2, progress=False), tokenizer,
               directory)
    weights = json.loads((directory / CONFIG_NAME).read_text())["weights"]
    assert names(directory) == sorted([CONFIG_NAME, MANIFEST_NAME, weights, "config.json"])
    assert names(tmp_path) == ["model"]


def test_saves_cli_refuses_a_hugging_face_folder_before_working(tmp_path, capsys):
    files = hugging_face_shards(tmp_path / "hf")
    assert main(["compress", str(tmp_path / "hf"), "--out", str(tmp_path / "hf")]) == 2
    assert "holds files mpotn did not write" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == files


def test_saves_leave_no_temp_file_when_a_save_fails(original, saved, monkeypatch):
    before = names(saved)

    def crash(module, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        original[0].save_pretrained(saved)
    assert names(saved) == before


def test_saves_remove_temp_files_of_their_own_files_a_killed_write_left(original, saved):
    weights = json.loads((saved / CONFIG_NAME).read_text())["weights"]
    leftovers = [".mpotn_config.json.zz9_abcd.json", f".{weights}.k1ll3d_a.safetensors"]
    for name in leftovers:
        (saved / name).write_bytes(b"x" * 10)
    original[0].save_pretrained(saved)
    assert not [name for name in leftovers if (saved / name).exists()]


@pytest.mark.parametrize("hidden", [".model.safetensors.mine", ".notes.k1ll3d_a.txt",
                                    ".env.template", ".settings.old"])
def test_saves_count_a_users_hidden_file_as_the_users(original, saved, hidden):
    (saved / hidden).write_bytes(b"mine")
    with pytest.raises(ValueError, match=re.escape(f"did not write ({hidden})")):
        original[0].save_pretrained(saved)
    original[0].save_pretrained(saved, overwrite=True)
    assert (saved / hidden).read_bytes() == b"mine"


def test_saves_remove_temp_folders_a_killed_run_save_left(original, tmp_path):
    (tmp_path / ".model.new.k1ll3d_a").mkdir()
    (tmp_path / ".model.new.k1ll3d_a" / "model-0.safetensors").write_bytes(b"partial")
    (tmp_path / ".model.keep").mkdir()
    tokenizer = type("Tokenizer", (), {"save_pretrained": lambda self, d: None})()
    save_model(original[0], tokenizer, tmp_path / "model")
    assert names(tmp_path) == [".model.keep", "model"]


# ------------------------------------------------- nothing runs, nothing is read from outside


def test_load_never_imports_the_module_a_save_names(saved, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    package = tmp_path / "code" / "evil"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "payload.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nclass BertModel: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    edit(saved, lambda c: c["base_model"].__setitem__("module", "evil.payload"))
    as_older_save(saved)  # re-signed: only the class refusal stands in the way
    with pytest.raises(ValueError, match=r"names the model class evil\.payload\.BertModel, which "
                                         r"is not one of transformers' model classes; mpotn "
                                         r"never imports"):
        load(saved)
    assert not marker.exists()
    assert not any(name == "evil" or name.startswith("evil.") for name in sys.modules)


@pytest.mark.parametrize(("key", "value"), [
    ("attn_implementation", "kernels-community/flash-attn2"),
    ("_attn_implementation_internal", "kernels-community/flash-attn2"),
    ("attn_implementation", "flash_attention_2"),  # a kernel fetched without flash-attn
    ("attn_implementation", {"": "kernels-community/flash-attn2"}),  # per module
])
def test_load_never_fetches_an_attention_kernel_a_save_names(saved, key, value, monkeypatch):
    import kernels
    fetched = []
    monkeypatch.setattr(kernels, "get_kernel", lambda *a, **k: fetched.append(a))
    edit(saved, lambda c: c["base_model"]["config"].__setitem__(key, value))
    as_older_save(saved)  # re-signed: only the attention refusal stands in the way
    with pytest.raises(ValueError, match=r"names the attention code .*, which transformers "
                                         r"may fetch from the Hub"):
        load(saved)
    assert fetched == []


def test_load_refuses_a_transformers_name_that_is_not_a_model_class(saved):
    edit(saved, lambda c: c["base_model"].update({"module": "transformers", "class": "pipeline"}))
    as_older_save(saved)  # re-signed: only the class refusal stands in the way
    with pytest.raises(ValueError, match=r"transformers\.pipeline, which is not one of "
                                         r"transformers' model classes"):
        load(saved)


@pytest.mark.parametrize("where", ["../other/{}", "/absolute/{}", "sub/{}"])
def test_load_refuses_weights_outside_the_folder(saved, where):
    weights = json.loads((saved / CONFIG_NAME).read_text())["weights"]
    (saved.parent / "other").mkdir()
    shutil.copy(saved / weights, saved.parent / "other" / weights)
    edit(saved, lambda c: c.__setitem__("weights", where.format(weights)))
    with pytest.raises(ValueError, match=r"'weights' names .*, which is not a file inside"):
        load(saved)


def test_load_refuses_weights_that_link_outside_the_folder(saved):
    weights = json.loads((saved / CONFIG_NAME).read_text())["weights"]
    outside = saved.parent / weights
    shutil.move(saved / weights, outside)
    os.symlink(outside, saved / weights)
    with pytest.raises(ValueError, match=r"which is not a file inside"):
        load(saved)


def squeezer_state(tmp_path, text: str) -> Squeezer:
    squeezer = Squeezer(None, None, None, SqueezeConfig(), TrainingConfig(), tmp_path / "run")
    squeezer.checkpoints.mkdir(parents=True)
    (squeezer.checkpoints / "latest.json").write_text(text)
    return squeezer


def state_json(**changes) -> str:
    state = {"checkpoint": "step-0000", "config": SqueezeConfig().to_dict(),
             "training": TrainingConfig().to_dict(), "state": {}, **changes}
    return json.dumps(state)


@pytest.mark.parametrize("checkpoint", ["../../..", "/tmp", "step-0000/../../x"])
def test_load_squeeze_resume_refuses_a_checkpoint_outside_its_folder(saved, tmp_path,
                                                                     checkpoint):
    squeezer = squeezer_state(tmp_path, state_json(checkpoint=checkpoint))
    shutil.copytree(saved, squeezer.checkpoints / "step-0000")
    with pytest.raises(ValueError, match=r"latest\.json 'checkpoint' names .*, which is not a "
                                         r"file inside"):
        squeezer.resume()
    assert squeezer.model is None


# ----------------------------------------------------------- clear errors instead of tracebacks


def test_load_a_missing_key_is_a_clear_error(saved):
    edit(saved, lambda c: c.pop("weights"))
    with pytest.raises(ValueError, match=r"lacks the fields \['weights'\] and has the unknown "
                                         r"fields \[\]; the file was edited or damaged"):
        load(saved)


def test_load_a_config_that_is_a_list_is_a_clear_error(saved):
    (saved / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"mpotn_config\.json holds a JSON list, not an object"):
        load(saved)


def test_load_bad_utf8_is_a_clear_error(saved):
    (saved / CONFIG_NAME).write_bytes((saved / CONFIG_NAME).read_bytes() + b"\xff")
    with pytest.raises(ValueError, match=r"mpotn_config\.json is not UTF-8 text"):
        load(saved)


def test_load_a_bond_of_minus_one_is_a_clear_error(saved):
    edit(saved, lambda c: c["layers"]["encoder.layer.0.intermediate.dense"]["bond_dims"]
         .__setitem__(2, -1))
    with pytest.raises(ValueError, match=r"layer 'encoder\.layer\.0\.intermediate\.dense' has "
                                         r"invalid bond_dims=\[1, 4, -1, 4, 4, 1\] \(sizes are "
                                         r"whole numbers >= 1"):
        load(saved)


def test_load_an_unknown_kind_is_a_clear_error(saved):
    edit(saved, lambda c: c["layers"]["encoder.layer.0.output.dense"].__setitem__("kind", "lora"))
    with pytest.raises(ValueError, match=r"has the unknown kind 'lora' \(mpotn writes linear, "
                                         r"embedding, tied-linear, factorized-linear, "
                                         r"factorized-embedding\)"):
        load(saved)


def test_load_an_extra_key_is_a_clear_error(saved):
    edit(saved, lambda c: c.__setitem__("trust_remote_code", True))
    with pytest.raises(ValueError, match=r"has the unknown fields \['trust_remote_code'\]"):
        load(saved)


def test_load_an_extra_key_in_a_layer_is_a_clear_error(saved):
    edit(saved, lambda c: c["layers"]["encoder.layer.0.output.dense"].__setitem__("scale", 2))
    with pytest.raises(ValueError, match=r"\(linear\) lacks \[\] and has the unknown \['scale'\]"):
        load(saved)


def test_load_a_nonsense_dtype_is_a_clear_error(saved):
    edit(saved, lambda c: c.__setitem__("dtype", "nonsense"))
    with pytest.raises(ValueError, match=r"invalid dtype='nonsense' \(dtype is one of float16, "
                                         r"bfloat16, float32, float64\)"):
        load(saved)


def test_load_edited_in_features_is_a_clear_error(saved):
    edit(saved, lambda c: c["layers"]["encoder.layer.0.intermediate.dense"]
         .__setitem__("in_features", 30))
    with pytest.raises(ValueError, match="was edited after it was saved"):
        load(saved)
    as_older_save(saved)  # without the config hash, the layer is checked against the model
    with pytest.raises(ValueError, match=r"layer 'encoder\.layer\.0\.intermediate\.dense' is a "
                                         r"\('linear', 30, 64\) .* but the model's Linear there "
                                         r"is \('linear', 32, 64\)"):
        load(saved)


def test_load_an_older_save_without_the_config_hash_still_loads(original, saved):
    as_older_save(saved)
    assert torch.equal(outputs(load(saved)), outputs(original[0]))


def test_load_squeeze_resume_a_truncated_latest_json_names_the_file(tmp_path):
    squeezer = squeezer_state(tmp_path, state_json()[:40])
    with pytest.raises(ValueError, match=r"run/checkpoints/latest\.json is not valid JSON .*"
                                         r"the checkpoint state is damaged"):
        squeezer.resume()


def test_load_squeeze_resume_an_unknown_config_key_is_a_clear_error(tmp_path):
    config = {**SqueezeConfig().to_dict(), "warp": 9}
    squeezer = squeezer_state(tmp_path, state_json(config=config))
    with pytest.raises(ValueError, match=r"latest\.json: 'config' has unknown settings "
                                         r"\['warp'\] \(SqueezeConfig has"):
        squeezer.resume()


def test_load_squeeze_resume_an_invalid_setting_is_a_clear_error(tmp_path):
    config = {**SqueezeConfig().to_dict(), "cut": -1}
    squeezer = squeezer_state(tmp_path, state_json(config=config))
    with pytest.raises(ValueError, match=r"'config' is invalid \(cut must be a whole number"):
        squeezer.resume()



def test_an_edited_config_is_refused_before_it_builds_anything(saved, monkeypatch):
    """The integrity checks come first: an edited size never allocates the model."""
    built = []
    monkeypatch.setattr(serialization, "_base_model", lambda *a: built.append(a))
    edit(saved, lambda c: c["base_model"]["config"].__setitem__(
        "max_position_embeddings", 50_000_000))
    with pytest.raises(ValueError, match=r"was edited after it was saved"):
        load(saved)
    assert built == []
