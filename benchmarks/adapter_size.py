"""Experiment: how large is an LFA adapter against the whole save, and does it reload exactly?

Run from the repository root (about 5 minutes on 2 cores)::

    python benchmarks/adapter_size.py [--steps 60] [--quick]

The embedded all-MiniLM-L6-v2 with a new SST-2 head, its attention and FFN
matrices decomposed into MPOs at full rank (``n = 5``; the embeddings stay dense),
is saved as the compressed base; that save is loaded, fine-tuned with LFA
(auxiliary tensors, biases, norms and the head) on the shipped SST-2 sample,
and saved twice: whole, and as an adapter of the base
(``save_pretrained(..., adapter_only=True)``). The adapter is then loaded onto
the base and its logits on the evaluation sentences compared with the trained
model's. Writes ``benchmarks/results/adapter_size.json`` and ``adapter_size.md``
(``--report-only`` rewrites the table from the JSON) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from mpotn import Table, compress, load
from mpotn.atomic import write_text
from mpotn.compression.models import load_classifier, load_tokenizer
from mpotn.data import sst2_sample
from mpotn.finetune.training import TrainingConfig, finetune, prepare_model, save_model
from mpotn.types import DEFAULT_TARGETS

RESULTS = Path(__file__).parent / "results" / "adapter_size.json"


def _weights_bytes(folder: Path, pattern: str) -> int:
    return sum(path.stat().st_size for path in folder.glob(pattern))


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits


def report(row: dict) -> str:
    """The Markdown table and summary of one run (``adapter_size.md``)."""
    table = Table([{"save": "adapter (LFA's parameters)", "parameters": row["trainable_params"],
                    "MB": row["adapter_bytes"] / 1e6},
                   {"save": "whole model", "parameters": row["total_params"],
                    "MB": row["whole_bytes"] / 1e6}])
    return (f"{table.to_markdown()}\n\nadapter / whole = {row['adapter_over_whole']:.4f} after "
            f"{row['lfa_steps']} LFA steps (SST-2 dev accuracy {row['accuracy']:.4f}); "
            "reloaded onto its base: max |logit difference| = "
            f"{row['max_abs_logit_difference']:.3g}, frozen as trained: "
            f"{row['frozen_as_trained']}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="LFA steps (default: 60)")
    parser.add_argument("--quick", action="store_true", help="2 steps on 64 examples")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    parser.add_argument("--report-only", action="store_true",
                        help="write the Markdown table from the JSON, computing nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        write_text(args.out.with_suffix(".md"), report(json.loads(args.out.read_text())))
        return 0
    data = sst2_sample()
    steps = 2 if args.quick else args.steps
    config = TrainingConfig(strategy="lfa", max_steps=steps, batch_size=16,
                            eval_limit=64 if args.quick else None)
    with tempfile.TemporaryDirectory() as work:
        base, adapter, whole = (Path(work) / name for name in ("base", "adapter", "whole"))
        torch.manual_seed(0)
        compress(load_classifier(None, num_labels=2), targets=list(DEFAULT_TARGETS),
                 progress=False).save_pretrained(base, tokenizer=load_tokenizer(None))
        model, tokenizer = prepare_model(str(base), data, config, progress=False)
        result = finetune(model, tokenizer, data, config, progress=False)
        trained = result.model
        save_model(trained, tokenizer, adapter, adapter_only=True)  # as mpotn finetune does
        trained.save_pretrained(whole)
        again = load(adapter, base=base)
        sentences = list(data.eval["text"][:64])
        batch = dict(tokenizer(sentences, padding=True, truncation=True, max_length=64,
                               return_tensors="pt"))
        difference = float((_logits(again, batch) - _logits(trained, batch)).abs().max())
        same_frozen = ({n for n, p in again.named_parameters() if p.requires_grad}
                       == {n for n, p in trained.named_parameters() if p.requires_grad})
        row = {
            "model": "all-MiniLM-L6-v2 + SST-2 head, MPO n = 5 at full rank",
            "lfa_steps": steps,
            "accuracy": result.record.get("accuracy"),
            "trainable_params": sum(p.numel() for p in trained.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in trained.parameters()),
            "adapter_bytes": _weights_bytes(adapter, "adapter-*.safetensors"),
            "whole_bytes": _weights_bytes(whole, "model-*.safetensors"),
            "base_bytes": _weights_bytes(base, "model-*.safetensors"),
            "max_abs_logit_difference": difference,
            "frozen_as_trained": same_frozen,
        }
    row["adapter_over_whole"] = row["adapter_bytes"] / row["whole_bytes"]
    print(report(row), end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(row, indent=2))
    write_text(args.out.with_suffix(".md"), report(row))
    return 0 if difference == 0.0 and same_frozen else 1


if __name__ == "__main__":
    sys.exit(main())
