"""The inspect job and the ``mpotn`` command line."""

import json
import subprocess
import sys

import pytest
from torch import nn

from mpotn.analysis.inspection import inspect_model
from mpotn.cli import main


def test_inspect_records_every_matrix_with_numbers():
    model = nn.Sequential(nn.Embedding(30522, 16), nn.Linear(16, 64), nn.Linear(64, 16))
    result = inspect_model(model, n=3, ratio=0.3, progress=False, keep=["1"])
    records = {r["name"]: r for r in result.records}
    assert set(records) == {"0", "1", "2"}
    emb = records["0"]
    assert emb["padded_shape"] == "30720x16"
    assert emb["ratio_at_budget"] <= 0.3
    assert emb["relative_error"] <= emb["relative_bound"] * (1 + 1e-6)
    assert 0 < emb["central_entropy"] <= emb["central_entropy_max"]
    assert records["1"]["shape"] == "16x64"  # nn.Linear(16, 64) is the in x out matrix
    assert "1" in result.networks


def test_inspect_rejects_unknown_matrix_names_and_empty_models():
    with pytest.raises(ValueError, match="no weight matrix named \\['nope'\\]; candidates"):
        inspect_model(nn.Linear(8, 8), keep=["nope"], progress=False)
    with pytest.raises(ValueError, match=r"no nn\.Linear or nn\.Embedding"):
        inspect_model(nn.ReLU(), progress=False)


def test_cli_inspect_on_the_embedded_model_writes_table_heatmap_and_drawing(tmp_path, capsys):
    assert main(["inspect", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "encoder.layer.5.output.dense" in printed and "30522x384" in printed
    data = json.loads((tmp_path / "inspect.json").read_text())
    assert len(data["matrices"]) == 40
    word = data["matrices"][0]
    assert word["full_bonds"] == "12,384,768,24" and word["padded_shape"] == "30720x384"
    ffn = [m for m in data["matrices"] if m["type"] == "ffn_in"]
    attention = [m for m in data["matrices"] if m["type"] == "query"]
    # FFN matrices carry more entanglement than attention ones in every layer
    assert min(m["central_entropy"] for m in ffn) > max(m["central_entropy"] for m in attention)
    for m in data["matrices"]:
        assert m["relative_error"] <= m["relative_bound"] * (1 + 1e-6)
    for name in ("entropy_heatmap.png", "network_encoder_layer_0_intermediate_dense.png",
                 "entropy_profiles.png", "spectra_encoder_layer_0_intermediate_dense.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "inspect.md").read_text().startswith("# mpotn inspect")


def test_cli_bad_arguments_exit_with_a_message(tmp_path):
    run = [sys.executable, "-m", "mpotn.cli", "inspect"]
    result = subprocess.run([*run, "--ratio", "0"], capture_output=True, text=True)
    assert result.returncode == 2 and "must be > 0" in result.stderr
    result = subprocess.run([*run, "--n", "1"], capture_output=True, text=True)
    assert result.returncode == 2 and "at least 2 cores" in result.stderr
    result = subprocess.run([*run, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "not a model folder" in result.stderr
    result = subprocess.run(
        [*run, "--draw", "nope", "--out", str(tmp_path / "o"), "--no-progress"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and "no weight matrix named ['nope']" in result.stderr


def test_cli_inspect_on_a_save_reports_its_kept_bonds_and_draws_shared_centrals(
        tmp_path, capsys):
    import torch
    from transformers import BertConfig, BertModel

    from mpotn.compression import compress, share_centrals

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3,
                                num_attention_heads=2, intermediate_size=48))
    model = compress(bert, targets=["ffn"], n=3, max_bond=6, progress=False)
    share_centrals(model, groups=[[f"encoder.layer.{i}.output.dense" for i in range(3)]],
                   init="layer")
    model.save_pretrained(tmp_path / "save")
    assert main(["inspect", str(tmp_path / "save"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "an mpotn save" in printed and "6 MPO layers" in printed
    records = {r["name"]: r for r in
               json.loads((tmp_path / "out" / "inspect.json").read_text())["matrices"]}
    assert len(records) == 6
    assert records["encoder.layer.2.output.dense"]["shared_by"] == 3
    assert records["encoder.layer.2.intermediate.dense"]["shared_by"] == 1
    assert records["encoder.layer.0.intermediate.dense"]["bonds"] == "6,6"
    assert records["encoder.layer.0.intermediate.dense"]["params"] == (
        model.mpo_layers()["encoder.layer.0.intermediate.dense"].num_params)
    shared = list((tmp_path / "out").glob("shared_*.png"))
    assert [p.name for p in shared] == ["shared_encoder_layer_0_output_dense.png"]
    assert (tmp_path / "out" / "network_encoder_layer_0_intermediate_dense.png").is_file()


def test_the_entropy_heatmap_gives_each_stack_and_expert_its_own_row(tmp_path, monkeypatch):
    """T5's encoder and decoder queries of one layer (or two experts' matrices) share a type
    and a layer: each keeps its own cell instead of the last one drawn over the others."""
    import mpotn.drawing as drawing

    drawn = {}
    monkeypatch.setattr(drawing, "draw_heatmap", lambda grid, rows, cols, path, **kw:
                        drawn.update(grid=grid, rows=rows) or path)
    records = [{"name": "encoder.block.0.layer.0.SelfAttention.q", "type": "query", "layer": 0,
                "central_entropy": 1.0},
               {"name": "decoder.block.0.layer.0.SelfAttention.q", "type": "query", "layer": 0,
                "central_entropy": 3.0}]
    drawing.draw_entropy_heatmap(drawing.Table(records), tmp_path / "h.png", "t5")
    assert drawn == {"grid": [[1.0], [3.0]], "rows": ["encoder query", "decoder query"]}
    drawing.draw_entropy_heatmap(drawing.Table(records[:1]), tmp_path / "h.png", "bert")
    assert drawn["rows"] == ["query"]  # no collision: the plain types


def test_entropy_profiles_draw_matrices_of_one_type_with_different_numbers_of_cores(tmp_path):
    from mpotn.drawing import draw_entropy_profiles

    records = [{"type": "ffn_in", "entropies": [0.5, 0.7], "full_bonds": "4,16"},
               {"type": "ffn_in", "entropies": [0.5, 0.7, 0.6], "full_bonds": "4,16,4"},
               {"type": "query", "entropies": [0.3, 0.4], "full_bonds": "4,4"}]
    path = draw_entropy_profiles(records, tmp_path / "profiles.png", "mixed")
    assert path.stat().st_size > 1000
