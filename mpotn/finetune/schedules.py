"""Per-step schedules run by the ``Trainer``: one callback for all of them.

[GradualPruning][mpotn.finetune.pruning.GradualPruning] and
[MixedRank][mpotn.finetune.mixed_rank.MixedRank] change the model before each
optimizer step, from the step number and the run's length alone (so that a resumed run
repeats them); [step_callback][mpotn.finetune.schedules.step_callback] calls their
``step`` from the ``Trainer``.

Examples
--------
>>> seen = []
>>> callback = step_callback(lambda step, total: seen.append((step, total)))
>>> class State:
...     global_step, max_steps = 3, 10
>>> callback.on_step_begin(None, State(), None)
>>> seen
[(3, 10)]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def step_callback(step: Callable[[int, int], Any]) -> Any:
    """A ``transformers.TrainerCallback`` that calls ``step(global_step, max_steps)``
    before every optimizer step."""
    from transformers import TrainerCallback

    class _StepCallback(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step(state.global_step, state.max_steps)

    return _StepCallback()
