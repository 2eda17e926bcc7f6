"""Experiment: the paper's Table 4 on MiniLM, on RTE, MRPC and SST-2 from GLUE's own files.

Run from the repository root (hours of CPU; every finished run is written at
once and runs already in the JSON are skipped, so a stopped run continues)::

    python benchmarks/glue_small.py                     # every run not yet in the JSON
    python benchmarks/glue_small.py --task rte --row dense --seed 0   # chosen runs
    python benchmarks/glue_small.py --report-only       # the table and verdicts
    python benchmarks/glue_small.py --quick --out /tmp/g.json  # smoke run (tests)

Model: the embedded all-MiniLM-L6-v2 (22.7M parameters) with a new
classification head; matrices decomposed: attention, FFN and the embeddings
(word, position, token type), so that the model can shrink to 0.65 of its size.
Data: ``../shared/data/glue`` (GLUE's ``glue_data/`` layout): RTE (2,490
training pairs, 277 dev) and MRPC (3,667 / 408) with seeds 0, 1, 2, 3 epochs,
128 tokens; SST-2 with the first 20,000 rows of its official training file, one
epoch, 64 tokens, seed 0. The GLUE metric is measured on the official dev set
(MRPC: F1, as GLUE reports it first).

Rows (``SIZE`` = 0.65 of the dense model's parameters):

``dense``
    full fine-tuning of the dense model;
``mpo-lfa``
    the full-rank MPO model (``n = 5``), LFA (auxiliary tensors, biases,
    norms and the head);
``squeeze``
    MPOP (Algorithm 2) from that seed's LFA model down to ``SIZE``: each step
    cuts central bonds by least estimated error (Eq. 3) until 6% of the
    original's parameters go, then fine-tunes the auxiliary tensors for 40
    steps; ``Delta`` off so that every seed ends at the same size;
``direct``
    MPOP_dir: the same LFA model truncated straight to the squeezed bonds,
    fine-tuned for as many steps;
``calibrated-lfa``
    mpotn's calibrated compression straight to ``SIZE`` (truncated SVD per
    matrix whitened by the task's training text, 256 sentences; word embedding
    weighted by token counts; one model-wide budget), then LFA at the library's
    default for two-core MPOs, 5e-5 (``mpotn.types.LFA_LR_TWO_CORE``): their
    auxiliary tensor is the orthonormal ``V^T`` (entries about ``1/sqrt(J)``,
    0.04), which 5e-4 moves by about 1% per step; on SST-2 a run at 5e-4 ended
    at the majority-class score (50.92), and over 150 steps 5e-5 scored 78.3
    against 76.6 for 5e-4;
``healed-lfa``
    the same, healed for 300 steps (all parameters, hidden-state distillation
    from the dense model on the task's training text), then LFA;
``svd-llm-ft``
    the anchor: SVD-LLM (truncated SVD whitened per linear, the embeddings
    truncated on their weights, the same ratio for every matrix) at ``SIZE``,
    then fine-tuning of every parameter.

Fine-tuning checkpoints every ``SAVE_STEPS`` steps into ``benchmarks/work/glue_small/runs``
(deleted once the run's record is written), so a run stopped part-way continues there
(``resumed_from`` in its record; its seconds are this invocation's); the squeeze
checkpoints its own steps.

Writes ``benchmarks/results/glue_small.json`` (every run) and ``glue_small.md``
(mean and spread over seeds per task, then the paper's claims as verdicts).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from mpotn import Table, compress, load
from mpotn.atomic import write_text
from mpotn.compression.calibrate import text_batches
from mpotn.compression.config import CompressionConfig, select_targets
from mpotn.compression.model import MPOModel
from mpotn.compression.models import load_classifier, load_tokenizer
from mpotn.compression.parameters import count_parameters
from mpotn.data import TaskData, compute_metrics, load_glue, sst2_sample, texts
from mpotn.finetune.heal import EARLIER_HEAL_LR, HealConfig, heal
from mpotn.finetune.squeeze import SqueezeConfig, Squeezer, direct_truncation
from mpotn.finetune.training import (
    FinetuneResult,
    TrainingConfig,
    finetune,
    last_checkpoint,
    lfa_budget,
)

RESULTS = Path(__file__).parent / "results" / "glue_small.json"
GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
WORK = Path(__file__).parent / "work" / "glue_small"
TARGETS = ["attention", "ffn", "embeddings"]
SIZE = 0.65
ROWS = ("dense", "mpo-lfa", "squeeze", "direct", "calibrated-lfa", "healed-lfa", "svd-llm-ft")
#: ``{task: (seeds, training settings)}``
TASKS: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {  # the order runs are computed in
    "sst2": ((0,), {"epochs": 1.0, "max_length": 64, "train_limit": 20_000}),
    "mrpc": ((0, 1, 2), {"epochs": 3.0, "max_length": 128}),
    "rte": ((0, 1, 2), {"epochs": 3.0, "max_length": 128}),
}
CALIBRATED = {"structure": "svd", "calibrate_embeddings": True, "budget": "model"}
SVD_LLM = {"structure": "svd"}
HEAL_STEPS = 300
SQUEEZE = SqueezeConfig(cut=1, budget=0.06, training_steps=40, step_limit=40, delta=1.0,
                        target_ratio=SIZE)
#: fine-tuning checkpoints every this many steps, so that a stopped run continues
SAVE_STEPS = 50
#: Keys of a run record that say part of the run was done by an earlier invocation.
RESUMED = frozenset({"resumed_from", "prep_resumed", "squeeze_resumed"})
QUICK_TASK = "sst2-sample"


def load_task(task: str) -> TaskData:
    """The task's data: GLUE's files, or the shipped SST-2 sample for the quick run."""
    return sst2_sample() if task == QUICK_TASK else load_glue(task, GLUE)


def task_settings(results: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """The training settings of every task in ``results``, those of ``tasks`` added."""
    return {**results.get("tasks", {}), **{t: TASKS.get(t, ((0,), {}))[1] for t in tasks}}


def majority_baseline(data: TaskData) -> float:
    """The task's metric for always predicting the most frequent training label."""
    labels = list(data.train["label"])
    guess = Counter(labels).most_common(1)[0][0]
    truth = list(data.eval["label"])
    return compute_metrics(data.spec.metrics, [guess] * len(truth), truth)[data.spec.metrics[0]]


class Bench:
    """Settings of one invocation (full or quick) and the task data, loaded once per task."""

    def __init__(self, quick: bool, work: Path) -> None:
        self.quick = quick
        self.work = work
        self.targets = ["attention"] if quick else TARGETS
        self.squeeze = (SqueezeConfig(cut=1, budget=0.05, training_steps=1, step_limit=2,
                                      delta=1.0, target_ratio=SIZE) if quick else SQUEEZE)
        self.heal_steps = 2 if quick else HEAL_STEPS
        self.save_steps = SAVE_STEPS  # the quick runs' 2 steps: the last checkpoint only
        self.tokenizer = load_tokenizer()
        self._data: dict[str, TaskData] = {}

    def data(self, task: str) -> TaskData:
        if task not in self._data:
            self._data[task] = load_task(task)
        return self._data[task]

    def training(self, task: str, strategy: str, seed: int) -> TrainingConfig:
        settings = ({"max_steps": 2, "train_limit": 64, "eval_limit": 64, "batch_size": 16}
                    if self.quick else TASKS[task][1])
        return TrainingConfig(strategy=strategy, seed=seed, **settings)

    def texts(self, task: str, samples: int | None) -> list[str]:
        if task == QUICK_TASK:
            return texts(None, samples=16)
        return texts(task, samples=samples, data_dir=GLUE)

    def classifier(self, task: str, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)  # the new task head
        return load_classifier(None, self.data(task).num_labels)

    def run_dir(self, task: str, row: str, seed: int) -> Path:
        """Where a run keeps its fine-tuning checkpoints until its record is written."""
        return self.work / "runs" / f"{task}-{row}-{seed}"

    def finetune(self, model: torch.nn.Module, task: str, row: str, seed: int,
                 strategy: str, **options: Any) -> FinetuneResult:
        """Fine-tune ``model`` on ``task`` (``finetune``'s ``options``: pruning,
        mixed-rank), checkpointing into ``run_dir`` every ``SAVE_STEPS`` steps and
        continuing a run stopped there (its weights replace ``model``'s, whose structure
        must be the same)."""
        out = self.run_dir(task, row, seed)
        return finetune(model, self.tokenizer, self.data(task),
                        self.training(task, strategy, seed), progress=False, out=out,
                        resume=resumable(out), save_steps=self.save_steps, **options)

    def forget_runs(self, keys: Iterable[tuple[str, str, int]]) -> None:
        """Delete the checkpoints of the recorded runs ``keys`` (task, row, seed)."""
        for key in keys:
            shutil.rmtree(self.run_dir(*key), ignore_errors=True)

    def ratio(self, model: torch.nn.Module, size: float = SIZE) -> float:
        """Per-target ratio that brings the whole model to ``size`` of its parameters
        (``size`` itself in the quick run, whose few targets cannot)."""
        if self.quick:
            return size
        total = count_parameters(model.parameters())
        targets = select_targets(model, CompressionConfig(targets=self.targets))
        inside = sum(module.weight.numel() for _, module in targets)
        return (size * total - (total - inside)) / inside


def resumable(out: Path) -> bool:
    """Whether ``out / "checkpoints"`` holds a complete Trainer checkpoint to continue
    from; a run stopped before its first complete one is removed, to start afresh."""
    if last_checkpoint(out / "checkpoints") is not None:
        return True
    shutil.rmtree(out, ignore_errors=True)
    return False


def _lfa_dir(bench: Bench, task: str, seed: int) -> Path:
    return bench.work / f"{task}-lfa-{seed}"


def _run_record(task: str, row: str, seed: int, data: TaskData, scores: dict[str, Any], *,
                total: int, over_dense: float, trainable: int | None, steps: int,
                seconds: float, prep_seconds: float = 0.0, **extra: Any) -> dict[str, Any]:
    """One run as the JSON stores it; ``scores`` holds the task's metrics and ``loss``
    (and ``resumed_from``, the checkpoint a resumed fine-tuning continued from)."""
    resumed = ({"resumed_from": Path(scores["resumed_from"]).name}
               if scores.get("resumed_from") else {})
    return {
        "task": task, "row": row, "seed": seed, "metric": scores[data.spec.metrics[0]],
        **{m: scores[m] for m in data.spec.metrics}, "loss": scores["loss"],
        "total_params": total, "total_over_dense": over_dense, "trainable_params": trainable,
        "steps": steps, **extra, **resumed, "prep_seconds": prep_seconds, "seconds": seconds,
    }


def steps_taken(record: dict[str, Any]) -> int:
    """The optimizer steps a fine-tuning ``record`` took in this invocation (all of them
    unless it resumed from a checkpoint)."""
    resumed = record.get("resumed_from")
    return record["steps"] - (int(Path(resumed).name.removeprefix("checkpoint-"))
                              if resumed else 0)


def _train(bench: Bench, task: str, row: str, seed: int, model: torch.nn.Module,
           strategy: str, prep_seconds: float, original: int) -> dict[str, Any]:
    """Fine-tune a prepared model; the run's record (with the learning rate it used)."""
    data = bench.data(task)
    result = bench.finetune(model, task, row, seed, strategy)
    if row == "mpo-lfa":
        result.model.save_pretrained(str(_lfa_dir(bench, task, seed)))
    trained = result.model.base_model if isinstance(result.model, MPOModel) else result.model
    total = count_parameters(trained.parameters())
    record = result.record
    return _run_record(task, row, seed, data, record, total=total, over_dense=total / original,
                       trainable=record.get("trainable_params"), steps=record["steps"],
                       lr=result.record["lr"], prep_seconds=prep_seconds,
                       seconds=prep_seconds + record["train_seconds"])


def _compressed(bench: Bench, task: str, seed: int, settings: dict[str, Any],
                heal_steps: int) -> tuple[torch.nn.Module, int]:
    """A calibrated compressed classifier (healed when asked) and the dense size."""
    dense = bench.classifier(task, seed)
    original = count_parameters(dense.parameters())
    calibration = text_batches(bench.tokenizer, bench.texts(task, 256))
    model = compress(copy.deepcopy(dense), targets=bench.targets,
                     ratio=bench.ratio(dense), calibration=calibration, progress=False,
                     **settings)
    if heal_steps:
        heal(model, dense, bench.tokenizer, bench.texts(task, None),
             HealConfig(steps=heal_steps, train="all", max_length=128,
                        learning_rate=EARLIER_HEAL_LR["all"]), progress=False)
    return model, original


def run(bench: Bench, task: str, row: str, seed: int) -> dict[str, Any]:
    """One run of the table: prepare the row's model, fine-tune it, evaluate it."""
    start = time.perf_counter()
    if row in ("dense", "mpo-lfa"):
        model = bench.classifier(task, seed)
        original = count_parameters(model.parameters())
        if row == "mpo-lfa":
            model = compress(model, targets=bench.targets, progress=False)
        return _train(bench, task, row, seed, model, "full" if row == "dense" else "lfa",
                      time.perf_counter() - start, original)
    if row in ("calibrated-lfa", "healed-lfa", "svd-llm-ft"):
        settings = SVD_LLM if row == "svd-llm-ft" else CALIBRATED
        heal_steps = bench.heal_steps if row == "healed-lfa" else 0
        model, original = _compressed(bench, task, seed, settings, heal_steps)
        return _train(bench, task, row, seed, model, "full" if row == "svd-llm-ft" else "lfa",
                      time.perf_counter() - start, original)
    raise ValueError(f"unknown row {row!r}")


def run_squeeze(bench: Bench, task: str, seed: int, squeezed: dict[str, Any] | None,
                lfa_recorded: bool = True) -> list[dict[str, Any]]:
    """The squeeze run (unless given) and the direct ablation at its bonds, after the
    ``mpo-lfa`` run they start from when its model is not in the work folder (that run
    is returned too unless ``lfa_recorded``)."""
    data = bench.data(task)
    lfa = _lfa_dir(bench, task, seed)
    runs = []
    if not lfa.is_dir():  # the LFA model of this seed (its row may be in the JSON already)
        lfa_run = run(bench, task, "mpo-lfa", seed)
        if not lfa_recorded:
            runs.append(lfa_run)
        bench.forget_runs([(task, "mpo-lfa", seed)])  # its model is saved
    config = bench.training(task, "lfa", seed)
    if squeezed is None:
        out = bench.work / f"{task}-squeeze-{seed}"
        start = time.perf_counter()
        squeezer = Squeezer(load(lfa), bench.tokenizer, data, bench.squeeze, config, out,
                            progress=False)
        resumed = squeezer.has_checkpoint()
        result = squeezer.run(resume=resumed)
        record = result.record
        squeezed = _run_record(
            task, "squeeze", seed, data, record, total=record["params"],
            over_dense=record["params_over_original"],
            trainable=lfa_budget(result.model.base_model), steps=record["fine_tuning_steps"],
            seconds=time.perf_counter() - start, squeeze_steps=record["accepted_step"],
            stop_reason=record["stop_reason"], bond_dims=record["bond_dims"],
            **({"squeeze_resumed": True} if resumed else {}))
        runs.append(squeezed)
    start = time.perf_counter()
    direct = direct_truncation(load(lfa), bench.tokenizer, data, squeezed["bond_dims"], config,
                               squeezed["steps"], progress=False)
    runs.append(_run_record(
        task, "direct", seed, data, direct, total=direct["params"],
        over_dense=direct["params_over_original"], trainable=direct["trainable_params"],
        steps=direct["fine_tuning_steps"], seconds=time.perf_counter() - start))
    return runs


def seed_groups(runs: list[dict[str, Any]], rows: tuple[str, ...]
                ) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
    """``(task, row, its runs)`` for every task (in the order of ``runs``) and every row
    of ``rows`` that has runs."""
    for task in dict.fromkeys(r["task"] for r in runs):
        for row in rows:
            group = [r for r in runs if r["task"] == task and r["row"] == row]
            if group:
                yield task, row, group


def score(group: list[dict[str, Any]]) -> dict[str, float]:
    """``metric %`` (the mean over the group's seeds) and ``spread (sd)`` (their sample
    standard deviation in points; nan for one seed)."""
    scores = [100 * r["metric"] for r in group]
    return {"metric %": statistics.mean(scores),
            "spread (sd)": statistics.stdev(scores) if len(scores) > 1 else float("nan")}


def summarize(runs: list[dict[str, Any]], rows: tuple[str, ...] = ROWS,
              extra: dict[str, Any] | None = None) -> Table:
    """Mean and spread (sample standard deviation, in points) of every row over its seeds.

    ``extra`` adds columns after ``#To/dense``: ``{name: f}`` with ``f(group)`` the value of
    a row's seeds ``group``. ``time s`` is the mean over the runs that did not resume a
    stopped one (marked by a key of ``RESUMED``; their seconds are their last
    invocation's only); NaN when all did."""
    table = Table()
    for task, row, group in seed_groups(runs, rows):
        whole = [r["seconds"] for r in group if not RESUMED.intersection(r)]
        table.append({
            "task": task, "row": row, "seeds": len(group), **score(group),
            "#To": round(statistics.mean(r["total_params"] for r in group)),
            "#To/dense": statistics.mean(r["total_over_dense"] for r in group),
            **{name: f(group) for name, f in (extra or {}).items()},
            "#Pr (trained)": round(statistics.mean(r["trainable_params"] or 0 for r in group)),
            "steps": round(statistics.mean(r["steps"] for r in group)),
            "time s": statistics.mean(whole) if whole else float("nan"),
        })
    return table


def _compare(a: dict[str, Any], b: dict[str, Any], margin: float) -> tuple[float, float, str]:
    """Gap ``a - b`` in points, the noise (the larger seed spread, and at least 1 point:
    two seeds can agree by chance, and one seed has no spread) and the verdict on the
    claim ``a >= b - margin``, decided only when ``gap + margin`` is beyond the noise (a
    gap equal to it is not)."""
    gap = a["metric %"] - b["metric %"]
    spreads = [r["spread (sd)"] for r in (a, b) if r["seeds"] > 1]
    noise = max([1.0, *spreads])
    if gap + margin > noise:
        verdict = "**confirmed**"
    elif gap + margin < -noise:
        verdict = "**refuted**"
    else:
        verdict = f"**not decided** (gap + margin within ±{noise:.2f} points)"
    return gap, noise, verdict


def paired(runs: list[dict[str, Any]], task: str, a: str, b: str
           ) -> tuple[dict[str, Any], dict[str, Any], list[int]] | None:
    """Rows ``a`` and ``b`` of ``task`` on the seeds both have (a claim compares like with
    like: a row with an extra seed would otherwise move its mean alone): each row's
    ``seeds``, ``metric %``, ``spread (sd)`` and ``#To/dense`` on them, and those seeds;
    ``None`` when they share no seed."""
    groups = {row: {r["seed"]: r for r in runs if r["task"] == task and r["row"] == row}
              for row in (a, b)}
    seeds = sorted(set(groups[a]) & set(groups[b]))
    if not seeds:
        return None

    def on(row: str) -> dict[str, Any]:
        group = [groups[row][seed] for seed in seeds]
        return {"row": row, "seeds": len(seeds), **score(group),
                "#To/dense": statistics.mean(r.get("total_over_dense", math.nan)
                                             for r in group)}

    return on(a), on(b), seeds


def claim_line(task: str, text: str, a: dict[str, Any], b: dict[str, Any], seeds: list[int],
               margin: float, baseline: float | None = None, planned: int | None = None
               ) -> str:
    """One Markdown bullet for the claim ``a >= b - margin`` on ``seeds`` (rows as
    ``paired`` gives them): both metrics and sizes, the gap, the threshold it must pass
    (``max(larger seed spread, 1 point)``) and the verdict. Two rows that both score no
    more than the constant guess (``baseline``, a fraction) on these seeds leave the claim
    not decided (a row at the guess that loses, or is beaten, clearly still decides it);
    fewer seeds than ``planned`` mark the verdict provisional; sizes more than 2% apart
    are named."""
    gap, noise, verdict = _compare(a, b, margin)
    guess = baseline is not None and max(a["metric %"], b["metric %"]) <= 100 * baseline
    if guess and not verdict.startswith("**not decided**"):
        verdict = (f"**not decided** (both score no more than the constant guess, "
                   f"{100 * baseline:.2f}, on these seeds)")
    size = a["#To/dense"] / b["#To/dense"]
    sizes = (f"; {a['row']} is {100 * abs(size - 1):.1f}% "
             f"{'larger' if size > 1 else 'smaller'} than {b['row']}"
             if abs(size - 1) > 0.02 else "")
    margin_text = f" + margin {margin:g}" if margin else ""
    provisional = (f"; provisional: {len(seeds)} of {planned} seeds"
                   if planned and len(seeds) < planned else "")
    return (f"- {task}: {text} ({a['row']} {a['metric %']:.2f} at {a['#To/dense']:.3f} of "
            f"dense vs {b['row']} {b['metric %']:.2f} at {b['#To/dense']:.3f}{sizes}; "
            f"seeds {', '.join(map(str, seeds))}; gap {gap:+.2f}{margin_text} against "
            f"{noise:.2f} points{provisional}): {verdict}.")


def planned_seeds(task: str) -> int:
    """How many seeds the GLUE benchmarks plan for ``task`` (``TASKS``)."""
    return len(TASKS[task][0]) if task in TASKS else 1


#: ``(a, b, margin, claim)``: the claim ``a >= b - margin`` (points of the GLUE metric);
#: ``best`` is the better of the two calibrated rows.
CLAIMS = (
    ("mpo-lfa", "dense", 1.0, "LFA of the full-rank MPO is within a point of full fine-tuning"),
    ("squeeze", "dense", 1.0, "MPOP squeezed to at most 0.65 of the size is within a point of "
                             "dense (Table 4)"),
    ("squeeze", "direct", 0.0, "squeezing beats direct truncation to the same bonds"),
    ("calibrated-lfa", "direct", 0.0, "calibrated compression beats plain truncation (direct, "
                                      "at the squeezed size) after LFA"),
    ("best", "dense", 1.0, "goal: the best calibrated row is within a point of dense"),
    ("best", "svd-llm-ft", 0.0, "goal: the best calibrated row beats SVD-LLM + fine-tuning "
                                "at equal size"),
)


def findings(runs: list[dict[str, Any]], baselines: dict[str, float] | None = None
             ) -> list[str]:
    """The paper's claims (and the issue's goal) checked per task on the seeds both rows
    of a claim have, one Markdown bullet each.

    ``baselines`` (``{task: majority-class metric}``) add a line per task saying how far
    dense fine-tuning gets above a constant guess, with a warning when it is not 5 points,
    and leave claims about rows at that guess not decided.
    """
    lines = []
    table = summarize(runs)
    for task in dict.fromkeys(r["task"] for r in runs):
        rows = {r["row"]: r for r in table if r["task"] == task}
        baseline = (baselines or {}).get(task)
        if baseline is not None:
            lines += baseline_lines(task, rows, baseline)
        calibrated = [r for r in ("calibrated-lfa", "healed-lfa") if r in rows]
        best = max(calibrated, key=lambda r: rows[r]["metric %"]) if calibrated else None
        claims = [(best if a == "best" else a, b, margin, text)
                  for a, b, margin, text in CLAIMS if a != "best" or best]
        lines += claim_bullets(runs, task, tuple(claims), baseline)
    return lines


def baseline_lines(task: str, rows: dict[str, dict[str, Any]], baseline: float) -> list[str]:
    """How far dense fine-tuning gets above always predicting the most frequent label
    (``baseline``, a fraction), with a warning under 5 points, and the rows that score no
    more than that constant guess: claims about them are not decided."""
    lines = []
    if "dense" in rows:
        above = rows["dense"]["metric %"] - 100 * baseline
        lines.append(f"- {task}: always predicting the most frequent label scores "
                     f"{100 * baseline:.2f}; dense fine-tuning is {above:+.2f} points above it"
                     + (" — the task barely separates a trained model from a constant guess "
                        "here, so its verdicts say little" if above < 5 else "") + ".")
    guessing = [name for name, r in rows.items() if r["metric %"] <= 100 * baseline]
    if guessing:
        lines.append(f"- {task}: {', '.join(guessing)} score no more than that constant "
                     "guess (over all their seeds): a claim between two such rows is not "
                     "decided.")
    return lines


def claim_bullets(runs: list[dict[str, Any]], task: str,
                  claims: tuple[tuple[str, str, float, str], ...],
                  baseline: float | None = None) -> list[str]:
    """One Markdown bullet per claim ``(a, b, margin, text)`` whose two rows ``task`` has
    on a common seed (``claim_line`` on ``paired`` rows; provisional while they have fewer
    seeds than ``planned_seeds``)."""
    lines = []
    for a, b, margin, text in claims:
        both = paired(runs, task, a, b)
        if both is not None:
            lines.append(claim_line(task, text, *both, margin, baseline, planned_seeds(task)))
    return lines


def publish(out: Path, results: dict[str, Any], table: Table, claims: list[str],
            intro: str) -> str:
    """Write the runs, ``table`` and ``claims`` to ``out`` and the Markdown report (the
    table, ``intro``, the claims as bullets) to ``out.with_suffix('.md')``."""
    results.update(summary=list(table), findings=claims)
    markdown = (table.to_markdown(floatfmt=".4g") + f"\n\n{intro} (on the seeds both rows "
                "of a claim have, a claim is decided when its gap plus margin is beyond "
                "max(larger seed spread, 1 point)):\n\n"
                + ("\n".join(claims) or "- none of the claims has both its rows yet.") + "\n")
    write_text(out, json.dumps(results, indent=2))
    write_text(out.with_suffix(".md"), markdown)
    return markdown


def write_report(out: Path, results: dict[str, Any]) -> str:
    """Table and findings to ``out`` (with the runs, and those another invocation stored
    meanwhile: ``merged_runs``) and ``out.with_suffix('.md')``."""
    with merged_runs(results, out, ROWS) as runs:
        claims = findings(runs, constant_guesses(runs))
        return publish(out, results, summarize(runs), claims, "The paper's claims and the "
                       "goal, computed from the table by `benchmarks/glue_small.py`")


def plan(tasks: list[str], rows: list[str], seeds: list[int] | None) -> list[tuple[str, str, int]]:
    """Runs in the order they are computed: seed by seed, so every row gets a first seed."""
    chosen = []
    for seed in range(3):
        for task in tasks:
            task_seeds = TASKS[task][0] if task in TASKS else (0,)
            if seed in task_seeds and (seeds is None or seed in seeds):
                chosen += [(task, row, seed) for row in rows]
    return chosen


def arguments(doc: str, rows: tuple[str, ...], results: Path) -> argparse.ArgumentParser:
    """The options of every GLUE benchmark here: ``--task``, ``--row``, ``--seed``,
    ``--quick``, ``--out`` (default ``results``) and ``--report-only``."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--task", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--row", nargs="+", choices=rows, default=list(rows))
    parser.add_argument("--seed", type=int, nargs="+", default=None,
                        help="only these seeds (default: each task's)")
    parser.add_argument("--quick", action="store_true",
                        help="every row on the shipped SST-2 sample, 64 examples, 2 steps "
                             "(needs its own --out)")
    parser.add_argument("--out", type=Path, default=results, help="JSON output path")
    parser.add_argument("--report-only", action="store_true",
                        help="print the table and verdicts from the JSON, train nothing")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None, results: Path
          ) -> argparse.Namespace:
    """The parsed options; a smoke run (``--quick``) never writes into ``results``."""
    args = parser.parse_args(argv)
    if args.quick and args.out.resolve() == results.resolve():
        parser.error("--quick needs its own --out: the smoke run's numbers are not results")
    return args


def merge_stored(results: dict[str, Any], out: Path) -> None:
    """Add to ``results`` the runs ``out`` holds and ``results`` lacks (another invocation
    wrote them since this one read the file), and the tasks' settings it lacks, so that
    writing ``results`` drops none."""
    if not out.is_file():
        return
    stored = json.loads(out.read_text())
    known = {(r["task"], r["row"], r["seed"]) for r in results["runs"]}
    results["runs"] += [r for r in stored["runs"]
                        if (r["task"], r["row"], r["seed"]) not in known]
    if "tasks" in stored:
        results["tasks"] = {**stored["tasks"], **results.get("tasks", {})}


def results_lock(out: Path) -> FileLock:
    """The lock every writer of ``out`` holds while it reads the stored runs and writes, so
    that two invocations (say one task each) finishing together drop none of each other's."""
    return FileLock(out.parent / f".{out.name}.lock")


def constant_guesses(runs: list[dict[str, Any]]) -> dict[str, float]:
    """``majority_baseline`` of each task ``runs`` has whose data is here."""
    tasks = dict.fromkeys(r["task"] for r in runs)
    return {t: majority_baseline(load_task(t)) for t in tasks
            if t == QUICK_TASK or GLUE.is_dir()}


@contextmanager
def merged_runs(results: dict[str, Any], out: Path, rows: Iterable[str]
                ) -> Iterator[list[dict[str, Any]]]:
    """Hold ``results_lock(out)`` while a report is computed and written: yield
    ``results["runs"]`` with the runs ``out`` holds merged in (``merge_stored``), sorted by
    task, row (in the order of ``rows``) and seed."""
    order = {name: k for k, name in enumerate(rows)}
    with results_lock(out):
        merge_stored(results, out)
        results["runs"].sort(key=lambda r: (r["task"], order[r["row"]], r["seed"]))
        yield results["runs"]


def store(results: dict[str, Any], record: dict[str, Any], out: Path) -> None:
    """Add a finished run to ``results``, say so, and write ``out`` at once (with the runs
    another invocation stored meanwhile: ``merge_stored``, under ``results_lock``), without
    the table and verdicts read when it started (stale now: the report writes them anew)."""
    key = (record["task"], record["row"], record["seed"])  # one run per key: this one
    for derived in ("summary", "findings"):
        results.pop(derived, None)
    size = (f" at {record['total_over_dense']:.3f} of dense"
            if "total_over_dense" in record else "")
    print(f"{record['task']} {record['row']} seed {record['seed']}: "
          f"{100 * record['metric']:.2f}{size} ({record['seconds']:.0f} s)",
          file=sys.stderr, flush=True)
    with results_lock(out):
        merge_stored(results, out)
        results["runs"] = [r for r in results["runs"]
                           if (r["task"], r["row"], r["seed"]) != key] + [record]
        write_text(out, json.dumps(results, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, ROWS, RESULTS)
    parser.add_argument("--work", type=Path, default=None,
                        help=f"folder of the LFA and squeeze models (default: {WORK}, or next "
                             "to --out with --quick)")
    args = parse(parser, argv, RESULTS)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": []}
    done = {(r["task"], r["row"], r["seed"]): r for r in results["runs"]}
    tasks = [QUICK_TASK] if args.quick else args.task
    todo = [key for key in plan(tasks, args.row, args.seed) if key not in done]
    if todo and not args.report_only:
        work = args.work or (args.out.parent / "glue_small_work" if args.quick else WORK)
        bench = Bench(args.quick, work)
        work.mkdir(parents=True, exist_ok=True)
        results.update(model="all-MiniLM-L6-v2 (embedded)", size=SIZE, targets=bench.targets,
                       tasks=task_settings(results, tasks),
                       squeeze=bench.squeeze.to_dict(), heal_steps=bench.heal_steps,
                       threads=torch.get_num_threads())
        bench.forget_runs(done)  # checkpoints left by a stop just after the record
        for task, row, seed in todo:
            if (task, row, seed) in done:  # the squeeze run also made its direct row
                continue
            if row in ("squeeze", "direct"):
                new = run_squeeze(bench, task, seed, done.get((task, "squeeze", seed)),
                                  lfa_recorded=(task, "mpo-lfa", seed) in done)
            else:
                new = [run(bench, task, row, seed)]
            for record in new:
                key = record["task"], record["row"], record["seed"]
                done[key] = record
                store(results, record, args.out)
                bench.forget_runs([key])
        if args.quick and args.work is None:  # the smoke run's own scratch folder
            shutil.rmtree(work)
    print(write_report(args.out, results))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
