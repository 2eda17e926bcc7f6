"""Algorithm 1: exact round trips, canonical form, spectra, dtypes, errors."""

import numpy as np
import pytest
import torch
from conftest import DEVICES

from mpotn import MPO
from mpotn.diagnostics import entanglement_entropy


def relative_error(mpo: MPO, matrix: torch.Tensor) -> float:
    return mpo.reconstruction_error(matrix) / float(matrix.double().norm())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("n", [2, 3, 5, 7])
def test_full_rank_round_trip_of_random_matrix_is_exact(device, dtype, tolerance, n):
    matrix = torch.randn(384, 1536, dtype=dtype, generator=torch.Generator().manual_seed(n))
    mpo = MPO.from_matrix(matrix.to(device), n=n)
    assert mpo.dtype == dtype and mpo.device.type == device
    assert relative_error(mpo, matrix.to(device)) <= tolerance
    assert mpo.bond_dims == mpo.full_bond_dims  # Eq. 2 at full rank
    assert mpo.error_bound == 0.0


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_full_rank_round_trip_of_rank_deficient_matrix_is_exact(dtype, tolerance):
    g = torch.Generator().manual_seed(1)
    matrix = (torch.randn(256, 7, generator=g) @ torch.randn(7, 192, generator=g)).to(dtype)
    mpo = MPO.from_matrix(matrix, n=4)
    assert relative_error(mpo, matrix) <= tolerance


def test_kronecker_product_has_a_rank_one_bond_with_zero_entropy():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(6, 8, generator=g, dtype=torch.float64)
    b = torch.randn(16, 12, generator=g, dtype=torch.float64)
    mpo = MPO.from_matrix(torch.kron(a, b), n=2, row_shape=(6, 16), col_shape=(8, 12))
    spectrum = mpo.singular_values[0]
    assert float(spectrum[1:].norm()) <= 1e-12 * float(spectrum[0])
    assert mpo.entropy(1) == pytest.approx(0.0, abs=1e-12)
    assert mpo.truncate(max_bond=1).reconstruction_error(torch.kron(a, b)) <= 1e-10


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize(
    "name",
    [
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "encoder.layer.2.attention.self.query.weight",
        "encoder.layer.5.output.dense.weight",
    ],
)
def test_full_rank_round_trip_of_real_minilm_matrices_is_exact(minilm, name, dtype, tolerance):
    matrix = minilm[name]
    matrix = (matrix if "embeddings" in name else matrix.T).to(dtype)
    mpo = MPO.from_matrix(matrix)
    assert relative_error(mpo, matrix) <= tolerance
    if "word_embeddings" in name:  # 30522 rows, zero-padded to 30720
        assert mpo.shape == (30522, 384) and mpo.padded_shape == (30720, 384)
        assert mpo.bond_dims == (1, 12, 384, 768, 24, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_is_decomposed_in_float32(dtype):
    matrix = torch.randn(64, 96).to(dtype)
    mpo = MPO.from_matrix(matrix, n=3)
    assert mpo.dtype == torch.float32
    assert relative_error(mpo, matrix.float()) <= 1e-5


def test_canonical_form_cores_are_isometries_and_bonds_are_sorted():
    mpo = MPO.from_matrix(torch.randn(96, 128, dtype=torch.float64), n=4)
    for core in mpo.cores[:-1]:
        left = core.reshape(-1, core.shape[3])
        torch.testing.assert_close(left.T @ left, torch.eye(core.shape[3], dtype=torch.float64))
    for spectrum in mpo.singular_values:
        assert bool((spectrum[:-1] >= spectrum[1:]).all())
    # left-canonical: the last core carries the whole norm
    assert mpo.cores[-1].norm().item() == pytest.approx(mpo.norm, rel=1e-12)


def unfolding_spectrum(matrix: np.ndarray, rows, cols, k: int) -> np.ndarray:
    """Singular values of M[i_1 j_1 .. i_k j_k, rest], computed with numpy only."""
    n = len(rows)
    tensor = matrix.reshape(*rows, *cols).transpose([a for m in range(n) for a in (m, n + m)])
    return np.linalg.svd(tensor.reshape(int(np.prod(tensor.shape[: 2 * k])), -1), compute_uv=False)


def test_stored_spectra_and_entropy_equal_numpy_computation_from_the_unfolding(ffn):
    matrix = ffn.double()
    mpo = MPO.from_matrix(matrix)
    for k in range(1, mpo.n):
        reference = unfolding_spectrum(matrix.numpy(), mpo.row_shape, mpo.col_shape, k)
        np.testing.assert_allclose(
            mpo.singular_values[k - 1].numpy(), reference[: mpo.bond_dims[k]], rtol=1e-9, atol=1e-12
        )
        v = reference**2 / (reference**2).sum()
        v = v[v > 0]
        assert mpo.entropy(k) == pytest.approx(float(-(v * np.log(v)).sum()), rel=1e-9)


def test_central_bond_has_the_largest_entropy_on_a_real_matrix(ffn):
    mpo = MPO.from_matrix(ffn)
    entropies = mpo.entropies
    assert max(entropies) in (entropies[1], entropies[2])  # the bonds of the central tensor
    assert entanglement_entropy(torch.ones(8)) == pytest.approx(np.log(8))


def test_truncated_decomposition_up_front_has_an_exact_a_posteriori_bound(ffn):
    matrix = ffn.double()
    for method in ("full", "randomized"):
        mpo = MPO.from_matrix(matrix, max_bond=24, svd=method)
        assert max(mpo.bond_dims) <= 24
        actual = mpo.reconstruction_error(matrix)
        assert actual <= mpo.error_bound * (1 + 1e-9)
        assert actual >= 0.9 * mpo.error_bound  # the step errors are nearly orthogonal
    full = MPO.from_matrix(matrix, max_bond=24, svd="full").reconstruction_error(matrix)
    fast = MPO.from_matrix(matrix, max_bond=24, svd="randomized").reconstruction_error(matrix)
    assert fast <= 1.02 * full  # the documented cost of the randomized SVD on this matrix


def test_bond_dims_up_front_are_per_bond():
    matrix = torch.randn(64, 64, dtype=torch.float64)
    mpo = MPO.from_matrix(matrix, n=3, bond_dims=[4, 6])
    assert mpo.bond_dims == (1, 4, 6, 1)


def test_bond_dims_up_front_as_a_mapping_cut_only_the_bonds_named():
    matrix = torch.randn(64, 48, dtype=torch.float64)
    full = MPO.from_matrix(matrix, n=3)
    assert MPO.from_matrix(matrix, n=3, bond_dims={2: 5}).bond_dims == (
        1, full.bond_dims[1], 5, 1)
    assert MPO.from_matrix(matrix, n=3, bond_dims={1: 3, 2: 5}).bond_dims == (1, 3, 5, 1)
    with pytest.raises(ValueError, match="bond 3 does not exist"):
        MPO.from_matrix(matrix, n=3, bond_dims={3: 2})


def test_decomposing_a_parameter_records_no_autograd_graph():
    weight = torch.nn.Linear(64, 48).weight
    mpo = MPO.from_matrix(weight.T, n=3)
    assert not any(c.requires_grad for c in mpo.cores)
    assert not any(c.requires_grad for c in mpo.truncate(max_bond=4).cores)
    assert not any(c.requires_grad for c in MPO.from_cores(
        [c.requires_grad_() for c in [t.clone() for t in mpo.cores]]).cores)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"matrix": torch.randn(4, 4, 4)}, "2-D torch.Tensor"),
        ({"matrix": [[1.0, 2.0]]}, "2-D torch.Tensor"),
        ({"matrix": torch.zeros(0, 4)}, "empty"),
        ({"matrix": torch.ones(8, 8, dtype=torch.int64)}, "floating-point"),
        ({"matrix": torch.full((8, 8), float("nan"))}, "NaN"),
        ({"matrix": torch.randn(8, 8), "n": 1}, "n >= 2"),
        ({"matrix": torch.randn(8, 8), "svd": "qr"}, "svd must be one of"),
        ({"matrix": torch.randn(8, 8), "max_bond": 0}, "max_bond must be >= 1"),
        ({"matrix": torch.randn(8, 8), "max_bond": 2, "bond_dims": [2, 2, 2, 2]}, "not both"),
        ({"matrix": torch.randn(8, 8), "n": 3, "bond_dims": [2]}, "expected 2 bond"),
        ({"matrix": torch.randn(5087, 4), "pad": False}, "pad to 5120"),
        ({"matrix": torch.randn(8, 8), "row_shape": (2, 2)}, "has 2 factors but n=5"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MPO.from_matrix(**kwargs)


def test_from_cores_canonicalizes_arbitrary_cores():
    g = torch.Generator().manual_seed(3)
    cores = [
        torch.randn(1, 2, 3, 5, generator=g, dtype=torch.float64),
        torch.randn(5, 4, 2, 6, generator=g, dtype=torch.float64),
        torch.randn(6, 3, 2, 1, generator=g, dtype=torch.float64),
    ]
    dense = torch.einsum("aijb,bklc,cmnd->ikmjln", *cores).reshape(24, 12)
    mpo = MPO.from_cores(cores)
    assert mpo.reconstruction_error(dense) <= 1e-12 * float(dense.norm())
    assert mpo.bond_dims == (1, 5, 6, 1)
    with pytest.raises(
        ValueError, match="bond_1: core 1 ends with size 5 but core 2 starts with 4"
    ):
        MPO.from_cores([cores[0], cores[1][:4], cores[2]])
    with pytest.raises(ValueError, match="boundary bonds"):
        MPO.from_cores([cores[1], cores[2]])


def test_from_cores_with_a_reference_reports_the_measured_error_and_its_norm():
    matrix = torch.randn(24, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    cut = MPO.from_matrix(matrix, n=3, row_shape=(2, 4, 3), col_shape=(3, 2, 2)).truncate(
        max_bond=2)
    again = MPO.from_cores(cut.cores, (24, 12), reference=matrix)
    actual = float((matrix - again.to_matrix()).norm())
    assert again.error_bound == pytest.approx(actual, rel=1e-12)
    assert again.source_norm == pytest.approx(float(matrix.norm()), rel=1e-12)
    summary = again.summary(matrix)
    assert summary["relative_error_bound"] == pytest.approx(
        summary["relative_actual_error"], rel=1e-12)
    alone = MPO.from_cores(cut.cores, (24, 12))  # its own source
    assert (alone.error_bound, alone.source_norm) == (0.0, pytest.approx(alone.norm))


def test_central_gauge_keeps_the_matrix_and_makes_auxiliary_tensors_isometries(ffn):
    mpo = MPO.from_matrix(ffn.double())
    cores = mpo.gauge_cores("central")
    c = mpo.central_index
    rebuilt = torch.einsum("aijb,bklc,cmnd,dope,eqrf->ikmoqjlnpr", *cores).reshape(384, 1536)
    torch.testing.assert_close(rebuilt, ffn.double(), rtol=0, atol=1e-10)
    for k, core in enumerate(cores):
        dl, i, j, dr = core.shape
        if k < c:  # left isometry: (d_{k-1} i j, d_k) has orthonormal columns
            left = core.reshape(dl * i * j, dr)
            torch.testing.assert_close(left.T @ left, torch.eye(dr, dtype=torch.float64))
        elif k > c:  # right isometry: (d_{k-1}, i j d_k) has orthonormal rows
            right = core.reshape(dl, i * j * dr)
            torch.testing.assert_close(right @ right.T, torch.eye(dl, dtype=torch.float64))
    assert float(cores[c].norm()) == pytest.approx(mpo.norm, rel=1e-12)
    assert [tuple(x.shape) for x in cores] == [tuple(x.shape) for x in mpo.gauge_cores("left")]
    with pytest.raises(ValueError, match="gauge must be one of"):
        mpo.gauge_cores("right")


@pytest.mark.parametrize("svd", ["full", "randomized", "auto"])
def test_a_truncation_of_any_svd_method_stays_within_its_error_bound(svd):
    torch.manual_seed(0)
    matrix = torch.randn(512, 512, dtype=torch.float64)
    mpo = MPO.from_matrix(matrix, n=3, row_shape=(8, 8, 8), col_shape=(8, 8, 8))
    for max_bond in (4, 16):
        cut = mpo.truncate(max_bond=max_bond, svd=svd)
        actual = float((cut.to_matrix() - matrix).norm())
        assert actual <= cut.error_bound * (1 + 1e-12)  # randomized: 486.88 > 486.87 before


def test_a_layer_decomposes_with_the_svd_method_it_is_given(monkeypatch):
    from mpotn.layers import MPOLinear

    calls = []
    lowrank = torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank",
                        lambda *a, **k: calls.append(1) or lowrank(*a, **k))
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 256)
    full = MPOLinear.from_linear(linear, n=3, max_bond=8, svd="full")
    assert not calls
    randomized = MPOLinear.from_linear(linear, n=3, max_bond=8, svd="randomized")
    assert calls and randomized.bond_dims == full.bond_dims == (1, 8, 8, 1)
    weight = linear.weight.detach().T
    best = float((full.matrix().detach() - weight).norm())
    error = float((randomized.matrix().detach() - weight).norm())
    assert best <= error <= 1.05 * best  # near-best
    before = len(calls)
    MPOLinear.from_linear(linear, n=3, ratio=0.2, svd="randomized")
    assert len(calls) > before  # a budget's cuts take it too
