"""Tasks and data for fine-tuning: GLUE by name, local files, and GLUE metrics.

A task is a :class:`TaskSpec` (text columns, label column, classification or
regression, metrics) and its data a :class:`TaskData` of ``datasets.Dataset``
splits with columns ``text``, optionally ``text_pair``, and ``label`` (class
ids, or floats for regression).

* :func:`load_glue` (:mod:`mpotn.data.hub`) -- a GLUE task by name from the
  Hugging Face hub (users with a network; the HF cache otherwise).
* :func:`load_local` (:mod:`mpotn.data.local`) -- TSV, CSV, JSON or JSON Lines
  files with a column mapping, with or without a header row; string labels are
  mapped to ids.
* :func:`sst2_sample` (:mod:`mpotn.data.local`) -- the SST-2 training sample
  and the official dev set shipped with mpotn, so that examples and tests run
  on a fresh machine.
* :func:`compute_metrics` (:mod:`mpotn.data.tasks`) -- accuracy, F1, Matthews
  correlation, Pearson and Spearman correlation, as GLUE reports them.

Examples
--------
>>> data = sst2_sample()
>>> len(data.train), len(data.eval), data.label_names
(2000, 872, ['negative', 'positive'])
>>> compute_metrics(["accuracy", "f1"], [1, 0, 1, 1], [1, 0, 0, 1])
{'accuracy': 0.75, 'f1': 0.8}
"""

from mpotn.data.hub import load_glue
from mpotn.data.local import RESOURCES, load_local, sst2_sample
from mpotn.data.tasks import GLUE_TASKS, METRICS, TaskData, TaskSpec, compute_metrics

__all__ = [
    "GLUE_TASKS",
    "METRICS",
    "RESOURCES",
    "TaskData",
    "TaskSpec",
    "compute_metrics",
    "load_glue",
    "load_local",
    "sst2_sample",
]
