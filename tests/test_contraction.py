"""Compiled contractions: equal to dense matmul, autograd, FLOP-based choice."""

import opt_einsum as oe
import pytest
import torch
from conftest import DEVICES

from mpotn import MPO
from mpotn.contraction import _plan
from mpotn.network import apply_equation, squeeze_ends


@pytest.fixture(scope="module")
def padded():
    """A truncated MPO of a matrix padded on both sides (30522-style)."""
    g = torch.Generator().manual_seed(5)
    matrix = torch.randn(1018, 97, generator=g, dtype=torch.float64)
    return matrix, MPO.from_matrix(matrix, n=3).truncate(ratio=0.4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["contract", "rebuild", "auto"])
@pytest.mark.parametrize("over", ["rows", "cols"])
def test_apply_equals_dense_matmul(padded, device, method, over):
    _, mpo = padded
    mpo = mpo.to(device)
    dense = mpo.to_matrix()
    assert mpo.padded_shape != mpo.shape  # both sides are zero-padded
    x = torch.randn(
        2,
        3,
        dense.shape[0] if over == "rows" else dense.shape[1],
        dtype=torch.float64,
        device=device,
    )
    expected = x @ dense if over == "rows" else x @ dense.T
    torch.testing.assert_close(mpo.apply(x, over=over, method=method), expected)


def test_full_rank_apply_equals_original_matrix(ffn):
    mpo = MPO.from_matrix(ffn)
    x = torch.randn(16, 384)
    assert float((mpo.apply(x, method="contract") - x @ ffn).abs().max()) <= 1e-4


@pytest.mark.parametrize("method", ["contract", "rebuild"])
def test_gradients_reach_every_core(padded, method):
    _, mpo = padded
    cores = [c.clone().requires_grad_(True) for c in mpo.cores]
    x = torch.randn(4, mpo.shape[0], dtype=torch.float64)
    y = mpo._contractor.apply(x, cores, method=method)
    y.square().sum().backward()
    for core in cores:
        assert core.grad is not None and float(core.grad.abs().sum()) > 0
    # the gradient is right: compare with autograd through an explicit einsum
    ref = [c.detach().clone().requires_grad_(True) for c in mpo.cores]
    dense = torch.einsum("aijb,bklc,cmnd->ikmjln", *ref).reshape(mpo.padded_shape)
    (x @ dense[: mpo.shape[0], : mpo.shape[1]]).square().sum().backward()
    for a, b in zip(cores, ref):
        torch.testing.assert_close(a.grad, b.grad)


def test_cost_reports_both_paths_and_auto_picks_the_faster_by_the_model(ffn):
    small = MPO.from_matrix(ffn).truncate(max_bond=8)
    one = small.contraction_cost(1)
    assert one.method == "contract" and one.contract_flops < one.rebuild_flops
    assert one.contract_seconds < one.rebuild_seconds
    assert one.dense_flops == 2 * 384 * 1536
    # small bonds, large batch: fewer FLOPs to contract, yet rebuilding is faster
    big = small.contraction_cost(4096)
    assert big.contract_flops < big.rebuild_flops
    assert big.method == "rebuild" and big.rebuild_seconds < big.contract_seconds
    full = MPO.from_matrix(ffn).contraction_cost(4096)
    assert full.method == "rebuild"


@pytest.mark.parametrize("batch", [1, 32, 1024])
def test_planned_path_needs_exactly_the_optimal_flops(ffn, batch):
    mpo = MPO.from_matrix(ffn).truncate(ratio=0.3)
    shapes = ((batch, *mpo.row_shape), *squeeze_ends([tuple(c.shape) for c in mpo.cores]))
    equation = apply_equation(mpo.n, "rows")
    _, optimal = oe.contract_path(equation, *shapes, shapes=True, optimize="optimal")
    planned = mpo.contraction_cost(batch).contract_flops
    assert planned == _plan(equation, shapes).flops
    assert planned == int(optimal.opt_cost)


def test_expressions_are_compiled_once_per_shape(padded):
    _, mpo = padded
    x = torch.randn(9, mpo.shape[0], dtype=torch.float64)
    mpo.apply(x, method="contract")
    before = _plan.cache_info()
    mpo.apply(x, method="contract")
    after = _plan.cache_info()
    assert after.hits == before.hits + 1
    assert after.misses == before.misses  # no new plan


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"over": "diag"}, "over must be one of"), ({"method": "fast"}, "method must be one of")],
)
def test_bad_contraction_arguments_are_errors(padded, kwargs, message):
    _, mpo = padded
    with pytest.raises(ValueError, match=message):
        mpo.apply(torch.randn(2, mpo.shape[0], dtype=torch.float64), **kwargs)


def test_wrong_input_width_or_dtype_is_an_error(padded):
    _, mpo = padded
    with pytest.raises(ValueError, match=r"input has 5 features .* rows have size 1018"):
        mpo.apply(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"input is torch.float32 on cpu but the cores are "
                                         r"torch.float64 on cpu; move one with \.to"):
        mpo.apply(torch.randn(2, 1018))


def test_autotuning_measures_each_key_once_and_keeps_the_outputs(padded):
    from mpotn.contraction import _TUNED, autotune_enabled, autotuning

    _, mpo = padded
    x = torch.randn(5, mpo.shape[0], dtype=torch.float64)
    expected = mpo.apply(x, method="rebuild")
    assert not autotune_enabled()
    with autotuning():
        before = len(_TUNED)
        first = mpo.apply(x)
        assert len(_TUNED) == before + 1  # batch 5 -> bucket 8, measured once
        mpo.apply(torch.randn(7, mpo.shape[0], dtype=torch.float64))
        assert len(_TUNED) == before + 1  # batch 7 falls in the same bucket
        mpo.apply(torch.randn(9, mpo.shape[0], dtype=torch.float64))
        assert len(_TUNED) == before + 2
    assert set(_TUNED.values()) <= {"contract", "rebuild"}
    torch.testing.assert_close(first, expected)
    assert not autotune_enabled()


def test_autotuning_draws_nothing_from_the_global_random_stream(padded):
    from mpotn.contraction import _TUNED, autotuning

    _, mpo = padded
    x = torch.randn(33, mpo.shape[0], dtype=torch.float64)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with autotuning():
        before = len(_TUNED)
        mpo.apply(x)  # batch 33 -> a bucket of 64, measured now
        assert len(_TUNED) == before + 1
    assert torch.equal(torch.rand(3), expected)


def test_a_float64_layer_stays_float64_under_autocast():
    from mpotn.layers import MPOLinear

    torch.manual_seed(0)
    layer = MPOLinear.from_linear(torch.nn.Linear(64, 64).double(), n=3).eval()
    x = torch.randn(2, 64, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = [layer.contractor.apply(x, list(layer.cores), method=method)
                   for method in ("contract", "rebuild")] + [layer(x)]
    assert [o.dtype for o in outputs] == [torch.float64] * 3  # bfloat16 on contract before
    torch.testing.assert_close(outputs[0], outputs[1])
