"""Experiment: where does fine-tuning put its changes, central or auxiliary tensors?

Run from the repository root (about 3 minutes on 2 cores)::

    python benchmarks/core_changes.py [--epochs 1] [--quick]

The analogue of the paper's Table 1: decompose the attention and FFN matrices
of the embedded all-MiniLM-L6-v2 at full rank (central gauge: the central
tensor carries the spectrum, the auxiliary tensors are isometries), fine-tune
*every* core on the shipped SST-2 sample, and measure per matrix how far the
central tensor and the auxiliary tensors moved, relative to their norms
(:func:`mpotn.finetune.core_changes.core_changes`). Writes
``benchmarks/results/core_changes.json`` and ``core_changes.md`` (by matrix
type, mean over layers), which the docs include.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from mpotn import Table
from mpotn.atomic import write_text
from mpotn.data import sst2_sample
from mpotn.finetune.training import TrainingConfig, finetune, prepare_model

RESULTS = Path(__file__).parent / "results" / "core_changes.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=float, default=1.0, help="default: 1")
    parser.add_argument("--quick", action="store_true", help="4 steps on 64 examples")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    args = parser.parse_args(argv)
    data = sst2_sample()
    limits = {"max_steps": 4, "train_limit": 64, "eval_limit": 64} if args.quick else {}
    config = TrainingConfig(strategy="full", epochs=args.epochs, **limits)
    model, tokenizer = prepare_model(None, data, config, compress_model=True, progress=False)
    result = finetune(model, tokenizer, data, config, progress=False)
    changes = result.core_changes
    summary = Table()
    for kind in dict.fromkeys(r["type"] for r in changes):
        rows = [r for r in changes if r["type"] == kind]
        central = statistics.mean(r["central_change"] for r in rows)
        auxiliary = statistics.mean(r["auxiliary_change"] for r in rows)
        summary.append({"matrix type": kind, "matrices": len(rows),
                        "central change": central, "auxiliary change": auxiliary,
                        "auxiliary / central": auxiliary / central if central else float("inf")})
    markdown = summary.to_markdown(floatfmt=".3g") + (
        f"\n\nFull fine-tuning of every core, {result.record['steps']} steps, dev accuracy "
        f"{100 * result.record['accuracy']:.2f}%. Relative change ||T' - T|| / ||T|| of the "
        "central tensor and of the auxiliary tensors together, mean over layers.\n")
    print(markdown)
    write_text(args.out, json.dumps({"record": result.record, "summary": list(summary),
                                     "matrices": list(changes)}, indent=2))
    write_text(args.out.with_suffix(".md"), markdown)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
