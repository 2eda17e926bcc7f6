"""GLUE tasks from the Hugging Face hub (:func:`load_glue`)."""

from __future__ import annotations

from typing import Any

from mpotn.data.local import _dataset
from mpotn.data.tasks import GLUE_TASKS, TaskData


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
