"""Add a decomposition to mpotn: one function and one registration line.

Run from the repository root::

    python examples/custom_decomposition.py

It registers ``kronecker``, the nearest Kronecker product ``A (x) B`` of a
matrix (Van Loan's rearrangement: the top singular pair of the reshuffled
matrix), then uses it like any built-in method: decomposition, error, drawing,
and ``mpotn.compress(model, method="kronecker")`` on a small model.
"""

from __future__ import annotations

import torch
from torch import nn

import mpotn
from mpotn.methods import DECOMPOSITIONS, FactorNetwork, decompose, register
from mpotn.shapes import plan_side


@register("kronecker")
def kronecker(matrix: torch.Tensor, *, n: int = 2, ratio: float | None = None) -> FactorNetwork:
    """``M ~ A (x) B`` with ``A`` of shape ``(i_1, j_1)`` and ``B`` of ``(i_2, j_2)``."""
    row, col = plan_side(matrix.shape[0], 2), plan_side(matrix.shape[1], 2)
    padded = nn.functional.pad(matrix.double(), (0, col.padding, 0, row.padding))
    (i1, i2), (j1, j2) = row.factors, col.factors
    shuffled = padded.reshape(i1, i2, j1, j2).permute(0, 2, 1, 3).reshape(i1 * j1, i2 * j2)
    u, s, vh = torch.linalg.svd(shuffled, full_matrices=False)
    a = (u[:, 0] * s[0]).reshape(i1, j1)
    b = vh[0].reshape(i2, j2)
    return FactorNetwork("kronecker", {"A": a.to(matrix.dtype), "B": b.to(matrix.dtype)},
                         {"A": ("row_1", "col_1"), "B": ("row_2", "col_2")}, row, col,
                         relative_error=float((torch.kron(a, b)[: matrix.shape[0],
                                                               : matrix.shape[1]]
                                               - matrix.double()).norm() / matrix.norm()))


def main() -> dict:
    row, col = plan_side(48, 2), plan_side(20, 2)  # the factors decompose will choose
    a = torch.randn(row.factors[0], col.factors[0], dtype=torch.float64)
    b = torch.randn(row.factors[1], col.factors[1], dtype=torch.float64)
    net = decompose(torch.kron(a, b), "kronecker")  # 48 x 20, exactly A (x) B
    print(f"kronecker: {net.num_params} parameters, relative error {net.relative_error:.2e}")
    model = nn.Sequential(nn.Linear(48, 20), nn.ReLU(), nn.Linear(20, 48))
    compressed = mpotn.compress(model, targets=["0", "2"], method="kronecker", progress=False)
    compressed.print_trainable_parameters()
    return {"network": net, "model": compressed, "registered": "kronecker" in DECOMPOSITIONS}


if __name__ == "__main__":
    main()
