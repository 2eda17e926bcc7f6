"""Compressing a model: replace its weight matrices by MPO layers (SPEC §1-2).

[plan][mpotn.compression.compress.plan] is the dry run and
[compress][mpotn.compression.compress.compress] the replacement; what to replace, and with which
settings, is a [CompressionConfig][mpotn.compression.config.CompressionConfig] (targets by preset,
suffix or regular expression, as PEFT chooses them). A module shared by
several parents (ALBERT's layer group, T5's ``shared`` embedding) is decomposed
once and stays shared; an output layer tied to a compressed embedding (GPT-2's
``lm_head``) becomes a [TiedMPOLinear][mpotn.layers.mpo.TiedMPOLinear] that reads
the embedding's cores.

Examples
--------
>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
>>> compressed = compress(model, targets=["0", "2"], n=3, ratio=0.5, progress=False)
>>> [r["name"] for r in compressed.report()]
['0', '2']
>>> compressed.totals()["total_params"] < compressed.totals()["original_params"]
True
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mpotn.budget import Path, mpo_path, spend, spend_keeping_dense
from mpotn.calibration import (
    Whitening,
    compensated_matrix,
    output_error,
    output_spectra_mpo,
    paired_output_error,
    refine,
    whitened_decomposition,
)
from mpotn.compression.architectures import (
    as_linear,
    is_conv1d,
    layer_index,
    linear_matrix,
    matrix_type,
)
from mpotn.compression.calibrate import (
    PairedCalibration,
    UnpairedInputsError,
    calibrate,
    calibrate_paired,
)
from mpotn.compression.config import (
    COMPRESSED_LAYERS,
    CompressionConfig,
    replace_module,
    select_targets,
    tied_modules,
)
from mpotn.compression.hf_ties import keep_surviving_ties, tied_keys
from mpotn.compression.model import MPOModel
from mpotn.compression.parameters import count_parameters
from mpotn.compression.sensitivity import OutputSensitivity
from mpotn.layers import (
    FactorizedEmbedding,
    FactorizedLinear,
    MPOEmbedding,
    MPOLinear,
    TiedMPOLinear,
)
from mpotn.methods import decompose, svd_shapes
from mpotn.mpo import MPO, _compute_dtype, bond_entropy
from mpotn.table import Table
from mpotn.truncation import TruncationPolicy, ratio_params


def _matrix(module: nn.Module) -> torch.Tensor:
    return module.weight.detach() if isinstance(module, nn.Embedding) else linear_matrix(module)


def _as_linears(model: nn.Module, selected: list[tuple[str, nn.Module]]
                ) -> list[tuple[str, nn.Module]]:
    """``selected`` with every ``Conv1D`` replaced, in ``model`` too, by the equal
    ``nn.Linear`` (a module shared by several parents stays shared)."""
    out = []
    for name, module in selected:
        if is_conv1d(module):
            module = as_linear(module)
            replace_module(model, name, module)
        out.append((name, module))
    return out


def _factorized(name: str, module: nn.Module, matrix: torch.Tensor, settings: dict[str, Any]
                ) -> tuple[nn.Module, dict[str, Any]]:
    """A non-MPO layer for one target (``settings["method"]``) and its report row."""
    network = decompose(matrix, settings["method"], n=settings["n"], ratio=settings["ratio"])
    if isinstance(module, nn.Embedding):
        layer = FactorizedEmbedding(network, module.padding_idx)
    else:
        layer = FactorizedLinear(network, bias=module.bias is not None)
        if module.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(module.bias)
    ranks = network.details.get("ranks", [network.details.get("rank")])
    return layer, {
        "name": name,
        "type": matrix_type(name),
        "layer": layer_index(name),
        "method": network.method,
        "shape": f"{matrix.shape[0]}x{matrix.shape[1]}",
        "factorization": " x ".join("·".join(map(str, f.factors))
                                    for f in (network.row, network.col)),
        "bond_dims": ",".join(map(str, ranks)),
        "params": network.num_params,
        "original_params": matrix.numel(),
        "ratio": network.params_ratio,
        "central_entropy": float("nan"),
        "relative_bound": float("nan"),
        "relative_error": layer.network().relative_error_to(matrix),  # of the layer built
        "tied": "",  # only MPO embeddings keep their output layers tied
    }


def plan(model: nn.Module, config: CompressionConfig | None = None, **kwargs: Any) -> Table:
    """The dry run: what [compress][mpotn.compression.compress.compress] would replace, with sizes,
    changing nothing: each target's ``structure`` (``mpo``, ``svd``, ``auto``, or another
    method's name), its ``n`` (2 for the SVD's two cores) and its policy. Under
    ``budget="model"`` every target's policy is its share of the one budget (a target's
    own policy override does not apply)."""
    config = config or CompressionConfig(**kwargs)
    shared = None if config.budget != "model" else (  # whatever a target overrides
        "share of one model budget ("
        + (f"params={config.params}" if config.params is not None else f"ratio={config.ratio}")
        + " of all targets)")
    rows = Table()
    for name, module in select_targets(model, config):
        settings = config.settings_for(name, module)
        matrix = _matrix(module)
        structure = settings["structure"] if settings["method"] == "mpo" else settings["method"]
        rows.append({
            "name": name,
            "module": type(module).__name__,
            "type": matrix_type(name),
            "shape": f"{matrix.shape[0]}x{matrix.shape[1]}",
            "params": matrix.numel(),
            "structure": structure,
            "n": 2 if structure == "svd" else settings["n"],
            "policy": shared or TruncationPolicy.from_settings(settings).describe(),
        })
    return rows


@dataclass
class _Candidate:
    """One structure for one target: the MPO whose spectra drive its truncation."""

    structure: str  # "mpo" (the configured factorization) or "svd" (rows (I, 1), cols (1, J))
    full: MPO  # of M, or of the whitened L^T M when ``whitening`` is set
    whitening: Whitening | None = None

    def truncated(self, policy: TruncationPolicy, target: _Target) -> tuple[MPO, MPO]:
        """``(MPO of M before any ALS sweep, the truncation its spectra read)`` under
        ``policy``."""
        cut = self.full.truncate_to(policy)
        if self.whitening is not None:
            return self.whitening.restore(cut, tuple(target.matrix.shape),
                                          _compute_dtype(target.matrix)), cut
        return cut, cut

    def finish(self, policy: TruncationPolicy, target: _Target) -> tuple[MPO, MPO]:
        """``(MPO of M, the truncation its spectra read)`` under ``policy``."""
        mpo, cut = self.truncated(policy, target)
        if self.refines(target):
            covariance = target.covariance
            if covariance.dim() == 1:  # token counts: a token the text never used keeps a
                # damped weight, as whitening gives it (at 0 the sweeps could move its row
                # anywhere)
                covariance = covariance + target.settings["damp"] * covariance.mean()
            mpo = refine(cut, target.goal, covariance, sweeps=target.settings["sweeps"])
        return mpo, cut

    def refines(self, target: _Target) -> bool:
        """Whether the truncation is then refined by ALS sweeps on Eq. 7 (a calibrated
        balanced MPO with ``fit="als"``)."""
        return (self.whitening is None and target.covariance is not None
                and target.settings["fit"] == "als")


@dataclass
class _Target:
    name: str
    module: nn.Module
    matrix: torch.Tensor
    settings: dict[str, Any]
    covariance: torch.Tensor | None = None
    paired: PairedCalibration | None = None  # sequential: this model's and the original's inputs
    compensated: torch.Tensor | None = None  # M* of the paired inputs
    sensitivity: OutputSensitivity | None = None  # weighs its error in a model budget

    @property
    def goal(self) -> torch.Tensor:
        """The matrix the fit approximates: ``M``, or ``M*`` when paired (Eq. 7')."""
        return self.matrix if self.compensated is None else self.compensated

    def pair(self, paired: PairedCalibration) -> None:
        """Fit from now on to the original's outputs from the inputs of ``paired``."""
        self.paired, self.covariance = paired, paired.covariance
        self.compensated = compensated_matrix(self.matrix, paired.covariance, paired.cross,
                                              damp=self.settings["damp"]).to(self.matrix.dtype)

    def weight_error(self, mpo: MPO) -> float:
        """``||M - MPO|| / ||M||``."""
        return mpo.reconstruction_error(self.matrix) / (float(self.matrix.double().norm()) or 1.0)

    def error(self, mpo: MPO) -> float:
        """Relative output error (Eq. 7) with a covariance, relative weight error without."""
        if self.covariance is None:
            return self.weight_error(mpo)
        if self.paired is not None:
            return paired_output_error(self.matrix, mpo.to_matrix(), self.paired.covariance,
                                       self.paired.cross, self.paired.reference)
        return output_error(self.matrix, mpo.to_matrix(), self.covariance)


def _whitens(settings: Mapping[str, Any], structure: str) -> bool:
    """Whether a calibrated target of ``settings`` is fitted in ``structure`` by whitening
    (its spectra are then those of the whitened matrix): always for the SVD, for a
    balanced MPO with ``fit="whiten"``."""
    return structure == "svd" or settings["fit"] == "whiten"


def _candidate(target: _Target, structure: str) -> _Candidate:
    settings, matrix = target.settings, target.goal
    if structure == "svd":
        n, row_shape, col_shape = svd_shapes(*matrix.shape)
    else:
        n, row_shape, col_shape = settings["n"], settings["row_shape"], settings["col_shape"]
    if target.covariance is not None and _whitens(settings, structure):
        full, whitening = whitened_decomposition(  # truncated and restored when chosen
            matrix, target.covariance, n, row_shape, col_shape, pad=settings["pad"],
            damp=settings["damp"], svd=settings["svd"])
        return _Candidate(structure, full, whitening)
    return _Candidate(structure, MPO.from_matrix(matrix, n, row_shape, col_shape,
                                                 pad=settings["pad"], svd=settings["svd"]))


def _structures(structure: str) -> tuple[str, ...]:
    return ("svd", "mpo") if structure == "auto" else (structure,)


def _policies(targets: list[_Target], candidates: dict[str, list[_Candidate]],
              config: CompressionConfig
              ) -> tuple[dict[str, TruncationPolicy | None], list[str]]:
    """The truncation policy of each target (its own settings, or its share of one
    budget), and the targets floored at bonds of 1
    ([_warn_floored][mpotn.compression.compress._warn_floored] names them).

    With ``structure="auto"`` and a budget per matrix, a structure whose every bond at 1
    is still above the target's parameters is dropped from its ``candidates``; with none
    left the target keeps the smaller structure and is cut to bonds of 1, like a target
    of one structure. Under ``budget="model"`` the policies come from the first
    structure's spectra (which the share can reach) and ``_replace`` drops the others
    a share cannot reach."""
    if config.budget == "model":  # _replace drops the structures a share cannot reach
        return _model_budget([_budget_path(t, candidates[t.name][0]) for t in targets],
                             {t.name: t.matrix.numel() for t in targets}, config), []
    policies, floored = {}, []
    for t in targets:
        settings = t.settings
        if settings["structure"] == "auto":  # equal parameter counts for both structures
            params = settings["params"] or ratio_params(settings["ratio"], t.matrix.numel())
            if _drop_unreachable(candidates[t.name], params):
                policies[t.name] = TruncationPolicy(params=params,
                                                    allocation=settings["allocation"])
            else:
                policies[t.name] = TruncationPolicy(max_bond=1)
                floored.append(t.name)
        elif ((settings["ratio"] is not None
               and settings["ratio"] < candidates[t.name][0].full.smallest_ratio)
              or (settings["params"] is not None
                  and settings["params"] < candidates[t.name][0].full.smallest_params)):
            policies[t.name] = TruncationPolicy(max_bond=1)
            floored.append(t.name)
        else:
            policies[t.name] = TruncationPolicy.from_settings(settings)
    return policies, floored


def _drop_unreachable(candidates: list[_Candidate], params: int) -> bool:
    """Keep in ``candidates`` the structures whose every bond at 1 is within ``params``,
    and say whether any is; with none, keep the smallest alone."""
    reachable = [c for c in candidates if c.full.smallest_params <= params]
    candidates[:] = reachable or [min(candidates, key=lambda c: c.full.smallest_params)]
    return bool(reachable)


def _keep_reachable(candidates: list[_Candidate], policy: TruncationPolicy) -> None:
    """Drop from several ``candidates`` the structures ``policy``'s parameters cannot reach
    (``_drop_unreachable``)."""
    if policy.params is not None and len(candidates) > 1:
        _drop_unreachable(candidates, policy.params)


def _warn_uncalibrated_in_budget(names: list[str]) -> None:
    """Name the targets one calibrated model budget weighs by their weight errors."""
    if names:
        warnings.warn(
            f"budget='model' weighs the calibrated matrices' output errors against the weight "
            f"errors of {len(names)} uncalibrated ones ({', '.join(names[:3])}"
            f"{' ...' if len(names) > 3 else ''}), which can then take most of the cut "
            "(MiniLM at 0.75 with ALS fits: mean cosine 0.60, against 0.83 with them "
            "calibrated): "
            "pass calibrate_embeddings=True (--calibrate-embeddings)", stacklevel=4)


def _warn_floored(floored: list[str], stacklevel: int) -> None:
    """Name the targets that cannot reach their ratio or parameters (``stacklevel``: the
    user's call)."""
    if floored:
        warnings.warn(
            f"{len(floored)} matrices cannot reach their ratio (or params) even with every "
            "bond at 1 and "
            f"are cut to bonds of 1 instead: {', '.join(floored[:5])}"
            f"{' ...' if len(floored) > 5 else ''} (the report shows their ratios; exclude them "
            "or use budget='model' to spend the same total elsewhere)", stacklevel=stacklevel)


#: The relative error (Eq. 7, or of the weights without calibration) of the truncation
#: a matrix's sensitivity is measured with: its path's first cut that reaches it.
PROBE_ERROR = 0.1


def _budget_path(t: _Target, candidate: _Candidate) -> Path:
    """What one model-wide budget reads of ``t`` (``candidate``: its first structure's):
    the cuts of its weights' spectra without calibration, of its whitened matrix's with
    it, so that every calibrated target's costs are relative output errors: a whitened
    candidate's own spectra, or, for an ALS fit (whose candidate holds the weights'), those
    of [output_spectra_mpo][mpotn.calibration.output_spectra_mpo] in its factorization.
    With a ``t.sensitivity``, every cost is weighted by the sensitivity measured with the
    path's truncation at [PROBE_ERROR][mpotn.compression.compress.PROBE_ERROR] (before
    any ALS sweep)."""
    full = candidate.full
    if t.covariance is not None and candidate.whitening is None:
        settings = t.settings
        full = output_spectra_mpo(t.goal, t.covariance, len(full.row_shape), full.row_shape,
                                  full.col_shape, pad=settings["pad"], damp=settings["damp"],
                                  svd=settings["svd"])
    path = mpo_path(t.name, full)
    if t.sensitivity is None or not path.steps:
        return path
    probe = TruncationPolicy(params=path.params_after(path.cuts_reaching(PROBE_ERROR**2)))
    mpo = candidate.truncated(probe, t)[0]
    return path.weighted(t.sensitivity.sensitivity(t.name, t.module, mpo.to_matrix(),
                                                   t.error(mpo)))


def _model_budget(paths: list[Path], sizes: Mapping[str, int], config: CompressionConfig
                  ) -> dict[str, TruncationPolicy | None]:
    """``budget="model"``: one budget (``params``, or ``ratio`` of the targets' summed
    ``sizes``) spent over every target's ``paths``, as each target's policy; with
    ``keep_dense``, ``None`` for a target that stays dense
    ([spend_keeping_dense][mpotn.budget.spend_keeping_dense])."""
    budget = (config.params if config.params is not None
              else ratio_params(config.ratio, sum(sizes.values())))
    if not config.keep_dense:
        cuts = spend(paths, budget)
        return {p.name: TruncationPolicy(params=p.params_after(cuts[p.name])) for p in paths}
    kept = spend_keeping_dense(paths, sizes, budget)
    return {p.name: None if kept[p.name] is None
            else TruncationPolicy(params=p.params_after(kept[p.name])) for p in paths}


def _dense_record(name: str, matrix: torch.Tensor, calibrated: bool) -> dict[str, Any]:
    """The report row of a target ``keep_dense`` leaves as it is."""
    rows, cols = matrix.shape
    return {
        "name": name, "type": matrix_type(name), "layer": layer_index(name),
        "shape": f"{rows}x{cols}", "structure": "dense", "factorization": "",
        "bond_dims": "", "full_bond_dims": "", "params": rows * cols,
        "original_params": rows * cols, "ratio": 1.0, "central_entropy": float("nan"),
        "relative_bound": 0.0, "relative_error": 0.0,
        "calibration": "dense" if calibrated else "none",
        "output_error": 0.0 if calibrated else None, "tied": "",
    }


def _record(target: _Target, candidate: _Candidate, mpo: MPO, cut: MPO, layer: nn.Module,
            error: float, tied: list[str]) -> dict[str, Any]:
    matrix, full = target.matrix, candidate.full
    whitened = candidate.whitening is not None
    fitted_other = whitened or target.paired is not None  # full is not the MPO of M
    refined = candidate.refines(target)  # the layer is not the truncation Eq. 4 bounds
    if target.covariance is None:
        calibration = "none"
    else:
        calibration = "whitened" if whitened else target.settings["fit"]
        calibration += ", sequential" if target.paired is not None else ""
    return {
        "name": target.name,
        "type": matrix_type(target.name),
        "layer": layer_index(target.name),
        "shape": f"{matrix.shape[0]}x{matrix.shape[1]}",
        "structure": candidate.structure,
        "factorization": " x ".join("·".join(map(str, s))
                                    for s in (full.row_shape, full.col_shape)),
        "bond_dims": ",".join(map(str, layer.bond_dims[1:-1])),
        "full_bond_dims": ",".join(map(str, full.full_bond_dims[1:-1])),
        "params": sum(c.numel() for c in layer.cores),
        "original_params": matrix.numel(),
        "ratio": layer.compression_ratio,
        # Eq. 6 of M: a whitened (or compensated) fit's own spectra are not M's
        "central_entropy": (full.entropy(full.central_bond) if not fitted_other
                            else bond_entropy(target.matrix, full.row, full.col,
                                              full.central_bond)),
        # Eq. 4 bounds the weight error of the truncation of the matrix fitted: not M's
        # when that was M*, not the layer's after ALS sweeps
        "relative_bound": (None if fitted_other or refined
                           else cut.error_bound / (full.norm or 1.0)),
        "relative_error": error if target.covariance is None else target.weight_error(mpo),
        "calibration": calibration,
        "output_error": error if target.covariance is not None else None,
        # SPEC §7: how much of C its nearest Kronecker product keeps (Kronecker whitening)
        "kronecker_kept": (candidate.whitening.kept
                           if whitened and candidate.structure == "mpo" else None),
        "tied": ",".join(tied),
    }


def _replace(model: nn.Module, t: _Target, candidates: list[_Candidate],
             policy: TruncationPolicy) -> dict[str, Any]:
    """Truncate ``t`` (the candidate with the lowest error among the structures
    ``policy``'s parameters can reach: a model budget reads the first structure's path,
    which is reachable), put its layer in ``model`` (and in every module tied to it) and
    return its report row."""
    _keep_reachable(candidates, policy)
    options = []
    for candidate in candidates:
        mpo, cut = candidate.finish(policy, t)
        options.append((t.error(mpo), len(options), candidate, mpo, cut))
    error, _, candidate, mpo, cut = min(options)
    build = MPOEmbedding.from_embedding if isinstance(t.module, nn.Embedding) else (
        MPOLinear.from_linear)
    layer = build(t.module, mpo=mpo, gauge=t.settings["gauge"])
    tied = tied_modules(model, t.module) if isinstance(t.module, nn.Embedding) else []
    replace_module(model, t.name, layer)
    for other_name, other in tied:  # tied embeddings share the layer, heads read it
        replace_module(model, other_name, layer if isinstance(other, nn.Embedding) else
                       TiedMPOLinear.from_linear(other, layer, t.name))
    return _record(t, candidate, mpo, cut, layer, error, tied=[name for name, _ in tied])


def _input_groups(targets: list[_Target]) -> list[list[_Target]]:
    """``targets`` (in the order the model runs them) in groups of consecutive
    matrices with one input (equal covariances: a query, key and value)."""
    groups: list[list[_Target]] = []
    for t in targets:
        last = groups[-1][-1] if groups else None
        if (last is not None and t.covariance is not None and last.covariance is not None
                and t.covariance.shape == last.covariance.shape
                and torch.equal(t.covariance, last.covariance)):
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def _put(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _put_back(model: nn.Module, paths: Mapping[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """Put the modules ``paths`` names back in ``model``; return ``(path, module)`` for
    each module this took out."""
    current = dict(model.named_modules(remove_duplicate=False))
    changed = [(path, current[path]) for path, module in paths.items()
               if path in current and current[path] is not module]
    for path, _ in changed:
        _put(model, path, paths[path])
    return changed


@contextmanager
def _original_modules(model: nn.Module, paths: Mapping[str, nn.Module]) -> Iterator[None]:
    """Put the modules ``paths`` names back in ``model`` while the context is open."""
    changed = _put_back(model, paths)
    try:
        yield
    finally:
        for path, module in changed:
            _put(model, path, module)


#: Calibration rows per input below which a matrix is not fitted sequentially: on
#: MiniLM at 0.75 of its size, 256 SST-2 sentences (2 tokens per input of its widest
#: matrix) fitted sequentially lower the mean cosine from 0.891 to 0.872, 2,000
#: (17 per input) raise it from 0.902 to 0.917 (``benchmarks/fidelity_calibrated.py``).
SEQUENTIAL_TOKENS_PER_INPUT = 10


def _unseen_positions_counted(name: str, covariance: torch.Tensor) -> torch.Tensor:
    """A position embedding's counts (its diagonal ``C``) with every position after the
    last the calibration text reached counted as often as the rarest it reached: longer
    inputs reach them, and at a count of 0 only the damping would keep them (MiniLM at
    0.75, calibrated on SST-2 sentences that reach 66 of 512 positions: the RTE dev
    sentences longer than 70 tokens keep a mean cosine of 0.9553 so, 0.9542 without).
    Positions before the first reached stay at 0 (RoBERTa's start at ``padding_idx + 1``).
    Any other covariance is returned as it is."""
    seen = covariance > 0
    if matrix_type(name) != "position_emb" or covariance.dim() != 1 or not seen.any():
        return covariance
    after = torch.arange(covariance.numel(), device=covariance.device) > seen.nonzero().max()
    return torch.where(after, covariance[seen].min(), covariance)


def _enough_rows(t: _Target, tokens: Mapping[str, int]) -> bool:
    return tokens[t.name] >= SEQUENTIAL_TOKENS_PER_INPUT * t.matrix.shape[0]


def _fit_for_rows(name: str, module: nn.Module, settings: dict[str, Any], rows: int | None,
                  inputs: int, refitted: list[str]) -> dict[str, Any]:
    """``settings`` with ``fit="whiten"`` in place of ``"als"`` when the calibration gave a
    linear layer fewer rows than it has inputs (``C`` singular: ALS would fit those rows,
    not the layer; on 40 rows of 64 inputs its held-out output error rose to 0.95 from
    the unrefined 0.87), naming the target in ``refitted``. An embedding's ``C`` counts
    tokens (its vocabulary is always larger than the text): it keeps ALS. An SVD is
    always whitened, never fitted by ALS: its settings stay."""
    if (settings["fit"] == "als" and "mpo" in _structures(settings["structure"])
            and rows is not None and rows < inputs and not isinstance(module, nn.Embedding)):
        refitted.append(name)
        return {**settings, "fit": "whiten"}
    return settings


def _warn_refitted(names: list[str], stacklevel: int) -> None:
    if names:
        warnings.warn(
            f"{len(names)} matrices saw fewer calibration rows than they have inputs, so "
            f"they are fitted by whitening instead of ALS (which would fit those rows, not "
            f"the layer; give more calibration text to refine them): {', '.join(names[:5])}"
            f"{' ...' if len(names) > 5 else ''}", stacklevel=stacklevel)


def _warn_unpaired(names: list[str], reason: str) -> None:
    warnings.warn(
        f"{len(names)} matrices are fitted without sequential compensation, {reason}: "
        f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}", stacklevel=5)


def _fit_in_order(model: nn.Module, groups: list[list[_Target]],
                  candidates: dict[str, list[_Candidate]],
                  policies: dict[str, TruncationPolicy | None],
                  batches: list[Mapping[str, Any]],
                  original_paths: Mapping[str, nn.Module], tokens: Mapping[str, int],
                  progress: bool) -> list[dict[str, Any]]:
    """Replace ``groups`` one after the other, each linear one fitted to the original's
    outputs from the inputs the model compressed so far gives it (Eq. 7'); a matrix
    with fewer than ``SEQUENTIAL_TOKENS_PER_INPUT`` calibration rows per input, or
    whose inputs cannot be paired (a routed expert), keeps its plain calibrated fit."""
    records, few, unpaired = [], [], []
    for group in tqdm(groups, desc="fitting in order", unit="group", disable=not progress):
        linear = {t.name: t for t in group if t.covariance is not None
                  and t.covariance.dim() == 2 and policies[t.name] is not None}
        few += [name for name, t in linear.items() if not _enough_rows(t, tokens)]
        linear = {name: t for name, t in linear.items() if _enough_rows(t, tokens)}
        changed = any(current is not original_paths.get(path)
                      for path, current in model.named_modules(remove_duplicate=False) if path)
        if linear and changed:
            try:
                paired = calibrate_paired(
                    model, batches, {n: t.module for n, t in linear.items()},
                    lambda: _original_modules(model, original_paths))
            except UnpairedInputsError:
                paired = {}
                unpaired += list(linear)
            for name, stats in paired.items():
                linear[name].pair(stats)
                _keep_reachable(candidates[name], policies[name])
                candidates[name][:] = [_candidate(linear[name], c.structure)
                                       for c in candidates[name]]
        for t in group:
            policy, options = policies[t.name], candidates.pop(t.name)
            records.append(_replace(model, t, options, policy) if policy is not None
                           else _dense_record(t.name, t.matrix, t.covariance is not None))
            t.paired = t.compensated = t.covariance = None  # free the I x I moments
    if few:
        _warn_unpaired(few, f"having fewer than {SEQUENTIAL_TOKENS_PER_INPUT} calibration "
                            "rows per input (give more calibration text to include them)")
    if unpaired:
        _warn_unpaired(unpaired, "their inputs differing in number between the original and "
                                 "the compressed model (routed experts)")
    return records


@contextmanager
def _restored_on_error(model: nn.Module) -> Iterator[None]:
    """On an exception, put every module of ``model`` back: it is left as it was."""
    paths = dict(model.named_modules(remove_duplicate=False))
    try:
        yield
    except BaseException:
        _put_back(model, paths)
        raise


def refuse_compressed(model: nn.Module) -> None:
    """Refuse a model that holds compressed layers: its parameter count is not the original's."""
    base = model.base_model if isinstance(model, MPOModel) else model
    layers = [name for name, m in base.named_modules() if isinstance(m, COMPRESSED_LAYERS)]
    if isinstance(model, MPOModel) or layers:
        shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3
                                         else "")
        raise ValueError(
            f"this model is already compressed ({len(layers)} compressed layers: {shown}); "
            "compress the original model instead (all targets in one call), or cut the "
            "compressed one further with mpotn squeeze or "
            "layer.load_mpo(layer.mpo().truncate(...))")


#: Bytes of input second moments (float64: ``I x I`` per linear target, one count per
#: token for an embedding) [compress][mpotn.compression.compress.compress] holds at once by
#: default. BERT-base needs about 1.2 GB in all and stays in one pass; LLaMA-7B's 224
#: matrices need about 57 GB, calibrated in groups of at most this much.
CALIBRATION_MEMORY = 4 * 2**30


def _moment_bytes(module: nn.Module) -> int:
    """Bytes of the input second moment [calibrate][mpotn.compression.calibrate.calibrate]
    keeps for ``module``."""
    size = module.num_embeddings if isinstance(module, nn.Embedding) else module.in_features ** 2
    return 8 * size


def _memory_groups(observed: Mapping[str, nn.Module], limit: float) -> list[list[str]]:
    """The names of ``observed`` in order, in consecutive groups whose moments take at most
    ``limit`` bytes (a target alone above it is a group of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, module in observed.items():
        need = _moment_bytes(module)
        if groups[-1] and size + need > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += need
    return groups if groups[0] else []


def _options(t: _Target) -> list[_Candidate]:
    """The candidate decompositions of ``t``: one per structure its settings allow."""
    return [_candidate(t, s) for s in _structures(t.settings["structure"])]


def _candidate_bytes(options: list[_Candidate]) -> int:
    """Bytes the decompositions of ``options`` (cores and whitening factors) hold."""
    tensors = [t for c in options
               for t in (*c.full.cores, *(c.whitening.factors if c.whitening else ()))]
    return sum(t.numel() * t.element_size() for t in tensors)


def _fit_and_replace(model: nn.Module, targets: list[_Target], config: CompressionConfig,
                     progress: bool,
                     policies: Mapping[str, TruncationPolicy | None] | None = None,
                     floored: list[str] | None = None,
                     memory: float = CALIBRATION_MEMORY) -> list[dict[str, Any]]:
    """Decompose ``targets``, choose their policies (unless given), and replace each in
    ``model``; their report rows. One target is decomposed, truncated and replaced at a
    time, so that one decomposition is held at once, except that ``budget="model"``
    without ``policies`` decomposes every target first to read its spectra, and keeps
    the decompositions for the fits while they take at most ``memory`` bytes (those
    beyond are decomposed again when fitted). Each target's covariance is freed once it
    is replaced. The targets floored at bonds of 1 are added to ``floored``, or named in
    a warning at the user's call when it is not given."""
    cut: list[str] = []
    held: dict[str, list[_Candidate]] = {}
    if policies is None and config.budget == "model":  # the budget reads every spectrum
        paths, spent = [], 0
        for t in tqdm(targets, desc="decomposing", unit="matrix", disable=not progress):
            options = _options(t)
            paths.append(_budget_path(t, options[0]))
            size = _candidate_bytes(options)
            if spent + size <= memory:
                held[t.name], spent = options, spent + size
            del options
        policies = _model_budget(paths, {t.name: t.matrix.numel() for t in targets}, config)
    records = []
    for t in tqdm(targets, desc="fitting", unit="matrix", disable=not progress):
        options = held.pop(t.name, None)
        if policies is not None and policies[t.name] is None:  # keep_dense: stays dense
            records.append(_dense_record(t.name, t.matrix, t.covariance is not None))
        else:
            options = options or _options(t)
            if policies is None:
                chosen, more = _policies([t], {t.name: options}, config)
                policy, cut = chosen[t.name], cut + more
            else:
                policy = policies[t.name]
            records.append(_replace(model, t, options, policy))
        t.covariance = None
        del options  # before the next target's are built
    if floored is None:
        _warn_floored(cut, stacklevel=5)  # this, _replace_all, compress, the user's call
    else:
        floored += cut
    return records


def _replace_in_groups(model: nn.Module, config: CompressionConfig,
                       observed: Mapping[str, nn.Module], groups: list[list[str]],
                       batches: list[Mapping[str, torch.Tensor]], others: list[_Target],
                       originals: Mapping[str, nn.Module], order: Mapping[str, int],
                       progress: bool, sensitivity: OutputSensitivity | None
                       ) -> list[dict[str, Any]]:
    """Calibrate, fit and replace the ``observed`` targets group by group, each group by
    its own pass over ``batches`` with the ``originals`` (every module path before any
    replacement) back in place: the moments, and so the layers, are those of one pass
    over the original model. ``others`` (the uncalibrated targets) are replaced first.
    With ``budget="model"`` the spectra of every target come first, in the targets'
    ``order``, for the one budget: a round of passes for the calibrated targets, whose
    spectra are those of their whitened matrices, none for the others."""

    refitted: list[str] = []

    def calibrated(group: list[str]) -> Iterator[_Target]:
        with _original_modules(model, originals):
            stats = calibrate(model, batches, {name: observed[name] for name in group})
        for name in group:
            stat, matrix = stats.pop(name), _matrix(observed[name])
            settings = _fit_for_rows(name, observed[name],
                                     config.settings_for(name, observed[name]),
                                     stat.tokens, matrix.shape[0], refitted)
            yield _Target(name, observed[name], matrix, settings,
                          _unseen_positions_counted(name, stat.covariance),
                          sensitivity=sensitivity)

    def path(t: _Target) -> Path:  # of the first structure, as _policies reads it
        return _budget_path(t, _candidate(t, _structures(t.settings["structure"])[0]))

    policies = None
    if config.budget == "model":
        paths = [path(t) for t in others]
        for group in tqdm(groups, desc="spectra in groups", unit="group",
                          disable=not progress):
            paths += [path(t) for t in calibrated(group)]
        paths.sort(key=lambda p: order[p.name])
        sizes = {name: _matrix(m).numel() for name, m in observed.items()}
        policies = _model_budget(paths, sizes | {t.name: t.matrix.numel() for t in others},
                                 config)
    floored: list[str] = []
    records = _fit_and_replace(model, others, config, progress, policies, floored)
    for group in tqdm(groups, desc="calibrating in groups", unit="group",
                      disable=not progress):
        if policies is not None and all(policies[name] is None for name in group):
            records += [_dense_record(name, _matrix(observed[name]), calibrated=True)
                        for name in group]  # no calibration pass needed
            continue
        records += _fit_and_replace(model, list(calibrated(group)), config, False, policies,
                                    floored)
    _warn_floored(floored, stacklevel=5)  # this, _replace_all, compress, the user's call
    _warn_refitted(refitted, stacklevel=5)  # this, _replace_all, compress, the user's call
    return records


def _check_calibrated(config: CompressionConfig, selected: list[tuple[str, nn.Module]],
                      observed: Mapping[str, nn.Module]) -> None:
    """Refuse calibration that reaches none of the targets; name the targets whose
    ``method`` (not ``"mpo"``) leaves them uncalibrated."""
    methods = {name: config.settings_for(name, module)["method"] for name, module in selected}
    other = [f"{name} ({methods[name]})" for name, _ in selected if methods[name] != "mpo"]
    hint = ("calibration applies to method='mpo' (structure='svd' gives SVD-LLM's whitened "
            "SVD, structure='mpo' ALS-fitted MPOs), to linear layers, and to embeddings with "
            "calibrate_embeddings=True")
    if not observed:
        raise ValueError(f"calibration was given but none of the {len(selected)} targets is "
                         f"calibrated: {hint}; or drop calibration")
    if other:
        warnings.warn(f"{len(other)} targets are not calibrated: {', '.join(other[:3])}"
                      f"{' ...' if len(other) > 3 else ''}; {hint}", stacklevel=4)


def _replace_all(model: nn.Module, config: CompressionConfig,
                 calibration: Iterable[Mapping[str, torch.Tensor]] | None, progress: bool,
                 calibration_memory: float = CALIBRATION_MEMORY,
                 sensitivity: OutputSensitivity | None = None
                 ) -> tuple[list[tuple[str, nn.Module]], list[dict[str, Any]]]:
    """The body of [compress][mpotn.compression.compress.compress]: the targets as found
    (before any ``Conv1D`` became an ``nn.Linear``) and their report rows; a model budget
    weighs every target by ``sensitivity`` when given."""
    found = select_targets(model, config)
    selected = _as_linears(model, found)
    observed = {} if calibration is None else {
        name: module for name, module in selected
        if config.settings_for(name, module)["method"] == "mpo"
        and (isinstance(module, nn.Linear) or config.calibrate_embeddings)}
    if calibration is not None:
        _check_calibrated(config, selected, observed)
    if observed and config.budget == "model" and sensitivity is None:
        _warn_uncalibrated_in_budget([name for name, module in selected if name not in observed
                                      and config.settings_for(name, module)["method"] == "mpo"])
    groups = _memory_groups(observed, calibration_memory)
    if len(groups) > 1 and config.sequential:
        total = sum(_moment_bytes(m) for m in observed.values())
        warnings.warn(
            f"sequential=True needs the input moments of all {len(observed)} calibrated "
            f"matrices at once, {total / 2**30:.1f} GiB (calibration_memory is "
            f"{calibration_memory / 2**30:.1f} GiB); without it they are calibrated in "
            "groups that fit", stacklevel=3)
        groups = [list(observed)]
    grouped = len(groups) > 1
    calibration = list(calibration) if config.sequential or grouped else calibration
    original_paths = (dict(model.named_modules(remove_duplicate=False))
                      if config.sequential or grouped else {})
    covariances: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    if observed and not grouped:
        stats = calibrate(model, calibration, observed, progress=progress)
        covariances = {name: _unseen_positions_counted(name, stat.covariance)
                       for name, stat in stats.items()}
        tokens = {name: stat.tokens for name, stat in stats.items()}
        del stats  # the targets hold the covariances, and free them once replaced
    records, targets, refitted = [], [], []
    for name, module in selected:
        settings = config.settings_for(name, module)
        if settings["method"] != "mpo":
            layer, record = _factorized(name, module, _matrix(module), settings)
            replace_module(model, name, layer)
            records.append(record)
        elif not (grouped and name in observed):
            matrix = _matrix(module)
            settings = _fit_for_rows(name, module, settings, tokens.get(name),
                                     matrix.shape[0], refitted)
            targets.append(_Target(name, module, matrix, settings,
                                   covariances.get(name), sensitivity=sensitivity))
    _warn_refitted(refitted, stacklevel=4)  # this, _replace_all, compress, the user's call
    fired = list(covariances)  # the order the model ran the calibrated targets in
    covariances.clear()  # the targets hold them, and free them once replaced
    if grouped:
        order = {name: k for k, (name, _) in enumerate(selected)}
        return found, records + _replace_in_groups(
            model, config, observed, groups, calibration, targets, original_paths, order,
            progress, sensitivity)
    if not config.sequential:
        return found, records + _fit_and_replace(model, targets, config, progress,
                                                 memory=calibration_memory)
    candidates = {t.name: _options(t) for t in tqdm(targets, desc="decomposing",
                                                    unit="matrix", disable=not progress)}
    policies, floored = _policies(targets, candidates, config)
    _warn_floored(floored, stacklevel=4)  # _replace_all, compress, the user's call
    by_name = {t.name: t for t in targets}
    order = [by_name[name] for name in fired if name in by_name]
    first = [t for t in targets if t.covariance is None]  # uncalibrated embeddings
    groups = [[t] for t in first] + _input_groups(order)
    records += _fit_in_order(model, groups, candidates, policies, calibration, original_paths,
                             tokens, progress)
    return found, records


def compress(
    model: nn.Module,
    config: CompressionConfig | None = None,
    *,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    progress: bool = True,
    calibration_memory: float = CALIBRATION_MEMORY,
    **kwargs: Any,
) -> MPOModel:
    """Replace the selected matrices of ``model`` by MPO layers, in place.

    Parameters
    ----------
    model:
        A Hugging Face model or any module built of ``nn.Linear`` / ``nn.Embedding``
        (GPT-2's ``Conv1D`` layers become MPO layers too, orientation handled).
    config:
        What and how; keyword arguments build one when omitted
        (``compress(model, targets=["ffn"], ratio=0.5)``).
    calibration:
        Model inputs (an iterable of dicts such as tokenizer outputs; see
        [mpotn.compression.calibrate.text_batches][]). When given, the
        model is run on them first ([mpotn.compression.calibrate.calibrate][])
        and every linear target is truncated to minimise the error of its
        outputs on those inputs (Eq. 7) instead of the error of its weights:
        exactly for ``structure="svd"`` (SVD-LLM's whitening), by ALS or
        Kronecker whitening for balanced MPOs (``config.fit``).
    progress:
        Show a progress bar over the matrices.
    calibration_memory:
        Bytes of input second moments to hold at once (default
        [CALIBRATION_MEMORY][mpotn.compression.compress.CALIBRATION_MEMORY], 4 GiB): when
        the targets need more (``8 I^2`` bytes per linear target of ``I`` inputs), they
        are calibrated, fitted and replaced in consecutive groups whose moments fit, one
        pass over the calibration data per group, each with the original modules back
        in place, so the result is that of one pass (``budget="model"`` reads every
        target's spectra first: a round of passes more for the calibrated ones). A whitened
        fit (and any calibrated target while ``budget="model"`` reads its spectra) also
        holds a Cholesky factor as large as its moment while it runs. ``budget="model"``
        in one pass (with or without calibration) keeps the decompositions it read the
        spectra of for the fits while they take at most this many bytes too, and
        decomposes the others again.
        ``sequential=True`` needs every target's moments at once and warns when they
        exceed it.

    Returns
    -------
    MPOModel
        The model (wrapping the same, modified ``model``) with its report; the
        report's ``output_error`` is the relative error of each matrix's
        outputs on the calibration inputs.

    Raises
    ------
    ValueError
        For invalid settings, targets that match nothing, or a model that is
        already compressed (an ``MPOModel``, or one holding MPO or factorized
        layers): its parameter count would be reported as the original's.
    """
    if config is not None and kwargs:
        raise ValueError("give a CompressionConfig or keyword settings, not both")
    config = config or CompressionConfig(**kwargs)
    refuse_compressed(model)
    if config.sequential and calibration is None:
        raise ValueError("sequential=True fits each matrix to the original's outputs on the "
                         "calibration data: give calibration batches, or drop sequential")
    sensitivity = None
    if config.sensitivity:
        if calibration is None:
            raise ValueError("sensitivity=True measures each matrix's effect on the model's "
                             "outputs on the calibration data: give calibration batches, or "
                             "drop sensitivity")
        calibration = list(calibration)
        sensitivity = OutputSensitivity(model, calibration)
    original = count_parameters(model.parameters())
    ties = tied_keys(model)
    if not calibration_memory > 0:
        raise ValueError(f"calibration_memory must be a number of bytes > 0, got "
                         f"{calibration_memory!r}")
    with _restored_on_error(model):
        found, records = _replace_all(model, config, calibration, progress,
                                      calibration_memory, sensitivity)
        originals = dict(found)
        for record in records:  # a Conv1D kept dense is GPT-2's own module again
            if record.get("structure") == "dense" and is_conv1d(originals[record["name"]]):
                replace_module(model, record["name"], originals[record["name"]])
        keep_surviving_ties(model, ties)
    order = {name: k for k, (name, _) in enumerate(found)}
    records.sort(key=lambda r: order[r["name"]])
    if sensitivity is not None:
        for record in records:
            record["sensitivity"] = sensitivity.measured.get(record["name"])
    return MPOModel(model, config, records, original)
