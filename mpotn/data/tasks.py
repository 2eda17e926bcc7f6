"""Task specs and metrics: [TaskSpec][mpotn.data.tasks.TaskSpec],
[TaskData][mpotn.data.tasks.TaskData], the GLUE tasks and
[compute_metrics][mpotn.data.tasks.compute_metrics] (accuracy, F1, Matthews correlation, Pearson and
Spearman correlation, as GLUE reports them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpotn.types import METRICS


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
        Metric names from [METRICS][mpotn.types.METRICS]; the first is the headline metric.
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
    # MNLI scored on its mismatched dev set (GLUE's MNLI-mm): the same training data
    "mnlimm": TaskSpec("mnlimm", "premise", "hypothesis", eval_split="validation_mismatched"),
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
