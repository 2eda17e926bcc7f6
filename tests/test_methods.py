"""Decompositions as plug-ins: registry, network objects, layers and compress(method=...)."""

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

import mpotn
from mpotn.layers import FactorizedEmbedding, FactorizedLinear
from mpotn.methods import DECOMPOSITIONS, FactorNetwork, decompose, register

EXACT = {"mpo": {"n": 3}, "tt": {"n": 2}, "tucker": {"n": 2}}


@pytest.fixture(scope="module")
def matrix():
    return torch.randn(48, 80, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize(("method", "options"), list(EXACT.items()))
def test_full_rank_methods_are_exact(matrix, method, options):
    net = decompose(matrix, method, **options)
    assert net.relative_error < 1e-12
    torch.testing.assert_close(net.rebuild(), matrix)
    x = torch.randn(5, 48, dtype=torch.float64)
    torch.testing.assert_close(net.apply(x), x @ matrix)


@pytest.mark.parametrize("method", sorted(DECOMPOSITIONS))
def test_every_method_meets_a_budget_and_reports_its_true_error(matrix, method):
    net = decompose(matrix, method, n=2, ratio=0.3)
    assert isinstance(net, FactorNetwork) and net.method == method
    assert 0.24 <= net.params_ratio <= 0.3  # the budget used (Tucker's core grows in steps)
    true = float((net.rebuild() - matrix).norm() / matrix.norm())
    assert net.relative_error == pytest.approx(true, rel=1e-9)
    graph = net.to_networkx()
    assert {f"row_{k}" for k in (1, 2)} | {f"col_{k}" for k in (1, 2)} <= set(graph.nodes)


def test_hooi_improves_on_hosvd_and_svd_is_the_two_core_mpo(matrix):
    hosvd = decompose(matrix, "tucker", n=2, rank=5)
    hooi = decompose(matrix, "tucker", n=2, rank=5, iterations=20)
    assert hooi.relative_error < hosvd.relative_error - 1e-3  # measured: 0.8790 -> 0.8605
    # n = 2 with trivial second factors is the truncated SVD (Eckart-Young)
    svd = decompose(matrix, "mpo", n=2, row_shape=(48, 1), col_shape=(1, 80), max_bond=10)
    s = torch.linalg.svdvals(matrix)
    assert svd.relative_error == pytest.approx(float(s[10:].norm() / s.norm()), rel=1e-9)


@pytest.mark.parametrize("method", ["tt", "tucker", "cp"])
def test_tensorly_methods_leave_the_global_backend_alone_and_keep_device_and_dtype(matrix,
                                                                                  method):
    """tensorly computes on its pytorch backend (on the matrix's device), and the caller's
    numpy backend is back afterwards; the nodes come back in the matrix's dtype."""
    import tensorly

    previous = tensorly.get_backend()
    tensorly.set_backend("numpy")
    try:
        net = decompose(matrix.float(), method, n=2, rank=5)
        assert tensorly.get_backend() == "numpy"
    finally:
        tensorly.set_backend(previous)
    assert {(t.dtype, t.device.type) for t in net.nodes.values()} == {(torch.float32, "cpu")}
    assert all(t.is_contiguous() for t in net.nodes.values())


def test_a_new_method_needs_one_function_and_one_line(matrix):
    @register("rank-one")
    def rank_one(m, *, n=2, ratio=None):
        u, s, vh = torch.linalg.svd(m.double())
        return FactorNetwork("rank-one", {"u": u[:, :1] * s[0], "v": vh[:1]},
                             {"u": ("row_1", "r"), "v": ("r", "col_1")},
                             mpotn.shapes.plan_side(m.shape[0], 1),
                             mpotn.shapes.plan_side(m.shape[1], 1))
    try:
        net = decompose(matrix, "rank-one")
        assert net.num_params == 48 + 80
        with pytest.raises(ValueError, match="already registered"):
            register("rank-one")(rank_one)
    finally:
        del DECOMPOSITIONS["rank-one"]


def test_bad_requests_are_clear_errors(matrix):
    with pytest.raises(ValueError, match="unknown decomposition"):
        decompose(matrix, "pca")
    with pytest.raises(ValueError, match="give rank or ratio"):
        decompose(matrix, "cp")
    with pytest.raises(ValueError, match="ratio must be > 0"):
        decompose(matrix, "tt", ratio=0)
    for method in ("tt", "tucker", "cp"):
        with pytest.raises(ValueError, match=r"give rank or ratio, not both"):
            decompose(matrix, method, n=2, rank=3, ratio=0.1)
        with pytest.raises(ValueError, match=r"must be a floating-point tensor"):
            decompose(torch.randint(-5, 5, (48, 80)), method, n=2, rank=3)
    for method in ("mpo", "tt"):
        with pytest.raises(ValueError, match=r"the 48 x 80 matrix is on the meta device"):
            decompose(torch.empty(48, 80, device="meta"), method, n=2, ratio=0.3)
    with pytest.raises(ValueError, match=r"ratio 1e-05 of a 48 x 80 matrix is 0.038 "
                                         r"parameters, fewer than 1"):
        decompose(matrix, "svd", ratio=1e-5)


@pytest.mark.parametrize("method", sorted(DECOMPOSITIONS))
def test_every_method_decomposes_an_all_zero_matrix_exactly(method):
    """Zero-initialised projections occur in real models; CP's ALS used to fail on them."""
    net = decompose(torch.zeros(48, 80, dtype=torch.float64), method, n=2, ratio=0.3)
    assert net.relative_error == 0.0 and float(net.rebuild().abs().max()) == 0.0
    assert net.params_ratio <= 0.3


def tiny():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=16)).eval()


@pytest.mark.parametrize("method", ["mpo", "tt", "tucker"])
def test_compress_with_any_exact_method_keeps_the_outputs_at_full_rank(method, tmp_path):
    original = tiny()
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        expected = original(input_ids=ids).last_hidden_state
    model = mpotn.compress(tiny(), targets=["ffn", "attention", "word_embeddings"],
                           method=method, n=2, progress=False)
    kinds = {type(m) for m in model.compressed_layers().values()}
    if method != "mpo":
        assert kinds == {FactorizedLinear, FactorizedEmbedding}
    with torch.no_grad():
        got = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert all(r["relative_error"] < 1e-5 for r in model.report())
    model.save_pretrained(str(tmp_path))
    loaded = mpotn.load(tmp_path)
    with torch.no_grad():
        assert float((loaded(input_ids=ids).last_hidden_state - got).abs().max()) == 0.0


def test_compress_with_cp_meets_the_ratio():
    model = mpotn.compress(tiny(), targets=["ffn"], method="cp", n=2, ratio=0.3,
                           progress=False)
    for row in model.report():
        assert row["method"] == "cp" and row["ratio"] <= 0.3
    assert isinstance(model.base_model.encoder.layer[0].intermediate.dense, FactorizedLinear)
    with pytest.raises(ValueError, match="unknown method"):
        mpotn.compress(tiny(), targets=["ffn"], method="pca", progress=False)


def test_factorized_layers_train(matrix):
    linear = nn.Linear(48, 80)
    layer = FactorizedLinear.from_linear(linear, "tucker", n=2, ratio=0.5)
    layer(torch.randn(4, 48)).square().sum().backward()
    assert all(p.grad is not None for p in layer.factors.values())


def test_tucker_by_ratio_chooses_a_rank_per_mode_within_the_budget(matrix):
    uniform = decompose(matrix, "tucker", n=2, rank=5)  # the largest one rank under 0.3
    assert uniform.params_ratio <= 0.3 < decompose(matrix, "tucker", n=2, rank=6).params_ratio
    per_mode = decompose(matrix, "tucker", n=2, ratio=0.3)
    assert per_mode.details["ranks"] == [8, 6, 2, 8]
    assert uniform.params_ratio < per_mode.params_ratio <= 0.3
    assert per_mode.relative_error < uniform.relative_error  # measured 0.868 vs 0.879


def test_tucker_by_ratio_keeps_one_rank_for_all_modes_where_that_is_closer():
    from mpotn.compression.models import load_model

    embedding = load_model().embeddings.word_embeddings.weight.detach().double()
    net = decompose(embedding, "tucker", n=3, ratio=0.4)
    assert net.details["ranks"] == [23, 23, 23, 6, 8, 8]  # per mode: 0.774, this: 0.733
    assert net.relative_error == pytest.approx(0.7332, abs=1e-3)
