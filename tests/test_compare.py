"""mpotn compare: every method against the ratio, on any matrix source."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mpotn.analysis.comparison import compare, load_matrix
from mpotn.cli import main


def low_rank_plus_noise(rows=120, cols=90, rank=6):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
            + 0.01 * torch.randn(rows, cols, generator=g)).double()


def test_svd_wins_on_a_low_rank_matrix_and_errors_fall_with_the_budget():
    table = compare(low_rank_plus_noise(), ratios=[0.15, 0.4], batch=4, repeats=1)
    assert not table.skipped  # 90 pads to a size with 5 and 7 balanced factors
    # every method at most its share of the matrix's own entries, padded MPOs too
    assert all(r["ratio"] <= r["target"] for r in table)
    rows = {(r["label"], r["target"]): r for r in table}
    assert rows[("MPO n=2 (Kronecker)", 0.15)]["relative_error"] > 0.5  # not the SVD
    assert rows[("dense", 1.0)]["flops"] == 2 * 4 * 120 * 90
    for label in ("SVD", "MPO n=3", "MPO n=5", "MPO n=7", "TT n=3", "Tucker n=3"):
        assert rows[(label, 0.4)]["relative_error"] <= rows[(label, 0.15)]["relative_error"]
    assert rows[("SVD", 0.15)]["relative_error"] < 0.01  # rank 6 fits in the budget
    assert all(r["relative_error"] >= rows[("SVD", 0.15)]["relative_error"]
               for r in table if r["target"] == 0.15)
    assert all(r["flops"] > 0 and r["ms_per_batch"] > 0 for r in table)


def test_a_ratio_below_a_methods_rank_one_network_is_skipped_not_plotted_above_it():
    """TT, Tucker and CP stop at rank 1; MPO and SVD refuse: no point lands above its
    target."""
    with pytest.warns(UserWarning, match="compare skipped"):
        table = compare(torch.randn(64, 96, dtype=torch.float64), ratios=[0.002], batch=2,
                        repeats=1, methods=[("TT n=3", "tt", {"n": 3}),
                                            ("Tucker n=3", "tucker", {"n": 3}),
                                            ("MPO n=3", "mpo", {"n": 3})])
    assert [r["label"] for r in table] == ["dense"]
    why = {s["label"]: s["why"] for s in table.skipped}
    assert why == {"TT n=3": "above the ratio", "Tucker n=3": "above the ratio",
                   "MPO n=3": "refused"}
    assert "holds 26 parameters, above the 12 of ratio 0.002" in table.skipped[0]["reason"]


def test_matrix_sources(tmp_path):
    m = low_rank_plus_noise()
    np.save(tmp_path / "m.npy", m.numpy())
    save_file({"w": m.float(), "v": m.float().T.contiguous()}, str(tmp_path / "m.safetensors"))
    assert load_matrix(tmp_path / "m.npy")[1].shape == (120, 90)
    assert load_matrix(f"{tmp_path}/m.safetensors:v")[1].shape == (90, 120)
    with pytest.raises(ValueError, match="holds 2 tensors"):
        load_matrix(tmp_path / "m.safetensors")
    name, ffn = load_matrix("encoder.layer.0.intermediate.dense")
    assert name == "encoder.layer.0.intermediate.dense" and ffn.shape == (384, 1536)
    with pytest.raises(ValueError, match="no matrix 'nope'"):
        load_matrix("nope")


def test_the_default_matrix_is_the_word_embedding_of_any_family(tmp_path):
    from transformers import GPT2Config, GPT2Model
    GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=8,
                         bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path / "gpt2")
    name, table = load_matrix(model=str(tmp_path / "gpt2"))
    assert name.endswith("wte") and table.shape == (50, 16)
    assert load_matrix()[0] == "embeddings.word_embeddings"  # MiniLM's


def test_compare_command_writes_table_plot_and_json(tmp_path, capsys):
    np.save(tmp_path / "m.npy", low_rank_plus_noise().numpy())
    out = tmp_path / "out"
    assert main(["compare", str(tmp_path / "m.npy"), "--ratios", "0.2", "--methods", "SVD",
                 "Tucker n=3", "CP n=3", "--batch", "4", "--out", str(out),
                 "--no-progress"]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert {r["label"] for r in report["rows"]} == {"dense", "SVD", "Tucker n=3", "CP n=3"}
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "compare.csv").read_text().startswith("label,")
    assert main(["compare", "--methods", "PCA", "--out", str(out)]) == 2
    assert "unknown method labels" in capsys.readouterr().err
