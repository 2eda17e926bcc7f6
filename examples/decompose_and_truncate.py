"""Decompose a real MiniLM matrix into an MPO, read its bonds, truncate, draw.

Run from the repository root::

    python examples/decompose_and_truncate.py [--matrix NAME] [--out DIR]

It takes layer 0's FFN up-projection of the embedded all-MiniLM-L6-v2
(384 x 1536 as the paper's in x out matrix), decomposes it exactly
(Algorithm 1), prints the bond table (Eqs. 2-6), compares four truncation
policies (budget-optimal, uniform, tolerance, one maximum), checks the Eq. 4
bound against the actual error, applies the MPO to a batch without forming the
matrix, and draws the network.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from mpotn import MPO, Table
from mpotn.compression.models import default_model_path


def main(argv: list[str] | None = None) -> Table:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--matrix", default="encoder.layer.0.intermediate.dense.weight",
                        help="a weight name in the model's safetensors")
    parser.add_argument("--ratio", type=float, default=0.3, help="budget rho (Eq. 5)")
    parser.add_argument("--out", type=Path, default=Path("example-output"))
    args = parser.parse_args(argv)

    weights = load_file(str(default_model_path() / "model.safetensors"))
    weight = weights[args.matrix]
    matrix = weight if "embeddings" in args.matrix else weight.T  # linear: in x out

    mpo = MPO.from_matrix(matrix)
    print(mpo)
    print(f"relative error at full rank: {mpo.reconstruction_error(matrix) / mpo.norm:.2e}\n")
    print(mpo.diagnostics().to_markdown(), "\n")

    policies = {
        f"optimal budget rho={args.ratio}": mpo.truncate(ratio=args.ratio),
        f"uniform budget rho={args.ratio}": mpo.truncate(ratio=args.ratio, allocation="uniform"),
        "tolerance 0.85": mpo.truncate(tol=0.85),
        "max bond 32": mpo.truncate(max_bond=32),
    }
    comparison = Table(
        {
            "policy": name,
            "bonds": ",".join(map(str, cut.bond_dims[1:-1])),
            "params": cut.num_params,
            "rho (Eq. 5)": cut.compression_ratio,
            "bound/|M| (Eq. 4)": cut.error_bound / mpo.norm,
            "actual/|M|": cut.reconstruction_error(matrix) / mpo.norm,
        }
        for name, cut in policies.items()
    )
    print(comparison.to_markdown(), "\n")

    cut = policies[f"optimal budget rho={args.ratio}"]
    x = torch.randn(8, matrix.shape[0])
    cost = cut.contraction_cost(8)
    y = cut.apply(x)
    print(f"x @ M for 8 vectors: {cost.method} ({cost.contract_flops:,} FLOPs contracting, "
          f"{cost.rebuild_flops:,} rebuilding); max |diff| to dense "
          f"{float((y - x @ cut.to_matrix()).abs().max()):.1e}")
    path = cut.draw(args.out / "network.png", title=f"{args.matrix} at rho={args.ratio}")
    print(f"drew {path}")
    return comparison


if __name__ == "__main__":
    main()
