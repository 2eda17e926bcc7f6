r"""Central tensors shared across layers (MPOBERT, SPEC §4; issue 14).

The central tensor $C$ of an MPO holds most of a matrix's parameters and the
auxiliary tensors $A_1, \dots$ hold what is specific to it, so one central tensor
can serve many matrices: [share_centrals][mpotn.compression.sharing.share_centrals]
gives every MPO layer of a group the *same* ``nn.Parameter`` at the central
position of its ``cores`` (as PEFT's VeRA hands one ``vera_A`` to every layer), and
each layer keeps its own auxiliary tensors, so that layer $l$ computes

$$
M_l = \mathrm{MPO}(A_l, C, B_l), \qquad
A_l = (T_{l,1}, \dots, T_{l,c-1}),\ B_l = (T_{l,c+1}, \dots, T_{l,n})
$$

with $c$ the central index. Sharing is the identity of that one ``Parameter``:
``model.parameters()`` yields it once (so #To counts it once), an optimizer step
updates it once and every user sees it, and
[shared_central_groups][mpotn.compression.sharing.shared_central_groups] reads the
groups back off the model. A save records them (the optional ``shared_centrals``
field of ``mpotn_config.json``, see [mpotn.compression.serialization][]); the
weights file stores the tensor once and [read][mpotn.compression.serialization.read]
ties the layers again ([tie_centrals][mpotn.compression.sharing.tie_centrals]).

A bond of the shared central is cut for the whole group at once:
[shared_bond_spectrum][mpotn.compression.sharing.shared_bond_spectrum] and
[cut_shared_bond][mpotn.compression.sharing.cut_shared_bond] (what squeezing calls)
keep one projection of that bond for every layer, so the layers still share one
(smaller) central ``Parameter``. ``load_mpo`` on one layer of a group raises
``ValueError`` rather than silently give it its own copy.

Examples
--------
>>> import torch
>>> from transformers import BertConfig, BertModel
>>> from mpotn.compression import compress
>>> torch.manual_seed(0) and None
>>> bert = BertModel(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3,
...                             num_attention_heads=2, intermediate_size=48))
>>> model = compress(bert, targets=["ffn"], n=3, progress=False)
>>> before = model.totals()["total_params"]
>>> report = share_centrals(model, init="fit")
>>> [row["group"] for row in report if row["kind"] == "group"]
['ffn_in', 'ffn_out']
>>> layers = model.mpo_layers()
>>> layers["encoder.layer.0.output.dense"].central is layers["encoder.layer.2.output.dense"].central
True
>>> saved = sum(row["saved_params"] for row in report if row["kind"] == "group")
>>> before - model.totals()["total_params"] == saved
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mpotn.compression.architectures import (
    compressed_names,
    layer_index,
    layer_pattern,
    matrix_type,
)
from mpotn.compression.config import MPO_LAYERS, layer_holder
from mpotn.mpo import SWEEP_DTYPE, _interleaved
from mpotn.table import Table
from mpotn.types import SHARE_INITS


def _mpo_layers(base: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in base.named_modules() if isinstance(m, MPO_LAYERS)}


def shared_central_groups(model: nn.Module) -> list[list[str]]:
    """Module names of the MPO layers that use one central tensor, per tensor (groups of
    two or more, in module order); ``[]`` when nothing is shared.

    ``model`` is an [MPOModel][mpotn.compression.model.MPOModel] (names relative to its
    ``base_model``) or any module.
    """
    groups: dict[int, list[str]] = {}
    for name, layer in _mpo_layers(layer_holder(model)).items():
        groups.setdefault(id(layer.central), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def mark_shared_centrals(base: nn.Module) -> None:
    """Record on every MPO layer whether its central tensor is shared, and by how many
    layers (``layer._shared_central = (tensor, users)``, which ``load_mpo`` checks)."""
    layers = _mpo_layers(base)
    users: dict[int, int] = {}
    for layer in layers.values():
        users[id(layer.central)] = users.get(id(layer.central), 0) + 1
    for layer in layers.values():
        count = users[id(layer.central)]
        if count > 1:
            layer._shared_central = (layer.central, count)  # a tuple: not registered
        elif hasattr(layer, "_shared_central"):
            del layer._shared_central


def _check_group(base: nn.Module, names: Sequence[str], layers: dict[str, nn.Module]) -> None:
    if isinstance(names, str) or len(names) < 2:
        raise ValueError(f"a group of layers sharing a central tensor lists two or more "
                         f"module names, got {names!r}")
    for name in names:
        if name not in layers:
            raise ValueError(f"{name!r} is not an MPO layer of the model (MPOLinear or "
                             "MPOEmbedding); compress it first, or leave it out of the group")
    first = layers[names[0]]
    for name in names[1:]:
        layer = layers[name]
        for what in ("row_shape", "col_shape", "bond_dims"):
            if getattr(layer, what) != getattr(first, what):
                raise ValueError(
                    f"layers sharing a central tensor need equal row/col factorizations and "
                    f"bond dimensions, but {what} of {name!r} is {list(getattr(layer, what))} "
                    f"and of {names[0]!r} {list(getattr(first, what))}; compress them with the "
                    "same n, row_shape / col_shape and bond_dims (or max_bond)")
        if type(layer) is not type(first):
            raise ValueError(f"{name!r} is an {type(layer).__name__} and {names[0]!r} an "
                             f"{type(first).__name__}; a group shares among one kind")


def default_groups(model: nn.Module) -> list[list[str]]:
    """One group per matrix of a layer over the numbered layers of each stack: every MPO
    layer of a ``...layer.N...`` module, grouped by its name with ``N`` left out
    ([layer_pattern][mpotn.compression.architectures.layer_pattern]: an encoder's and a
    decoder's query, or a decoder's self- and cross-attention query, are separate
    groups; the experts of a mixture, which already share one, are one group), in layer
    order; matrices found in fewer than two layers are left out."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for name in _mpo_layers(layer_holder(model)):
        index = layer_index(name)
        if index is not None:
            groups.setdefault(layer_pattern(name), []).append((index, name))
    return [[name for _, name in sorted(members)] for members in groups.values()
            if len(members) > 1]


def _group_labels(groups: list[list[str]]) -> list[str]:
    """A default group's label: its matrix type, or its layer pattern where two groups
    have one type (an encoder-decoder's stacks)."""
    types = [matrix_type(names[0]) for names in groups]
    return [kind if types.count(kind) == 1 else layer_pattern(names[0])
            for kind, names in zip(types, groups)]


def tie_centrals(model: nn.Module, groups: Sequence[Sequence[str]]) -> None:
    """Make the layers of each group use the first one's central ``Parameter`` (its values
    are the group's); used after a load, where the weights file holds it once.

    Raises
    ------
    ValueError
        For a name that is no MPO layer, a group of fewer than two, or layers of
        different factorizations or bond dimensions.
    """
    base = layer_holder(model)
    layers = _mpo_layers(base)
    for names in groups:
        _check_group(base, names, layers)
        shared = layers[names[0]].central
        for name in names[1:]:
            layer = layers[name]
            layer.cores[layer.central_index] = shared
            layer._cache = None
    mark_shared_centrals(base)


# ------------------------------------------------------------------ fitting
def _cores3(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Cores as ``(d_{k-1}, i_k j_k, d_k)`` in float64."""
    return [c.detach().to(SWEEP_DTYPE).reshape(c.shape[0], -1, c.shape[3]) for c in cores]


def _left(cores: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """``E``: cores ``0..k-1`` contracted, ``(P_{<k}, d_k)``."""
    env = torch.ones(1, 1, dtype=SWEEP_DTYPE, device=cores[0].device)
    for core in cores[:k]:
        env = torch.einsum("pa,amb->pmb", env, core).reshape(-1, core.shape[2])
    return env


def _right(cores: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """``F``: cores ``k+1..n-1`` contracted, ``(d_{k+1}, P_{>k})``."""
    env = torch.ones(1, 1, dtype=SWEEP_DTYPE, device=cores[0].device)
    for core in reversed(cores[k + 1:]):
        env = torch.einsum("amb,bq->amq", core, env).reshape(core.shape[0], -1)
    return env


def _normal(cores: Sequence[torch.Tensor], k: int, target: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normal equations of core ``k`` in ``||T - E T_k F||^2``: ``G = E^T E``,
    ``X = E^T T F^T`` and ``H = F F^T``, so the least-squares core solves
    ``G T_k H = X``."""
    left, right = _left(cores, k), _right(cores, k)
    t = target.reshape(left.shape[0], cores[k].shape[1], right.shape[1])
    x = torch.einsum("pa,pmq,bq->amb", left, t, right)
    return left.T @ left, x, right @ right.T


def _sandwich(g: torch.Tensor, core: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ab,bmc,cd->amd", g, core, h)


def _solve_shared(systems: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                  start: torch.Tensor, iterations: int = 500, tol: float = 1e-13
                  ) -> torch.Tensor:
    r"""The shared central minimising $\sum_l \|T_l - E_l C F_l\|^2$: the solution of
    $\sum_l G_l C H_l = \sum_l X_l$ by preconditioned conjugate gradients from ``start``
    (preconditioner $\bar G^+ R \bar H^+$, exact when the layers' Gram matrices agree).
    Every iterate lowers the objective, so the result is never worse than ``start``."""
    rhs = sum(x for _, x, _ in systems)
    g_inv = torch.linalg.pinv(sum(g for g, _, _ in systems) / len(systems), hermitian=True)
    h_inv = torch.linalg.pinv(sum(h for _, _, h in systems) / len(systems), hermitian=True)

    def apply(c: torch.Tensor) -> torch.Tensor:
        return sum(_sandwich(g, c, h) for g, _, h in systems)

    c = start.clone()
    r = rhs - apply(c)
    scale = float(rhs.norm()) or 1.0
    z = _sandwich(g_inv, r, h_inv)
    p = z.clone()
    rz = float((r * z).sum())
    for _ in range(iterations):
        if float(r.norm()) <= tol * scale:
            break
        ap = apply(p)
        curvature = float((p * ap).sum())
        if curvature <= 0:
            break
        alpha = rz / curvature
        c = c + alpha * p
        r = r - alpha * ap
        z = _sandwich(g_inv, r, h_inv)
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p if rz else z
        rz = rz_new
    return c


def _dense(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    return _left(cores, len(cores)).reshape(-1)


def _objective(chains: list[list[torch.Tensor]], targets: list[torch.Tensor]) -> float:
    return sum(float((t - _dense(c)).pow(2).sum()) for c, t in zip(chains, targets))


def _fit(chains: list[list[torch.Tensor]], targets: list[torch.Tensor], center: int,
         sweeps: int) -> torch.Tensor:
    """Alternating least squares on $\\sum_l \\|T_l - \\mathrm{MPO}(A_l, C, B_l)\\|^2$, in
    place on ``chains`` (whose central entries all become the fitted $C$)."""
    def central_step() -> None:
        systems = [_normal(chain, center, t) for chain, t in zip(chains, targets)]
        shared = _solve_shared(systems, chains[0][center])
        for chain in chains:
            chain[center] = shared

    central_step()
    previous = _objective(chains, targets)
    for _ in range(sweeps):
        for chain, target in zip(chains, targets):
            for k in range(len(chain)):
                if k != center:
                    g, x, h = _normal(chain, k, target)
                    chain[k] = _sandwich(torch.linalg.pinv(g, hermitian=True), x,
                                         torch.linalg.pinv(h, hermitian=True))
        central_step()
        now = _objective(chains, targets)
        if previous - now <= 1e-12 * max(previous, 1e-300):
            break
        previous = now
    return chains[0][center]


def share_centrals(model: nn.Module, groups: Sequence[Sequence[str]] | None = None,
                   init: str = "fit", sweeps: int = 5) -> Table:
    r"""Make each group of MPO layers share one central tensor (MPOBERT), each layer
    keeping its own auxiliary tensors; the model is changed in place.

    Parameters
    ----------
    model:
        A compressed model ([MPOModel][mpotn.compression.model.MPOModel], or a module
        holding MPO layers).
    groups:
        Lists of module names (relative to ``base_model``) whose layers share one
        central tensor $C$, e.g. consecutive layers; by default one group per matrix
        of a layer over all numbered layers of each stack
        ([default_groups][mpotn.compression.sharing.default_groups]). The layers of a
        group must have equal row and column factorizations and bond dimensions.
    init:
        ``"layer"``: $C$ is the central tensor of the group's first layer, the other
        layers' auxiliary tensors unchanged (what the MPOBERT reference code does).
        ``"fit"``: alternating least squares on
        $\sum_l \|M_l - \mathrm{MPO}(A_l, C, B_l)\|_F^2$ over the group, $M_l$ each
        layer's matrix before sharing (zero-padded, as Algorithm 1 has it): $C$ in
        closed form given every layer's auxiliary tensors ($C$ enters linearly; the
        normal equations $\sum_l G_l C H_l = \sum_l X_l$ are solved by conjugate
        gradients), then each auxiliary tensor of each layer given the rest, for
        ``sweeps`` sweeps, in float64. It starts from the layers' own auxiliary
        tensors, so its total error is never above ``"layer"``'s.
    sweeps:
        Most ALS sweeps of ``"fit"`` (it stops early once the error stops falling).

    Returns
    -------
    Table
        One row per layer (``kind`` ``"layer"``): its ``group`` (the matrix type -- its
        layer pattern where two default groups have one type -- or ``group <i>``),
        ``name``, ``norm`` $\|M_l\|_F$, the relative error
        $\|M_l - \mathrm{MPO}_l\|_F / \|M_l\|_F$ of the ``"layer"`` initialisation
        (``layer_init_error``; its first layer's is 0) and of the chosen one
        (``error``; before sharing every error is 0, $M_l$ being the layer's own
        matrix); then one row per group (``kind`` ``"group"``) with the same errors
        over the whole group ($\sqrt{\sum_l \|M_l - \mathrm{MPO}_l\|^2 / \sum_l
        \|M_l\|^2}$), the shared tensor's ``central_params`` $|C|$ and the
        ``saved_params``: the entries of the central tensors before (each distinct
        tensor once) minus $|C|$, $(L - 1)|C|$ for $L$ layers that had their own.
        An [MPOModel][mpotn.compression.model.MPOModel]'s compression report
        (``model.report()``, saved with it) gains each shared layer's ``shared_group``
        and ``sharing_error`` (its ``error`` here).

    Raises
    ------
    ValueError
        For an unknown ``init``, a name that is not an MPO layer, a name in two
        groups, a group of fewer than two layers, layers of one group whose
        factorizations or bond dimensions differ, or a group that holds some but not
        all of the layers already using one central tensor (the experts of a block).
    """
    if init not in SHARE_INITS:
        raise ValueError(f"init must be one of {SHARE_INITS}, got {init!r}")
    if not isinstance(sweeps, int) or sweeps < 0:
        raise ValueError(f"sweeps must be a whole number >= 0, got {sweeps!r}")
    base = layer_holder(model)
    layers = _mpo_layers(base)
    named = groups is None
    groups = default_groups(base) if groups is None else [list(g) for g in groups]
    if not groups:
        raise ValueError("no two numbered MPO layers of one matrix type to share a central "
                         "tensor; compress the model's layers first, or pass groups=")
    seen: set[str] = set()
    for names in groups:
        _check_group(base, names, layers)
        twice = seen.intersection(names)
        if twice:
            raise ValueError(f"{sorted(twice)} appear in more than one group")
        seen.update(names)
    _check_whole_groups(layers, groups)
    report = Table()
    labels = _group_labels(groups) if named else [f"group {i}" for i in range(len(groups))]
    for names, label in zip(groups, labels):
        report.extend(_share_group([layers[n] for n in names], names, label, init, sweeps))
    mark_shared_centrals(base)
    _record_sharing(model, report)
    return report


def _record_sharing(model: nn.Module, report: Table) -> None:
    """Add to the compression report's row of each shared layer (an
    [MPOModel][mpotn.compression.model.MPOModel]'s ``records``) its ``shared_group`` and
    ``sharing_error``, its relative error against its matrix before sharing (the mean
    over an upcycled block's experts; a layer inside an adapter's wrapper counts as the
    matrix it wraps: [compressed_names][mpotn.compression.architectures.compressed_names])."""
    records = {record.get("name"): record for record in getattr(model, "records", None) or ()}
    found: dict[str, list[dict[str, Any]]] = {}
    for row in report:
        if row["kind"] == "layer":
            name = next((n for n in compressed_names(row["name"]) if n in records), None)
            if name is not None:
                found.setdefault(name, []).append(row)
    for name, rows in found.items():
        records[name]["shared_group"] = rows[0]["group"]
        records[name]["sharing_error"] = sum(row["error"] for row in rows) / len(rows)


def _check_whole_groups(layers: dict[str, nn.Module], groups: list[list[str]]) -> None:
    """Refuse a group that holds some, not all, of the layers using a central tensor
    (experts of one block, layers shared before): sharing it would split them."""
    users: dict[int, list[str]] = {}
    for name, layer in layers.items():
        users.setdefault(id(layer.central), []).append(name)
    for names in groups:
        outside = sorted({other for name in names for other in users[id(layers[name].central)]}
                         - set(names))
        if outside:
            raise ValueError(f"{outside} use the central tensor of a layer of the group "
                             f"{names}, which sharing would split; put them in the same "
                             "group")


@torch.no_grad()
def _share_group(group: list[nn.Module], names: list[str], label: str, init: str,
                 sweeps: int) -> list[dict[str, Any]]:
    first = group[0]
    center = first.central_index
    matrices = [layer.matrix().detach().to(SWEEP_DTYPE) for layer in group]
    targets = [_interleaved(m, layer.row, layer.col).reshape(-1)
               for m, layer in zip(matrices, group)]
    chains = [_cores3(layer._core_tensors()) for layer in group]
    central = chains[0][center]

    def errors(shared: torch.Tensor, chains: list[list[torch.Tensor]]) -> list[float]:
        out = []
        for layer, chain, m in zip(group, chains, matrices):
            cores = [shared if k == center else c for k, c in enumerate(chain)]
            cores = [c.reshape(c.shape[0], i, j, c.shape[2])
                     for c, i, j in zip(cores, layer.row.factors, layer.col.factors)]
            rebuilt = layer.contractor.rebuild(cores)
            out.append(float((m - rebuilt).norm()))
        return out

    layer_errors = errors(central, chains)
    if init == "fit":
        fitted = [list(chain) for chain in chains]
        central = _fit(fitted, targets, center, sweeps)
        chains = fitted
    final = layer_errors if init == "layer" else errors(central, chains)
    reference = first.central
    before = sum({id(layer.central): layer.central.numel() for layer in group}.values())
    shared = nn.Parameter(
        central.reshape(reference.shape).to(reference.device, reference.dtype).clone(),
        requires_grad=any(layer.central.requires_grad for layer in group))
    with torch.no_grad():
        for layer, chain in zip(group, chains):
            for k, (param, core) in enumerate(zip(layer._core_tensors(), chain)):
                if k != center:
                    param.copy_(core.reshape(param.shape))
            layer.cores[center] = shared
            layer._cache = None
    norms = [float(m.norm()) for m in matrices]
    rows = [{"kind": "layer", "group": label, "name": name, "norm": norm,
             "layer_init_error": e0 / norm if norm else 0.0,
             "error": e / norm if norm else 0.0,
             "central_params": None, "saved_params": None}
            for name, norm, e0, e in zip(names, norms, layer_errors, final)]
    total = sum(n * n for n in norms) ** 0.5

    def pooled(errs: list[float]) -> float:
        return sum(e * e for e in errs) ** 0.5 / total if total else 0.0

    rows.append({"kind": "group", "group": label, "name": f"{len(group)} layers",
                 "norm": total, "layer_init_error": pooled(layer_errors),
                 "error": pooled(final), "central_params": shared.numel(),
                 "saved_params": before - shared.numel()})
    return rows



# ------------------------------------------------------------------ cutting a shared bond
def _sqrt_and_inverse(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``X = G^{1/2}`` and its pseudo-inverse, for a symmetric positive semi-definite
    ``G``."""
    values, vectors = torch.linalg.eigh(gram)
    floor = float(values.max().clamp(min=0)) * 1e-12
    root = values.clamp(min=0).sqrt()
    inverse = torch.where(values > floor, 1 / root.clamp(min=1e-300), torch.zeros_like(root))
    return (vectors * root) @ vectors.T, (vectors * inverse) @ vectors.T


def _bond_side(layers: Sequence[nn.Module], bond: int) -> str:
    center = layers[0].central_index
    if not 1 <= bond <= layers[0].n - 1:
        raise ValueError(f"bond {bond} is a boundary of the chain (1 x 1), not a bond of the "
                         f"shared central tensor; the chain's bonds are 1 to {layers[0].n - 1}")
    if bond == center:
        return "left"
    if bond == center + 1:
        return "right"
    raise ValueError(f"bond {bond} is not a bond of the shared central tensor (core "
                     f"{center}); its bonds are {center} and {center + 1}")


def _bond_system(layers: Sequence[nn.Module], bond: int
                 ) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    r"""The group's joint weight on a bond of its shared central.

    For the bond left of $C$ (``bond`` = central index $c$), with $L_l$ the layer's
    cores $0..c-1$ contracted (``P x d``) and $R_l$ cores $c..n-1$ (``d x Q``):
    $X = \bar G^{1/2}$ for the mean Gram matrix $\bar G$ of the $L_l$, and
    $K = \sum_l X R_l R_l^T X$; the right bond mirrors it. When every $L_l$ is
    orthonormal ($\bar G = I$, as a left-canonical chain is), $M_l = L_l R_l$ and
    keeping the top eigenvectors $U$ of $K$ loses exactly
    $\sum_l \|L_l (I - UU^T) R_l\|^2 = \sum_{\mathrm{dropped}} \lambda$.
    Returns the side, $X$, $X^+$, $K$ and $\sum_l \|M_l\|^2$.
    """
    side = _bond_side(layers, bond)
    center = layers[0].central_index
    grams, parts, energy = [], [], 0.0
    for layer in layers:
        cores = _cores3(layer._core_tensors())
        if side == "left":
            outer = _left(cores, center)  # (P, d)
            inner = torch.einsum("amb,bq->amq", cores[center], _right(cores, center)
                                 ).reshape(cores[center].shape[0], -1)  # (d, Q)
            grams.append(outer.T @ outer)
            parts.append(inner @ inner.T)
            energy += float(((outer @ inner) ** 2).sum())
        else:
            inner = _left(cores, center + 1)  # (P, d'): cores 0..c
            outer = _right(cores, center)  # (d', Q): cores c+1..n-1
            grams.append(outer @ outer.T)
            parts.append(inner.T @ inner)
            energy += float(((inner @ outer) ** 2).sum())
    root, inverse = _sqrt_and_inverse(sum(grams) / len(grams))
    weight = sum(root @ part @ root for part in parts)
    return side, root, inverse, weight, energy


def shared_bond_spectrum(layers: Sequence[nn.Module], bond: int) -> dict[str, Any]:
    r"""The spectrum of a bond of a group's shared central tensor: ``{"bond", "values",
    "norm"}`` with ``values`` $\sqrt{\lambda_k}$ of the group's joint weight (see
    [cut_shared_bond][mpotn.compression.sharing.cut_shared_bond]), largest first, and
    ``norm`` $\sqrt{\sum_l \|M_l\|^2}$ -- the form squeezing's Eq. 3 estimate reads.
    For one layer in left- or right-canonical form these are the bond's singular
    values.

    Raises
    ------
    ValueError
        If ``bond`` is not one of the central tensor's two bonds.
    """
    with torch.no_grad():
        _, _, _, weight, energy = _bond_system(layers, bond)
    values = torch.linalg.eigvalsh(weight).flip(0).clamp(min=0).sqrt()
    return {"bond": bond, "values": values.tolist(), "norm": energy ** 0.5}


@torch.no_grad()
def cut_shared_bond(layers: Sequence[nn.Module], bond: int, dim: int) -> dict[str, Any]:
    r"""Cut a bond of the central tensor the ``layers`` share to ``dim``, for all of them.

    One projection serves every layer: with the group's joint weight $K$ on the bond
    (left of $C$: $X = \bar G^{1/2}$ of the left chains' mean Gram matrix,
    $K = \sum_l X R_l R_l^T X$; right of $C$ mirrored) and $U$ its top ``dim``
    eigenvectors, the shared central becomes $U^T X C$ and each layer's neighbouring
    auxiliary tensor $A_l X^+ U$ (right bond: $C X U$ and $U^T X^+ B_l$), so that
    $M_l \to L_l X^+ U U^T X R_l$. The layers then hold one new central
    ``nn.Parameter`` (same ``data_ptr`` for all) and new auxiliary tensors, each
    keeping its trainable state, dtype and device. Pass every layer that uses the
    tensor: a part of a group made by [share_centrals][mpotn.compression.sharing.share_centrals]
    or [upcycle_experts][mpotn.compression.experts.upcycle_experts] is refused, but
    sharing set up by hand (as below) records no users to check against.

    Returns
    -------
    dict
        The bond's new spectrum (as
        [shared_bond_spectrum][mpotn.compression.sharing.shared_bond_spectrum]) and
        ``error``: the actual relative error $\sqrt{\sum_l \|M_l - M_l'\|^2 /
        \sum_l \|M_l\|^2}$ of the cut.

    Raises
    ------
    ValueError
        If the layers do not share one central tensor, ``bond`` is not one of its
        bonds, or ``dim`` is not between 1 and the bond's dimension.

    Examples
    --------
    >>> import torch
    >>> from mpotn.layers import MPOLinear
    >>> torch.manual_seed(0) and None
    >>> layers = [MPOLinear.from_linear(torch.nn.Linear(16, 16), n=3) for _ in range(2)]
    >>> layers[1].cores[1] = layers[0].cores[1]
    >>> spectrum = cut_shared_bond(layers, 1, 2)
    >>> layers[0].bond_dims, layers[0].central is layers[1].central
    ((1, 2, 4, 1), True)
    """
    if len({id(layer.central) for layer in layers}) != 1:
        raise ValueError("cut_shared_bond needs layers that share one central tensor "
                         "(share_centrals)")
    marked = getattr(layers[0], "_shared_central", None)
    if marked is not None and marked[0] is layers[0].central and marked[1] != len(layers):
        raise ValueError(f"the central tensor is shared by {marked[1]} layers but "
                         f"{len(layers)} were given; pass the whole group "
                         "(shared_central_groups) so that every user keeps sharing it")
    full = layers[0].bond_dims[bond]
    if not isinstance(dim, int) or not 1 <= dim <= full:
        raise ValueError(f"dim must be a whole number from 1 to the bond's dimension {full}, "
                         f"got {dim!r}")
    before = [layer.matrix().detach().to(SWEEP_DTYPE) for layer in layers]
    side, root, inverse, weight, _ = _bond_system(layers, bond)
    _, vectors = torch.linalg.eigh(weight)
    keep = vectors.flip(1)[:, :dim]
    center = layers[0].central_index
    old = layers[0].central
    central = _cores3([old])[0]
    if side == "left":
        central = torch.einsum("ba,bmc->amc", root @ keep, central)
        neighbour, map_ = center - 1, inverse @ keep
    else:
        central = torch.einsum("amb,bc->amc", central, root @ keep)
        neighbour, map_ = center + 1, keep.T @ inverse
    shared = nn.Parameter(
        central.reshape(dim if side == "left" else old.shape[0], *old.shape[1:3],
                        old.shape[3] if side == "left" else dim
                        ).to(old.device, old.dtype),
        requires_grad=old.requires_grad)
    for layer in layers:
        previous = layer._core_tensors()[neighbour]
        core = _cores3([previous])[0]
        core = (torch.einsum("amb,bc->amc", core, map_) if side == "left"
                else torch.einsum("ab,bmc->amc", map_, core))
        shape = ((*previous.shape[:3], dim) if side == "left"
                 else (dim, *previous.shape[1:]))
        layer.cores[neighbour] = nn.Parameter(core.reshape(shape).to(previous.device,
                                                                     previous.dtype),
                                              requires_grad=previous.requires_grad)
        layer.cores[center] = shared
        layer._cache = None
        if marked is not None:
            layer._shared_central = (shared, len(layers))
    after = [layer.matrix().detach().to(SWEEP_DTYPE) for layer in layers]
    lost = sum(float((a - b).pow(2).sum()) for a, b in zip(before, after))
    total = sum(float(m.pow(2).sum()) for m in before)
    spectrum = shared_bond_spectrum(layers, bond)
    spectrum["error"] = (lost / total) ** 0.5 if total else 0.0
    return spectrum
