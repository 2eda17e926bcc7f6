"""Calibrated truncation (SPEC §7): whitening, the Kronecker covariance, ALS refinement."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mpotn import MPO
from mpotn.calibration import (
    Whitening,
    calibrated_mpo,
    kronecker_factors,
    output_error,
    refine,
)
from mpotn.shapes import Factorization

LAYER = "encoder.layer.2.intermediate.dense"


@pytest.fixture(scope="module")
def activations() -> dict[str, torch.Tensor]:
    """Real inputs of MiniLM layer 2's FFN up-projection on SST-2 training sentences:
    ``C = X^T X`` over 128 sentences for calibration and over 128 others held out."""
    from mpotn.compression.models import load_model, load_tokenizer
    from mpotn.data import sst2_sample

    model, tokenizer = load_model().eval(), load_tokenizer()
    module = dict(model.named_modules())[LAYER]
    sentences = sst2_sample().train["text"][:256]
    covariances, state = [], {}

    def hook(_module, inputs, _output):
        x = inputs[0][state["mask"]].double()
        state["cov"] += x.T @ x

    handle = module.register_forward_hook(hook)
    with torch.no_grad():
        for part in (sentences[:128], sentences[128:]):
            state["cov"] = torch.zeros(384, 384, dtype=torch.float64)
            batch = tokenizer(part, padding=True, truncation=True, max_length=64,
                              return_tensors="pt")
            state["mask"] = batch["attention_mask"].bool()
            model(**batch)
            covariances.append(state["cov"])
    handle.remove()
    return {"matrix": module.weight.detach().T.double(), "calibration": covariances[0],
            "held_out": covariances[1]}


def test_kronecker_factors_recover_an_exact_kronecker_covariance():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(k, k, dtype=torch.float64, generator=g) for k in (2, 3, 4)]
    spd = [p @ p.T + torch.eye(len(p), dtype=torch.float64) for p in parts]
    cov = torch.kron(torch.kron(spd[0], spd[1]), spd[2])
    kron = kronecker_factors(cov, Factorization(24, (2, 3, 4)))
    rebuilt = torch.kron(torch.kron(kron.factors[0], kron.factors[1]), kron.factors[2])
    assert kron.kept == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(rebuilt, cov, atol=1e-9)


def test_kronecker_factors_report_how_much_of_a_general_covariance_they_keep():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 12, dtype=torch.float64, generator=g)
    cov = x.T @ x
    kron = kronecker_factors(cov, Factorization(12, (3, 4)))
    rebuilt = torch.kron(*kron.factors)
    cosine = float((rebuilt * cov).sum() / (rebuilt.norm() * cov.norm()))
    assert 0 < kron.kept < 1
    assert kron.kept == pytest.approx(cosine**2, rel=1e-9)


def test_whitening_of_row_legs_is_undone_exactly_on_the_cores():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(100, 12, dtype=torch.float64, generator=g)
    m = torch.randn(12, 10, dtype=torch.float64, generator=g)
    row = Factorization(12, (3, 4))
    whitening = Whitening.from_covariance(x.T @ x, row)
    assert torch.allclose(whitening.undo(whitening.apply(m)), m, atol=1e-10)
    mpo = MPO.from_matrix(whitening.apply(m), 2, (3, 4), (2, 5))
    restored = MPO.from_cores(whitening.restore_cores(mpo.cores), shape=(12, 10))
    assert torch.allclose(restored.to_matrix(), m, atol=1e-9)


def test_full_rank_calibrated_mpo_is_exact(ffn):
    cov = torch.eye(384, dtype=torch.float64) + 0.1
    calibrated = calibrated_mpo(ffn.double(), cov, n=5)
    assert calibrated.mpo.bond_dims == calibrated.mpo.full_bond_dims
    assert float((calibrated.mpo.to_matrix() - ffn.double()).norm() / ffn.norm()) < 1e-10


def test_trivial_factorization_is_svd_llm_closed_form(activations):
    """n = 2 with rows (I, 1) and columns (1, J): the Kronecker approximation is exact and
    the truncation equals L^{-T} U_r S_r V_r^T of SVD-LLM (Cholesky of the damped C)."""
    m, cov = activations["matrix"], activations["calibration"]
    rank = 96
    calibrated = calibrated_mpo(m, cov, 2, (384, 1), (1, 1536), damp=1e-2, bond_dims=[rank])
    assert calibrated.whitening.kept == pytest.approx(1.0, abs=1e-12)
    damped = cov + 1e-2 * cov.trace() / 384 * torch.eye(384, dtype=torch.float64)
    chol = torch.linalg.cholesky(damped)
    u, s, vh = torch.linalg.svd(chol.T @ m, full_matrices=False)
    closed_form = torch.linalg.solve(chol.T, u[:, :rank] * s[:rank]) @ vh[:rank]
    assert torch.allclose(calibrated.mpo.to_matrix(), closed_form, atol=1e-8)
    # and the discarded whitened singular values give its output error exactly (damped C)
    error = output_error(m, closed_form, damped)
    assert calibrated.estimated_output_error == pytest.approx(error, rel=1e-8)
    assert error == pytest.approx(float(s[rank:].norm() / s.norm()), rel=1e-8)


def test_whitened_svd_halves_the_held_out_output_error_of_the_plain_svd(activations):
    m, cov, held = activations["matrix"], activations["calibration"], activations["held_out"]
    rank = 144  # 0.75 of the dense size
    calibrated = calibrated_mpo(m, cov, 2, (384, 1), (1, 1536), bond_dims=[rank])
    plain = MPO.from_matrix(m, 2, (384, 1), (1, 1536)).truncate(bond_dims=[rank])
    assert calibrated.mpo.num_params == plain.num_params == rank * (384 + 1536)
    ours = output_error(m, calibrated.mpo.to_matrix(), held)
    theirs = output_error(m, plain.to_matrix(), held)
    assert ours < 0.5 * theirs


def test_refined_mpo_beats_plain_mpo_at_the_same_bonds_on_real_activations(activations):
    m, cov, held = activations["matrix"], activations["calibration"], activations["held_out"]
    plain = MPO.from_matrix(m, n=5).truncate(ratio=0.5)
    refined = refine(plain, m, cov, sweeps=1, cg_steps=10)
    assert refined.bond_dims == plain.bond_dims
    assert refined.num_params == plain.num_params
    calibration = (output_error(m, refined.to_matrix(), cov),
                   output_error(m, plain.to_matrix(), cov))
    held_out = (output_error(m, refined.to_matrix(), held),
                output_error(m, plain.to_matrix(), held))
    assert calibration[0] < 0.6 * calibration[1]
    assert held_out[0] < 0.6 * held_out[1]


def test_refine_never_increases_the_calibrated_error():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(80, 24, dtype=torch.float64, generator=g) * torch.logspace(-2, 1, 24)
    m = torch.randn(24, 20, dtype=torch.float64, generator=g)
    cov = x.T @ x
    mpo = MPO.from_matrix(m, n=3).truncate(max_bond=4)
    errors = [output_error(m, mpo.to_matrix(), cov)]
    for _ in range(3):
        mpo = refine(mpo, m, cov, sweeps=1, cg_steps=5)
        errors.append(output_error(m, mpo.to_matrix(), cov))
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(errors))
    # no Eq. 4 bound after the sweeps: the bound it reports is the measured weight error
    assert mpo.error_bound == pytest.approx(float((m - mpo.to_matrix()).norm()), rel=1e-9)
    assert mpo.source_norm == pytest.approx(float(m.norm()), rel=1e-12)


def test_diagonal_covariance_weights_rows():
    """An embedding's covariance is the diagonal of token counts: unused rows cost nothing."""
    m = torch.randn(16, 8, dtype=torch.float64)
    counts = torch.zeros(16, dtype=torch.float64)
    counts[:4] = 10.0
    calibrated = calibrated_mpo(m, counts, 2, (16, 1), (1, 8), damp=0.0, bond_dims=[4])
    assert output_error(m, calibrated.mpo.to_matrix(), counts) < 1e-8
    assert math.isfinite(calibrated.estimated_output_error)


@pytest.mark.parametrize("covariance, message", [
    (torch.eye(5), r"shape \(4, 4\) or \(4,\)"),
    (torch.full((4, 4), float("nan")), "NaN"),
])
def test_bad_covariance_is_a_clear_error(covariance, message):
    with pytest.raises(ValueError, match=message):
        calibrated_mpo(torch.randn(4, 6), covariance, 2, (4, 1), (1, 6))


def test_a_zero_covariance_fits_the_weights_with_a_warning_instead_of_failing():
    torch.manual_seed(0)
    matrix = torch.randn(12, 20, dtype=torch.float64)
    zero = torch.zeros(12, 12, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"covariance is zero .* minimises the weight error"):
        fit = calibrated_mpo(matrix, zero, row_shape=(12, 1), col_shape=(1, 20), max_bond=4)
    plain = MPO.from_matrix(matrix, 2, (12, 1), (1, 20)).truncate(max_bond=4)
    assert torch.allclose(fit.mpo.to_matrix(), plain.to_matrix(), atol=1e-10)


def test_a_calibrated_mpo_reports_its_measured_weight_error_against_the_matrix():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 48, dtype=torch.float64, generator=g)
    m = torch.randn(48, 64, dtype=torch.float64, generator=g)
    calibrated = calibrated_mpo(m, x.T @ x, n=3, ratio=0.3)
    summary = calibrated.mpo.summary(m)
    assert summary["error_bound"] == pytest.approx(summary["actual_error"], rel=1e-9)
    assert calibrated.mpo.source_norm == pytest.approx(float(m.norm()), rel=1e-12)
    assert 0.1 < summary["relative_actual_error"] < 1.0


def test_a_covariance_with_one_wide_factor_is_that_factor_without_a_copy():
    from mpotn.calibration import Whitening, kronecker_factors
    from mpotn.shapes import Factorization

    torch.manual_seed(0)
    x = torch.randn(64, 48, dtype=torch.float64)
    covariance = x.T @ x
    row = Factorization(48, (48, 1))  # the SVD structure's
    kron = kronecker_factors(covariance, row)
    assert kron.kept == 1.0 and kron.factors[0].data_ptr() == covariance.data_ptr()
    assert kron.factors[1].tolist() == [[1.0]]
    whitening = Whitening.from_covariance(covariance, row, damp=0.01)
    damped = covariance + 0.01 * covariance.trace() / 48 * torch.eye(48, dtype=torch.float64)
    lower = whitening.factors[0] * whitening.factors[1]  # L_1 (x) L_2, L_2 a 1 x 1
    torch.testing.assert_close(lower @ lower.T, damped * 1.01)  # the 1 x 1 factor damped too
    assert torch.equal(covariance, x.T @ x)  # the caller's covariance is left as it was
