"""LPAF's second stage: factorize a pruned model's matrices with the sparsity-aware SVD.

After first-order pruning ([GradualPruning][mpotn.finetune.pruning.GradualPruning]) a
matrix ``A`` holds zeros where its entries were judged unimportant.
[factorize_pruned][mpotn.compression.lpaf.factorize_pruned] gives each selected
matrix the truncated SVD of ``ratio`` of its dense size (the ``svd`` structure of
[compress][mpotn.compression.compress.compress]: rows ``(I, 1)``, columns ``(1, J)``,
one bond of rank ``r``, ``r (I + J) <= ratio * I J``), and fits its factors to the kept
entries only ([sparsity_aware_svd][mpotn.linalg.sparsity_aware_svd]): the rank-``r``
``L`` minimising ``||M ⊙ (A - L)||`` with ``M = (A != 0)``. ``L`` is written into the
layer and [compress][mpotn.compression.compress.compress] cuts it at the same ratio, so
the MPO layer holds ``L`` exactly and the model is an ordinary
[MPOModel][mpotn.compression.model.MPOModel]: LFA, squeezing, saves and the rest apply.

Each report row tells the truth about the pruned matrix, not ``L``:
``relative_error`` is ``||A - L|| / ||A||``, ``kept_error`` the same on the kept
entries only, ``plain_kept_error`` what the plain truncated SVD of ``A`` leaves there,
``sparsity`` the share of zeros in ``A``, and ``calibration`` says
``"sparsity-aware"`` (``"none"`` when no fill ran: the plain truncated SVD).

Examples
--------
>>> import torch
>>> from transformers import BertConfig, BertModel
>>> _ = torch.manual_seed(0)
>>> bert = BertModel(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1,
...                             num_attention_heads=2, intermediate_size=64))
>>> with torch.no_grad():  # prune half of every FFN entry (smallest magnitudes)
...     for m in (bert.encoder.layer[0].intermediate.dense, bert.encoder.layer[0].output.dense):
...         m.weight[m.weight.abs() < m.weight.abs().median()] = 0
>>> model, pruned = factorize_pruned(bert, 0.3, targets=["ffn"], progress=False)
>>> [(r["bond_dims"], r["kept_error"] < r["plain_kept_error"]) for r in model.report()]
[('6', True), ('6', True)]
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from mpotn.compression.architectures import is_conv1d, is_linear, linear_matrix
from mpotn.compression.compress import compress
from mpotn.compression.config import CompressionConfig, select_targets
from mpotn.compression.model import MPOModel
from mpotn.linalg import sparsity_aware_svd


def factorize_pruned(
    model: nn.Module,
    ratio: float,
    targets: str | Sequence[str] = ("attention", "ffn"),
    exclude: str | Sequence[str] | None = None,
    *,
    iterations: int = 50,
    rtol: float = 1e-4,
    progress: bool = True,
) -> tuple[MPOModel, dict[str, torch.Tensor]]:
    """Each selected linear matrix as a truncated SVD fitted to its kept entries.

    Parameters
    ----------
    model:
        The pruned model (its pruned entries are exact zeros), changed in place.
    ratio:
        Parameters of each factorized matrix over its dense size.
    targets, exclude:
        Which matrices, as in [CompressionConfig][mpotn.compression.config.CompressionConfig];
        ``nn.Linear`` and Conv1D only.
    iterations, rtol:
        Of [sparsity_aware_svd][mpotn.linalg.sparsity_aware_svd]; ``iterations=0`` gives
        the plain truncated SVD of the pruned matrix.
    progress:
        Show [compress][mpotn.compression.compress.compress]'s progress bar.

    Returns
    -------
    model, pruned
        The compressed model, and each matrix's pruned weight as it was (``nn.Linear``
        orientation, ``out x in``), for
        [MixedRank][mpotn.finetune.mixed_rank.MixedRank] fine-tuning.

    Raises
    ------
    ValueError
        When ``ratio`` is not in ``(0, 1)`` or the targets select no linear matrix.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio is each factorized matrix's share of its dense size, in "
                         f"(0, 1); got {ratio}")
    config = CompressionConfig(targets=list(targets) if not isinstance(targets, str)
                               else targets, exclude=exclude)
    linears = [(n, m) for n, m in select_targets(model, config) if is_linear(m) or is_conv1d(m)]
    if not linears:
        raise ValueError(f"targets {targets!r} select no nn.Linear or Conv1D matrix")
    pruned, errors = {}, {}
    for name, module in linears:
        matrix = linear_matrix(module).double()  # in x out, the paper's orientation
        mask = matrix != 0
        cut, fills = sparsity_aware_svd(matrix, mask, svd_rank(*matrix.shape, ratio),
                                        iterations, rtol)
        fitted = (cut.U * cut.S) @ cut.Vh
        pruned[name] = module.weight.detach().clone() if is_linear(module) else \
            module.weight.detach().T.clone()
        norm = float(matrix.norm()) or 1.0
        errors[name] = {
            "relative_error": float((matrix - fitted).norm()) / norm,
            "kept_error": fills[-1] / norm,
            "plain_kept_error": fills[0] / norm,  # the plain truncated SVD's
            "sparsity": float((~mask).double().mean()),
            "calibration": "sparsity-aware" if len(fills) > 1 else "none",
        }
        with torch.no_grad():
            module.weight.copy_(fitted.T if is_linear(module) else fitted)
    exact = "|".join(re.escape(name) for name, _ in linears)  # these matrices, no others
    compressed = compress(model, targets=exact, structure="svd", ratio=ratio,
                          progress=progress)
    for record in compressed.records:
        record.update(errors[record["name"]])
    return compressed, pruned


def svd_rank(rows: int, cols: int, ratio: float) -> int:
    """The rank [compress][mpotn.compression.compress.compress] gives an ``svd``-structure
    matrix at ``ratio``: the largest ``r`` with ``r (I + J) <= int(ratio * I * J)``, at
    least 1 (``compress`` cuts an unreachable ratio to bonds of 1 and warns).

    Examples
    --------
    >>> svd_rank(384, 1536, 0.25), svd_rank(8, 8, 0.01)
    (76, 1)
    """
    return max(1, int(ratio * rows * cols) // (rows + cols))
