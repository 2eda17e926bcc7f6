"""Fidelity of compressed all-MiniLM-L6-v2: sentence embeddings against the original.

Run from the repository root::

    python benchmarks/fidelity.py            # full table, about 6 minutes on 2 cores
    python benchmarks/fidelity.py --quick    # full rank + one ratio, about 1 minute

For every setting the model is compressed with ``mpotn.compress`` (no
fine-tuning), all 872 sentences of the official SST-2 development set are
embedded with mean pooling, and the cosine similarity to the original model's
embedding is taken sentence by sentence: the table gives its mean and its
worst value, with the parameter counts (#To: all parameters; #Pr: what
auxiliary-only fine-tuning would update). Settings: full rank, then per-matrix
ratios rho (Eq. 5) with the budget-optimal and the uniform bond allocation,
for the whole model (every linear and embedding) and for the FFN matrices only.

Writes ``benchmarks/results/fidelity.json`` and ``fidelity.md`` (included by the docs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mpotn import Table, compress
from mpotn.analysis.fidelity import cosine_fidelity, sentence_embeddings, sst2_dev
from mpotn.atomic import write_text
from mpotn.compression.models import load_model, load_tokenizer

RESULTS = Path(__file__).parent / "results" / "fidelity.json"
TARGETS = {"whole model": ["all-linear", "embeddings"], "FFN only": ["ffn"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="full rank and rho = 0.9 (FFN)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer()
    sentences, _ = sst2_dev()
    original = load_model()
    reference = sentence_embeddings(original, tokenizer, sentences)
    original_params = sum(p.numel() for p in original.parameters())
    ratios = [0.9] if args.quick else [1.0, 0.9, 0.75, 0.5, 0.25]
    settings = [("whole model", None, "full rank")]
    for scope in (["FFN only"] if args.quick else list(TARGETS)):
        for ratio in ratios:
            for allocation in ("optimal", "uniform"):
                settings.append((scope, ratio, allocation))

    rows = Table()
    for scope, ratio, allocation in settings:
        start = time.perf_counter()
        policy = {} if ratio is None else {"ratio": ratio, "allocation": allocation}
        model = compress(load_model(), targets=TARGETS[scope], progress=False, **policy)
        fidelity = cosine_fidelity(reference, sentence_embeddings(model, tokenizer, sentences))
        totals = model.totals()
        rows.append({
            "targets": scope,
            "rho": "full" if ratio is None else ratio,
            "allocation": allocation,
            "mean_cosine": fidelity["mean_cosine"],
            "worst_cosine": fidelity["worst_cosine"],
            "#To": totals["total_params"],
            "#To/original": totals["total_over_original"],
            "#Pr": totals["lfa_trainable_params"],
            "mean_matrix_error": sum(r["relative_error"] for r in model.report())
            / len(model.report()),
            "seconds": time.perf_counter() - start,
        })
        print(f"{scope}, rho={ratio}, {allocation}: mean cos {fidelity['mean_cosine']:.6f}, "
              f"worst {fidelity['worst_cosine']:.6f}", file=sys.stderr)

    table = (f"872 SST-2 dev sentences; original model: {original_params:,} parameters.\n\n"
             + rows.to_markdown(floatfmt=".6g") + "\n")
    print(table)
    write_text(args.out, json.dumps({"sentences": len(sentences),
                                     "original_params": original_params,
                                     "rows": list(rows)}, indent=2))
    write_text(args.out.with_suffix(".md"), table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
