"""Experiment: LPAF (low-rank prune-and-factorize, SPEC §4) on MiniLM and GLUE.

Run from the repository root (hours of CPU; every finished run is written at once and
runs already in the JSON are skipped, so a stopped run continues)::

    python benchmarks/lpaf.py                                  # every run not yet done
    python benchmarks/lpaf.py --task mrpc --row lpaf --seed 0  # chosen runs
    python benchmarks/lpaf.py --report-only                    # the table and verdicts
    python benchmarks/lpaf.py --quick --out /tmp/l.json        # smoke run (tests)

Model, data and training are those of ``glue_small.py`` (the embedded all-MiniLM-L6-v2
with a new head; RTE and MRPC with seeds 0-2, 3 epochs, 128 tokens; SST-2's first
20,000 training rows, one epoch, 64 tokens, seed 0; the official dev sets; every
parameter trained). The attention and FFN matrices are pruned and factorized; the
embeddings stay dense. ``RATIO`` = 0.25: each factorized matrix keeps a quarter of its
parameters as a truncated SVD, which brings the model to about 0.65 of its size, and
each pruned one the same share of its entries (sparsity 0.75: as many non-zero
weights; the pruned rows' #To counts the dense storage their zeros still take).

Every factorized row trains twice as long as ``dense``: a first fine-tuning (dense,
or pruning while fine-tuning), then a second one of the factorized model.

``dense``
    fine-tuning of the dense model (saved for ``svd``); records the mean rank of its
    matrices over their smaller dimension, numerical and of 90% of their energy
    (LPAF: fine-tuned matrices are nearly full rank);
``movement`` / ``magnitude``
    fine-tuning while pruning to sparsity 0.75 (cubic schedule, 10% warm-up, 20%
    cool-down) by movement scores (first order) or by magnitude (zeroth order); the
    pruned model, saved for the rows below, with the mean rank share of its matrices;
``svd`` / ``svd-llm``
    the fine-tuned dense model's matrices as truncated SVDs at ``RATIO``, plain or
    whitened by their inputs (SVD-LLM, on 256 of the task's training sentences),
    fine-tuned;
``movement-svd`` / ``movement-ssvd`` / ``movement-whitened``
    the movement-pruned model factorized by the plain truncated SVD, the
    sparsity-aware SVD (factors fitted to the kept entries) or the whitened SVD,
    fine-tuned;
``lpaf``
    the movement-pruned model, whitened SVD (the default of ``mpotn finetune
    --factorize``), then mixed-rank fine-tuning (each factorized layer computes with
    its pruned full-rank matrix with a probability falling from 0.5 to 0 over the
    first half of the steps);
``lpaf-ssvd``
    the same with the sparsity-aware SVD;
``magnitude-lpaf``
    ``lpaf`` from the magnitude-pruned model.

Fine-tuning checkpoints as ``glue_small`` does (``benchmarks/work/lpaf/runs``), so a run
stopped part-way continues. Writes ``benchmarks/results/lpaf.json`` (every run) and
``lpaf.md`` (mean and spread per task and row, then LPAF's claims as verdicts).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import glue_small  # the tasks, settings and helpers of the Table 4 benchmark

from mpotn.compression.architectures import linear_matrix
from mpotn.compression.calibrate import text_batches
from mpotn.compression.config import CompressionConfig, select_targets
from mpotn.compression.lpaf import factorize_pruned
from mpotn.compression.model import MPOModel
from mpotn.compression.parameters import count_parameters
from mpotn.finetune.mixed_rank import MixedRank
from mpotn.finetune.pruning import ENERGY, GradualPruning, rank_measures
from mpotn.table import Table

RESULTS = Path(__file__).parent / "results" / "lpaf.json"
WORK = Path(__file__).parent / "work" / "lpaf"
TARGETS = ["attention", "ffn"]
RATIO = 0.25
WARMUP, COOLDOWN = 0.1, 0.2
MIXED_P, MIXED_ANNEAL = 0.5, 0.5
SSVD_ITERATIONS = 50
#: ``{row: (the model it starts from, the fit, mixed-rank fine-tuning)}``
FACTORIZED = {
    "svd": ("dense", "plain", False), "svd-llm": ("dense", "whitened", False),
    "movement-svd": ("movement", "plain", False),
    "movement-ssvd": ("movement", "sparsity-aware", False),
    "movement-whitened": ("movement", "whitened", False),
    "lpaf": ("movement", "whitened", True), "lpaf-ssvd": ("movement", "sparsity-aware", True),
    "magnitude-lpaf": ("magnitude", "whitened", True),
}
ROWS = ("dense", "movement", "magnitude", *FACTORIZED)
CALIBRATION_SENTENCES = 256


def rank_shares(model: nn.Module, targets: list[str]) -> dict[str, float]:
    """``mean_rank_share`` and ``mean_energy_rank_share`` of the target matrices
    ([rank_measures][mpotn.finetune.pruning.rank_measures])."""
    rows = [rank_measures(linear_matrix(module))
            for _, module in select_targets(model, CompressionConfig(targets=targets))]
    return {f"mean_{key}": statistics.mean(r[key] for r in rows)
            for key in ("rank_share", "energy_rank_share")}


class LpafBench(glue_small.Bench):
    """``glue_small``'s settings with the first-stage models saved in ``work``."""

    def __init__(self, quick: bool, work: Path) -> None:
        super().__init__(quick, work)
        self.targets = ["ffn"] if quick else TARGETS
        self.iterations = 2 if quick else SSVD_ITERATIONS

    def stage(self, task: str, row: str, seed: int) -> Path:
        return self.work / f"{task}-{row}-{seed}"


def first_stage(bench: LpafBench, task: str, row: str, seed: int) -> dict[str, Any]:
    """``dense``, ``movement`` or ``magnitude``: fine-tune (pruning for the latter two),
    save the model for the factorized rows, and record the run."""
    start = time.perf_counter()
    model = bench.classifier(task, seed)
    original = count_parameters(model.parameters())
    pruning = None if row == "dense" else GradualPruning(
        model, 1.0 - RATIO, row, bench.targets, warmup=WARMUP, cooldown=COOLDOWN)
    data = bench.data(task)
    result = bench.finetune(model, task, row, seed, "full", pruning=pruning)
    result.model.save_pretrained(str(bench.stage(task, row, seed)))
    record = result.record
    extra = ({key: record[key] for key in ("sparsity", "mean_rank_share",
                                           "mean_energy_rank_share")}
             if pruning else rank_shares(result.model, bench.targets))
    nonzero = sum(int((p != 0).sum()) for p in result.model.parameters())
    return glue_small._run_record(
        task, row, seed, data, record, total=original, over_dense=1.0,
        trainable=record.get("trainable_params"), steps=record["steps"], **extra,
        nonzero_params=nonzero, nonzero_over_dense=nonzero / original,
        seconds=time.perf_counter() - start)


def factorized(bench: LpafBench, task: str, row: str, seed: int) -> dict[str, Any]:
    """A factorized row from its first stage's saved model (``main`` runs and records the
    first stage before; a recorded stage whose model is gone, say on a new machine, runs
    again here, deterministically, for its model only)."""
    source, fit, mixed = FACTORIZED[row]
    folder = bench.stage(task, source, seed)
    if not folder.is_dir():
        first_stage(bench, task, source, seed)
        bench.forget_runs([(task, source, seed)])  # its model is saved
    from transformers import AutoModelForSequenceClassification

    start = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    original = count_parameters(model.parameters())
    batches = text_batches(bench.tokenizer, bench.texts(task, CALIBRATION_SENTENCES),
                           max_length=bench.training(task, "full", seed).max_length)
    model, pruned = factorize_pruned(model, RATIO, bench.targets, fit=fit, progress=False,
                                     calibration=batches if fit == "whitened" else None,
                                     iterations=bench.iterations)
    report = model.report()
    prep = time.perf_counter() - start
    mixing = MixedRank(model, pruned, MIXED_P, MIXED_ANNEAL, seed) if mixed else None
    data = bench.data(task)
    result = bench.finetune(model, task, row, seed, "full", mixed_rank=mixing)
    trained = result.model.base_model if isinstance(result.model, MPOModel) else result.model
    total = count_parameters(trained.parameters())
    record = result.record
    return glue_small._run_record(
        task, row, seed, data, record, total=total, over_dense=total / original,
        trainable=record.get("trainable_params"), steps=record["steps"],
        kept_error=statistics.mean(r["kept_error"] for r in report),
        plain_kept_error=statistics.mean(r["plain_kept_error"] for r in report),
        relative_error=statistics.mean(r["relative_error"] for r in report),
        output_error=(statistics.mean(r["output_error"] for r in report)
                      if fit == "whitened" else None),
        prep_seconds=prep, seconds=prep + record["train_seconds"])


def run(bench: LpafBench, task: str, row: str, seed: int) -> dict[str, Any]:
    return factorized(bench, task, row, seed) if row in FACTORIZED else first_stage(
        bench, task, row, seed)


def summarize(runs: list[dict[str, Any]]) -> Table:
    """``glue_small``'s summary with the mean rank share (first stages) and the mean
    relative error on the kept entries (factorized rows)."""
    def mean_of(key: str) -> Any:
        return lambda group: statistics.mean(r.get(key, float("nan")) for r in group)
    return glue_small.summarize(runs, ROWS, {
        "rank share": mean_of("mean_rank_share"),
        f"{ENERGY:.0%} energy rank": mean_of("mean_energy_rank_share"),
        "kept error": mean_of("kept_error")})


#: ``(a, b, margin, claim)``: the claim ``a >= b - margin`` (points of the GLUE metric).
CLAIMS = (
    ("lpaf", "svd", 0.0, "LPAF beats the plain SVD of the fine-tuned dense model at equal "
                         "size"),
    ("lpaf", "svd-llm", 0.0, "LPAF beats SVD-LLM on the fine-tuned dense model at equal size"),
    ("movement-ssvd", "movement-svd", 0.0, "the sparsity-aware SVD beats the plain SVD "
                                           "of the pruned matrices"),
    ("movement-whitened", "movement-svd", 0.0, "the whitened SVD beats the plain SVD of the "
                                               "pruned matrices"),
    ("lpaf", "movement-whitened", 0.0, "mixed-rank fine-tuning beats plain fine-tuning of "
                                       "the factorized model"),
    ("lpaf", "magnitude-lpaf", 0.0, "first-order pruning beats magnitude pruning as the "
                                    "first stage"),
)


def _rank_claim(task: str, runs: list[dict[str, Any]]) -> str | None:
    """First-order pruning leaves matrices of lower rank than magnitude pruning (the
    singular values holding ``ENERGY`` of each matrix), decided seed by seed (every
    seed agreeing), with the dense model's beside them."""
    shares = {row: {r["seed"]: r["mean_energy_rank_share"] for r in runs
                    if r["task"] == task and r["row"] == row}
              for row in ("dense", "movement", "magnitude")}
    seeds = sorted(set(shares["movement"]) & set(shares["magnitude"]))
    if not seeds:
        return None
    lower = [shares["movement"][s] < shares["magnitude"][s] for s in seeds]
    verdict = ("**confirmed**" if all(lower) else "**refuted**" if not any(lower)
               else "**not decided** (the seeds disagree)")
    dense = (f"; dense {statistics.mean(shares['dense'].values()):.3f}"
             if shares["dense"] else "")
    return (f"- {task}: first-order pruning leaves matrices of lower rank than magnitude "
            f"pruning at the same sparsity (singular values holding {ENERGY:.0%} of each "
            f"matrix, over its smaller dimension: movement "
            f"{statistics.mean(shares['movement'][s] for s in seeds):.3f} vs magnitude "
            f"{statistics.mean(shares['magnitude'][s] for s in seeds):.3f}{dense}; "
            f"{len(seeds)} seed(s)): {verdict}.")


def findings(table: Table, runs: list[dict[str, Any]],
             baselines: dict[str, float] | None = None) -> list[str]:
    """LPAF's claims per task, one Markdown bullet each (``glue_small``'s verdicts, on the
    seeds both rows of a claim have), after each task's constant guess (``baselines``,
    ``{task: majority-class metric}``), which leaves claims about rows at it undecided."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in table):
        baseline = (baselines or {}).get(task)
        if baseline is not None:
            rows = {r["row"]: r for r in table if r["task"] == task}
            lines += glue_small.baseline_lines(task, rows, baseline)
        rank = _rank_claim(task, runs)
        lines += [rank] if rank else []
        lines += glue_small.claim_bullets(runs, task, CLAIMS, baseline)
    return lines


def write_report(out: Path, results: dict[str, Any]) -> str:
    """Table and findings to ``out`` (with the runs, and those another invocation stored
    meanwhile: ``glue_small.merged_runs``) and ``out.with_suffix('.md')``."""
    with glue_small.merged_runs(results, out, ROWS) as runs:
        table = summarize(runs)
        return glue_small.publish(out, results, table,
                                  findings(table, runs, glue_small.constant_guesses(runs)),
                                  "LPAF's claims, computed from the table by "
                                  "`benchmarks/lpaf.py`")


def main(argv: list[str] | None = None) -> int:
    args = glue_small.parse(glue_small.arguments(__doc__, ROWS, RESULTS), argv, RESULTS)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": []}
    done = {(r["task"], r["row"], r["seed"]) for r in results["runs"]}
    tasks = [glue_small.QUICK_TASK] if args.quick else args.task
    todo = [key for key in glue_small.plan(tasks, args.row, args.seed) if key not in done]
    if todo and not args.report_only:
        work = args.out.parent / "lpaf_work" if args.quick else WORK
        bench = LpafBench(args.quick, work)
        results.update(model="all-MiniLM-L6-v2 (embedded)", targets=bench.targets,
                       ratio=RATIO, sparsity=1.0 - RATIO, warmup=WARMUP, cooldown=COOLDOWN,
                       mixed_rank={"p": MIXED_P, "anneal": MIXED_ANNEAL},
                       ssvd_iterations=bench.iterations,
                       tasks=glue_small.task_settings(results, tasks),
                       threads=torch.get_num_threads())
        bench.forget_runs(done)  # checkpoints left by a stop just after the record
        for task, row, seed in todo:
            # a factorized row's first stage runs, and is recorded, before it
            needs = [(task, FACTORIZED[row][0], seed)] if row in FACTORIZED else []
            for key in [*needs, (task, row, seed)]:
                if key not in done:
                    done.add(key)
                    glue_small.store(results, run(bench, *key), args.out)
                    bench.forget_runs([key])
        if args.quick:  # the smoke run's own scratch folder
            shutil.rmtree(work, ignore_errors=True)
    print(write_report(args.out, results))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
