"""Tasks and data for fine-tuning: GLUE by name, local files, and GLUE metrics.

A task is a [TaskSpec][mpotn.data.tasks.TaskSpec] (text columns, label column, classification or
regression, metrics) and its data a [TaskData][mpotn.data.tasks.TaskData] of ``datasets.Dataset``
splits with columns ``text``, optionally ``text_pair``, and ``label`` (class
ids, or floats for regression).

* [load_glue][mpotn.data.hub.load_glue] ([mpotn.data.hub][]) -- a GLUE task by name from the
  Hugging Face hub (users with a network; the HF cache otherwise), or with
  ``data_dir`` from a folder in GLUE's own ``glue_data/`` layout
  ([mpotn.data.glue_files][]: official files, headers and label strings).
* [load_local][mpotn.data.local.load_local] ([mpotn.data.local][]) -- TSV, CSV, JSON or JSON Lines
  files with a column mapping, with or without a header row; string labels are
  mapped to ids.
* [sst2_sample][mpotn.data.local.sst2_sample] ([mpotn.data.local][]) -- the SST-2 training sample
  and the official dev set shipped with mpotn, so that examples and tests run
  on a fresh machine.
* [texts][mpotn.data.texts.texts] ([mpotn.data.texts][]) -- unlabelled sentences for
  calibration and healing: the shipped SST-2 sample, a GLUE task's training
  texts or a text file, as a fixed seeded subset.
* [compute_metrics][mpotn.data.tasks.compute_metrics] ([mpotn.data.tasks][]) -- accuracy, F1,
  Matthews correlation, Pearson and Spearman correlation, as GLUE reports them.

Examples
--------
>>> data = sst2_sample()
>>> len(data.train), len(data.eval), data.label_names
(2000, 872, ['negative', 'positive'])
>>> compute_metrics(["accuracy", "f1"], [1, 0, 1, 1], [1, 0, 0, 1])
{'accuracy': 0.75, 'f1': 0.8}
>>> len(texts(samples=100))
100
"""

from mpotn.data.glue_files import GLUE_FILES, load_glue_files
from mpotn.data.hub import load_glue
from mpotn.data.local import RESOURCES, load_local, sst2_sample
from mpotn.data.tasks import GLUE_TASKS, METRICS, TaskData, TaskSpec, compute_metrics
from mpotn.data.texts import texts

__all__ = [
    "GLUE_FILES",
    "GLUE_TASKS",
    "METRICS",
    "RESOURCES",
    "TaskData",
    "TaskSpec",
    "compute_metrics",
    "load_glue",
    "load_glue_files",
    "load_local",
    "sst2_sample",
    "texts",
]
