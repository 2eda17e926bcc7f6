"""Reading compressed models and decompositions: inspection, comparison, fidelity, reports.

* [mpotn.analysis.inspection][] -- every matrix of a model as an MPO: bonds,
  entropies, errors at a budget (``mpotn inspect``);
* [mpotn.analysis.comparison][] -- error, FLOPs and time of every
  decomposition over a range of ratios (``mpotn compare``);
* [mpotn.analysis.fidelity][] -- sentence embeddings and their cosine
  fidelity after compression, and a causal language model's perplexity;
* [mpotn.analysis.reports][] -- the report files of a compression.

The drawing and table utilities they use ([mpotn.drawing][],
[mpotn.table][]) stay in the flat core, because [mpotn.mpo.MPO][] uses
them too.
"""

from mpotn.analysis.comparison import compare, draw_comparison, load_matrix
from mpotn.analysis.fidelity import (
    FidelityProbe,
    cosine_fidelity,
    is_causal_lm,
    perplexity,
    sentence_embeddings,
    sst2_dev,
)
from mpotn.analysis.inspection import Inspection, inspect_model
from mpotn.analysis.reports import report_table, write_compression_report

__all__ = [
    "FidelityProbe",
    "Inspection",
    "compare",
    "cosine_fidelity",
    "draw_comparison",
    "inspect_model",
    "is_causal_lm",
    "load_matrix",
    "perplexity",
    "report_table",
    "sentence_embeddings",
    "sst2_dev",
    "write_compression_report",
]
