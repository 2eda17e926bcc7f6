"""GLUE tasks from the Hugging Face hub ([load_glue][mpotn.data.hub.load_glue])."""

from __future__ import annotations

import os
from typing import Any

from mpotn.data.glue_files import glue_task, load_glue_files
from mpotn.data.local import _dataset
from mpotn.data.tasks import GLUE_TASKS, TaskData

#: The hub's GLUE configuration of a task whose key is not one (MNLI-mm is MNLI's).
HUB_CONFIGS = {"mnlimm": "mnli"}


def load_glue(task: str, data_dir: str | os.PathLike | None = None,
              cache_dir: str | None = None) -> TaskData:
    """A GLUE task by name (``sst2``, ``mrpc``, ... or GLUE's ``SST-2``, ``MRPC``).

    Either way the splits are ``train`` and the dev set GLUE scores are
    reported on, with the hub's class ids and GLUE's metrics.

    Parameters
    ----------
    task:
        A key of [GLUE_TASKS][mpotn.data.tasks.GLUE_TASKS], or GLUE's folder name.
    data_dir:
        A folder in GLUE's ``glue_data/`` layout (``DIR/RTE/train.tsv``,
        ``DIR/RTE/dev.tsv``, ...), read by
        [load_glue_files][mpotn.data.glue_files.load_glue_files]; without it the task
        comes from the Hugging Face hub (a network, or the HF datasets cache).
    cache_dir:
        HF datasets cache folder, for the hub.

    Examples
    --------
    A folder in GLUE's layout (here one written on the spot, as GLUE ships RTE):

    >>> import tempfile, pathlib
    >>> glue = pathlib.Path(tempfile.mkdtemp())
    >>> (glue / "RTE").mkdir()
    >>> rows = ("index\\tsentence1\\tsentence2\\tlabel\\n"
    ...         "0\\tA cat sat.\\tA cat is sitting.\\tentailment\\n")
    >>> for split in ("train", "dev"):
    ...     _ = (glue / "RTE" / f"{split}.tsv").write_text(rows)
    >>> rte = load_glue("rte", data_dir=glue)
    >>> len(rte.train), rte.label_names, rte.spec.metrics
    (1, ['entailment', 'not_entailment'], ('accuracy',))
    """
    key = glue_task(task)
    if key is None:
        raise ValueError(f"unknown GLUE task {task!r}; choose from {sorted(GLUE_TASKS)}")
    if data_dir is not None:
        return load_glue_files(key, data_dir)
    task = key
    from datasets import load_dataset

    spec = GLUE_TASKS[task]
    try:
        raw = load_dataset("nyu-mll/glue", HUB_CONFIGS.get(task, task), cache_dir=cache_dir)
    except (ConnectionError, OSError, ValueError) as error:
        raise ValueError(
            f"could not load GLUE {task!r} from the hub ({error}); without a network, pass "
            "local files (load_local / --train-file, --eval-file) or a folder in GLUE's "
            "layout (load_glue(task, data_dir=...) / --data-dir)"
        ) from error

    def convert(split: Any) -> Any:
        columns = {"text": split[spec.text]}
        if spec.text_pair:
            columns["text_pair"] = split[spec.text_pair]
        columns["label"] = split[spec.label]
        return _dataset(columns)

    names = None if spec.regression else list(raw["train"].features[spec.label].names)
    return TaskData(spec, convert(raw["train"]), convert(raw[spec.eval_split]), names)
