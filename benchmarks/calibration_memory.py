"""Benchmark: peak memory of calibrated compression, in one pass and in groups.

Run from the repository root::

    python benchmarks/calibration_memory.py            # about 10 minutes on 2 cores
    python benchmarks/calibration_memory.py --quick    # a 2-layer model, seconds

A random-weight Llama (hidden size 1,024, FFN 2,816, 4 layers, vocabulary 8,000:
67.8M parameters; its 28 attention and FFN matrices need 434 MiB of float64 input
moments) is compressed SVD-LLM-style (``structure="svd"``, ratio 0.5, 32 sequences
of 128 random tokens) once per ``calibration_memory``: above the moments (one
pass) and at two bounds below them (groups). Each row runs in a fresh process, so
that its peak resident memory is its own; the table reports, measured in the
same run:

* ``peak above model MiB``: the process's peak resident memory minus its
  resident memory once the model and the inputs are built (what compressing
  added);
* ``x one pass``: that against the one-pass row;
* ``passes``: whole-model calibration passes;
* ``time x one pass``: the wall time against the one-pass row (each row alone
  in its process, but the machine may be shared: read it as a ratio);
* ``max |logit diff|``: the compressed model's logits against the one-pass
  model's (0: the same model).

Rows are written to ``benchmarks/results/calibration_memory.json`` as they finish
and skipped when already there (their logits kept in
``benchmarks/work/calibration_memory``); ``calibration_memory.md`` holds the table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "calibration_memory.json"
#: Each row's logits, kept (out of git) for the rows of later runs to compare with.
WORK = Path(__file__).parent / "work" / "calibration_memory"
#: The model of the full run, and of ``--quick``.
SIZES = {"full": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4},
         "quick": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2}}
#: ``calibration_memory`` of each row in MiB (``None``: the default, above the moments).
BOUNDS = [None, 256, 64]


def _build(size: str) -> tuple[object, list[dict]]:
    """The random Llama of ``size`` and its calibration batches (imports in the row's
    process)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8000, num_attention_heads=8,
                                         num_key_value_heads=8, **SIZES[size])).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 8000, (8, 128), generator=generator)}
               for _ in range(4)]
    return model, batches


def _resident_kib() -> int:
    """This process's resident memory now, in KiB (``VmRSS``; Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmRSS:")))


def run_row(size: str, bound: float | None, logits_path: str) -> dict:
    """Compress in this process and measure it (the ``--row`` entry point)."""
    import importlib

    import torch

    import mpotn

    module = importlib.import_module("mpotn.compression.compress")
    model, batches = _build(size)
    passes = []
    calibrate = module.calibrate
    module.calibrate = lambda *a, **k: passes.append(1) or calibrate(*a, **k)
    moments = sum(8 * m.in_features ** 2 for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n != "lm_head")
    before = _resident_kib()
    start = time.perf_counter()
    limit = {} if bound is None else {"calibration_memory": bound * 2**20}
    compressed = mpotn.compress(model, targets=["attention", "ffn"], structure="svd",
                                ratio=0.5, calibration=batches, progress=False, **limit)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        logits = compressed(input_ids=batches[0]["input_ids"][:2]).logits
    torch.save(logits, logits_path)
    return {"bound_mib": bound, "moments_mib": moments / 2**20,
            "peak_above_model_mib": (peak - before) / 1024, "passes": len(passes),
            "seconds": seconds, "params": compressed.totals()["total_params"]}


def table(rows: list[dict]) -> str:
    """The Markdown table, ratios against the one-pass row."""
    base = next(r for r in rows if r["bound_mib"] is None)
    lines = ["| calibration_memory | moments MiB | peak above model MiB | x one pass | passes "
             "| time x one pass | max abs logit diff |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        bound = "default (4 GiB): one pass" if r["bound_mib"] is None else f"{r['bound_mib']:g} MiB"
        lines.append(
            f"| {bound} | {r['moments_mib']:.0f} | {r['peak_above_model_mib']:.0f} | "
            f"{r['peak_above_model_mib'] / base['peak_above_model_mib']:.2f} | {r['passes']} | "
            f"{r['seconds'] / base['seconds']:.2f} | {r['logit_diff']:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2-layer model")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    parser.add_argument("--row", nargs=3, metavar=("SIZE", "BOUND", "LOGITS"),
                        help=argparse.SUPPRESS)  # one row, in its own process
    args = parser.parse_args(argv)
    if args.row:
        size, bound, logits = args.row
        print(json.dumps(run_row(size, None if bound == "none" else float(bound), logits)))
        return 0
    import torch

    from mpotn.atomic import write_text

    size = "quick" if args.quick else "full"
    bounds = [None, 1] if args.quick else BOUNDS
    done = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    if done.get("size") not in (None, SIZES[size]):
        raise SystemExit(f"{args.out} holds rows of another model; pass another --out")
    rows = done["rows"]
    logits_dir = WORK if args.out == RESULTS else args.out.parent / f"{args.out.stem}-logits"
    logits_dir.mkdir(parents=True, exist_ok=True)
    reference = logits_dir / "None.pt"
    if not reference.is_file():  # a new row needs the one-pass logits: measure it again
        rows = [r for r in rows if r["bound_mib"] is not None]
    for bound in bounds:
        if any(r["bound_mib"] == bound for r in rows):
            print(f"calibration_memory {bound} MiB: already measured, skipped")
            continue
        path = logits_dir / f"{bound}.pt"
        done_run = subprocess.run(
            [sys.executable, __file__, "--row", size, "none" if bound is None else str(bound),
             str(path)], capture_output=True, text=True)
        if done_run.returncode != 0:
            raise SystemExit(f"the row calibration_memory={bound} MiB failed:\n"
                             f"{done_run.stderr}")
        row = json.loads(done_run.stdout.strip().splitlines()[-1])
        row["logit_diff"] = float((torch.load(path) - torch.load(reference)).abs().max())
        rows.append(row)
        write_text(args.out, json.dumps({"size": SIZES[size], "rows": rows}, indent=2))
        print(f"calibration_memory {bound} MiB: {row['peak_above_model_mib']:.0f} MiB above the "
              f"model, {row['passes']} passes, {row['seconds']:.1f} s")
    markdown = table(rows)
    write_text(args.out.with_suffix(".md"), markdown)
    print(markdown)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
