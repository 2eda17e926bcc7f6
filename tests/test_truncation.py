"""Truncation policies, Eq. 3/4 bounds and Eq. 5 parameter counts."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpotn import MPO


@pytest.fixture(scope="module")
def real(ffn):
    return ffn.double(), MPO.from_matrix(ffn.double())


@pytest.fixture(scope="module")
def small():
    g = torch.Generator().manual_seed(7)
    # decaying spectrum, like a trained matrix
    u, _ = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(128, 96, generator=g, dtype=torch.float64))
    matrix = u @ torch.diag(torch.logspace(0, -3, 96, dtype=torch.float64)) @ v.T
    return matrix, MPO.from_matrix(matrix, n=4)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_eq4_bound_holds_for_random_truncations(small, data):
    matrix, mpo = small
    dims = [
        data.draw(st.integers(1, d), label=f"bond_{k}")
        for k, d in enumerate(mpo.bond_dims[1:-1], start=1)
    ]
    cut = mpo.truncate(dims)
    actual = cut.reconstruction_error(matrix)
    assert actual <= mpo.estimated_error([1, *dims, 1]) * (1 + 1e-9) + 1e-12
    assert actual <= cut.error_bound * (1 + 1e-9) + 1e-12
    assert cut.error_bound <= mpo.estimated_error([1, *dims, 1]) * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("bond", [1, 2, 3, 4])
def test_eq4_is_an_equality_for_a_single_bond_cut(real, bond):
    matrix, mpo = real
    dim = max(1, mpo.bond_dims[bond] // 3)
    cut = mpo.truncate({bond: dim})
    assert cut.reconstruction_error(matrix) == pytest.approx(
        mpo.truncation_error(bond, dim), rel=1e-9
    )
    assert cut.error_bound == pytest.approx(mpo.truncation_error(bond, dim), rel=1e-9)


def test_truncation_leaves_the_original_intact(real):
    _, mpo = real
    before = [c.clone() for c in mpo.cores]
    mpo.truncate(max_bond=8)
    assert all(torch.equal(a, b) for a, b in zip(before, mpo.cores))
    assert mpo.bond_dims == mpo.full_bond_dims


def test_max_bond_caps_every_bond(real):
    _, mpo = real
    assert mpo.truncate(max_bond=16).bond_dims == (1, 8, 16, 16, 12, 1)


def test_tolerance_gives_a_bound_within_tolerance(real):
    matrix, mpo = real
    slack = 1e-9 * mpo.norm
    for tol in (0.2, 0.4, 0.6):
        cut = mpo.truncate(tol=tol)
        assert 0 < cut.error_bound <= tol * mpo.norm + slack
        assert cut.reconstruction_error(matrix) <= cut.error_bound + slack
    # tighter tolerances keep more parameters
    assert mpo.truncate(tol=0.2).num_params > mpo.truncate(tol=0.4).num_params
    # this trained matrix is so close to full rank that 5% allows no cut at all
    smallest = min(float(s[-1]) for s in mpo.singular_values)
    assert smallest > 0.05 * mpo.norm
    assert mpo.truncate(tol=0.05).bond_dims == mpo.bond_dims


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6])
def test_ratio_budget_is_met_and_optimal_allocation_beats_uniform_on_a_real_matrix(real, ratio):
    matrix, mpo = real
    optimal = mpo.truncate(ratio=ratio)
    uniform = mpo.truncate(ratio=ratio, allocation="uniform")
    budget = ratio * mpo.padded_shape[0] * mpo.padded_shape[1]
    assert optimal.num_params <= budget and uniform.num_params <= budget
    assert optimal.compression_ratio <= ratio
    assert optimal.error_bound < uniform.error_bound
    assert optimal.reconstruction_error(matrix) < uniform.reconstruction_error(matrix)


def test_parameter_budget(real):
    _, mpo = real
    assert mpo.truncate(params=50_000).num_params <= 50_000


def test_eq5_ratio_and_parameter_counts_for_spec_attention_shape():
    mpo = MPO.from_matrix(
        torch.randn(768, 768), row_shape=(3, 4, 4, 4, 4), col_shape=(4, 4, 4, 4, 3)
    )
    assert mpo.bond_dims == (1, 12, 192, 192, 12, 1)
    assert mpo.central_params == 192 * 16 * 192 == 768 * 768
    assert mpo.auxiliary_params == 144 + 12 * 16 * 192 + 192 * 16 * 12 + 144 == 74016
    assert mpo.num_params == mpo.central_params + mpo.auxiliary_params
    assert mpo.compression_ratio == pytest.approx((768 * 768 + 74016) / (768 * 768))
    cut = mpo.truncate(bond_dims=[12, 100, 50, 12])
    expected = 144 + 12 * 16 * 100 + 100 * 16 * 50 + 50 * 16 * 12 + 144
    assert cut.num_params == expected
    assert cut.compression_ratio == pytest.approx(expected / 768**2)


def test_auxiliary_tensors_add_7_to_13_percent_at_full_rank():
    ffn = MPO.from_matrix(
        torch.randn(768, 3072), row_shape=(3, 4, 4, 4, 4), col_shape=(4, 4, 8, 6, 4)
    )
    assert ffn.central_params == 768 * 3072
    assert 0.07 <= ffn.auxiliary_params / ffn.central_params <= 0.13


def test_request_above_current_dimension_clamps_and_warns_naming_the_bond(real):
    _, mpo = real
    with pytest.warns(UserWarning, match=r"bond_1: requested 50 exceeds .* \(full dimension 8\)"):
        cut = mpo.truncate({1: 50, 2: 10})
    assert cut.bond_dims[1] == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one truncation policy"),
        ({"max_bond": 4, "tol": 0.1}, r"at most one truncation policy .*got \[.max_bond., .tol.\]"),
        ({"ratio": 0.0}, r"ratio must be > 0 \(Eq. 5: core entries over matrix entries\), got 0.0"),
        ({"ratio": -1.0}, "ratio must be > 0"),
        ({"tol": -0.1}, "tol is a relative error and must be >= 0"),
        ({"params": 0}, "params must be >= 1"),
        ({"params": 10}, "below the smallest MPO of this shape"),
        ({"ratio": 1e-9}, r"ratio 1e-09 is below the smallest MPO of this shape \(ratio "),
        ({"max_bond": 0}, "max_bond must be >= 1"),
        ({"bond_dims": {5: 3}}, r"bond 5 does not exist: this MPO has bonds 1..4"),
        ({"bond_dims": {0: 3}}, "bond 0 does not exist"),
        ({"bond_dims": [4, 4, -1, 4]}, "bond_3: a bond dimension must be an integer >= 1"),
        ({"bond_dims": [4, 4]}, r"expected 4 bond dimensions \(bonds 1..4\)"),
        ({"ratio": 0.5, "allocation": "greedy"}, "allocation must be one of"),
    ],
)
def test_impossible_truncations_are_value_errors(real, kwargs, message):
    _, mpo = real
    with pytest.raises(ValueError, match=message):
        mpo.truncate(**kwargs)


def test_diagnostic_queries_reject_missing_bonds(real):
    _, mpo = real
    with pytest.raises(ValueError, match=r"bond must be an integer in 1..4"):
        mpo.entropy(0)
    with pytest.raises(ValueError, match=r"bond must be an integer in 1..4"):
        mpo.truncation_error(5, 1)
    with pytest.raises(ValueError, match="kept dimension must be >= 0"):
        mpo.truncation_error(2, -1)


def test_diagnostics_table_has_every_core_bond_and_total(real):
    matrix, mpo = real
    cut = mpo.truncate(ratio=0.3)
    table = cut.diagnostics(reference=matrix)
    assert [r["name"] for r in table] == [
        "auxiliary_1",
        "bond_1",
        "auxiliary_2",
        "bond_2",
        "central",
        "bond_3",
        "auxiliary_4",
        "bond_4",
        "auxiliary_5",
        "total",
    ]
    total = table[-1]
    assert total["params"] == cut.num_params
    assert total["actual_error"] <= total["error_bound"] * (1 + 1e-9)
    assert sum(r["params"] for r in table if r["kind"] == "core") == cut.num_params
    bond2 = table[3]
    assert bond2["next_cut_error"] == pytest.approx(cut.truncation_error(2, cut.bond_dims[2] - 1))
    frame = table.to_dataframe()
    assert frame.shape[0] == 10
    assert "| bond_3" in table.to_markdown()
    summary = cut.summary(reference=matrix)
    assert summary["relative_actual_error"] <= summary["relative_error_bound"] * (1 + 1e-9)
    assert math.isclose(summary["compression_ratio"], cut.compression_ratio)


def test_budget_too_small_for_uniform_is_an_error(real):
    _, mpo = real
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="below the smallest MPO"):
            mpo.truncate(params=5, allocation="uniform")


def test_a_ratio_budget_loses_no_parameter_to_float_rounding_on_any_path():
    from torch import nn

    from mpotn.compression import compress
    from mpotn.truncation import ratio_params

    assert 0.3 * 96 * 120 < 3456 and ratio_params(0.3, 96 * 120) == 3456
    torch.manual_seed(0)
    matrix = torch.randn(96, 120, dtype=torch.float64)
    assert MPO.from_matrix(matrix, 2, (96, 1), (1, 120)).truncate(ratio=0.3).bond_dims == (
        1, 16, 1)
    for structure in ("svd", "auto"):
        model = compress(nn.Sequential(nn.Linear(96, 120)), targets=["0"], ratio=0.3,
                         structure=structure, progress=False)
        assert model.base_model[0].bond_dims == (1, 16, 1), structure


@pytest.mark.parametrize("shape, n, max_bond", [((96, 120), 4, 3), ((256, 1024), 3, 8)])
def test_randomized_svd_keeps_the_eq4_bound_on_wide_matrices(shape, n, max_bond):
    torch.manual_seed(0)
    matrix = torch.randn(*shape, dtype=torch.float64)
    mpo = MPO.from_matrix(matrix, n=n, max_bond=max_bond, svd="randomized", seed=0)
    actual = float((mpo.to_matrix() - matrix).norm())
    assert actual <= mpo.error_bound * (1 + 1e-10)


def test_the_randomized_svd_error_is_exact_also_when_it_is_small_in_float32():
    """``sqrt(||A||^2 - sum s^2)`` cancels in float32 (it gave 0.0 here)."""
    from mpotn.linalg import truncated_svd

    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64))
    s = torch.cat([torch.full((10,), 100.0), torch.full((290,), 1e-3)]).double()
    matrix = (u * s) @ v.T
    cut = truncated_svd(matrix.float(), 10, method="randomized")
    exact = float(s[10:].norm())
    assert float(cut.error) == pytest.approx(exact, rel=0.02)


def test_the_randomized_svd_seeds_its_own_device_only_and_restores_the_state(monkeypatch):
    """``torch.manual_seed`` would reseed every GPU of the machine as well."""
    from mpotn.linalg import truncated_svd

    def refuse(seed):
        raise AssertionError("torch.manual_seed reseeds every device")

    monkeypatch.setattr(torch, "manual_seed", refuse)
    matrix = torch.randn(200, 150, generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    first = truncated_svd(matrix, 5, method="randomized", generator_seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = truncated_svd(matrix, 5, method="randomized", generator_seed=3)
    assert torch.equal(first.U, again.U)


def test_the_randomized_svd_on_a_gpu_seeds_that_gpu_only_and_forks_its_state(monkeypatch):
    """The GPU branch, with a stand-in for ``torch.cuda``: the matrix's device is made
    current and seeded; every device's state is forked and restored."""
    import contextlib

    from mpotn import linalg

    calls = []

    class FakeCuda:
        @staticmethod
        @contextlib.contextmanager
        def device(device):
            calls.append(("current", str(device)))
            yield

        @staticmethod
        def manual_seed(seed):
            calls.append(("seed", seed))

    @contextlib.contextmanager
    def fork_rng(devices, device_type="cuda"):
        calls.append(("fork", [str(d) for d in devices], device_type))
        yield

    monkeypatch.setattr(torch, "get_device_module", lambda kind: FakeCuda)
    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    monkeypatch.setattr(torch, "manual_seed", lambda seed: calls.append(("all", seed)))
    with linalg._seeded(torch.device("cuda", 1), 7):
        calls.append(("work",))
    assert calls == [("fork", ["cuda:1"], "cuda"), ("current", "cuda:1"), ("seed", 7),
                     ("work",)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["full", "randomized"])
def test_half_precision_svds_are_computed_in_float32_and_returned_in_their_dtype(dtype, method):
    from mpotn.linalg import sparsity_aware_svd, truncated_svd

    matrix = torch.randn(120, 90, generator=torch.Generator().manual_seed(1))
    cut = truncated_svd(matrix.to(dtype), 4, method=method)
    exact = torch.linalg.svdvals(matrix.to(dtype).double())
    assert {t.dtype for t in (cut.U, cut.S, cut.Vh, cut.error)} == {dtype}
    assert torch.allclose(cut.S.double(), exact[:4], rtol=0.02)  # the leading values
    assert float(cut.error) == pytest.approx(float(exact[4:].norm()), rel=0.02)
    mask = torch.rand(120, 90, generator=torch.Generator().manual_seed(2)) > 0.3
    fitted, errors = sparsity_aware_svd(matrix.to(dtype) * mask, mask, 4, iterations=3)
    assert fitted.S.dtype == dtype and errors[-1] <= errors[0]


def test_a_rank_below_one_is_refused():
    from mpotn.linalg import truncated_svd

    with pytest.raises(ValueError, match="rank must be an integer >= 1, got 0"):
        truncated_svd(torch.randn(10, 8), 0)


def test_a_budget_grows_back_the_bonds_its_last_cut_freed_more_than_needed():
    """Removal stops at the first bonds within the budget; the bond that then removes
    the most error per parameter grows back while the budget holds."""
    from mpotn.truncation import dims_for_budget, params_of
    spectra = [torch.tensor([3.07, 2.54, 1.99, 1.23, 0.53, 0.35]),
               torch.tensor([3.59, 2.53, 1.96, 1.82, 1.61, 1.40])]
    local = (6, 6, 6)
    dims = dims_for_budget(spectra, (1, 6, 6, 1), local, budget=104)
    assert dims == (1, 2, 5, 1) and params_of(dims, local) == 102  # removal alone: 4, 84
    for budget in range(1 * 6 + 6 * 1 + 6, 6 * 6 * 2 + 6 * 6 * 6 + 1, 5):
        assert params_of(dims_for_budget(spectra, (1, 6, 6, 1), local, budget), local) <= budget
