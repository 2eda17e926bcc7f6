"""compress(..., calibration=...): calibrated structures, a model-wide budget, the CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mpotn
from mpotn.calibration import output_error
from mpotn.cli import main
from mpotn.compression.calibrate import calibrate, text_batches
from mpotn.compression.models import load_model, load_tokenizer
from mpotn.data import texts

TARGET = "encoder.layer.1.intermediate.dense"


def toy_model_and_inputs() -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """Two linears whose inputs have very unequal scales (as transformer activations do)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 16))
    scale = torch.logspace(-2, 1, 24)
    batches = [{"input": torch.randn(64, 24) * scale} for _ in range(4)]
    return model, batches


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.inner(input)


def test_calibrate_accumulates_x_transpose_x_over_real_tokens_only():
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, input: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.body(input)

    stats = calibrate(Masked(), [{"input": x, "attention_mask": mask}], {"0": model[0]})
    rows = x[mask.bool()].double()
    assert stats["0"].tokens == 5
    assert torch.allclose(stats["0"].covariance, rows.T @ rows)


def test_calibrated_svd_structure_has_lower_output_error_than_plain_svd():
    model, batches = toy_model_and_inputs()
    plain_model, _ = toy_model_and_inputs()
    stats = calibrate(Wrapper(model), batches, {"0": model[0]})
    cov = stats["0"].covariance
    matrix = model[0].weight.detach().T.double()
    calibrated = mpotn.compress(Wrapper(model), targets=["inner.0"], structure="svd",
                                ratio=0.4, calibration=batches, progress=False)
    plain = mpotn.compress(Wrapper(plain_model), targets=["inner.0"], structure="svd",
                           ratio=0.4, progress=False)
    [ours], [theirs] = calibrated.report(), plain.report()
    assert ours["structure"] == "svd" and ours["calibration"] == "whitened"
    assert ours["params"] == theirs["params"] <= 0.4 * 24 * 32
    assert theirs["output_error"] is None
    layer = calibrated.base_model.inner[0]
    weight = layer.contractor.rebuild(list(layer.cores)).double()
    assert ours["output_error"] == pytest.approx(output_error(matrix, weight, cov), rel=1e-5)
    plain_layer = plain.base_model.inner[0]
    plain_weight = plain_layer.contractor.rebuild(list(plain_layer.cores)).double()
    assert ours["output_error"] < 0.5 * output_error(matrix, plain_weight, cov)


def test_model_budget_spends_one_budget_unevenly_and_meets_it():
    model, batches = toy_model_and_inputs()
    compressed = mpotn.compress(Wrapper(model), targets=["inner.0", "inner.2"],
                                structure="svd", budget="model", ratio=0.5,
                                calibration=batches, progress=False)
    report = compressed.report()
    assert sum(r["params"] for r in report) <= 0.5 * (24 * 32 + 32 * 16)
    assert report[0]["ratio"] != pytest.approx(report[1]["ratio"], abs=0.02)


def test_calibrated_mpo_by_als_beats_plain_mpo_at_the_same_bonds_on_minilm():
    tokenizer = load_tokenizer()
    batches = text_batches(tokenizer, texts(samples=64))
    held_out = text_batches(tokenizer, texts(samples=64, seed=1))
    settings = {"targets": [TARGET], "n": 3, "ratio": 0.5, "progress": False}
    calibrated = mpotn.compress(load_model(), calibration=batches, fit="als", **settings)
    plain = mpotn.compress(load_model(), **settings)
    [ours], [theirs] = calibrated.report(), plain.report()
    assert ours["bond_dims"] == theirs["bond_dims"] and ours["params"] == theirs["params"]
    original = load_model()
    module = dict(original.named_modules())[TARGET]
    cov = calibrate(original, held_out, {TARGET: module})[TARGET].covariance
    matrix = module.weight.detach().T.double()

    def held_out_error(model: mpotn.MPOModel) -> float:
        layer = dict(model.base_model.named_modules())[TARGET]
        return output_error(matrix, layer.contractor.rebuild(list(layer.cores)).double(), cov)

    assert held_out_error(calibrated) < 0.7 * held_out_error(plain)


def test_structure_auto_keeps_the_lower_error_structure_per_matrix():
    model, batches = toy_model_and_inputs()
    compressed = mpotn.compress(Wrapper(model), targets=["inner.0"], structure="auto", n=2,
                                ratio=0.5, calibration=batches, progress=False)
    [row] = compressed.report()
    svd_model, _ = toy_model_and_inputs()
    svd = mpotn.compress(Wrapper(svd_model), targets=["inner.0"], structure="svd",
                         ratio=0.5, calibration=batches, progress=False)
    assert row["output_error"] <= svd.report()[0]["output_error"] + 1e-12


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": "model"}, "give ratio or params"),
    ({"structure": "auto", "max_bond": 4}, "equal parameter counts"),
    ({"structure": "tree"}, "structure must be one of"),
    ({"fit": "dmrg"}, "fit must be one of"),
    ({"sweeps": -1}, "sweeps must be an integer"),
])
def test_bad_calibration_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mpotn.compress(nn.Sequential(nn.Linear(4, 4)), targets=["0"], progress=False, **kwargs)


def test_cli_compress_calibrates_from_a_text_file_and_reports_fidelity(tiny_bert, tmp_path,
                                                                       capsys):
    sentences = tmp_path / "calibration.txt"
    sentences.write_text("a fine film .\nan awful , boring mess .\nthe cast is great .\n")
    out = tmp_path / "out"
    assert main(["compress", str(tiny_bert), "--targets", "ffn", "--structure", "svd",
                 "--ratio", "0.5", "--calibrate", str(sentences), "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "expected fidelity: mean cosine" in printed
    assert "output error (Eq. 7)" in printed
    loaded = mpotn.load(out)
    assert all(r["calibration"] == "whitened" for r in loaded.report())
