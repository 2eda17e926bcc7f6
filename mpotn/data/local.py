"""Local task files: TSV, CSV, JSON or JSON Lines with a column mapping
([load_local][mpotn.data.local.load_local]), and the SST-2 sample shipped with mpotn
([sst2_sample][mpotn.data.local.sst2_sample]).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mpotn.data.tasks import TaskData, TaskSpec
from mpotn.types import METRICS

#: The data shipped in the package (``mpotn/resources``).
RESOURCES = Path(__file__).parents[1] / "resources"


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


def sst2_sample() -> TaskData:
    """The shipped SST-2 sample: 2,000 training phrases and the 872-sentence dev set."""
    data = load_local(RESOURCES / "sst2" / "dev.tsv", RESOURCES / "sst2" / "train_sample.tsv",
                      text="sentence", label="label")
    data.spec = TaskSpec("sst2", "sentence")
    data.label_names = ["negative", "positive"]
    return data
