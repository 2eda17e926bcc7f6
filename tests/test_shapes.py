import math

import pytest

from mpotn.shapes import (
    centre_heavy,
    factorize,
    full_bond_dims,
    is_balanced,
    pad_to_factorable,
    plan_side,
)

# SPEC §1 reference factorizations (n = 5) and their full bonds.
REFERENCE = [
    ((5, 10, 10, 10, 6), (2, 2, 4, 4, 2), (10, 200, 480, 12)),  # ALBERT embedding
    ((3, 4, 4, 4, 4), (4, 4, 8, 6, 4), (12, 192, 384, 16)),  # BERT FFN
    ((3, 4, 4, 4, 4), (4, 4, 4, 4, 3), (12, 192, 192, 12)),  # BERT attention
]


@pytest.mark.parametrize(("rows", "cols", "bonds"), REFERENCE)
def test_full_bond_dims_match_spec_reference_shapes(rows, cols, bonds):
    assert full_bond_dims(rows, cols) == (1, *bonds, 1)


@pytest.mark.parametrize(
    ("dim", "expected"),
    [(768, (3, 4, 4, 4, 4)), (3072, (4, 4, 8, 6, 4)), (30000, (5, 10, 10, 10, 6)),
     (128, (2, 2, 4, 4, 2)), (384, (2, 4, 4, 4, 3))],
)
def test_automatic_factors_are_balanced_and_centre_heavy(dim, expected):
    factors = factorize(dim, 5)
    assert factors == expected
    assert math.prod(factors) == dim
    assert factors[2] == max(factors)  # the largest factor sits in the centre


def test_centre_heavy_puts_smallest_factors_at_the_ends():
    assert centre_heavy([9, 1, 5, 3, 7]) == (1, 5, 9, 7, 3)


@pytest.mark.parametrize("n", [2, 3, 5, 7, 9])
def test_vocabulary_30522_pads_to_30720(n):
    assert pad_to_factorable(30522, n) == 30720
    assert is_balanced(factorize(30720, n))


def test_balanced_sizes_are_not_padded():
    assert [pad_to_factorable(d, 5) for d in (384, 1536, 512, 2)] == [384, 1536, 512, 2]


def test_prime_size_without_padding_is_an_error_that_proposes_a_size():
    with pytest.raises(ValueError, match=r"5087 .* pad to 5120"):
        factorize(5087, 5)
    with pytest.raises(ValueError, match="pad to 30720"):
        plan_side(30522, 5, pad=False)


def test_plan_side_pads_automatically_and_reports_padding():
    side = plan_side(30522, 5)
    assert (side.padded_size, side.padding) == (30720, 198)


@pytest.mark.parametrize(
    ("shape", "message"),
    [((2, 2, 2), "has 3 factors but n=5"), ((1, 1, 1, 1, 2), "smaller than the dimension"),
     ((0, 4, 4, 4, 4), ">= 1")],
)
def test_bad_explicit_shapes_are_clear_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        plan_side(100, 5, shape)


def test_bad_dimension_and_n_are_errors():
    with pytest.raises(ValueError, match="positive integer"):
        factorize(0, 5)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        factorize(10, 0)
    with pytest.raises(ValueError, match="same number of factors"):
        full_bond_dims((2, 2), (2, 2, 2))
