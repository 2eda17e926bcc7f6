"""Output sensitivity (mpotn.compression.sensitivity) and the model budget weighted by it."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
import transformers as tf
from torch import nn

from mpotn import compress
from mpotn.cli import main
from mpotn.compression.sensitivity import SKETCH, OutputSensitivity, replaced


class Masked(nn.Module):
    """A linear layer over ``(batch, seq, features)`` returning a ``ModelOutput``-like
    dict; ``attention_mask`` marks the real tokens."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.layer = nn.Linear(inputs, outputs, bias=False)

    def forward(self, input: torch.Tensor, attention_mask: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        return {"last_hidden_state": self.layer(input)}


class TwoBranches(nn.Module):
    """``a(x) + 0.01 b(x)``: the output barely depends on ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.a(input) + 0.01 * self.b(input)


def _relative(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new - old).double().pow(2).sum() / old.double().pow(2).sum())


def test_output_error_counts_real_tokens_only():
    """Padding rows are excluded: the error is that of the real rows exactly."""
    torch.manual_seed(0)
    model = Masked(4, 3)
    x = torch.randn(2, 3, 4)
    x[1, 1:] *= 100  # padding that would dominate the error
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    probe = OutputSensitivity(model, [{"input": x, "attention_mask": mask}])
    matrix = model.layer.weight.detach().T
    changed = matrix + 0.1 * torch.randn_like(matrix)
    rows = x[mask.bool()]
    assert probe.output_error(model.layer, changed) == pytest.approx(
        _relative(rows @ changed, rows @ matrix), rel=1e-5)
    assert probe.output_error(model.layer, matrix) == 0.0


def test_every_floating_output_counts_relative_to_its_own_norm():
    """A model returning ``(y, loss)`` (a scalar) and an integer tensor: the error is
    ``y``'s relative squared change plus the scalar's; the integers are not compared."""

    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 3, bias=False)

        def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, ...]:
            y = self.layer(input)
            return y, y.pow(2).mean(), torch.arange(3)

    torch.manual_seed(0)
    model = WithLoss()
    x = torch.randn(16, 4)
    probe = OutputSensitivity(model, [{"input": x}])
    matrix = model.layer.weight.detach().T
    changed = 1.5 * matrix
    y, new = x @ matrix, x @ changed
    expected = _relative(new, y) + _relative(new.pow(2).mean(), y.pow(2).mean())
    assert probe.output_error(model.layer, changed) == pytest.approx(expected, rel=1e-5)


def test_encoder_and_decoder_outputs_take_their_own_masks():
    """An encoder-decoder's outputs: an ``encoder_...`` output of the encoder's length
    takes ``attention_mask``, the others ``decoder_attention_mask``; with both of one
    length, the name decides; a per-token output without features (question answering's
    ``start_logits``) too; an output of neither shape keeps every row."""
    from mpotn.compression.sensitivity import _rows

    encoder = torch.tensor([[1, 1, 0], [1, 0, 0]])
    decoder = torch.tensor([[1, 1, 1], [1, 1, 0]])
    batch = {"attention_mask": encoder, "decoder_attention_mask": decoder}
    value = torch.randn(2, 3, 5)
    assert _rows("encoder_last_hidden_state", value, batch).shape == (3, 5)
    assert _rows("logits", value, batch).shape == (5, 5)
    longer = torch.randn(2, 4, 5)
    assert _rows("logits", longer, {**batch, "decoder_attention_mask": torch.ones(2, 4)}
                 ).shape == (8, 5)
    assert _rows("pooler_output", torch.randn(2, 5), batch).shape == (2, 5)
    # a pooler as wide as the padded length is still one row per sentence
    assert _rows("pooler_output", torch.randn(2, 3), batch).shape == (2, 3)
    assert _rows("loss", torch.tensor(1.5), batch).shape == (1, 1)
    start_logits = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # one per token
    assert _rows("start_logits", start_logits, {"attention_mask": encoder}).tolist() == [
        [1.0], [2.0], [4.0]]  # padding left out


def test_sensitivity_refuses_outputs_it_cannot_compare():
    """No floating-point tensor at the top level, all-zero outputs and non-finite ones
    are errors, not sensitivities of 0 that would let the budget cut everything."""

    class Ids(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, input: torch.Tensor) -> dict[str, Any]:
            return {"ids": self.layer(input).argmax(-1), "nested": (self.layer(input),)}

    model = Ids()
    with pytest.raises(ValueError, match="no floating-point tensor at the top level"):
        OutputSensitivity(model, [{"input": torch.randn(8, 4)}]).output_error(
            model.layer, model.layer.weight.detach().T)
    zeros = Masked(4, 3)
    probe = OutputSensitivity(zeros, [{"input": torch.zeros(2, 3, 4),
                                       "attention_mask": torch.ones(2, 3)}])
    with pytest.raises(ValueError, match="are all zero"):
        probe.output_error(zeros.layer, torch.randn(4, 3))
    finite = Masked(4, 3)
    probe = OutputSensitivity(finite, [{"input": torch.randn(2, 3, 4),
                                        "attention_mask": torch.ones(2, 3)}])
    with pytest.raises(ValueError, match="not finite"):
        probe.sensitivity("layer", finite.layer, torch.full((4, 3), float("inf")), 0.1)


def test_measured_sequences_are_drawn_from_all_batches():
    """Batches sorted by length: the measured ones are not just the first (shortest)."""
    batches = [{"input": torch.randn(8, 4)} for _ in range(20)]
    probe = OutputSensitivity(nn.Linear(4, 3), batches, sequences=32)
    chosen = [next(k for k, b in enumerate(batches) if b is m) for m in probe.batches]
    assert len(chosen) == 4 and max(chosen) >= 10


def test_wide_outputs_are_compared_through_a_sketch_that_estimates_the_error():
    """An output wider than SKETCH columns: the sketched relative error is within 20% of
    the exact one."""
    torch.manual_seed(0)
    model = Masked(8, 4 * SKETCH)
    x = torch.randn(4, 16, 8)
    probe = OutputSensitivity(model, [{"input": x, "attention_mask": torch.ones(4, 16)}])
    matrix = model.layer.weight.detach().T
    changed = matrix + 0.2 * torch.randn_like(matrix)
    exact = _relative(x @ changed, x @ matrix)
    assert probe.output_error(model.layer, changed) == pytest.approx(exact, rel=0.2)


def test_replaced_restores_the_weight_after_an_error():
    layer = nn.Linear(3, 2)
    before = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="inside"), replaced(layer, torch.zeros(3, 2)):
        raise RuntimeError("inside")
    assert torch.equal(layer.weight, before)
    with (pytest.raises(ValueError, match=r"cannot stand in for a weight of shape \(2, 3\)"),
          replaced(layer, torch.zeros(2, 3))):
        pass


def test_sensitivity_is_each_branch_share_of_the_output():
    """For ``y = a(x) + 0.01 b(x)``, changing ``a`` by a relative ``eps`` of its outputs
    changes ``y`` by ``eps^2 ||XA||^2 / ||Y||^2``: ``s_a = ||XA||^2 / ||Y||^2``,
    ``s_b = 10^-4 ||XB||^2 / ||Y||^2``."""
    torch.manual_seed(0)
    model = TwoBranches()
    x = torch.randn(128, 16)
    probe = OutputSensitivity(model, [{"input": x}])
    y = model(x).detach()
    for name, scale in (("a", 1.0), ("b", 0.01)):
        module = getattr(model, name)
        matrix = module.weight.detach().T
        change = 0.3 * torch.randn_like(matrix)
        error = float((x @ change).norm() / (x @ matrix).norm())
        expected = scale**2 * float((x @ matrix).pow(2).sum() / y.pow(2).sum())
        assert probe.sensitivity(name, module, matrix + change, error) == pytest.approx(
            expected, rel=1e-4)
    assert probe.measured["a"] > 1e3 * probe.measured["b"]


def test_model_budget_weighted_by_sensitivity_spends_where_the_output_depends():
    """Both branches have like spectra, so the unweighted budget cuts them alike; weighted,
    it keeps more of ``a`` and the model's output error falls, in the same budget."""
    torch.manual_seed(0)
    batches = [{"input": torch.randn(64, 16)} for _ in range(2)]
    x = torch.cat([b["input"] for b in batches])
    results = {}
    for weighted in (False, True):
        torch.manual_seed(1)
        model = TwoBranches()
        y = model(x).detach()
        compressed = compress(model, targets=["a", "b"], ratio=0.5, structure="svd",
                              budget="model", sensitivity=weighted, calibration=batches,
                              progress=False)
        report = {r["name"]: r for r in compressed.report()}
        results[weighted] = (report, _relative(model(x).detach(), y))
        assert compressed.totals()["total_params"] <= 0.5 * 2 * 16 * 16
    (plain, plain_error), (weighted, weighted_error) = results[False], results[True]
    assert "sensitivity" not in plain["a"]
    assert weighted["a"]["sensitivity"] > 1e3 * weighted["b"]["sensitivity"]
    assert weighted["a"]["params"] > plain["a"]["params"]
    assert weighted_error < 0.5 * plain_error


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_model_budget_with_sensitivity_on_hugging_face_models(family):
    """Every target of a BERT, a GPT-2 (logits wider than SKETCH are sketched) and a T5
    (encoder and decoder outputs) gets a sensitivity above 0, the targets fit their
    budget, and the matrices kept dense were measured too and hold their original weights
    (every probe put the weight back); the uncalibrated embeddings are weighed by their own
    sensitivity, without the warning a plain budget gives."""
    small = {"vocab_size": 2 * SKETCH}
    config, cls = {
        "bert": (tf.BertConfig(**small, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=48), tf.BertModel),
        "gpt2": (tf.GPT2Config(**small, n_embd=32, n_layer=2, n_head=2), tf.GPT2LMHeadModel),
        "t5": (tf.T5Config(**small, d_model=32, num_layers=2, num_heads=2, d_ff=48, d_kv=16,
                           decoder_start_token_id=0), tf.T5ForConditionalGeneration),
    }[family]
    torch.manual_seed(0)
    model = cls(config).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(1, 2 * SKETCH, (8, 12))
    mask = torch.ones_like(ids)
    mask[4:, 8:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}]
    with warnings.catch_warnings(record=True) as caught:  # uncalibrated embeddings
        warnings.simplefilter("always")
        compressed = compress(model, targets=["all-linear", "embeddings"], ratio=0.8,
                              structure="svd", budget="model", keep_dense=True,
                              sensitivity=True, calibration=batches, progress=False)
    assert not [w for w in caught if "weighs the calibrated matrices" in str(w.message)]
    report = compressed.report()
    assert all(r["sensitivity"] > 0 for r in report)
    assert sum(r["params"] for r in report) <= 0.8 * sum(r["original_params"] for r in report)
    dense = [r["name"] for r in report if r["structure"] == "dense"]
    assert dense
    modules = dict(model.named_modules())
    for name in dense:
        assert torch.equal(modules[name].weight, original[f"{name}.weight"])


def test_sensitivity_needs_a_model_budget_and_calibration():
    with pytest.raises(ValueError, match="use it with budget='model'"):
        compress(TwoBranches(), targets=["a"], ratio=0.5, sensitivity=True)
    with pytest.raises(ValueError, match="give calibration batches, or drop sensitivity"):
        compress(TwoBranches(), targets=["a"], ratio=0.5, budget="model", sensitivity=True)


@pytest.mark.parametrize("flags, message", [
    (["--sensitivity", "--budget", "matrix"],
     "--sensitivity weighs the matrices of one model-wide budget against each other: "
     "add --budget model"),
    (["--sensitivity", "--budget", "model", "--no-calibrate"], "drop --sensitivity"),
])
def test_compress_cli_refuses_sensitivity_without_budget_or_calibration(tmp_path, capsys,
                                                                        flags, message):
    assert main(["compress", *flags, "--out", str(tmp_path / "never")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_compress_cli_sensitivity_reports_each_matrix_s(tiny_bert, tmp_path):
    out = tmp_path / "weighted"
    assert main(["compress", str(tiny_bert), "--ratio", "0.8", "--budget", "model",
                 "--sensitivity", "--samples", "64", "--out", str(out), "--no-progress"]) == 0
    assert "sensitivity s" in (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["sensitivity"] and report["config"]["budget"] == "model"
    measured = [m["sensitivity"] for m in report["matrices"]]
    assert len(measured) == 16 and all(s > 0 for s in measured)  # 3 embeddings, 12, pooler
    assert sum(m["params"] for m in report["matrices"]) <= 0.8 * sum(
        m["original_params"] for m in report["matrices"])


def test_sensitivity_weighs_alike_in_one_pass_in_groups_and_sequentially():
    """The budget reads the same sensitivities and allocates the same parameters whether
    the targets are calibrated at once, in groups (one target's moments per group), or
    fitted in order."""
    torch.manual_seed(0)
    batches = [{"input": torch.randn(64, 16)} for _ in range(4)]  # 16 rows per input
    allocations = []
    for extra in ({}, {"calibration_memory": 8 * 16 * 16}, {"sequential": True}):
        torch.manual_seed(1)
        compressed = compress(TwoBranches(), targets=["a", "b"], ratio=0.5, structure="svd",
                              budget="model", sensitivity=True, calibration=batches,
                              progress=False, **extra)
        allocations.append({r["name"]: (r["params"], round(r["sensitivity"], 6))
                            for r in compressed.report()})
    assert allocations[0]["a"][0] > allocations[0]["b"][0]
    assert allocations[1] == allocations[0]
    assert allocations[2] == allocations[0]


@pytest.mark.parametrize("flags, budget, sensitivity", [
    ([], "model", True),
    (["--ratio", "0.3"], "model", True),
    (["--no-sensitivity"], "model", False),
    (["--budget", "matrix"], "matrix", False),
    (["--keep-dense"], "model", True),
    (["--allocation", "uniform"], "matrix", False),
    (["--max-bond", "8"], "matrix", False),
    (["--tol", "0.2"], "matrix", False),
    (["--full-rank"], "matrix", False),
    (["--method", "tt"], "matrix", False),
    (["--share-centrals", "fit"], "matrix", False),
    (["--experts", "2"], "matrix", False),
    (["--no-calibrate"], "matrix", False),
    (["--no-calibrate", "--budget", "model"], "model", False),
])
def test_compress_cli_defaults_to_a_weighted_model_budget_when_calibrating_by_a_ratio(
        flags, budget, sensitivity):
    from mpotn.cli import build_parser
    from mpotn.cli.compress import _resolve_budget

    args = build_parser().parse_args(["compress", *flags])
    _resolve_budget(args)
    assert (args.budget, args.sensitivity) == (budget, sensitivity)


def test_model_budget_refuses_a_uniform_allocation():
    with pytest.raises(ValueError, match="use it with budget='matrix'"):
        compress(TwoBranches(), targets=["a"], ratio=0.5, budget="model",
                 allocation="uniform")
