"""Make every figure of the documentation from the benchmarks' JSON (never by hand).

Run from the repository root after the benchmarks (``mkdocs build`` uses the results)::

    python scripts/docs_figures.py

Reads ``benchmarks/results/{fidelity,glue_sst2,forward,compare}.json`` (each
written by its benchmark command; a missing one is reported and skipped) and
writes ``docs/figures/*.png``; it also draws the networks of layer 0's FFN
matrix of the embedded MiniLM decomposed by MPO, Tucker and CP at rho = 0.02.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt

from mpotn.atomic import atomic_path
from mpotn.drawing import draw_lines  # also selects the Agg backend

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "figures"


def _save(fig: plt.Figure, name: str) -> Path:
    path = FIGURES / name
    with atomic_path(path) as tmp:
        fig.savefig(tmp, bbox_inches="tight", dpi=130, format="png")
    plt.close(fig)
    return path


def fidelity(report: dict) -> Path:
    """Mean cosine of the sentence embeddings against rho, optimal vs uniform bonds."""
    series = {}
    for row in report["rows"]:
        if row["rho"] != "full":
            series.setdefault(f"{row['targets']}, {row['allocation']}", []).append(
                (row["rho"], row["mean_cosine"]))
    return draw_lines(series, FIGURES / "fidelity.png",
                      f"compressed MiniLM vs the original, {report['sentences']} SST-2 sentences",
                      "compression ratio rho per matrix (Eq. 5)", "mean cosine similarity")


def glue(report: dict) -> Path:
    """Dev accuracy against trainable parameters, one point per row (mean and spread)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for row in report["summary"]:
        spread = row["spread (sd)"]
        ax.errorbar(max(row["trainable params"], 1), row["dev accuracy %"],
                    yerr=None if spread != spread else spread, marker="o", capsize=3)
        ax.annotate(row["row"], (max(row["trainable params"], 1), row["dev accuracy %"]),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title("all-MiniLM-L6-v2 on SST-2 (2,000 training phrases)", fontsize=9)
    return _save(fig, "glue_sst2.png")


def forward(report: dict) -> Path:
    """Automatic path choice against the better path, cost model vs measurement."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for choice in ("auto", "tuned"):
        ratios = sorted(r[f"{choice}/best_path"] for r in report["rows"])
        ax.plot(range(1, len(ratios) + 1), ratios, marker=".", label=choice)
    ax.axhline(1.1, color="0.5", linestyle="--", linewidth=1, label="goal 1.10")
    ax.set_xlabel("benchmark rows, sorted")
    ax.set_ylabel("time / time of the better path")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("MPOLinear: how close the automatic choice gets to the faster path", fontsize=9)
    return _save(fig, "forward.png")


def compare(report: dict) -> Path:
    """Relative error against compression ratio per method (the paper's Fig. 2)."""
    series: dict[str, list] = {}
    for row in report["rows"]:
        if row["label"] != "dense":
            series.setdefault(row["label"], []).append((row["ratio"], row["relative_error"]))
    rows, cols = report["shape"]
    return draw_lines(series, FIGURES / "compare.png", f"{report['matrix']} ({rows} x {cols})",
                      "compression ratio (parameters / entries)", "relative error", log_x=True)


def networks() -> list[Path]:
    """Drawings of one real matrix decomposed three ways at rho = 0.02."""
    from mpotn.compression.models import load_model, weight_matrices
    from mpotn.methods import decompose

    matrix = next(m.matrix for m in weight_matrices(load_model())
                  if m.name == "encoder.layer.0.intermediate.dense").double()
    paths = []
    for method, options in (("mpo", {"n": 5}), ("tucker", {"n": 3}),
                            ("cp", {"n": 3, "iterations": 10})):
        net = decompose(matrix, method, ratio=0.02, **options)
        title = (f"{method} of layer 0 FFN (384 x 1536) at rho = 0.02: "
                 f"{net.num_params:,} parameters, error {net.relative_error:.3f}")
        paths.append(net.draw(FIGURES / f"network_{method}.png", title))
    return paths


def main() -> int:
    FIGURES.mkdir(parents=True, exist_ok=True)
    makers = {"fidelity": fidelity, "glue_sst2": glue, "forward": forward, "compare": compare}
    for name, make in makers.items():
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            print(f"skipped {name}: {path} is missing (run its benchmark first)")
            continue
        print(f"wrote {make(json.loads(path.read_text()))}")
    for path in networks():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
