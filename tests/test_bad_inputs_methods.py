"""Bad inputs of the decompositions (issue 11): layers with 10+ tensors, the SVD, CP's work.

Every test is named ``test_methods_<case>``.
"""

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

import mpotn
from mpotn.compression.compress import compress
from mpotn.layers import FactorizedLinear
from mpotn.methods import FactorNetwork, decompose

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
