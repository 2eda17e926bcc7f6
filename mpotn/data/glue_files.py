"""GLUE tasks from a local folder in GLUE's own ``glue_data/`` layout
([load_glue_files][mpotn.data.glue_files.load_glue_files]; [load_glue][mpotn.data.hub.load_glue]
with ``data_dir``).

The folder holds one subfolder per task, spelled as GLUE spells it (``CoLA``,
``SST-2``, ``MRPC``, ``QQP``, ``STS-B``, ``MNLI``, ``QNLI``, ``RTE``,
``WNLI``), each with ``train.tsv`` and ``dev.tsv`` (MNLI: ``dev_matched.tsv``),
tab-separated with GLUE's own headers (CoLA has none; MRPC's files start with a
UTF-8 byte-order mark). Quote characters are literal text, as in GLUE's own
readers. Class ids follow the label names of the hub's ``ClassLabel`` features
(RTE: ``entailment`` = 0, ``not_entailment`` = 1), so a model trained from the
files and one trained from the hub agree; specs and metrics are
[GLUE_TASKS][mpotn.data.tasks.GLUE_TASKS]'.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from mpotn.data.local import _dataset, read_text
from mpotn.data.tasks import GLUE_TASKS, TaskData


@dataclass(frozen=True)
class GlueFiles:
    """Where a GLUE task's data lives in ``glue_data/`` and how its files are laid out.

    Attributes
    ----------
    folder:
        Task folder, as GLUE spells it.
    header:
        The header row GLUE writes (``None``: no header row; columns are then
        addressed by position).
    text, text_pair, label:
        Column names (or 0-based positions without a header) of the texts and
        the label.
    label_names:
        Class names by id, as the hub's ``ClassLabel`` names them; ``None`` for
        regression.
    dev:
        File name of the evaluation split.
    """

    folder: str
    header: tuple[str, ...] | None
    text: str | int
    text_pair: str | int | None
    label: str | int
    label_names: tuple[str, ...] | None
    dev: str = "dev.tsv"


_MNLI_TRAIN = ("index", "promptID", "pairID", "genre", "sentence1_binary_parse",
               "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
               "sentence2", "label1", "gold_label")

#: The nine GLUE tasks' files (MNLI twice: its matched and mismatched dev sets), keyed like
#: [GLUE_TASKS][mpotn.data.tasks.GLUE_TASKS].
GLUE_FILES = {
    "cola": GlueFiles("CoLA", None, 3, None, 1, ("unacceptable", "acceptable")),
    "sst2": GlueFiles("SST-2", ("sentence", "label"), "sentence", None, "label",
                      ("negative", "positive")),
    "mrpc": GlueFiles("MRPC", ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
                      "#1 String", "#2 String", "Quality", ("not_equivalent", "equivalent")),
    "qqp": GlueFiles("QQP", ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
                     "question1", "question2", "is_duplicate", ("not_duplicate", "duplicate")),
    "stsb": GlueFiles("STS-B", ("index", "genre", "filename", "year", "old_index", "source1",
                                "source2", "sentence1", "sentence2", "score"),
                      "sentence1", "sentence2", "score", None),
    "mnli": GlueFiles("MNLI", _MNLI_TRAIN, "sentence1", "sentence2", "gold_label",
                      ("entailment", "neutral", "contradiction"), dev="dev_matched.tsv"),
    "mnlimm": GlueFiles("MNLI", _MNLI_TRAIN, "sentence1", "sentence2", "gold_label",
                        ("entailment", "neutral", "contradiction"), dev="dev_mismatched.tsv"),
    "qnli": GlueFiles("QNLI", ("index", "question", "sentence", "label"), "question",
                      "sentence", "label", ("entailment", "not_entailment")),
    "rte": GlueFiles("RTE", ("index", "sentence1", "sentence2", "label"), "sentence1",
                     "sentence2", "label", ("entailment", "not_entailment")),
    "wnli": GlueFiles("WNLI", ("index", "sentence1", "sentence2", "label"), "sentence1",
                      "sentence2", "label", ("not_entailment", "entailment")),
}


def glue_task(name: str) -> str | None:
    """The [GLUE_TASKS][mpotn.data.tasks.GLUE_TASKS] key of a task name, or ``None``.

    Accepts the keys (``sst2``) and GLUE's folder spellings (``SST-2``), in any case, and
    MNLI's dev sets by name (``mnli-m``, ``mnli_matched``; ``mnli-mm``,
    ``mnli_mismatched``).

    Examples
    --------
    >>> glue_task("SST-2"), glue_task("sts-b"), glue_task("RTE"), glue_task("sst3")
    ('sst2', 'stsb', 'rte', None)
    >>> glue_task("MNLI-mm"), glue_task("mnli_mismatched"), glue_task("mnli-m")
    ('mnlimm', 'mnlimm', 'mnli')
    """
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    key = {"mnlim": "mnli", "mnlimatched": "mnli", "mnlimismatched": "mnlimm"}.get(key, key)
    return key if key in GLUE_FILES else None


def _layout(files: GlueFiles) -> str:
    """GLUE's columns of a task, for error messages."""
    if files.header is None:
        return (f"GLUE's {files.folder} files have no header row and the columns source, "
                "label, original mark, sentence")
    return f"GLUE's {files.folder} files have the header {', '.join(files.header)}"


def _label(value: str, files: GlueFiles, path: Path, line: int) -> int | float:
    value = value.strip()
    names = files.label_names
    if names is None:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{path}, line {line}: score {value!r} is not a number; "
                             f"{_layout(files)} with a real-valued score") from None
    if value in names:
        return names.index(value)
    if value.isdigit() and int(value) < len(names):  # ids, as GLUE writes 0/1 labels
        return int(value)
    allowed = " / ".join(names) if files.folder in ("MNLI", "QNLI", "RTE") else \
        f"0..{len(names) - 1}"
    raise ValueError(f"{path}, line {line}: label {value!r} is not one of {allowed}; "
                     f"fix the row or use GLUE's own {files.folder} files")


def _read_split(path: Path, files: GlueFiles) -> tuple[dict[str, list], int]:
    """The columns ``text`` (``text_pair``) ``label`` of one file, and how many rows were short."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist; GLUE's {files.folder} folder holds "
                         f"train.tsv and {files.dev} (download GLUE, or omit data_dir to use "
                         "the hub)")
    # read_text drops MRPC's byte-order mark; QUOTE_NONE keeps GLUE's quote characters as text
    rows = [row for row in csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t",
                                      quoting=csv.QUOTE_NONE) if row]
    start = 0 if files.header is None else 1
    if len(rows) <= start:
        raise ValueError(f"{path} is empty (no {'' if start == 0 else 'data '}rows); "
                         f"{_layout(files)}, one example per line")
    wanted = [c for c in (files.text, files.text_pair, files.label) if c is not None]
    if files.header is None:
        positions = wanted
        if len(rows[0]) <= max(positions):
            raise ValueError(f"{path} has {len(rows[0])} columns in its first row, not 4; "
                             f"{_layout(files)}")
    else:
        header = [name.strip() for name in rows[0]]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise ValueError(f"{path} has no column {missing[0]!r}; its header is "
                             f"{', '.join(header)}; {_layout(files)}")
        positions = [header.index(c) for c in wanted]
    width = max(positions) + 1
    columns: dict[str, list] = {"text": []}
    if files.text_pair is not None:
        columns["text_pair"] = []
    columns["label"] = []
    short = 0
    for line, row in enumerate(rows[start:], start=start + 1):
        if len(row) < width:  # a corrupted row; GLUE's own readers drop these too
            short += 1
            continue
        values = [row[k] for k in positions]
        columns["text"].append(values[0])
        if files.text_pair is not None:
            columns["text_pair"].append(values[1])
        columns["label"].append(_label(values[-1], files, path, line))
    if not columns["label"]:
        raise ValueError(f"{path} holds no complete rows; {_layout(files)}")
    return columns, short


def load_glue_files(task: str, data_dir: str | os.PathLike) -> TaskData:
    """A GLUE task read from a folder in GLUE's ``glue_data/`` layout.

    Parameters
    ----------
    task:
        A key of [GLUE_TASKS][mpotn.data.tasks.GLUE_TASKS] or GLUE's folder name (``RTE``).
    data_dir:
        The ``glue_data`` folder (holding ``RTE/train.tsv``, ...); the task's
        own folder (``glue_data/RTE``) is accepted too.

    Returns
    -------
    TaskData
        Splits ``train`` (``train.tsv``) and ``eval`` (``dev.tsv``, MNLI:
        ``dev_matched.tsv``, MNLI-mm: ``dev_mismatched.tsv``), with the hub's label names
        and GLUE's metrics.
        Rows with fewer fields than the header are dropped with a warning, as
        GLUE's own readers drop them.

    Raises
    ------
    ValueError
        For an unknown task, a missing folder or file, a missing column, an
        empty file or a label the task does not have, naming the file.
    """
    key = glue_task(task)
    if key is None:
        raise ValueError(f"unknown GLUE task {task!r}; choose from {sorted(GLUE_TASKS)}")
    files = GLUE_FILES[key]
    root = Path(data_dir)
    folder = root / files.folder
    if not folder.is_dir() and root.name.lower() == files.folder.lower() and root.is_dir():
        folder = root
    if not folder.is_dir():
        raise ValueError(f"no folder {folder}: data_dir must be a folder in GLUE's glue_data/ "
                         f"layout, holding {files.folder}/train.tsv and {files.folder}/"
                         f"{files.dev} (or omit data_dir to use the hub)")
    splits = {}
    for split, name in (("train", "train.tsv"), ("eval", files.dev)):
        columns, short = _read_split(folder / name, files)
        if short:
            warnings.warn(f"{folder / name}: dropped {short} rows with too few columns",
                          stacklevel=2)
        splits[split] = _dataset(columns)
    names = None if files.label_names is None else list(files.label_names)
    return TaskData(GLUE_TASKS[key], splits["train"], splits["eval"], names)
