"""Bad inputs of the decompositions (issue 11): layers with 10+ tensors, the SVD, CP's work.

Every test is named ``test_methods_<case>``.
"""

import json

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

import mpotn
from mpotn.analysis.comparison import compare
from mpotn.cli import main
from mpotn.compression.compress import compress
from mpotn.layers import FactorizedLinear
from mpotn.methods import FactorNetwork, decompose, svd_shapes
from mpotn.methods.cp import WorkLimitError
from mpotn.types import COMPARE_METHODS

#: (method, options) whose networks hold 10 or more tensors on a 32 x 32 matrix
MANY = [("tt", {"n": 5}), ("tucker", {"n": 5}), ("cp", {"n": 5, "rank": 40}),
        ("mpo", {"n": 10})]


def _linear(size: int) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(size, size).double()


def _forward_error(layer: nn.Module, dense: nn.Linear) -> float:
    """``||M' - M|| / ||M||`` read from the layer's forward (identity inputs, bias removed)."""
    eye = torch.eye(dense.in_features, dtype=torch.float64)
    with torch.no_grad():
        built, reference = layer(eye) - dense.bias, dense(eye) - dense.bias
    return float((built - reference).norm() / reference.norm())


@pytest.mark.parametrize(("method", "options"), MANY)
def test_methods_layer_with_ten_or_more_tensors_forwards_its_network(method, options):
    dense = _linear(32)
    layer = FactorizedLinear.from_linear(dense, method, **options)
    network = layer.network()
    assert len(network.nodes) >= 10
    x = torch.randn(3, dense.in_features, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
        expected = x @ decompose(dense.weight.T, method, **options).rebuild() + dense.bias
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    if method != "cp":  # the others are exact at full rank
        torch.testing.assert_close(got, dense(x), rtol=1e-5, atol=1e-5)


def test_methods_tensor_order_of_the_parameters_cannot_pair_a_tensor_with_other_legs():
    dense = _linear(32)
    layer = FactorizedLinear.from_linear(dense, "tucker", n=5)
    assert list(layer.legs) == ["core", *(f"factor_{m}" for m in range(1, 11))]
    net = layer.network()
    shuffled = FactorNetwork(net.method, dict(reversed(net.nodes.items())), net.legs, net.row,
                             net.col)  # legs listed in another order than the nodes
    torch.testing.assert_close(shuffled.rebuild(), dense.weight.T.detach(), rtol=0, atol=1e-9)


@pytest.mark.parametrize(("method", "ratio"), [("tucker", None), ("tt", None), ("tucker", 0.3),
                                               ("tt", 0.3), ("cp", 0.3)])
def test_methods_compress_report_is_the_error_of_the_layer_it_built(method, ratio):
    dense = _linear(32).float()
    model = compress(nn.Sequential(dense), targets=["0"], method=method, n=5, ratio=ratio,
                     progress=False)
    row = model.report()[0]
    reference = _linear(32).float()
    measured = _forward_error(model.base_model[0].double(), reference.double())
    assert row["relative_error"] == pytest.approx(measured, rel=1e-3, abs=1e-6)
    if ratio is None:
        assert row["relative_error"] < 1e-6 and measured < 1e-6


def test_methods_the_issue_example_tucker_on_1024_reports_and_forwards_alike():
    dense = _linear(1024).float()
    reference = _linear(1024).float()
    model = compress(nn.Sequential(dense), targets=["0"], method="tucker", progress=False)
    x = torch.randn(4, 1024)
    with torch.no_grad():
        diff = float((model(x) - reference(x)).abs().max())
    assert model.report()[0]["relative_error"] < 1e-6
    assert diff < 1e-4


def test_methods_mpo_layers_with_three_to_five_cores_build():
    dense = _linear(96)
    x = torch.randn(2, 96, dtype=torch.float64)
    for n in (3, 4, 5):
        layer = FactorizedLinear.from_linear(dense, "mpo", n=n)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), dense(x), rtol=1e-9, atol=1e-9)


def test_methods_a_saved_model_with_eleven_tensor_layers_loads_alike(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=16)
    original = BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        expected = original(input_ids=ids).last_hidden_state
    model = mpotn.compress(original, targets=["ffn", "attention"], method="tucker", n=5,
                           progress=False)
    with torch.no_grad():
        got = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    model.save_pretrained(str(tmp_path))
    with torch.no_grad():
        again = mpotn.load(tmp_path)(input_ids=ids).last_hidden_state
    assert float((again - got).abs().max()) == 0.0


def _matrix(rows: int = 48, cols: int = 80) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


def test_methods_svd_is_the_truncated_svd_and_mpo_n2_is_not():
    matrix = _matrix()
    s = torch.linalg.svdvals(matrix)
    svd = decompose(matrix, "svd", max_bond=10)
    assert svd.method == "svd" and svd.details["rank"] == 10
    assert (svd.row.factors, svd.col.factors) == ((48, 1), (1, 80))
    assert svd.relative_error == pytest.approx(float(s[10:].norm() / s.norm()), rel=1e-9)
    assert svd.num_params == 10 * (48 + 80)
    at_ratio = decompose(matrix, "svd", ratio=0.2)  # rank floor(0.2 * 3840 / 128) = 6
    assert at_ratio.details["rank"] == 6
    assert at_ratio.relative_error == pytest.approx(float(s[6:].norm() / s.norm()), rel=1e-9)
    kronecker = decompose(matrix, "mpo", n=2, ratio=0.2)  # balanced factors on both sides
    assert min(kronecker.row.factors) > 1 and min(kronecker.col.factors) > 1
    assert kronecker.relative_error > at_ratio.relative_error


def test_methods_structure_svd_and_method_svd_build_the_same_factorization():
    assert svd_shapes(48, 80) == (2, (48, 1), (1, 80))
    rows = {}
    for key, options in (("structure", {"structure": "svd", "max_bond": 5}),
                         ("method", {"method": "svd", "ratio": 5 * (48 + 80) / (48 * 80)})):
        torch.manual_seed(0)
        model = compress(nn.Sequential(nn.Linear(48, 80)), targets=["0"], progress=False,
                         **options)
        rows[key] = model.report()[0]
    assert rows["structure"]["factorization"] == rows["method"]["factorization"] == "48·1 x 1·80"
    assert rows["method"]["method"] == "svd" and rows["method"]["bond_dims"] == "5"
    assert rows["method"]["relative_error"] == pytest.approx(rows["structure"]["relative_error"],
                                                             rel=1e-4)


def test_methods_cp_refuses_minutes_of_work_with_the_limit_and_how_to_raise_it():
    matrix = _matrix(384, 1536)
    with pytest.raises(WorkLimitError, match=r"cp at rank \d+ on a 384 x 1536 matrix \(n=5, 100 "
                       r"iterations\) needs about .* above the limit of 1\.2e\+10 .*max_work="):
        decompose(matrix, "cp", n=5, ratio=0.05)
    with pytest.raises(ValueError, match=r"above the limit of 1\.2e\+10.*MAX_WORK"):
        compress(nn.Sequential(nn.Linear(384, 1536)), targets=["0"], method="cp", ratio=0.05,
                 progress=False)
    small = _matrix(24, 24)
    with pytest.raises(WorkLimitError, match="above the limit of 1e\\+03"):
        decompose(small, "cp", n=2, rank=4, max_work=1e3)
    assert decompose(small, "cp", n=2, rank=4, iterations=5, max_work=1e9).details["rank"] == 4


def test_methods_compare_says_which_points_it_skipped_and_why():
    methods = [("SVD", "svd", {}), ("CP n=2", "cp", {"n": 2, "iterations": 2})]
    with pytest.warns(UserWarning, match=r"compare skipped 2 of 4 points: CP n=2 at 0\.1, 0\.2 "
                      r"\(work limit: cp at rank"):
        table = compare(_matrix(), ratios=[0.1, 0.2], methods=methods, batch=2, repeats=1,
                        max_cp_work=10)
    assert [r["label"] for r in table] == ["dense", "SVD", "SVD"]
    assert [(p["label"], p["target"], p["why"]) for p in table.skipped] == [
        ("CP n=2", 0.1, "work limit"), ("CP n=2", 0.2, "work limit")]


def test_methods_compare_command_fails_when_nothing_was_computed(tmp_path, capsys):
    np.save(tmp_path / "m.npy", _matrix().numpy())
    out = tmp_path / "out"
    assert main(["compare", str(tmp_path / "m.npy"), "--methods", "CP n=3", "--ratios", "0.1",
                 "--max-cp-work", "10", "--batch", "2", "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "nothing computed: all 1 points were skipped (raise CP's limit with --max-cp-work" in err
    assert "CP n=3 at 0.1 (work limit: cp at rank" in err
    assert not out.exists()
    assert main(["compare", str(tmp_path / "m.npy"), "--methods", "SVD", "CP n=3", "--ratios",
                 "0.1", "--max-cp-work", "10", "--batch", "2", "--out", str(out),
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 points (raise CP's limit" in captured.err
    assert "1 decompositions (1 points skipped)" in captured.out
    report = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in report["rows"]] == ["dense", "SVD"]
    assert [(p["label"], p["why"]) for p in report["skipped"]] == [("CP n=3", "work limit")]


def test_methods_compare_line_up_names_the_svd_and_the_kronecker_mpo():
    line_up = {label: (method, options) for label, method, options in COMPARE_METHODS}
    assert line_up["SVD"] == ("svd", {})
    assert line_up["MPO n=2 (Kronecker)"] == ("mpo", {"n": 2})
