"""Experiment: central tensors shared across layers (MPOBERT) and experts (MPOE) on GLUE.

Run from the repository root (many hours of CPU; every finished run is written at
once and runs already in the JSON are skipped, so a stopped run continues)::

    python benchmarks/glue_sharing.py                          # every run not yet done
    python benchmarks/glue_sharing.py --task rte --row mpoe4 --seed 0   # chosen runs
    python benchmarks/glue_sharing.py --report-only            # the tables and verdicts
    python benchmarks/glue_sharing.py --timing --report-only   # step times against dense
    python benchmarks/glue_sharing.py --quick --out /tmp/s.json   # smoke run (tests)

Model, data and training are those of ``glue_small.py`` (the embedded
all-MiniLM-L6-v2 with a new head; RTE and MRPC with seeds 0-2, 3 epochs, 128
tokens; SST-2's first 20,000 training rows, one epoch, 64 tokens, seed 0; the
official dev sets). Every row but ``dense`` and the mixtures of experts is healed
first (``HEAL_STEPS`` steps of hidden-state distillation from the dense model on
the task's training text, every parameter), then every row fine-tunes every
parameter (``full``), so that the rows differ only in their structure. A healed
row's model does not depend on the seed (only the task head does), so it is prepared
once per task and invocation and each later seed fine-tunes a copy under its own head
(``prep_reused`` in the run's record; its time counts the preparation it reused).
A row's longest runs (the 12-layer model takes hours) continue where they stopped: a
healed row's model is kept in ``benchmarks/work/glue_sharing`` once healed, and healing
and fine-tuning checkpoint there every ``glue_small.SAVE_STEPS`` steps, so a stopped invocation
resumes them (``prep_resumed`` / ``resumed_from`` in the run's record; its seconds are
this invocation's, its seconds per step those of the steps it took). A kept model or
healing run made with other settings (targets, rank, ALS sweeps, healing steps) is
refused, not reused. A run's checkpoints are deleted once its record is written.

MPOBERT rows (attention and FFN matrices as ``n = 5`` MPOs at full rank):

``dense``
    the 6-layer dense model (taken from ``glue_small.json`` when that run exists);
``shared-layer`` / ``shared-fit``
    one central tensor per matrix type shared by all 6 layers, initialised from
    layer 0 (the reference code) or fitted to every layer (ALS);
``albert``
    ALBERT-style full sharing: groups of consecutive layers are one module
    repeated, as many groups as bring #To closest to ``shared-fit``'s;
``independent``
    independent MPOs truncated (model-wide optimal allocation) to ``shared-fit``'s #To;
``deep12``
    ``shared-fit`` deepened to 12 layers (each layer followed by a copy sharing its
    centrals), healed from the 6-layer dense model.

MPOE rows (FFN blocks; top-2 routing, capacity 1.25, router loss 0.01; their records
hold ``router_aux_loss`` and ``router_dropped``, the means of their training logs'):

``moe4``
    the plain mixture of experts: 4 full copies of each FFN block, perturbed;
``mpoe4`` / ``mpoe8``
    4 or 8 experts whose MPOs (``n = 5``, full rank) share each block's central
    tensors and own their auxiliary tensors.

Writes ``benchmarks/results/glue_sharing.json`` (every run) and
``glue_sharing.md`` (mean and spread per task and row, then the papers' claims as
verdicts). The runs' wall times are not comparable across rows (they ran at different
times, beside different jobs): ``--timing`` measures each row's forward-and-backward time
over dense's in one process, with the models interleaved, into
``glue_sharing_timing.json``; the table's ``fwd+bwd x dense`` column reads it::

    python benchmarks/glue_sharing.py --task sst2 --timing --report-only
"""

from __future__ import annotations

import copy
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
from safetensors.torch import load_model, save_model

from mpotn import Table, compress
from mpotn.atomic import write_text
from mpotn.compression.deepen import deepen
from mpotn.compression.experts import upcycle_experts
from mpotn.compression.model import MPOModel
from mpotn.compression.parameters import count_parameters
from mpotn.compression.sharing import share_centrals
from mpotn.finetune.heal import EARLIER_HEAL_LR, HealConfig, heal

RESULTS = Path(__file__).parent / "results" / "glue_sharing.json"
WORK = Path(__file__).parent / "work" / "glue_sharing"
TARGETS = ["attention", "ffn"]
ROWS = ("dense", "shared-layer", "shared-fit", "albert", "independent", "deep12", "moe4",
        "mpoe4", "mpoe8")
HEALED = ("shared-layer", "shared-fit", "albert", "independent", "deep12")
HEAL_STEPS = 300
FIT_SWEEPS = 3
EXPERTS = {"moe4": (4, False), "mpoe4": (4, True), "mpoe8": (8, True)}
#: a healed row's prepared model is complete in ``prep_dir`` once this file is written
PREPARED = "prepared.json"


def _layers(model: nn.Module) -> nn.ModuleList:
    base = model.base_model if isinstance(model, MPOModel) else model
    return base.base_model.encoder.layer


def ffn_params(model: nn.Module) -> int:
    """Parameters of every feed-forward block (experts and routers included), each once."""
    seen: dict[int, int] = {}
    for layer in _layers(model):
        for module in (layer.intermediate, layer.output.dense):
            for p in module.parameters():
                seen[id(p)] = p.numel()
    return sum(seen.values())


def albert_sharing(model: nn.Module, groups: int) -> None:
    """ALBERT-style sharing in place: ``groups`` runs of consecutive layers, each run one
    module (its first layer) repeated."""
    layers = _layers(model)
    size = -(-len(layers) // groups)
    for i in range(len(layers)):
        layers[i] = layers[(i // size) * size]


class SharingBench(glue_small.Bench):
    """``glue_small``'s settings (tasks, tokenizer, training), with healing and the
    sharing rows."""

    def __init__(self, quick: bool, work: Path) -> None:
        super().__init__(quick, work)
        self.targets = ["ffn"] if quick else TARGETS
        self.heal_steps = 2 if quick else HEAL_STEPS
        self.sweeps = 1 if quick else FIT_SWEEPS
        #: full rank in the experiment; small bonds in the smoke run, to be quick
        self.rank = {"max_bond": 8} if quick else {}
        #: ``{(task, row): (model, extra, seconds)}``: the healed rows' prepared models
        self.prepared: dict[tuple[str, str], tuple[nn.Module, dict[str, Any], float]] = {}

    def heal(self, model: nn.Module, teacher: nn.Module, task: str, out: Path) -> None:
        """Heal ``model`` from ``teacher``, checkpointing into ``out``; a run checkpointed
        there continues (its weights replace ``model``'s)."""
        heal(model, teacher, self.tokenizer, self.texts(task, None),
             HealConfig(steps=self.heal_steps, train="all", max_length=128,
                        save_steps=self.save_steps, learning_rate=EARLIER_HEAL_LR["all"]),
             out=out, resume=glue_small.resumable(out), progress=False)

    def shared(self, dense: nn.Module, init: str, sweeps: int) -> MPOModel:
        model = compress(copy.deepcopy(dense), targets=self.targets, progress=False,
                         **self.rank)
        share_centrals(model, init=init, sweeps=sweeps)
        return model


def prep_dir(bench: SharingBench, task: str, row: str) -> Path:
    """Where a healed row's preparation keeps its healing checkpoints and its model."""
    return bench.work / f"{task}-{row}"


def with_head(model: nn.Module, dense: nn.Module) -> nn.Module:
    """``model`` (in place) with ``dense``'s task head, the one part a seed draws."""
    target = model.base_model if isinstance(model, MPOModel) else model
    target.classifier.load_state_dict(dense.classifier.state_dict())
    return model


def prepared(bench: SharingBench, task: str, row: str, seed: int, sizes: dict[str, int]
             ) -> tuple[nn.Module, dict[str, Any], float]:
    """The row's model before fine-tuning, what to record about it, and the seconds its
    preparation took. A healed row's encoder does not depend on the seed (compression,
    the ALS fit and healing are deterministic; healing never touches the head), so it is
    prepared once per task, kept in memory and in ``prep_dir`` (safetensors; the healing
    checkpoints there are deleted then), and each later seed, in this invocation or a
    later one, gets a copy with its own head."""
    if (task, row) in bench.prepared:
        model, extra, seconds = bench.prepared[task, row]
        return with_head(copy.deepcopy(model), bench.classifier(task, seed)), {
            **extra, "prep_reused": True}, seconds
    start = time.perf_counter()
    if row not in HEALED:
        model, extra = prepare(bench, task, row, seed, sizes)
        return model, extra, time.perf_counter() - start
    kept = prep_dir(bench, task, row)
    check_settings(bench, kept)
    if (kept / PREPARED).is_file():
        model, extra = prepare(bench, task, row, seed, sizes, healed=False)
        load_model(model, kept / "model.safetensors")
        saved = json.loads((kept / PREPARED).read_text())
        if extra != {k: v for k, v in saved["extra"].items() if not k.startswith("prep_")}:
            raise ValueError(f"{kept} holds a {row} model of another structure "
                             f"({saved['extra']}, not {extra}); delete it to prepare again")
        extra, seconds = {**saved["extra"], "prep_reused": True}, saved["seconds"]
        with_head(model, bench.classifier(task, seed))
    else:
        resumed = glue_small.resumable(kept / "heal")
        model, extra = prepare(bench, task, row, seed, sizes)
        seconds = time.perf_counter() - start
        if resumed:
            extra["prep_resumed"] = True
        save_model(model, str(kept / "model.safetensors"))
        write_text(kept / PREPARED, json.dumps({"extra": extra, "seconds": seconds}))
    shutil.rmtree(kept / "heal", ignore_errors=True)  # its checkpoints are spent
    bench.prepared[task, row] = copy.deepcopy(model), extra, seconds
    return model, extra, seconds


def check_settings(bench: SharingBench, kept: Path) -> None:
    """Record in ``kept`` the settings a healed row's preparation depends on, or refuse
    a folder prepared with others (a kept model or healing checkpoint of other settings
    must not pass for this invocation's)."""
    settings = {"targets": bench.targets, "rank": bench.rank, "fit_sweeps": bench.sweeps,
                "heal_steps": bench.heal_steps}
    path = kept / "settings.json"
    saved = json.loads(path.read_text()) if path.is_file() else settings
    if saved != settings:
        raise ValueError(f"{kept} was prepared with other settings ({saved}, not "
                         f"{settings}); delete it to prepare the row again")
    kept.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(settings))


def prepare(bench: SharingBench, task: str, row: str, seed: int, sizes: dict[str, int],
            healed: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The row's model before fine-tuning, and what to record about it. With ``healed``
    false its structure only: no ALS sweep, no healing."""
    dense = bench.classifier(task, seed)
    extra: dict[str, Any] = {}
    heal_dir = prep_dir(bench, task, row) / "heal"
    # a healing checkpoint's weights replace the fitted ones: the structure is enough
    sweeps = bench.sweeps if healed and not glue_small.resumable(heal_dir) else 0
    if row in ("shared-layer", "shared-fit", "deep12"):
        model = bench.shared(dense, "layer" if row == "shared-layer" else "fit", sweeps)
        if row == "deep12":
            deepen(model, depth=2 * len(_layers(model)))
    elif row == "albert":
        goal = sizes.get("shared-fit") or count_parameters(
            bench.shared(dense, "fit", 0).parameters())
        options = []
        for groups in range(1, len(_layers(dense)) + 1):
            trial = copy.deepcopy(dense)
            albert_sharing(trial, groups)
            options.append((abs(count_parameters(trial.parameters()) - goal), groups))
        model = copy.deepcopy(dense)
        extra["layer_groups"] = min(options)[1]
        albert_sharing(model, extra["layer_groups"])
    elif row == "independent":
        goal = sizes.get("shared-fit") or count_parameters(
            bench.shared(dense, "fit", 0).parameters())
        total = count_parameters(dense.parameters())
        model = compress(copy.deepcopy(dense), targets=bench.targets, progress=False,
                         ratio=bench.ratio(dense, goal / total), budget="model")
    elif row in EXPERTS:
        experts, share = EXPERTS[row]
        model = (compress(copy.deepcopy(dense), targets=["ffn"], progress=False, **bench.rank)
                 if share else copy.deepcopy(dense))
        upcycle_experts(model, experts=experts, top_k=2, share_central=share, seed=seed)
        extra["ffn_params_multiple"] = ffn_params(model) / ffn_params(dense)
    else:
        raise ValueError(f"unknown row {row!r}")
    if row in HEALED and healed:
        bench.heal(model, dense, task, heal_dir)
    return model, extra


def run(bench: SharingBench, task: str, row: str, seed: int, sizes: dict[str, int]
        ) -> dict[str, Any]:
    """One run: prepare the row's model, fine-tune every parameter, evaluate."""
    if row == "dense":
        return glue_small.run(bench, task, "dense", seed)
    model, extra, prep = prepared(bench, task, row, seed, sizes)
    original = count_parameters(bench.classifier(task, seed).parameters())
    data = bench.data(task)
    result = bench.finetune(model, task, row, seed, "full")
    trained = result.model.base_model if isinstance(result.model, MPOModel) else result.model
    total = count_parameters(trained.parameters())
    record = result.record
    for key in ("router_aux_loss", "router_dropped"):  # the mixtures' training logs
        logged = [entry[key] for entry in result.history if entry.get(key) is not None]
        if logged:
            extra = {**extra, key: statistics.mean(logged)}
    return glue_small._run_record(
        task, row, seed, data, record, total=total, over_dense=total / original,
        trainable=record.get("trainable_params"), steps=record["steps"],
        seconds_per_step=record["train_seconds"] / max(glue_small.steps_taken(record), 1),
        layers=len(_layers(trained)), **extra, prep_seconds=prep,
        seconds=prep + record["train_seconds"])


def _step_seconds(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Seconds of one training step's work: forward, loss, backward."""
    start = time.perf_counter()
    model(**batch).loss.backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def step_times(bench: SharingBench, task: str, rows: list[str], sizes: dict[str, int],
               repeats: int = 7) -> dict[str, dict[str, float]]:
    """Each row's forward-and-backward time over dense's (``step x dense`` in the timing
    file, ``fwd+bwd x dense`` in the table; the optimizer's update is not timed),
    measured in this one process: the rows' models (untrained: the work of a step does
    not depend on the weights, except in the mixtures of experts, whose untrained router
    decides how many tokens go over capacity, so their rows also hold the share of token
    assignments ``dropped``, the mean over their mixtures; shared centrals fitted with no
    ALS sweep) each take a step on the same batch of 32 training examples, interleaved
    with the dense model's steps so that load changes hit both, and the ratio is of the
    medians."""
    from transformers import DataCollatorWithPadding

    from mpotn.compression.models import padding_tokenizer
    from mpotn.finetune.training import tokenize
    from mpotn.layers.experts import MixtureOfExperts

    data = bench.data(task)
    train, _ = tokenize(data, bench.tokenizer, bench.training(task, "full", 0).max_length,
                        train_limit=32, eval_limit=1)
    collate = DataCollatorWithPadding(padding_tokenizer(bench.tokenizer))
    batch = collate([train[k] for k in range(len(train))])
    batch["labels"] = batch.pop("label") if "label" in batch else batch.pop("labels")
    dense = bench.classifier(task, 0).train()
    measured = {}
    for row in rows:
        model = (dense if row == "dense"
                 else prepare(bench, task, row, 0, sizes, healed=False)[0]).train()
        pairs = [(_step_seconds(dense, batch), _step_seconds(model, batch))
                 for _ in range(repeats + 1)][1:]  # the first step warms up
        measured[row] = {"step x dense": statistics.median(b for _, b in pairs)
                         / statistics.median(a for a, _ in pairs)}
        dropped = [float(m.dropped) for m in model.modules()
                   if isinstance(m, MixtureOfExperts) and m.dropped is not None]
        if dropped:
            measured[row]["dropped"] = statistics.mean(dropped)
    return measured


def _ffn_multiple(group: list[dict[str, Any]]) -> float:
    multiple = [1.0 if r["row"] == "dense" else r["ffn_params_multiple"] for r in group
                if r["row"] == "dense" or "ffn_params_multiple" in r]
    return statistics.mean(multiple) if multiple else float("nan")


def _step_seconds_of_runs(group: list[dict[str, Any]]) -> float:
    """The mean of the runs' own seconds per training step (forward, backward and the
    optimizer's update; each run's, beside whatever else ran then); for a run that
    recorded none (dense, borrowed from ``glue_small``), its training seconds over its
    steps unless it resumed."""
    steps = [r["seconds_per_step"] if r.get("seconds_per_step")
             else (r["seconds"] - r.get("prep_seconds", 0.0)) / r["steps"]
             for r in group if r.get("seconds_per_step")
             or not glue_small.RESUMED.intersection(r)]
    return statistics.mean(steps) if steps else float("nan")


def summarize(runs: list[dict[str, Any]],
              steps: dict[str, dict[str, dict[str, float]]] | None = None) -> Table:
    """``glue_small``'s summary of these rows, with the FFN's size against dense, the
    runs' own seconds per training step (``s/step``: they ran at different times, beside
    different jobs, so compare them loosely) and each row's forward-and-backward time
    over dense's measured in one process (``fwd+bwd x dense``, from ``step_times``;
    ``--timing``)."""
    table = glue_small.summarize(runs, ROWS, {"FFN x dense": _ffn_multiple,
                                              "s/step": _step_seconds_of_runs})
    for row in table:
        row["fwd+bwd x dense"] = (steps or {}).get(row["task"], {}).get(row["row"], {}).get(
            "step x dense", float("nan"))
    return table


#: ``(a, b, margin, claim)``: the claim ``a >= b - margin`` (points of the GLUE metric).
CLAIMS = (
    ("shared-fit", "albert", 0.0, "MPOBERT: sharing central tensors beats sharing whole layers "
                                  "(ALBERT) at about the same size"),
    ("shared-fit", "shared-layer", 0.0, "fitting the shared central beats taking layer 0's"),
    ("shared-fit", "independent", 0.0, "sharing central tensors beats independent MPOs "
                                       "truncated to the same size"),
    ("deep12", "shared-fit", 0.0, "MPOBERT: 12 layers with shared centrals beat 6 at about "
                                  "the same size"),
    ("mpoe4", "moe4", 1.0, "MPOE with 4 experts matches (within a point) or beats the plain "
                           "4-expert MoE with far fewer FFN parameters"),
    ("mpoe8", "moe4", 1.0, "MPOE with 8 experts matches (within a point) or beats the plain "
                           "4-expert MoE"),
)


def findings(runs: list[dict[str, Any]], table: Table,
             baselines: dict[str, float] | None = None) -> list[str]:
    """The papers' claims per task, one Markdown bullet each (``glue_small``'s verdicts, on
    the seeds both rows of a claim have), after each task's constant guess (``baselines``,
    ``{task: majority-class metric}``), which leaves claims about rows at it undecided."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in table):
        baseline = (baselines or {}).get(task)
        if baseline is not None:
            rows = {r["row"]: r for r in table if r["task"] == task}
            lines += glue_small.baseline_lines(task, rows, baseline)
        lines += glue_small.claim_bullets(runs, task, CLAIMS, baseline)
    return lines


def _timing_path(out: Path) -> Path:
    """Where ``--timing`` keeps its ratios: beside ``out``, apart from the runs, so that a
    training invocation running at the same time cannot overwrite them."""
    return out.with_name(f"{out.stem}_timing.json")


def write_report(out: Path, results: dict[str, Any]) -> str:
    """Tables and findings to ``out`` (with the runs, and those another invocation stored
    meanwhile: ``glue_small.merged_runs``) and ``out.with_suffix('.md')``."""
    timing = _timing_path(out)
    steps = json.loads(timing.read_text()) if timing.is_file() else None
    with glue_small.merged_runs(results, out, ROWS) as runs:
        table = summarize(runs, steps)
        return glue_small.publish(out, results, table,
                                  findings(runs, table, glue_small.constant_guesses(runs)),
                                  "The papers' claims, computed from the table by "
                                  "`benchmarks/glue_sharing.py`")


def _borrowed_dense(task: str, seed: int) -> dict[str, Any] | None:
    """``glue_small``'s dense run of the same task and seed (the same settings), if any."""
    if not glue_small.RESULTS.is_file():
        return None
    for record in json.loads(glue_small.RESULTS.read_text())["runs"]:
        if (record["task"], record["row"], record["seed"]) == (task, "dense", seed):
            return {**record, "from": "glue_small.json"}
    return None


def main(argv: list[str] | None = None) -> int:
    parser = glue_small.arguments(__doc__, ROWS, RESULTS)
    parser.add_argument("--timing", action="store_true",
                        help="measure, in this one process, each row's forward-and-backward time "
                             "over dense's for the chosen tasks and rows (a few minutes; "
                             "nothing is trained), into OUT's _timing.json")
    args = glue_small.parse(parser, argv, RESULTS)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": []}
    done = {(r["task"], r["row"], r["seed"]) for r in results["runs"]}
    tasks = [glue_small.QUICK_TASK] if args.quick else args.task
    todo = [key for key in glue_small.plan(tasks, args.row, args.seed) if key not in done]
    work = args.out.parent / "glue_sharing_work" if args.quick else WORK
    if todo and not args.report_only:
        bench = SharingBench(args.quick, work)
        bench.forget_runs(done)  # checkpoints left by a stop just after the record
        results.update(model="all-MiniLM-L6-v2 (embedded)", targets=bench.targets,
                       heal_steps=bench.heal_steps, fit_sweeps=bench.sweeps,
                       tasks=glue_small.task_settings(results, tasks),
                       threads=torch.get_num_threads())
        for task, row, seed in todo:
            borrowed = _borrowed_dense(task, seed) if row == "dense" and not args.quick else None
            sizes = {r["row"]: r["total_params"] for r in results["runs"]
                     if r["task"] == task and r["seed"] == seed}
            glue_small.store(results, borrowed or run(bench, task, row, seed, sizes), args.out)
            bench.forget_runs([(task, row, seed)])
    if args.timing:
        bench = SharingBench(args.quick, work)
        timing = _timing_path(args.out)
        steps = json.loads(timing.read_text()) if timing.is_file() else {}
        for task in tasks:
            sizes = {r["row"]: r["total_params"] for r in results["runs"]
                     if r["task"] == task and r["seed"] == 0}
            steps[task] = {**steps.get(task, {}), **step_times(bench, task, args.row, sizes)}
            write_text(timing, json.dumps(steps, indent=2))
    if args.quick:  # the smoke run's own scratch folder
        shutil.rmtree(work, ignore_errors=True)
    print(write_report(args.out, results))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
