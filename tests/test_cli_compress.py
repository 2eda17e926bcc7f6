"""``mpotn compress``: report, saved model that loads back identically, dry run, errors."""

import json
import subprocess
import sys

import pytest
import torch

import mpotn
from mpotn.cli import main
from mpotn.compression.calibrate import text_batches
from mpotn.compression.models import load_model, load_tokenizer
from mpotn.data import texts


def test_compress_embedded_model_saves_a_model_that_loads_back_identically(tmp_path, capsys):
    """The default: calibrated truncated SVDs within one budget of rho = 0.5 of the targets,
    weighted by each matrix's measured sensitivity; saved and loaded exactly."""
    out = tmp_path / "minilm-mpo"
    assert main(["compress", "--ratio", "0.5", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "calibrating on 256 sentences of the shipped SST-2 training sample" in printed
    assert "embeddings.word_embeddings" in printed and "#Pr" in printed
    assert "sensitivity s" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["budget"] == "model" and report["config"]["sensitivity"]
    assert len(report["matrices"]) == 40
    assert {m["structure"] for m in report["matrices"]} == {"svd"}
    assert {m["calibration"] for m in report["matrices"]} == {"whitened"}
    assert all(m["sensitivity"] >= 0 for m in report["matrices"])
    ratios = [m["ratio"] for m in report["matrices"]]
    assert min(ratios) < 0.5 < max(ratios)  # spent where the outputs depend on it
    targets = sum(m["original_params"] for m in report["matrices"])
    assert sum(m["params"] for m in report["matrices"]) <= 0.5 * targets
    for name in ("errors.png", "entropy_heatmap.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    assert (out / "report.md").read_text().startswith("# mpotn compress")

    loaded = mpotn.load(out)
    reference = mpotn.compress(
        load_model(), targets=["all-linear", "embeddings"], ratio=0.5, structure="svd",
        budget="model", sensitivity=True, calibrate_embeddings=True,
        calibration=text_batches(load_tokenizer(), texts()), progress=False).eval()
    ids = torch.randint(0, 30522, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = loaded(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        b = reference(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert float((a - b).abs().max()) == 0.0


@pytest.mark.parametrize("flag", ["--no-calibrate", "--full-rank"])
def test_compress_without_calibration_keeps_balanced_mpos_of_the_weights(tiny_bert, tmp_path,
                                                                         capsys, flag):
    """--no-calibrate truncates by the weights; --full-rank (exact) does not calibrate."""
    out = tmp_path / "plain"
    assert main(["compress", str(tiny_bert), "--targets", "ffn", flag, "--out",
                 str(out), "--no-progress"]) == 0
    assert "calibrating" not in capsys.readouterr().out
    report = mpotn.load(out).report()
    assert {(r["structure"], r["calibration"]) for r in report} == {("mpo", "none")}
    if flag == "--full-rank":
        assert all(r["relative_error"] < 1e-5 for r in report)


def test_compress_dry_run_lists_targets_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["compress", "--targets", "ffn", "--max-bond", "32", "--dry-run",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("max_bond=32") == 12 and "384x1536" in printed
    assert not out.exists()


def test_compress_cli_errors_are_messages_not_tracebacks(tmp_path):
    run = [sys.executable, "-m", "mpotn.cli", "compress", "--no-progress",
           "--out", str(tmp_path / "o")]
    result = subprocess.run([*run, "--targets", "nothing_like_this"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "match no nn.Linear" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run([*run, "--ratio", "0.5", "--max-bond", "4"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
    result = subprocess.run([*run, "--max-bond", "0"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "argument --max-bond: must be an integer >= 1, got '0'" in result.stderr


def test_compress_cli_sequential_fits_in_order_and_refuses_no_calibration(tiny_bert, tmp_path,
                                                                          capsys):
    out = tmp_path / "seq"
    with pytest.warns(UserWarning, match="fitted without sequential compensation, having "
                      "fewer than 10 calibration rows per input .*: pooler.dense$"):
        assert main(["compress", str(tiny_bert), "--ratio", "0.5", "--sequential", "--samples",
                     "64", "--budget", "model", "--out", str(out), "--no-progress"]) == 0
    assert "expected fidelity: mean cosine" in capsys.readouterr().out
    loaded = mpotn.load(out)
    assert loaded.compression_config.sequential
    assert all(r["output_error"] is not None for r in loaded.report()
               if r["calibration"] == "whitened")
    assert main(["compress", str(tiny_bert), "--no-calibrate", "--sequential",
                 "--out", str(tmp_path / "never")]) == 2
    assert "drop --no-calibrate, or drop --sequential" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_compress_cli_keep_dense_saves_a_model_with_dense_matrices_that_loads_equal(
        tiny_bert, tmp_path, capsys):
    from transformers import BertModel

    out = tmp_path / "dense"
    assert main(["compress", str(tiny_bert), "--ratio", "0.95", "--budget", "model",
                 "--keep-dense", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    saved = mpotn.load(out)
    report = saved.report()
    dense = [r for r in report if r["structure"] == "dense"]
    assert dense and len(dense) < len(report)
    assert f"compressed {len(report) - len(dense)} matrices (kept {len(dense)} dense)" in printed
    assert saved.totals()["compressed_matrices"] == len(report) - len(dense)
    assert saved.totals()["total_params"] <= 0.95 * saved.original_params
    assert saved.compression_config.keep_dense
    assert (out / "entropy_heatmap.png").exists() == any(
        r["layer"] is not None for r in report if r["structure"] != "dense")
    modules = dict(saved.base_model.named_modules())
    original = dict(BertModel.from_pretrained(tiny_bert).named_modules())
    for row in dense:  # saved and loaded as they were
        assert type(modules[row["name"]]) in (torch.nn.Linear, torch.nn.Embedding)
        assert torch.equal(modules[row["name"]].weight, original[row["name"]].weight)


def test_compress_cli_shares_centrals_deepens_and_saves(tiny_bert, tmp_path, capsys):
    """``--share-centrals fit --deepen 4``: one central tensor per matrix type over the 4
    layers of the saved model, each group's fitted error below layer 0's central."""
    out = tmp_path / "mpobert"
    assert main(["compress", str(tiny_bert), "--share-centrals", "fit", "--deepen", "4",
                 "--out", str(out), "--no-progress"]) == 0  # attention, ffn, full rank
    printed = capsys.readouterr().out
    assert "shared central tensors (fit init)" in printed and "deepened to 4 layers" in printed
    assert "calibrating" not in printed and "sharing error/|M|" in printed
    rows = [line.split("|")[1:-1] for line in printed.splitlines()
            if line.startswith("| ffn_in ") or line.startswith("| query ")]
    assert len(rows) == 2
    assert all(float(row[3]) < float(row[2]) for row in rows)  # fit below layer 0's
    loaded = mpotn.load(out)
    report = {r["name"]: r for r in loaded.report()}
    assert set(report) == {f"encoder.layer.{i}.{path}" for i in (0, 2) for path in (
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "intermediate.dense", "output.dense")}
    assert all(r["relative_error"] < 1e-5 for r in report.values())  # full rank
    query = report["encoder.layer.2.attention.self.query"]  # the original layer 1
    assert query["shared_group"] == "query" and 0.01 < query["sharing_error"] < 1
    layers = loaded.base_model.encoder.layer
    assert len(layers) == 4
    for path in ("attention.self.query", "intermediate.dense", "output.dense"):
        centrals = {layer.get_submodule(path).central.data_ptr() for layer in layers}
        assert len(centrals) == 1


def test_compress_cli_upcycles_experts_that_share_the_central(tiny_bert, tmp_path, capsys):
    out = tmp_path / "mpoe"
    assert main(["compress", str(tiny_bert), "--targets", "ffn", "--full-rank",
                 "--no-calibrate", "--experts", "3", "--top-k", "1", "--out", str(out),
                 "--no-progress"]) == 0
    assert "3 experts per FFN block sharing its central tensors, top-1" in (
        capsys.readouterr().out)
    for layer in mpotn.load(out).base_model.encoder.layer:
        mixture = layer.intermediate
        assert mixture.num_experts == 3 and mixture.top_k == 1
        centrals = {e.intermediate.dense.central.data_ptr() for e in mixture.experts}
        auxiliary = {e.intermediate.dense.cores[0].data_ptr() for e in mixture.experts}
        assert len(centrals) == 1 and len(auxiliary) == 3


@pytest.mark.parametrize("flags, message", [
    (["--deepen", "4"], "add --share-centrals"),
    (["--experts", "2", "--share-centrals", "fit"], "choose one"),
    (["--experts", "2", "--structure", "svd"], "needs balanced MPOs"),
    (["--experts", "2", "--top-k", "3"], "--top-k 3 needs --experts E with E >= 3"),
    (["--top-k", "1"], "--top-k 1 needs --experts"),
    (["--share-centrals", "layer", "--share-sweeps", "2"], "ALS sweeps of --share-centrals fit"),
    (["--share-centrals", "fit", "--ratio", "0.5"], "--ratio with --allocation optimal"),
    (["--share-centrals", "fit", "--max-bond", "8", "--budget", "model"], "--budget model do"),
    (["--experts", "2", "--structure", "auto"], "drop --structure auto"),
    (["--keep-dense", "--budget", "matrix"],
     "--keep-dense lets one model-wide budget leave matrices dense: add --budget model"),
    (["--keep-dense", "--no-calibrate"],
     "--keep-dense lets one model-wide budget leave matrices dense: add --budget model"),
    (["--experts", "2", "--budget", "model", "--ratio", "0.5", "--keep-dense"],
     "a matrix kept dense does not have: drop --keep-dense"),
    (["--no-calibrate", "--samples", "10", "--fit", "whiten"],
     "--samples, --fit set how the calibration text is used: drop --no-calibrate, or drop "
     "them"),
    (["--no-calibrate", "--calibrate-embeddings"], "--calibrate-embeddings set how"),
    (["--data-dir", "glue_data"], "--data-dir is the folder of a GLUE task's files: give the "
                                  "task as --calibrate NAME"),
])
def test_compress_cli_refuses_sharing_flags_that_do_not_go_together(tmp_path, capsys,
                                                                     monkeypatch, flags,
                                                                     message):
    import mpotn.compression.models as models

    monkeypatch.setattr(models, "load_pretrained", lambda *a: pytest.fail("loaded a model"))
    assert main(["compress", *flags, "--out", str(tmp_path / "never")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_compress_cli_refuses_experts_of_blocks_it_does_not_compress_before_compressing(
        tmp_path, capsys, monkeypatch):
    import mpotn.compression

    monkeypatch.setattr(mpotn.compression, "compress", lambda *a, **k: pytest.fail("compressed"))
    assert main(["compress", "--experts", "2", "--targets", "attention", "--out",
                 str(tmp_path / "never")]) == 2
    assert ("--targets leaves 6 blocks uncompressed (encoder.layer.0.intermediate, "
            "encoder.layer.1.intermediate, encoder.layer.2.intermediate); add ffn to --targets"
            in capsys.readouterr().err)
    assert main(["compress", "--targets", "embeddings", "--no-calibrate-embeddings", "--out",
                 str(tmp_path / "never")]) == 2
    assert ("no target uses the calibration text: drop --no-calibrate-embeddings, or pass "
            "--no-calibrate" in capsys.readouterr().err)
    assert not (tmp_path / "never").exists()


def test_compress_method_tt_fits_other_decompositions_by_ratio_and_saves_them(tiny_bert, capsys,
                                                                                tmp_path):
    out = tmp_path / "tt"
    assert main(["compress", str(tiny_bert), "--no-calibrate", "--targets", "ffn",
                 "--ratio", "0.3", "--out", str(out), "--no-progress"]) == 0
    assert (out / "entropy_heatmap.png").is_file()  # of the MPOs
    assert main(["compress", str(tiny_bert), "--method", "tt", "--n", "3", "--targets", "ffn",
                 "--ratio", "0.3", "--out", str(out), "--no-progress"]) == 0
    assert not (out / "entropy_heatmap.png").exists()  # TT cores have no central bond
    report = mpotn.load(out).report()
    assert len(report) == 4 and {r["method"] for r in report} == {"tt"}
    assert all(r["params"] <= 0.3 * r["original_params"] for r in report)
    assert "calibrating" not in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--method", "tt", "--calibrate", "rte"], "--method tt is fitted to the weights"),
    (["--method", "tt", "--fit", "whiten", "--samples", "8"],
     "--method tt is fitted to the weights; --samples, --fit apply to --method mpo"),
    (["--method", "svd", "--calibrate-embeddings"], "--calibrate-embeddings apply to"),
    (["--method", "cp", "--sensitivity", "--budget", "model"], "--sensitivity apply to"),
    (["--method", "cp", "--structure", "svd"], "--structure, --sequential, --budget model, "
                                               "--share-centrals and --experts apply to "
                                               "--method mpo"),
    (["--method", "tt", "--budget", "model"], "--budget model"),
    (["--method", "tucker", "--max-bond", "4"], "method 'tucker' is truncated by ratio only"),
])
def test_compress_method_refuses_what_only_mpo_does(tmp_path, capsys, flags, message):
    assert main(["compress", *flags, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags", [["--n", "3"], ["--n", "3", "--structure", "svd"]])
def test_compress_refuses_n_for_the_svd_structure_it_would_ignore(tmp_path, capsys, flags):
    assert main(["compress", *flags, "--dry-run", "--out", str(tmp_path / "x")]) == 2
    assert ("--n 3 shapes a balanced MPO, but the matrices get the SVD structure (n = 2"
            in capsys.readouterr().err)
    assert main(["compress", "--n", "3", "--structure", "mpo", "--dry-run",
                 "--targets", "ffn", "--out", str(tmp_path / "x")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "intermediate" in line]
    assert rows and all("| mpo         |   3 |" in line for line in rows)
