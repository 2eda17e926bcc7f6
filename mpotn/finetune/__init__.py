"""Fine-tuning compressed models: strategies, the Trainer wrapper, squeezing, healing.

* [mpotn.finetune.strategies][] -- which parameters each strategy trains;
* [mpotn.finetune.training][] -- [finetune][mpotn.finetune.training.finetune] with the transformers
  ``Trainer``;
* [mpotn.finetune.squeeze][] -- Algorithm 2 ([Squeezer][mpotn.finetune.squeeze.Squeezer]) and the
  direct ablation;
* [mpotn.finetune.heal][] -- healing: distilling the original model into the compressed one
  on unlabelled text;
* [mpotn.finetune.pruning][] -- gradual pruning while fine-tuning, by movement or magnitude
  (LPAF's first stage);
* [mpotn.finetune.mixed_rank][] -- mixed-rank fine-tuning of a factorized model (LPAF's
  third stage);
* [mpotn.finetune.core_changes][] -- how far training moved central and auxiliary tensors.

``mpotn.finetune.squeeze`` as an attribute is the function; import from the
module with ``from mpotn.finetune.squeeze import ...``.
"""

from mpotn.finetune.core_changes import core_changes, snapshot_cores
from mpotn.finetune.mixed_rank import MixedRank
from mpotn.finetune.pruning import GradualPruning
from mpotn.finetune.squeeze import (
    SqueezeConfig,
    Squeezer,
    SqueezeResult,
    direct_truncation,
    squeeze,
)
from mpotn.finetune.strategies import apply_strategy, optimizer_groups
from mpotn.finetune.training import (
    FinetuneResult,
    TrainingConfig,
    evaluate_task,
    finetune,
    prepare_model,
    write_run,
)

__all__ = [
    "FinetuneResult",
    "GradualPruning",
    "MixedRank",
    "SqueezeConfig",
    "SqueezeResult",
    "Squeezer",
    "TrainingConfig",
    "apply_strategy",
    "core_changes",
    "direct_truncation",
    "evaluate_task",
    "finetune",
    "optimizer_groups",
    "prepare_model",
    "snapshot_cores",
    "squeeze",
    "write_run",
]
