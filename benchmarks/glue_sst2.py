"""Experiment: lightweight fine-tuning and dimension squeezing on SST-2 (the paper's claims).

Run from the repository root::

    python benchmarks/glue_sst2.py                 # every row, seeds 0-2 for the headline rows
    python benchmarks/glue_sst2.py --seeds 0       # one seed (see the docs for run times)
    python benchmarks/glue_sst2.py --quick         # a smoke run on 64 examples (tests)
    python benchmarks/glue_sst2.py --rows squeeze --work runs  # keep models; reuse LFA ones
    python benchmarks/glue_sst2.py --rows squeeze --seeds 0 --target 0.9 --budget 0.014 ...
        ... --out benchmarks/results/glue_sst2_deep.json    # the deeper squeeze (one line)

Model: the embedded all-MiniLM-L6-v2 with a new classification head. Data: the
shipped SST-2 training sample (2,000 phrases from the official training set)
and the official development set (872 sentences), on which accuracy is
reported. Rows:

* ``full``: every parameter of the dense model;
* ``lfa``: the auxiliary tensors (with biases, LayerNorms and the head) of the
  full-rank MPO model (attention and FFN matrices, ``n = 5``);
* ``central``: only the central tensors (and the head) of the same MPO model;
* ``last-1/2/3``: the last k transformer layers of the dense model (and the head);
* ``lora``: PEFT's LoRA on the dense model, with the rank that matches LFA's
  trainable budget;
* ``squeeze``: Algorithm 2 from each seed's LFA model, with the paper's
  one-dimension cuts and a per-step budget: each step takes single-dimension
  cuts of the attention and FFN central bonds by least estimated error (Eq. 3)
  until 0.7% of the original model's parameters go, then fine-tunes the
  auxiliary tensors for 40 steps and evaluates; eight such steps bring the
  model from 1.055 to under 1.0 times the dense original's size (``--target``),
  where it stops. ``Delta`` is off (1.0) so that every seed ends at the same size;
* ``direct``: the same starting LFA model truncated straight to the squeezed
  model's bonds, fine-tuned for the same number of steps.

Writes ``benchmarks/results/glue_sst2.json`` (every run) and ``glue_sst2.md``
(the table, mean and spread over seeds), which the docs include.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from mpotn import Table, load
from mpotn.atomic import write_text
from mpotn.data import sst2_sample
from mpotn.finetune.squeeze import SqueezeConfig, Squeezer, direct_truncation
from mpotn.finetune.training import TrainingConfig, finetune, lfa_budget, prepare_model

RESULTS = Path(__file__).parent / "results" / "glue_sst2.json"
HEADLINE = ("full", "lfa", "lora", "squeeze", "direct")
ROWS = ("full", "lfa", "central", "last-1", "last-2", "last-3", "lora", "squeeze", "direct")
TARGETS = ["attention", "ffn"]


def run(strategy: str, seed: int, settings: dict, data, k: int | None = None,
        work: Path | None = None) -> dict:
    """Fine-tune one strategy with one seed; returns its record (and saves LFA models)."""
    config = TrainingConfig(strategy=strategy, k=k, seed=seed, **settings)
    model, tokenizer = prepare_model(None, data, config, targets=TARGETS, progress=False)
    result = finetune(model, tokenizer, data, config, progress=False)
    if strategy == "lfa" and work is not None:
        result.model.save_pretrained(str(work / f"lfa-{seed}"))
    record = {k: v for k, v in result.record.items() if not isinstance(v, dict)}
    return {"row": record["strategy"], **record}


def run_squeeze(seed: int, settings: dict, squeeze: SqueezeConfig, data, work: Path) -> list[dict]:
    """Squeeze the seed's LFA model, then the direct ablation at the same bonds."""
    config = TrainingConfig(strategy="lfa", seed=seed, **settings)
    _, tokenizer = prepare_model(None, data, TrainingConfig(strategy="full"), progress=False)
    shutil.rmtree(work / f"squeeze-{seed}", ignore_errors=True)  # every run starts afresh
    start = time.perf_counter()
    result = Squeezer(load(work / f"lfa-{seed}"), tokenizer, data, squeeze, config,
                      work / f"squeeze-{seed}", progress=False).run()
    seconds = time.perf_counter() - start
    record = result.record
    squeezed = {
        "row": "squeeze", "seed": seed, "accuracy": record["accuracy"], "loss": record["loss"],
        "total_params": record["params"], "params_over_original": record["params_over_original"],
        "trainable_params": lfa_budget(result.model.base_model),
        "steps": record["fine_tuning_steps"], "cuts": record["accepted_step"],
        "matrix_cuts": record["matrix_cuts"],
        "stop_reason": record["stop_reason"], "train_seconds": seconds,
    }
    start = time.perf_counter()
    direct = direct_truncation(load(work / f"lfa-{seed}"), tokenizer, data, record["bond_dims"],
                               config, record["fine_tuning_steps"], progress=False)
    direct_row = {
        "row": "direct", "seed": seed, "accuracy": direct["accuracy"], "loss": direct["loss"],
        "total_params": direct["params"], "params_over_original": direct["params_over_original"],
        "trainable_params": direct["trainable_params"], "steps": direct["fine_tuning_steps"],
        "train_seconds": time.perf_counter() - start,
    }
    return [squeezed, direct_row]


def summarize(runs: list[dict]) -> Table:
    """Mean and spread (sample standard deviation) of every row over its seeds."""
    table = Table()
    for row in dict.fromkeys(r["row"] for r in runs):
        group = [r for r in runs if r["row"] == row]
        accuracy = [100 * r["accuracy"] for r in group]
        table.append({
            "row": row,
            "seeds": len(group),
            "dev accuracy %": statistics.mean(accuracy),
            "spread (sd)": statistics.stdev(accuracy) if len(group) > 1 else float("nan"),
            "trainable params": round(statistics.mean(r["trainable_params"] or 0 for r in group)),
            "total params": round(statistics.mean(r["total_params"] for r in group)),
            "fine-tuning steps": round(statistics.mean(r["steps"] for r in group)),
            "time s": statistics.mean(r["train_seconds"] for r in group),
        })
    return table


def findings(table: Table) -> list[str]:
    """The paper's claims checked against the table, one Markdown bullet each."""
    rows = {r["row"]: r for r in table}
    acc = {name: r["dev accuracy %"] for name, r in rows.items()}

    def verdict(holds: bool) -> str:
        return "**confirmed**" if holds else "**refuted**"

    lines = []
    if "lfa" in rows and "full" in rows:
        cut = 1 - rows["lfa"]["trainable params"] / rows["full"]["trainable params"]
        gap = acc["lfa"] - acc["full"]
        lines.append(f"- LFA trains {100 * (1 - cut):.1f}% of the parameters full fine-tuning "
                     f"trains (a {100 * cut:.1f}% cut; claim: about 90%): "
                     f"{verdict(cut >= 0.85)}.")
        lines.append(f"- LFA is {gap:+.2f} points from full fine-tuning ({acc['lfa']:.2f}% vs "
                     f"{acc['full']:.2f}%; claim: within about a point): {verdict(gap >= -1.0)}.")
    def compare(better: str, worse: str) -> tuple[float, float, str]:
        """The gap of ``better`` over ``worse``, the noise it must exceed to decide (the
        larger seed spread, or one point where a row has one seed) and its wording."""
        spreads = [rows[name]["spread (sd)"] for name in (better, worse)]
        one_seed = any(math.isnan(sd) for sd in spreads)
        noise = 1.0 if one_seed else max(spreads)
        within = ("a point, on one seed" if one_seed
                  else f"the larger seed spread ({noise:.2f})")
        return acc[better] - acc[worse], noise, within

    last = {name: a for name, a in acc.items() if name.startswith("last-")}
    if last and "lfa" in acc:
        gaps = {name: compare("lfa", name) for name in last}
        won = [n for n, (gap, noise, _) in gaps.items() if gap >= noise]
        lost = [n for n, (gap, noise, _) in gaps.items() if gap <= -noise]
        level = [n for n in last if n not in won and n not in lost]
        overall = ("**refuted**" if lost else "**confirmed**" if not level
                   else "**not decided**")
        lines.append(
            f"- LFA ({acc['lfa']:.2f}%) against last-layer tuning ("
            + ", ".join(f"{name} {a:.2f}%" for name, a in last.items())
            + "; claim: LFA is better; a gap decides beyond the larger seed spread, or a "
            f"point on one seed): better than {', '.join(won) or 'none'}, worse than "
            f"{', '.join(lost) or 'none'}, level with {', '.join(level) or 'none'}: "
            f"{overall}.")
    if "squeeze" in acc and "direct" in acc:
        size = rows["squeeze"]["total params"], rows["direct"]["total params"]
        gap, noise, within = compare("squeeze", "direct")
        lines.append(
            f"- Squeezing {acc['squeeze']:.2f}% against direct truncation {acc['direct']:.2f}% "
            f"at {size[0]:,} and {size[1]:,} parameters (claim: squeezing is better): "
            + (f"**not decided** (a gap of {gap:+.2f} points, within {within})."
               if abs(gap) < noise else f"{verdict(gap > 0)}."))
    return lines


def write_report(out: Path, runs: list[dict], **record: object) -> str:
    """Write the runs with their summary and findings to ``out`` (JSON) and ``.md``."""
    order = {name: k for k, name in enumerate(ROWS)}
    runs.sort(key=lambda r: (order[r["row"]], r["seed"]))
    table = summarize(runs)
    claims = findings(table)
    markdown = (table.to_markdown(floatfmt=".4g") + "\n\nThe paper's claims on this model "
                "(computed from the table by `benchmarks/glue_sst2.py`):\n\n"
                + "\n".join(claims) + "\n")
    write_text(out, json.dumps({**record, "summary": list(table), "findings": claims,
                                "runs": runs}, indent=2))
    write_text(out.with_suffix(".md"), markdown)
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of the headline rows (default: 0 1 2; others use the first)")
    parser.add_argument("--epochs", type=float, default=3.0, help="default: 3")
    parser.add_argument("--target", type=float, default=1.0,
                        help="squeeze until the model has this share of the original's "
                             "parameters (default: 1.0)")
    parser.add_argument("--budget", type=float, default=0.007,
                        help="share of the original model's parameters one squeeze step "
                             "removes (default: 0.007)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                        help="rows to (re)run, the rest kept from an existing --out file "
                             "(squeeze also runs direct and the lfa models it starts from)")
    parser.add_argument("--quick", action="store_true", help="64 examples, 2 steps per run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the intermediate models (lfa-SEED, squeeze-SEED) here instead "
                             "of in a temporary directory; the squeeze rows then reuse the LFA "
                             "models found there, whose rows are kept from --out")
    parser.add_argument("--report-only", action="store_true",
                        help="remake the table and findings from the runs in --out, "
                             "training nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads(args.out.read_text())
        print(write_report(args.out, saved.pop("runs"), **{
            k: v for k, v in saved.items() if k not in ("summary", "findings")}))
        return 0
    data = sst2_sample()
    settings = {"epochs": args.epochs}
    squeeze = SqueezeConfig(cut=1, budget=args.budget, training_steps=40, step_limit=40,
                            delta=1.0, target_ratio=args.target)
    if args.quick:
        settings = {"max_steps": 2, "train_limit": 64, "eval_limit": 64, "batch_size": 16}
        squeeze = SqueezeConfig(cut=1, budget=0.005, training_steps=1, step_limit=2, delta=1.0)
    reuse = args.work is not None and all((args.work / f"lfa-{seed}").is_dir()
                                          for seed in args.seeds)
    wanted = set(args.rows)
    if "squeeze" in wanted:  # direct always; the LFA models it starts from unless reused
        wanted |= {"direct"} if reuse else {"direct", "lfa"}
    rows = [(strategy, k) for strategy, k in (
        ("full", None), ("lfa", None), ("central", None), ("last-k", 1), ("last-k", 2),
        ("last-k", 3), ("lora", None)) if (f"last-{k}" if k else strategy) in wanted]
    runs: list[dict] = []
    if wanted != set(ROWS) and args.out.is_file():  # keep the other rows and seeds
        rerun = {"squeeze", "direct"} if "squeeze" in args.rows else set()
        runs = [r for r in json.loads(args.out.read_text())["runs"] if r["row"] not in wanted
                or (r["seed"] not in args.seeds and r["row"] not in rerun)]
    start = time.perf_counter()
    with (nullcontext(str(args.work)) if args.work is not None
          else tempfile.TemporaryDirectory(prefix="mpotn-glue-")) as scratch:
        work = Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        for strategy, k in rows:
            name = f"last-{k}" if k else strategy
            for seed in (args.seeds if name in HEADLINE else args.seeds[:1]):
                runs.append(run(strategy, seed, settings, data, k, work))
                r = runs[-1]
                print(f"{name} seed {seed}: accuracy {r['accuracy']:.4f}, trainable "
                      f"{r['trainable_params']:,}, {r['train_seconds']:.0f} s", file=sys.stderr)
        for seed in args.seeds if "squeeze" in wanted else []:
            runs.extend(run_squeeze(seed, settings, squeeze, data, work))
            for r in runs[-2:]:
                print(f"{r['row']} seed {seed}: accuracy {r['accuracy']:.4f}, params "
                      f"{r['params_over_original']:.3f} of the original", file=sys.stderr)
    print(write_report(args.out, runs, model="all-MiniLM-L6-v2 (embedded)",
                       train_examples=len(data.train), eval_examples=len(data.eval),
                       settings=settings, squeeze=squeeze.to_dict(),
                       threads=torch.get_num_threads(), seconds=time.perf_counter() - start))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
