"""Tasks and data for fine-tuning: GLUE by name, local files, and GLUE metrics.

A task is a :class:`TaskSpec` (text columns, label column, classification or
regression, metrics) and its data a :class:`TaskData` of ``datasets.Dataset``
splits with columns ``text``, optionally ``text_pair``, and ``label`` (class
ids, or floats for regression).

* :func:`load_glue` -- a GLUE task by name from the Hugging Face hub (users
  with a network; the HF cache otherwise).
* :func:`load_local` -- TSV, CSV, JSON or JSON Lines files with a column
  mapping, with or without a header row; string labels are mapped to ids.
* :func:`sst2_sample` -- the SST-2 training sample and the official dev set
  shipped with mpotn, so that examples and tests run on a fresh machine.
* :func:`compute_metrics` -- accuracy, F1, Matthews correlation, Pearson and
  Spearman correlation, as GLUE reports them.

Examples
--------
>>> data = sst2_sample()
>>> len(data.train), len(data.eval), data.label_names
(2000, 872, ['negative', 'positive'])
>>> compute_metrics(["accuracy", "f1"], [1, 0, 1, 1], [1, 0, 0, 1])
{'accuracy': 0.75, 'f1': 0.8}
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RESOURCES = Path(__file__).parent / "resources"
METRICS = ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr")


@dataclass(frozen=True)
class TaskSpec:
    """What a task's examples look like and how it is scored.

    Attributes
    ----------
    name:
        Task name (``sst2``, ``mrpc``, ... or a file's name).
    text, text_pair:
        Source column of the text, and of the second text for pair tasks.
    label:
        Source column of the label.
    regression:
        Whether labels are real numbers (STS-B) rather than classes.
    metrics:
        Metric names from :data:`METRICS`; the first is the headline metric.
    eval_split:
        The split evaluated on (GLUE tasks only).
    """

    name: str
    text: str
    text_pair: str | None = None
    label: str = "label"
    regression: bool = False
    metrics: tuple[str, ...] = ("accuracy",)
    eval_split: str = "validation"


#: The GLUE tasks, with the columns and metrics of the GLUE benchmark.
GLUE_TASKS = {
    "cola": TaskSpec("cola", "sentence", metrics=("matthews_correlation",)),
    "sst2": TaskSpec("sst2", "sentence"),
    "mrpc": TaskSpec("mrpc", "sentence1", "sentence2", metrics=("f1", "accuracy")),
    "qqp": TaskSpec("qqp", "question1", "question2", metrics=("f1", "accuracy")),
    "stsb": TaskSpec("stsb", "sentence1", "sentence2", regression=True,
                     metrics=("pearson", "spearmanr")),
    "mnli": TaskSpec("mnli", "premise", "hypothesis", eval_split="validation_matched"),
    "qnli": TaskSpec("qnli", "question", "sentence"),
    "rte": TaskSpec("rte", "sentence1", "sentence2"),
    "wnli": TaskSpec("wnli", "sentence1", "sentence2"),
}


@dataclass
class TaskData:
    """A task's splits, with columns ``text``, (``text_pair``,) ``label``.

    Attributes
    ----------
    spec:
        The task.
    train, eval:
        ``datasets.Dataset`` splits (``train`` may be ``None``).
    label_names:
        Class names by id; ``None`` for regression.
    """

    spec: TaskSpec
    train: Any
    eval: Any
    label_names: list[str] | None

    @property
    def num_labels(self) -> int:
        """Number of classes (1 for regression)."""
        return 1 if self.label_names is None else len(self.label_names)


def _read(path: str | os.PathLike, header: bool) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    head = 0 if header else None
    if suffix in (".tsv", ".csv"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", header=head,
                           quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL,
                           keep_default_na=False, dtype=str)
    if suffix in (".json", ".jsonl"):
        return pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
    raise ValueError(f"{path.name}: data files must be .tsv, .csv, .json or .jsonl")


def _column(frame: pd.DataFrame, name: str | int, path: str | os.PathLike) -> pd.Series:
    key = int(name) if isinstance(name, int) or str(name).isdigit() else name
    if key not in frame.columns:
        raise ValueError(
            f"{Path(path).name} has no column {name!r}; its columns are "
            f"{[str(c) for c in frame.columns]} (without a header row, name columns by "
            "position: 0, 1, ...)"
        )
    return frame[key]


def _labels(values: pd.Series, regression: bool, names: list[str] | None,
            path: str | os.PathLike) -> tuple[list, list[str] | None]:
    if regression:
        try:
            return [float(v) for v in values], None
        except ValueError as error:
            raise ValueError(f"{Path(path).name}: regression labels must be numbers: {error}") \
                from error
    text = [str(v).strip() for v in values]
    if names is None:
        if all(t.lstrip("-").isdigit() for t in text):
            top = max(int(t) for t in text)
            names = [str(k) for k in range(top + 1)]
        else:
            names = sorted(set(text))
    index = {name: k for k, name in enumerate(names)}
    unknown = sorted(set(text) - set(index))
    if unknown:
        raise ValueError(
            f"{Path(path).name} has labels {unknown[:10]} that the training data does not "
            f"have; known labels: {names}"
        )
    return [index[t] for t in text], names


def _dataset(columns: dict[str, list]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict(columns)


def load_local(
    eval_file: str | os.PathLike,
    train_file: str | os.PathLike | None = None,
    *,
    text: str | int = "sentence",
    text_pair: str | int | None = None,
    label: str | int = "label",
    header: bool = True,
    regression: bool = False,
    metrics: Sequence[str] | None = None,
    label_names: Sequence[str] | None = None,
) -> TaskData:
    """A task from local files.

    Parameters
    ----------
    eval_file, train_file:
        ``.tsv``, ``.csv``, ``.json`` (records) or ``.jsonl`` files.
    text, text_pair, label:
        Column names, or 0-based positions for files without a header row.
    header:
        Whether TSV/CSV files start with a header row.
    regression:
        Real-valued labels.
    metrics:
        Metric names (default: accuracy, or Pearson/Spearman for regression).
    label_names:
        Class names by id; by default the sorted distinct labels of the
        training file (integer labels ``0..K-1`` keep their ids).

    Raises
    ------
    ValueError
        For a missing file or column (listing the columns there are), an
        unsupported format, or evaluation labels the training data lacks.
    """
    metrics = tuple(metrics or (("pearson", "spearmanr") if regression else ("accuracy",)))
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    spec = TaskSpec(Path(eval_file).stem, str(text), None if text_pair is None else str(text_pair),
                    str(label), regression, metrics)
    names = list(label_names) if label_names is not None else None
    splits = {}
    for split, path in (("train", train_file), ("eval", eval_file)):
        if path is None:
            splits[split] = None
            continue
        frame = _read(path, header)
        columns = {"text": [str(v) for v in _column(frame, text, path)]}
        if text_pair is not None:
            columns["text_pair"] = [str(v) for v in _column(frame, text_pair, path)]
        columns["label"], names = _labels(_column(frame, label, path), regression, names, path)
        splits[split] = _dataset(columns)
    return TaskData(spec, splits["train"], splits["eval"], names)


def load_glue(task: str, cache_dir: str | None = None) -> TaskData:
    """A GLUE task by name (``sst2``, ``mrpc``, ...) from the Hugging Face hub.

    Needs a network, or the task in the local HF datasets cache.
    """
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; choose from {sorted(GLUE_TASKS)}")
    from datasets import load_dataset

    spec = GLUE_TASKS[task]
    try:
        raw = load_dataset("nyu-mll/glue", task, cache_dir=cache_dir)
    except (ConnectionError, OSError, ValueError) as error:
        raise ValueError(
            f"could not load GLUE {task!r} from the hub ({error}); without a network, pass "
            "local files (load_local / --train-file, --eval-file)"
        ) from error

    def convert(split: Any) -> Any:
        columns = {"text": split[spec.text]}
        if spec.text_pair:
            columns["text_pair"] = split[spec.text_pair]
        columns["label"] = split[spec.label]
        return _dataset(columns)

    names = None if spec.regression else list(raw["train"].features[spec.label].names)
    return TaskData(spec, convert(raw["train"]), convert(raw[spec.eval_split]), names)


def sst2_sample() -> TaskData:
    """The shipped SST-2 sample: 2,000 training phrases and the 872-sentence dev set."""
    data = load_local(RESOURCES / "sst2" / "dev.tsv", RESOURCES / "sst2" / "train_sample.tsv",
                      text="sentence", label="label")
    data.spec = TaskSpec("sst2", "sentence")
    data.label_names = ["negative", "positive"]
    return data


def compute_metrics(
    names: Sequence[str], predictions: Sequence[float], labels: Sequence[float]
) -> dict[str, float]:
    """GLUE metrics of predictions (class ids, or real values for regression).

    Examples
    --------
    >>> compute_metrics(["pearson"], [1.0, 2.0, 3.0], [2.0, 4.0, 6.5])["pearson"] > 0.99
    True
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.shape[0]} predictions for {labels.shape[0]} labels")
    scores = {}
    for name in names:
        if name == "accuracy":
            scores[name] = float((predictions == labels).mean())
        elif name == "f1":
            scores[name] = float(f1_score(labels, predictions))
        elif name == "matthews_correlation":
            scores[name] = float(matthews_corrcoef(labels, predictions))
        elif name == "pearson":
            scores[name] = float(pearsonr(predictions, labels)[0])
        elif name == "spearmanr":
            scores[name] = float(spearmanr(predictions, labels)[0])
        else:
            raise ValueError(f"unknown metric {name!r}; choose from {METRICS}")
    return scores
