"""Unlabelled sentences for calibration and healing ([texts][mpotn.data.texts.texts]).

Calibration (the input second moments of each matrix) and healing (distilling
the original model into the compressed one) need task text but no labels.
[texts][mpotn.data.texts.texts] gathers it from the SST-2 sample shipped with mpotn, a GLUE task
(the hub, or a local folder in GLUE's layout) or a text file with one sentence
per line, and keeps a fixed, seeded subset.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mpotn.data.glue_files import glue_task
from mpotn.data.hub import load_glue
from mpotn.data.local import read_text, sst2_sample
from mpotn.data.tasks import TaskData
from mpotn.types import CALIBRATION_SAMPLES


def _task_texts(data) -> list[str]:
    """Training texts of a task; a pair's first and second text each count as a sentence."""
    first = list(data.train["text"])
    if "text_pair" not in data.train.column_names:
        return first
    second = list(data.train["text_pair"])
    return [text for pair in zip(first, second) for text in pair]


def _file_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(
            f"text file {path} does not exist; pass a GLUE task name "
            "(sst2, rte, ...) or a .txt file with one sentence per line"
        )
    return [line.strip() for line in read_text(path).splitlines()]


def texts(
    source: str | os.PathLike | TaskData | None = None,
    samples: int | None = CALIBRATION_SAMPLES,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> list[str]:
    """Unlabelled sentences, for calibration and healing.

    Parameters
    ----------
    source:
        ``None`` for the training sentences of the SST-2 sample shipped with
        mpotn (2,000 phrases); a GLUE task name (``"rte"``, ``"sst2"``, or
        GLUE's folder spelling ``"SST-2"``) for that task's training texts,
        read by [load_glue][mpotn.data.hub.load_glue] (from ``data_dir`` when given,
        else from the hub), where a pair task gives its first and second text
        each as a sentence; a loaded task ([TaskData][mpotn.data.tasks.TaskData]) for
        its training texts, pairs likewise; or a path to a text file with one
        sentence per line (blank lines are skipped).
    samples:
        Keep a random subset of this many sentences when there are more, in
        their original order; ``None`` keeps all of them.
    data_dir:
        Folder in GLUE's ``glue_data/`` layout, for a GLUE task name.
    seed:
        Seed of the random subset: the same seed gives the same sentences.

    Returns
    -------
    list of str
        Non-empty sentences, in the order of the source.

    Raises
    ------
    ValueError
        For ``samples < 1``, a missing or empty text file, and the errors of
        [load_glue][mpotn.data.hub.load_glue].

    Examples
    --------
    >>> sentences = texts(samples=4)
    >>> len(sentences), len(texts(samples=None))
    (4, 2000)
    >>> sentences == texts(samples=4) and sentences != texts(samples=4, seed=1)
    True
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "calibration.txt"
    >>> _ = path.write_text("a first sentence .\\n\\nand a second one .\\n")
    >>> texts(path)
    ['a first sentence .', 'and a second one .']
    """
    if samples is not None and (isinstance(samples, bool) or int(samples) != samples
                                or samples < 1):
        raise ValueError(f"samples must be a whole number of at least 1 (or None for all), "
                         f"not {samples!r}")
    if source is None:
        found = list(sst2_sample().train["text"])
        origin = "the shipped SST-2 sample"
    elif isinstance(source, TaskData):
        if source.train is None:
            raise ValueError(f"task {source.spec.name!r} has no training split to take "
                             "sentences from")
        found = _task_texts(source)
        origin = f"the {source.spec.name!r} training data"
    elif isinstance(source, str) and glue_task(source) is not None and not Path(source).is_file():
        found = _task_texts(load_glue(glue_task(source), data_dir=data_dir))
        origin = f"GLUE {glue_task(source)!r} training data"
    else:
        found = _file_texts(Path(source))
        origin = str(source)
    found = [text.strip() for text in found if text and text.strip()]
    if not found:
        raise ValueError(f"{origin} holds no sentences; a text file needs one sentence per line")
    if samples is None or len(found) <= samples:
        return found
    keep = np.random.default_rng(seed).choice(len(found), size=int(samples), replace=False)
    return [found[k] for k in sorted(keep)]
