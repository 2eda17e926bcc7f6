"""Experiment: MPO-LSTM against magnitude pruning at equal parameter counts (SPEC §4).

Run from the repository root (tens of minutes of CPU; every finished run is written
at once and runs already in the JSON are skipped, so a stopped run continues)::

    python benchmarks/mpo_lstm.py                      # every run not yet done
    python benchmarks/mpo_lstm.py --task classify --seed 0   # chosen runs
    python benchmarks/mpo_lstm.py --report-only        # the table and verdicts
    python benchmarks/mpo_lstm.py --quick --out /tmp/l.json  # smoke run (tests)

Two tasks on GLUE's SST-2 files (``../shared/data/glue``), each an LSTM trained from
scratch (seeds 0, 1, 2):

``classify`` (sequence classification)
    every SST-2 training sentence (67,349; WordPiece tokens of all-MiniLM-L6-v2's
    tokenizer, the 10,000 most frequent kept, at most 64), an embedding of 128, a
    256-unit LSTM and a linear head on its final state; one epoch; dev accuracy.
``predict`` (sequence prediction)
    a character language model on the first 10,000 SST-2 training sentences (at most
    96 characters, lower-cased): an embedding of 64, a 256-unit LSTM, next-character
    logits; two epochs; next-character accuracy on the 872 dev sentences (and bits
    per character).

Every row is a trained LSTM fine-tuned for ``FINETUNE_STEPS`` more steps (every
parameter; the same data, learning rate and seed), so that all have had the same
training; ``before fine-tuning %`` is its score before those steps. Rows: ``dense``
(the LSTM as trained), then for each kept share ``r`` of the LSTM's
weight-matrix entries (0.5, 0.2, 0.1): ``mpo@r``, each ``W_ih`` and ``W_hh`` an
``n = 5`` MPO truncated to ``ratio = r`` (Algorithm 1,
[MPOLSTM.from_lstm][mpotn.layers.lstm.MPOLSTM.from_lstm]), and ``prune@r``, each
matrix keeping exactly as many entries as its MPO has, the largest in magnitude
(the pruned entries stay zero). ``scratch@r`` is the paper's architecture: an
MPO-LSTM of ``mpo@r``'s bonds, trained from random cores like the dense model (same
epochs, learning rate and seed). ``calibrated@r`` and ``svd-calibrated@r`` are
mpotn's activation-aware truncation (SPEC §7) of the same shares: each matrix cut to
minimise the error of its outputs on the inputs it sees on ``CALIBRATION`` training
sequences, as an ``n = 5`` MPO or as its truncated SVD (SVD-LLM's whitening). Each
row records its metric and the LSTM's stored weights (``#LSTM``: MPO core entries, or
non-zero entries of the pruned matrices, whose positions a sparse format would store
as well).

Writes ``benchmarks/results/mpo_lstm.json`` and ``mpo_lstm.md`` (mean and spread
over seeds, then the claim — MPO beats magnitude pruning at equal parameters,
compressed from the trained LSTM or trained from scratch — as verdicts).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.rnn import (
    PackedSequence,
    pack_padded_sequence,
    pad_packed_sequence,
    pad_sequence,
)
from transformers import PrinterCallback, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
import glue_small  # the verdict rule and the report writer of the GLUE benchmarks

from mpotn import Table
from mpotn.atomic import atomic_path, write_text
from mpotn.compression.models import load_tokenizer
from mpotn.data import load_glue, sst2_sample
from mpotn.layers.lstm import MPOLSTM

RESULTS = Path(__file__).parent / "results" / "mpo_lstm.json"
WORK = Path(__file__).parent / "work" / "mpo_lstm"
GLUE = Path(__file__).parent.parent.parent / "shared" / "data" / "glue"
SHARES = (0.5, 0.2, 0.1)
SEEDS = (0, 1, 2)
FINETUNE_STEPS = 300
CALIBRATION = 2000  # training sequences whose LSTM inputs calibrate the truncation
#: ``{task: settings}``
TASKS: dict[str, dict[str, Any]] = {
    "classify": {"train_limit": None, "vocab": 10_000, "max_length": 64, "embed": 128,
                 "hidden": 256, "epochs": 1, "lr": 2e-3, "batch": 64},
    "predict": {"train_limit": 10_000, "max_length": 96, "embed": 64, "hidden": 256,
                "epochs": 2, "lr": 2e-3, "batch": 64},
}
QUICK = {"train_limit": 256, "eval_limit": 64, "vocab": 500, "hidden": 32, "embed": 16,
         "epochs": 1, "finetune_steps": 2}
PAD, UNKNOWN = 0, 1


class SequenceModel(nn.Module):
    """Embedding, LSTM and a linear head: on the final state (``classes``) or on every
    step (a language model, ``classes`` = the vocabulary)."""

    def __init__(self, vocab: int, embed: int, hidden: int, classes: int, per_step: bool
                 ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed, padding_idx=PAD)
        self.lstm: nn.Module = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)
        self.per_step = per_step

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        packed = pack_padded_sequence(self.embedding(input_ids), lengths.cpu(),
                                      batch_first=True, enforce_sorted=False)
        out, (h, _) = self.lstm(packed)
        if self.per_step:
            logits = self.head(pad_packed_sequence(out, batch_first=True,
                                                   total_length=input_ids.shape[1])[0])
        else:
            logits = self.head(h[-1])
        result = {"logits": logits}
        if labels is not None:
            result["loss"] = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return result


def _collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    ids = [torch.tensor(e["input_ids"]) for e in examples]
    batch = {"input_ids": pad_sequence(ids, batch_first=True, padding_value=PAD),
             "lengths": torch.tensor([len(i) for i in ids])}
    labels = [e["labels"] for e in examples]
    batch["labels"] = (torch.tensor(labels) if isinstance(labels[0], int) else
                       pad_sequence([torch.tensor(x) for x in labels], batch_first=True,
                                    padding_value=-100))
    return batch


class TaskData:
    """A task's examples (``input_ids``, ``labels``), vocabulary size and classes."""

    def __init__(self, task: str, settings: dict[str, Any], quick: bool) -> None:
        data = sst2_sample() if quick else load_glue("sst2", GLUE)
        train = list(data.train["text"])[: settings.get("train_limit")]
        train_labels = list(data.train["label"])[: len(train)]
        dev, dev_labels = list(data.eval["text"]), list(data.eval["label"])
        if settings.get("eval_limit"):
            dev, dev_labels = dev[: settings["eval_limit"]], dev_labels[: settings["eval_limit"]]
        if task == "classify":
            tokenizer = load_tokenizer()
            encode = [tokenizer(t, add_special_tokens=False, truncation=True,
                                max_length=settings["max_length"])["input_ids"] or
                      [tokenizer.unk_token_id] for t in (train + dev)]
            counts = Counter(i for ids in encode[: len(train)] for i in ids)
            index = {i: k + 2 for k, (i, _) in enumerate(counts.most_common(settings["vocab"]))}
            ids = [[index.get(i, UNKNOWN) for i in seq] for seq in encode]
            self.vocab, self.classes, self.per_step = len(index) + 2, 2, False
            labels: list[Any] = train_labels + dev_labels
        else:
            sentences = [s.lower()[: settings["max_length"] + 1] for s in train + dev]
            chars = Counter(c for s in sentences[: len(train)] for c in s)
            index = {c: k + 2 for k, c in enumerate(sorted(chars))}
            full = [[index.get(c, UNKNOWN) for c in s] for s in sentences]
            full = [s if len(s) > 1 else [*s, UNKNOWN] for s in full]
            ids, labels = [s[:-1] for s in full], [s[1:] for s in full]
            self.vocab, self.classes, self.per_step = len(index) + 2, len(index) + 2, True
        examples = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]
        self.train, self.dev = examples[: len(train)], examples[len(train):]


def _model(data: TaskData, settings: dict[str, Any]) -> SequenceModel:
    return SequenceModel(data.vocab, settings["embed"], settings["hidden"], data.classes,
                         data.per_step)


def train(model: nn.Module, data: TaskData, settings: dict[str, Any], seed: int,
          steps: int | None = None) -> float:
    """Train with the Hugging Face Trainer (AdamW, linear decay; ``steps`` or the task's
    epochs); the seconds it took."""
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch, per_device_train_batch_size=settings["batch"],
            learning_rate=settings["lr"], num_train_epochs=settings["epochs"],
            max_steps=steps or -1, seed=seed, save_strategy="no", report_to=[],
            logging_strategy="no", remove_unused_columns=False, disable_tqdm=True,
            dataloader_pin_memory=torch.cuda.is_available())
        trainer = Trainer(model=model, args=args, train_dataset=data.train,
                          data_collator=_collate)
        trainer.remove_callback(PrinterCallback)  # the table says what a run reached
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


@torch.no_grad()
def evaluate(model: SequenceModel, data: TaskData, batch: int = 128) -> dict[str, float]:
    """Dev accuracy (per sentence or per next character) and, for the language model,
    bits per character."""
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    nats = 0.0
    for start in range(0, len(data.dev), batch):
        inputs = {k: v.to(device) for k, v in _collate(data.dev[start:start + batch]).items()}
        logits, labels = model(**inputs)["logits"], inputs["labels"]
        real = labels != -100
        correct += int((logits.argmax(-1) == labels)[real].sum())
        total += int(real.sum())
        if data.per_step:
            nats += float(nn.functional.cross_entropy(logits[real], labels[real],
                                                      reduction="sum"))
    model.train()
    scores = {"metric": correct / total}
    if data.per_step:
        scores["bits_per_char"] = nats / total / math.log(2)
    return scores


def prune_like(lstm: nn.LSTM, keep: Sequence[int]) -> int:
    """Zero all but the ``keep[k]`` largest-magnitude entries of the LSTM's ``k``-th weight
    matrix (``weight_ih``, ``weight_hh`` per layer) and keep them zero in training (a
    gradient mask); the entries kept."""
    weights = [p for name, p in lstm.named_parameters() if name.startswith("weight")]
    for weight, count in zip(weights, keep, strict=True):
        mask = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
        mask[weight.detach().abs().flatten().topk(count).indices] = 1
        mask = mask.view_as(weight)
        with torch.no_grad():
            weight.mul_(mask)
        weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device))
    return sum(int((w != 0).sum()) for w in weights)


def dense_model(bench: Bench, task: str, seed: int) -> tuple[SequenceModel, float]:
    """The trained dense model of ``task`` and ``seed`` and the seconds its training took:
    trained once, then kept in the work folder (``bench.work``, safetensors) for later
    rows and invocations; training is the same in every invocation (the Trainer seeds
    the initialisation and data order)."""
    data, settings = bench.data(task), bench.settings(task)
    path = bench.work / f"{task}-dense-{seed}.safetensors"
    if path.is_file():
        state = load_file(path)
        seconds = float(json.loads(path.with_suffix(".json").read_text())["train_seconds"])
    else:
        torch.manual_seed(seed)
        model = _model(data, settings)
        seconds = train(model, data, settings, seed)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        bench.work.mkdir(parents=True, exist_ok=True)
        write_text(path.with_suffix(".json"), json.dumps({"train_seconds": seconds}))
        with atomic_path(path) as tmp:
            save_file(state, tmp)
    model = _model(data, settings)
    model.load_state_dict(state)
    return model, seconds


@torch.no_grad()
def lstm_inputs(model: SequenceModel, data: TaskData, count: int, batch: int = 64
                ) -> list[PackedSequence]:
    """The LSTM's inputs (embedded, packed) on the first ``count`` training sequences."""
    device = next(model.parameters()).device
    inputs = []
    for start in range(0, min(count, len(data.train)), batch):
        chunk = _collate(data.train[start:min(start + batch, count)])
        embedded = model.embedding(chunk["input_ids"].to(device))
        inputs.append(pack_padded_sequence(embedded, chunk["lengths"], batch_first=True,
                                           enforce_sorted=False))
    return inputs


def lstm_weights(lstm: nn.Module) -> int:
    """Stored entries of the LSTM's weight matrices (MPO cores, or non-zeros)."""
    if isinstance(lstm, MPOLSTM):
        return sum(c.numel() for m in lstm.matrices() for c in m.cores)
    return sum(int((p != 0).sum()) for n, p in lstm.named_parameters() if n.startswith("weight"))


class Bench:
    """Settings of one invocation (full or quick), task data and the folder of the trained
    dense models."""

    def __init__(self, quick: bool, work: Path) -> None:
        self.quick = quick
        self._data: dict[str, TaskData] = {}
        self.work = work
        self.finetune_steps = QUICK["finetune_steps"] if quick else FINETUNE_STEPS
        self.calibration = 64 if quick else CALIBRATION

    def settings(self, task: str) -> dict[str, Any]:
        return {**TASKS[task], **(QUICK if self.quick else {})}

    def data(self, task: str) -> TaskData:
        if task not in self._data:
            self._data[task] = TaskData(task, self.settings(task), self.quick)
        return self._data[task]


def run(bench: Bench, task: str, row: str, seed: int) -> dict[str, Any]:
    """One run: a trained LSTM (the dense one, an MPO-LSTM trained from scratch, or the
    dense one compressed) fine-tuned for ``bench.finetune_steps`` steps, so that every
    row has had the same training; its score before and after that fine-tuning."""
    model, dense_seconds = dense_model(bench, task, seed)
    start = time.perf_counter()
    dense_weights = lstm_weights(model.lstm)
    method, _, share = row.partition("@")
    if method in ("mpo", "prune", "scratch"):
        mpo = MPOLSTM.from_lstm(model.lstm, ratio=float(share), svd="full")  # exact cuts
    if method == "scratch":
        torch.manual_seed(seed)
        model = _model(bench.data(task), bench.settings(task))
        model.lstm = MPOLSTM.from_spec(mpo.spec())
        train(model, bench.data(task), bench.settings(task), seed)
    elif method == "mpo":
        model.lstm = mpo
    elif method == "prune":
        prune_like(model.lstm, [sum(c.numel() for c in m.cores) for m in mpo.matrices()])
    elif method in CALIBRATED:
        model.lstm = MPOLSTM.from_lstm(
            model.lstm, structure=CALIBRATED[method], ratio=float(share),
            calibration=lstm_inputs(model, bench.data(task), bench.calibration))
    before = evaluate(model, bench.data(task))
    train(model, bench.data(task), bench.settings(task), seed, bench.finetune_steps)
    weights = lstm_weights(model.lstm)
    return {"task": task, "row": row, "seed": seed, "threads": torch.get_num_threads(),
            **evaluate(model, bench.data(task)), "metric_before": before["metric"],
            "steps": bench.finetune_steps, "lstm_weights": weights,
            "lstm_over_dense": weights / dense_weights,
            "seconds": time.perf_counter() - start
            + (dense_seconds if row == "dense" else 0.0)}


#: ``{row method: structure}`` of the calibrated rows
CALIBRATED = {"calibrated": "mpo", "svd-calibrated": "svd"}
ROWS = ("dense", *(f"{m}@{s}" for s in SHARES
                   for m in ("mpo", "prune", "scratch", *CALIBRATED)))


def summarize(runs: list[dict[str, Any]]) -> Table:
    """Mean and spread (sample standard deviation, points) of every row over its seeds."""
    table = Table()
    for task, row, group in glue_small.seed_groups(runs, ROWS):
        bits = [r["bits_per_char"] for r in group if "bits_per_char" in r]
        table.append({
            "task": task, "row": row, "seeds": len(group), **glue_small.score(group),
            "before fine-tuning %": statistics.mean(100 * r["metric_before"] for r in group),
            "bits/char": statistics.mean(bits) if bits else float("nan"),
            "#LSTM": round(statistics.mean(r["lstm_weights"] for r in group)),
            "#LSTM/dense": statistics.mean(r["lstm_over_dense"] for r in group),
            "time s": statistics.mean(r["seconds"] for r in group)})
    return table


def findings(table: Table, runs: list[dict[str, Any]]) -> list[str]:
    """The claim per task and share: MPO beats magnitude pruning at equal parameters,
    compressed from the trained LSTM (``mpo``) or trained from scratch (``scratch``), on
    the seeds both rows have."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in table):
        rows = {r["row"]: r for r in table if r["task"] == task}
        for method, how in (("mpo", "compressed and fine-tuned"),
                            ("scratch", "trained from scratch"),
                            ("calibrated", "calibrated (mpotn), fine-tuned"),
                            ("svd-calibrated", "as calibrated SVDs (mpotn), fine-tuned")):
            for share in SHARES:
                both = glue_small.paired(runs, task, f"{method}@{share}", f"prune@{share}")
                if both is None:
                    continue
                a, b, seeds = both
                gap, _, verdict = glue_small._compare(a, b, 0.0)
                lines.append(
                    f"- {task}: an MPO-LSTM {how} beats magnitude pruning (fine-tuned) at "
                    f"{share} of the LSTM's weights ({method} {a['metric %']:.2f} with "
                    f"{rows[a['row']]['#LSTM']:,} weights vs prune {b['metric %']:.2f} with "
                    f"{rows[b['row']]['#LSTM']:,}, seeds {', '.join(map(str, seeds))}, gap "
                    f"{gap:+.2f} points): {verdict}.")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--row", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--seed", type=int, nargs="+", choices=SEEDS, default=list(SEEDS))
    parser.add_argument("--quick", action="store_true",
                        help="every row on the shipped SST-2 sample, tiny LSTMs, one seed")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    parser.add_argument("--work", type=Path, default=None,
                        help=f"where the trained dense models are kept (default {WORK})")
    parser.add_argument("--report-only", action="store_true",
                        help="print the table and verdicts from the JSON, train nothing")
    args = parser.parse_args(argv)
    if args.quick and args.out == RESULTS:
        parser.error("--quick needs its own --out: its runs are not the experiment's")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": []}
    done = {(r["task"], r["row"], r["seed"]) for r in results["runs"]}
    seeds = [0] if args.quick else args.seed
    todo = [(t, r, s) for s in seeds for t in args.task for r in args.row
            if (t, r, s) not in done]
    if todo and not args.report_only:
        if not args.quick and not GLUE.is_dir():
            parser.error(f"GLUE's files are not at {GLUE}; see ../shared/data/README")
        with tempfile.TemporaryDirectory() as scratch:  # the smoke run's dense models
            bench = Bench(args.quick, args.work or (Path(scratch) if args.quick else WORK))
            results.setdefault("tasks", {}).update({t: bench.settings(t) for t in args.task})
            for task, row, seed in todo:
                glue_small.store(results, run(bench, task, row, seed), args.out)
    with glue_small.merged_runs(results, args.out, ROWS) as runs:
        table = summarize(runs)
        print(glue_small.publish(args.out, results, table, findings(table, runs),
                                 "The MPO-LSTM claim, computed from the table by "
                                 "`benchmarks/mpo_lstm.py`"))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
