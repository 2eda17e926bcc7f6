"""Local task files: TSV, CSV, JSON or JSON Lines with a column mapping
([load_local][mpotn.data.local.load_local]), and the SST-2 sample shipped with mpotn
([sst2_sample][mpotn.data.local.sst2_sample]).
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mpotn.data.tasks import TaskData, TaskSpec
from mpotn.types import METRICS

#: The data shipped in the package (``mpotn/resources``).
RESOURCES = Path(__file__).parents[1] / "resources"


#: Label-column names that mark a first row as a header (see ``header=False``).
HEADER_WORDS = ("label", "labels", "class", "category", "target", "score", "gold_label", "y")
#: Label names shown at most in an error message.
SHOWN_LABELS = 20


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of a data file (a byte-order mark is dropped).

    Raises
    ------
    ValueError
        For a missing file, a folder, or a byte that is not UTF-8 (naming the
        file, the line and the byte).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a data file; give the file inside it")
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path}, line {line}: byte 0x{data[error.start]:02x} is not UTF-8; "
                         "save the file as UTF-8") from None


def _table(path: Path, text: str, header: bool) -> pd.DataFrame:
    """Rows of a TSV (quote characters are text) or CSV file; every row has the first's fields."""
    tsv = path.suffix.lower() == ".tsv"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    rows = []
    for row in reader:
        if row:  # blank lines are skipped
            rows.append((reader.line_num, row))
    if not rows:
        raise ValueError(f"{path} is empty; it needs {'a header row and ' if header else ''}"
                         "one example per line")
    width = len(rows[0][1])
    for line, row in rows:
        if len(row) != width:
            hint = ("a tab inside a text field?" if tsv else
                    "quote fields that contain commas")
            raise ValueError(f"{path}, line {line}: {len(row)} fields, but the first row has "
                             f"{width} ({hint}); every row needs the same columns")
    if not header:
        return pd.DataFrame([row for _, row in rows], dtype=str)
    names = rows[0][1]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{path}: the header names {twice} more than once; name each "
                         "column once")
    if len(rows) == 1:
        raise ValueError(f"{path} has a header row but no examples")
    return pd.DataFrame([row for _, row in rows[1:]], columns=names, dtype=str)


def _read(path: str | os.PathLike, header: bool) -> pd.DataFrame:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".csv", ".json", ".jsonl"):
        raise ValueError(f"{path.name}: data files must be .tsv, .csv, .json or .jsonl")
    text = read_text(path)
    if suffix in (".tsv", ".csv"):
        return _table(path, text, header)
    if not text.strip():
        form = "one JSON object per line" if suffix == ".jsonl" else "a JSON list of records"
        raise ValueError(f"{path} is empty; it needs {form}")
    try:
        frame = pd.read_json(io.StringIO(text), lines=suffix == ".jsonl", dtype=False)
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON{' Lines' if suffix == '.jsonl' else ''} "
                         f"({error}); write a list of records, or one object per line in "
                         ".jsonl") from None
    if frame.empty:
        raise ValueError(f"{path} holds no examples")
    return frame


def _column(frame: pd.DataFrame, name: str | int, path: str | os.PathLike) -> pd.Series:
    key = int(name) if isinstance(name, int) or str(name).isdigit() else name
    if key not in frame.columns:
        raise ValueError(
            f"{Path(path).name} has no column {name!r}; its columns are "
            f"{[str(c) for c in frame.columns]} (without a header row, name columns by "
            "position: 0, 1, ...)"
        )
    return frame[key]


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _shown(names: Sequence[str]) -> str:
    """At most [SHOWN_LABELS][mpotn.data.local.SHOWN_LABELS] names, each cut to 40 characters."""
    cut = [n if len(n) <= 40 else n[:37] + "..." for n in names[:SHOWN_LABELS]]
    more = len(names) - SHOWN_LABELS
    return f"{cut}" + (f" and {more} more ({len(names)} in all)" if more > 0 else "")


def _check_no_header(labels: list[str], regression: bool, path: str | os.PathLike) -> None:
    """Refuse a first row that looks like a header when the file is read without one."""
    first, rest = labels[0], labels[1:]
    typed = _is_number if regression else _is_int
    header = (rest and all(typed(t) for t in rest) and not typed(first)) or (
        first.lower() in HEADER_WORDS and first not in rest)
    if header:
        raise ValueError(
            f"{Path(path).name}: its first row looks like a header (label {first!r}), but "
            "the file is read without one (--no-header / header=False) and that row would be "
            "an example; drop --no-header (header=True) and name the columns by that header, "
            "or delete the row")


def _labels(values: pd.Series, regression: bool, names: list[str] | None,
            path: str | os.PathLike, given: bool) -> tuple[list, list[str] | None]:
    """Label values as ids (classes: the ``names`` given, else the labels that occur, ordered:
    numerically when all are integers), or floats for regression."""
    text = [str(v).strip() for v in values]
    if regression:
        bad = [t for t in text if not _is_number(t)]
        if bad:
            raise ValueError(f"{Path(path).name}: regression labels must be numbers (finite), "
                             f"got {_shown(sorted(set(bad)))}")
        return [float(t) for t in text], None
    if "" in text:
        raise ValueError(f"{Path(path).name}, example {text.index('') + 1}: the label is empty; "
                         "every example needs a label")
    if all(_is_int(t) for t in text):
        text = [str(int(t)) for t in text]
    if names is None:
        found = set(text)
        names = ([str(k) for k in sorted(int(t) for t in found)]
                 if all(_is_int(t) for t in found) else sorted(found))
        if len(names) < 2:
            raise ValueError(f"{Path(path).name} has one class only ({_shown(names)}): a "
                             "classifier needs examples of at least two (or pass --regression "
                             "/ regression=True for real-valued labels)")
    index = {name: k for k, name in enumerate(names)}
    unknown = sorted(set(text) - set(index))
    if unknown:
        where = "label_names" if given else "the training data"
        hint = (" (real-valued labels? pass --regression / regression=True)"
                if all(_is_number(t) for t in unknown) and not all(_is_int(t) for t in unknown)
                else "")
        raise ValueError(f"{Path(path).name} has labels {_shown(unknown)} that {where} does "
                         f"not have; known labels: {_shown(names)}{hint}")
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
        Whether TSV/CSV files start with a header row. Without one, a first
        row that looks like a header (a word label above numeric ones, or a
        label such as ``label`` that occurs nowhere else) is an error.
    regression:
        Real-valued labels.
    metrics:
        Metric names (default: accuracy, or Pearson/Spearman for regression).
    label_names:
        Class names by id; by default the labels that occur in the training
        file (the evaluation file without one), ordered: numerically when all
        are integers (labels ``1..4`` are the classes ``0..3`` named
        ``"1"..."4"``; ``0..K-1`` keep their ids), else as strings.

    Raises
    ------
    ValueError
        Naming the file (and line) for a missing file or column (listing the
        columns there are), a folder, an unsupported format, a file with no
        examples, a byte that is not UTF-8, a row with more or fewer fields
        than the first, a header read as an example, an empty label, or labels
        the training data (or ``label_names``) lacks (at most
        [SHOWN_LABELS][mpotn.data.local.SHOWN_LABELS] of them listed).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "reviews.csv").write_text("sentence,label\\ngreat film,pos\\ndull,neg\\n")
    >>> task = load_local(folder / "reviews.csv", folder / "reviews.csv")
    >>> task.label_names, list(task.eval["label"]), task.spec.metrics
    (['neg', 'pos'], [1, 0], ('accuracy',))
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
        labels = _column(frame, label, path)
        if not header:
            _check_no_header([str(v).strip() for v in labels], regression, path)
        columns = {"text": [str(v) for v in _column(frame, text, path)]}
        if text_pair is not None:
            columns["text_pair"] = [str(v) for v in _column(frame, text_pair, path)]
        columns["label"], names = _labels(labels, regression, names, path,
                                          label_names is not None)
        splits[split] = _dataset(columns)
    _check_metrics(metrics, regression, names)
    return TaskData(spec, splits["train"], splits["eval"], names)


def _check_metrics(metrics: Sequence[str], regression: bool, names: list[str] | None) -> None:
    """Refuse metrics the task cannot be scored by, before any training: correlations of
    classes or class metrics of real values, and F1 (of class 1) unless there are two."""
    correlations = ("pearson", "spearmanr")
    wrong = [m for m in metrics if (m in correlations) != regression]
    if wrong:
        kind, usable = (("regression", "pearson, spearmanr") if regression else
                        ("classification", "accuracy, f1 or matthews_correlation"))
        raise ValueError(f"metrics {wrong} do not score a {kind} task; use {usable}")
    if "f1" in metrics and names is not None and len(names) != 2:
        raise ValueError(f"f1 scores class 1 of two classes, and the task has {len(names)} "
                         f"({_shown(names)}); use accuracy or matthews_correlation")


def sst2_sample() -> TaskData:
    """The shipped SST-2 sample: 2,000 training phrases and the 872-sentence dev set."""
    data = load_local(RESOURCES / "sst2" / "dev.tsv", RESOURCES / "sst2" / "train_sample.tsv",
                      text="sentence", label="label")
    data.spec = TaskSpec("sst2", "sentence")
    data.label_names = ["negative", "positive"]
    return data
