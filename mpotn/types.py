"""Every allowed-value type of mpotn and its tuple of values, in one place.

Each ``Literal`` alias sits beside the tuple its runtime checks use; the
modules that take such a value import both from here, and the command line
reads its ``choices=`` from here (so building the parser needs nothing
heavier than this module). The last section holds the few defaults the
command line shows in its help text, for the same reason.

Examples
--------
>>> SVD_METHODS
('auto', 'full', 'randomized')
>>> "lfa" in STRATEGIES
True
"""

from __future__ import annotations

from typing import Literal

# -- core ---------------------------------------------------------------------

#: SVD flavours of [mpotn.linalg.truncated_svd][].
SVDMethod = Literal["auto", "full", "randomized"]
#: The values of ``SVDMethod``, for runtime checks and ``choices=``.
SVD_METHODS = ("auto", "full", "randomized")

#: How [mpotn.contraction.Contractor][] applies an MPO.
ContractionMethod = Literal["auto", "contract", "rebuild"]
#: The values of ``ContractionMethod``, for runtime checks and ``choices=``.
CONTRACTION_METHODS = ("auto", "contract", "rebuild")

#: Which side of the matrix an input is contracted with.
Side = Literal["rows", "cols"]
#: The values of ``Side``, for runtime checks and ``choices=``.
SIDES = ("rows", "cols")

#: How layers store their cores (see [mpotn.mpo.MPO.gauge_cores][]).
Gauge = Literal["central", "left"]
#: The values of ``Gauge``, for runtime checks and ``choices=``.
GAUGES = ("central", "left")

#: How a parameter budget is spread over bonds (see [mpotn.mpo.MPO.truncate][]).
Allocation = Literal["optimal", "uniform"]
#: The values of ``Allocation``, for runtime checks and ``choices=``.
ALLOCATIONS = ("optimal", "uniform")

#: What healing trains ([mpotn.finetune.heal][]): the LFA parameter set, or every parameter.
HealTrain = Literal["auxiliary", "all"]
#: The values of ``HealTrain``, for runtime checks and ``choices=``.
HEAL_TRAIN = ("auxiliary", "all")

# -- compression and data -----------------------------------------------------

#: Matrix structures of [mpotn.compression.config.CompressionConfig][]:
#: ``mpo`` (the configured ``n`` and factorization), ``svd`` (the truncated SVD:
#: ``n = 2``, rows ``(I, 1)``, columns ``(1, J)``), ``auto`` (per matrix, whichever
#: of the two has the lower (calibrated) error at its parameter count).
Structure = Literal["mpo", "svd", "auto"]
#: The values of ``Structure``, for runtime checks and ``choices=``.
STRUCTURES = ("mpo", "svd", "auto")

#: How a ratio or parameter budget is spent: the same share of every matrix,
#: or one budget for all target matrices together (SPEC §7).
Budget = Literal["matrix", "model"]
#: The values of ``Budget``, for runtime checks and ``choices=``.
BUDGETS = ("matrix", "model")

#: How an MPO with ``n > 2`` balanced factors is fitted to calibration data:
#: ``als`` (plain truncation, then alternating least squares on Eq. 7) or
#: ``whiten`` (Kronecker-factored whitening of the row legs).
Fit = Literal["als", "whiten"]
#: The values of ``Fit``, for runtime checks and ``choices=``.
FITS = ("als", "whiten")

#: How [factorize_pruned][mpotn.compression.lpaf.factorize_pruned] fits a pruned matrix's
#: truncated SVD: whitened by its inputs (SVD-LLM), plain, or to its kept entries only.
FACTORIZE_FITS = ("whitened", "plain", "sparsity-aware")

#: How [share_centrals][mpotn.compression.sharing.share_centrals] initialises a shared
#: central tensor: fitted to every layer of its group (ALS) or taken from the first.
SHARE_INITS = ("fit", "layer")

#: Target presets of [mpotn.compression.config.CompressionConfig][].
Preset = Literal["embeddings", "attention", "ffn", "all-linear"]
#: The values of ``Preset``, for runtime checks and ``choices=``.
PRESETS = ("embeddings", "attention", "ffn", "all-linear")

#: Task metrics of [mpotn.data.tasks.compute_metrics][].
Metric = Literal["accuracy", "f1", "matthews_correlation", "pearson", "spearmanr"]
#: The values of ``Metric``, for runtime checks and ``choices=``.
METRICS = ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr")

# -- fine-tuning --------------------------------------------------------------

#: Fine-tuning strategies of [mpotn.finetune.strategies.apply_strategy][].
Strategy = Literal["full", "lfa", "central", "last-k", "lora"]
#: The values of ``Strategy``, for runtime checks and ``choices=``.
STRATEGIES = ("full", "lfa", "central", "last-k", "lora")

#: Scores a squeeze run watches ([mpotn.finetune.squeeze.SqueezeConfig][]).
Monitor = Literal["metric", "loss"]
#: The values of ``Monitor``, for runtime checks and ``choices=``.
MONITORS = ("metric", "loss")

#: Error estimates a squeeze run ranks cuts by.
ErrorKind = Literal["relative", "absolute"]
#: The values of ``ErrorKind``, for runtime checks and ``choices=``.
ERRORS = ("relative", "absolute")

# -- defaults the command line shows ------------------------------------------

#: Default budget of the inspection report: a quarter of each matrix's entries.
DEFAULT_RATIO = 0.25

#: Learning rates that work for each strategy on MiniLM-sized models: whole
#: matrices move slowly, small adapter-like tensors and a fresh head need more.
DEFAULT_LR = {"full": 5e-5, "lfa": 5e-4, "central": 5e-4, "last-k": 1e-4, "lora": 1e-3}

#: The ``lfa`` default for a model whose MPO layers all have two cores (truncated SVDs,
#: ``structure="svd"``, what ``mpotn compress`` makes by default): the auxiliary tensor is
#: then the orthonormal ``V^T`` (entries about ``1/sqrt(J)``), which 5e-4 moves by about
#: 1% per Adam step. Measured on MiniLM, SST-2, 0.65 of the dense size: 5e-4 ended at the
#: majority-class score after 625 steps, 5e-5 reached 83.37 (benchmarks/glue_small.py).
LFA_LR_TWO_CORE = 5e-5

#: Matrices decomposed for ``lfa`` / ``central`` unless told otherwise: attention
#: and FFN (not the pooler or the head). The paper also decomposes the word
#: embedding; add ``word_embeddings`` to do so, at a cost: its full-rank MPO
#: (30522 x 384, central tensor of 11.8M entries) must be contracted for every
#: batch once its auxiliary tensors train, which doubles a MiniLM training step.
DEFAULT_TARGETS = ("attention", "ffn")

#: The paper's Fig. 2 line-up compared by [mpotn.analysis.comparison.compare][]:
#: ``(label, method, options)``. ``SVD`` is the ``svd`` method (the two-core MPO with
#: rows ``(I, 1)`` and columns ``(1, J)``); ``MPO n=2 (Kronecker)`` is the two-core MPO
#: with balanced factors, a sum of Kronecker products.
COMPARE_METHODS: list[tuple[str, str, dict[str, object]]] = [
    ("SVD", "svd", {}),
    ("MPO n=2 (Kronecker)", "mpo", {"n": 2}),
    ("MPO n=3", "mpo", {"n": 3}),
    ("MPO n=5", "mpo", {"n": 5}),
    ("MPO n=7", "mpo", {"n": 7}),
    ("TT n=3", "tt", {"n": 3}),
    ("Tucker n=3", "tucker", {"n": 3}),
    ("CP n=3", "cp", {"n": 3, "iterations": 10}),
]
#: Compression ratios the comparison runs at.
COMPARE_RATIOS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)

#: Calibration sentences by default (``mpotn compress --samples``, ``mpotn finetune
#: --calibration-samples``, [texts][mpotn.data.texts.texts]): a few hundred, as SVD-LLM uses.
CALIBRATION_SAMPLES = 256
