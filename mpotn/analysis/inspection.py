r"""The ``inspect`` job: decompose every weight matrix of a model, report bonds.

For each ``nn.Embedding`` / ``nn.Linear`` weight (in the paper's orientation,
see [mpotn.compression.models][]) it runs Algorithm 1 at full rank and records the
factorization, the full bonds (Eq. 2), the central-bond entropy (Eq. 6), and,
at a default budget (compression ratio, Eq. 5, allocated to minimise Eq. 4),
the kept bonds, the Eq. 4 bound and the actual error, both relative to
$\|M\|_F$. It writes the table as Markdown and JSON, an entropy heatmap
across layers and matrix types, the entropy profiles along the chain by matrix
type, and a drawing and the bond spectra of one network.
[draw_shared_centrals][mpotn.analysis.inspection.draw_shared_centrals] draws a
compressed model's shared central tensors (MPOBERT, MPOE), each once, with the
chains of the layers that use it.

Examples
--------
>>> from torch import nn
>>> result = inspect_model(nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 64)), n=3,
...                        progress=False)
>>> [r["name"] for r in result.records], result.records[0]["full_bonds"]
(['0', '1'], '12,16')
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from mpotn.atomic import write_output
from mpotn.compression.config import MPO_LAYERS, layer_holder
from mpotn.compression.models import layer_index, matrix_type, weight_matrices
from mpotn.compression.sharing import shared_central_groups
from mpotn.drawing import draw_entropy_heatmap, draw_entropy_profiles, draw_graph, draw_spectra
from mpotn.mpo import MPO
from mpotn.network import shared_graph
from mpotn.table import Table
from mpotn.types import DEFAULT_RATIO, Allocation

#: Column order of the printed table and its headers.
COLUMNS = {
    "name": "matrix",
    "shape": "shape",
    "factorization": "factorization (rows x cols)",
    "full_bonds": "full bonds (Eq. 2)",
    "central_entropy": "S_central (Eq. 6)",
    "bonds_at_budget": "bonds at budget",
    "ratio_at_budget": "rho (Eq. 5)",
    "relative_bound": "bound/|M| (Eq. 4)",
    "relative_error": "error/|M|",
}


def _join(values: Any, sep: str = ",") -> str:
    return sep.join(str(v) for v in values)


@dataclass
class Inspection:
    """What [inspect_model][mpotn.analysis.inspection.inspect_model] found.

    Attributes
    ----------
    records:
        One record per matrix (see [COLUMNS][mpotn.analysis.inspection.COLUMNS] for the main
        fields).
    settings:
        ``n``, ``ratio``, ``allocation`` and ``svd`` used.
    networks:
        The truncated MPO of each matrix whose name was asked for in ``keep``.
    spectra:
        The full-rank MPO of the same matrices (their bond spectra are drawn).
    """

    records: Table
    settings: dict[str, Any]
    networks: dict[str, MPO] = field(default_factory=dict)
    spectra: dict[str, MPO] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=lambda: dict(COLUMNS))
    shared: dict[str, Path] = field(default_factory=dict)
    compressed: Any = None

    def table(self) -> Table:
        """The printed columns, with readable headers."""
        return self.records.select(self.columns)

    def _title(self, model_name: str) -> str:
        if self.compressed is not None:
            return (f"# mpotn inspect: {model_name} (compressed)\n\nThe bonds the save keeps, "
                    "with the entropies of its cores (Eq. 6).\n\n")
        return (f"# mpotn inspect: {model_name}\n\n"
                f"n = {self.settings['n']} cores; budget rho = {self.settings['ratio']} "
                f"({self.settings['allocation']} allocation). Errors are relative to "
                "||M||_F.\n\n")

    def write(self, out: str | Path, model_name: str) -> dict[str, Path]:
        """Write ``inspect.md``, ``inspect.json``, the heatmap and the drawings (for a
        compressed model, also each shared central tensor's drawing)."""
        out = Path(out)
        title = self._title(model_name)
        paths = {
            "markdown": write_output(out / "inspect.md",
                                     title + self.table().to_markdown() + "\n"),
            "json": write_output(
                out / "inspect.json",
                json.dumps({"model": model_name, "settings": self.settings,
                            "matrices": list(self.records)}, indent=2),
            ),
        }
        paths["heatmap"] = write_output(out / "entropy_heatmap.png", lambda path: (
            draw_entropy_heatmap(self.records, path, model_name)))
        paths["profiles"] = write_output(out / "entropy_profiles.png", lambda path: (
            draw_entropy_profiles(self.records, path,
                                  f"{model_name}: entropy along the chain, by matrix type")))
        kept = "kept/full" if self.compressed is not None else (
            f"at rho={self.settings['ratio']} (kept/full)")
        for name, mpo in self.networks.items():
            safe = name.replace(".", "_") or "matrix"
            paths[f"network:{name}"] = write_output(
                out / f"network_{safe}.png",
                lambda path, name=name, mpo=mpo: mpo.draw(path, title=f"{name}: bonds {kept}"))
        for name, mpo in self.spectra.items():
            safe = name.replace(".", "_") or "matrix"
            kind = "kept" if self.compressed is not None else "full rank"
            paths[f"spectra:{name}"] = write_output(
                out / f"spectra_{safe}.png",
                lambda path, name=name, mpo=mpo, kind=kind: draw_spectra(
                    mpo, path, f"{name}: singular values per bond ({kind})"))
        if self.compressed is not None:
            for name, path in draw_shared_centrals(self.compressed, out).items():
                paths[f"shared:{name}"] = path
        return {key: path for key, path in paths.items() if path}


def inspect_model(
    model: nn.Module,
    *,
    n: int = 5,
    ratio: float = DEFAULT_RATIO,
    allocation: Allocation = "optimal",
    svd: str = "auto",
    keep: list[str] | None = None,
    progress: bool = True,
) -> Inspection:
    """Decompose every weight matrix of ``model`` and record its bond structure.

    Parameters
    ----------
    model:
        Any ``nn.Module``; its ``nn.Embedding`` and ``nn.Linear`` weights are read.
    n:
        Number of cores per matrix.
    ratio:
        Budget for the error columns: compression ratio ``rho`` (Eq. 5).
    allocation:
        ``"optimal"`` (minimise the Eq. 4 bound) or ``"uniform"`` bonds.
    svd:
        SVD flavour of the full-rank decomposition.
    keep:
        Names of matrices whose truncated MPO to keep (for drawing).
    progress:
        Show a progress bar over the matrices.
    """
    if ratio <= 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    matrices = weight_matrices(model)
    if not matrices:
        raise ValueError("the model has no nn.Linear or nn.Embedding weights to inspect")
    keep = set(keep or [])
    unknown = keep - {m.name for m in matrices}
    if unknown:
        raise ValueError(
            f"no weight matrix named {sorted(unknown)}; candidates: "
            f"{[m.name for m in matrices][:12]}..."
        )
    records = Table()
    networks, spectra = {}, {}
    for wm in tqdm(matrices, desc="decomposing", unit="matrix", disable=not progress):
        mpo = MPO.from_matrix(wm.matrix, n=n, svd=svd)
        norm = mpo.norm or 1.0
        try:
            cut = mpo.truncate(ratio=ratio, allocation=allocation)
        except ValueError:  # the budget is below this matrix's smallest MPO
            cut = None
        if wm.name in keep:
            spectra[wm.name] = mpo
            if cut is not None:
                networks[wm.name] = cut
        central = mpo.central_bond
        records.append({
            "name": wm.name,
            "type": wm.type,
            "layer": wm.layer,
            "shape": f"{wm.shape[0]}x{wm.shape[1]}",
            "padded_shape": f"{mpo.padded_shape[0]}x{mpo.padded_shape[1]}",
            "factorization": f"{_join(mpo.row_shape, '·')} x {_join(mpo.col_shape, '·')}",
            "full_bonds": _join(mpo.full_bond_dims[1:-1]),
            "central_bond": central,
            "central_entropy": mpo.entropy(central),
            "central_entropy_max": math.log(mpo.full_bond_dims[central]),
            "entropies": list(mpo.entropies),
            "params_full_rank": mpo.num_params,
            "bonds_at_budget": _join(cut.bond_dims[1:-1]) if cut else None,
            "ratio_at_budget": cut.compression_ratio if cut else None,
            "params_at_budget": cut.num_params if cut else None,
            "relative_bound": cut.error_bound / norm if cut else None,
            "relative_error": cut.reconstruction_error(wm.matrix) / norm if cut else None,
        })
    settings = {"n": n, "ratio": ratio, "allocation": allocation, "svd": svd}
    return Inspection(records, settings, networks, spectra)


#: Columns of the table of a compressed model
#: ([inspect_compressed][mpotn.analysis.inspection.inspect_compressed]).
COMPRESSED_COLUMNS = {
    "name": "matrix",
    "shape": "shape",
    "factorization": "factorization (rows x cols)",
    "bonds": "bonds kept",
    "full_bonds": "full bonds (Eq. 2)",
    "central_entropy": "S_central (Eq. 6)",
    "params": "parameters (a shared central in each)",
    "ratio": "rho (Eq. 5)",
    "shared_by": "central shared by",
}


def inspect_compressed(model: nn.Module, keep: list[str] | None = None) -> Inspection:
    """The bond structure of a compressed model's MPO layers as they are (no new
    decomposition): per layer its factorization, kept and full bonds, the entropy of
    every bond of its canonical form (Eq. 6), parameters, $\\rho$ (Eq. 5) and how
    many layers share its central tensor; ``write`` also draws every shared central
    tensor once ([draw_shared_centrals][mpotn.analysis.inspection.draw_shared_centrals]).

    Parameters
    ----------
    model:
        An [MPOModel][mpotn.compression.model.MPOModel] (or a module with MPO layers).
    keep:
        Names of layers whose MPO to keep for drawing (network and bond spectra).

    Raises
    ------
    ValueError
        For a model without MPO layers, or a name in ``keep`` that is not one.
    """
    base = layer_holder(model)
    layers = {n: m for n, m in base.named_modules() if isinstance(m, MPO_LAYERS)}
    if not layers:
        raise ValueError("the model has no MPO layers to inspect")
    unknown = set(keep or []) - set(layers)
    if unknown:
        raise ValueError(f"no MPO layer named {sorted(unknown)}; candidates: "
                         f"{list(layers)[:12]}...")
    users: dict[int, int] = {}
    for layer in layers.values():
        users[id(layer.central)] = users.get(id(layer.central), 0) + 1
    records, networks, spectra = Table(), {}, {}
    for name, layer in layers.items():
        mpo = layer.mpo()  # canonical form of the detached cores
        if name in set(keep or []):
            networks[name] = spectra[name] = mpo
        records.append({
            "name": name, "type": matrix_type(name), "layer": layer_index(name),
            "shape": f"{mpo.shape[0]}x{mpo.shape[1]}",
            "factorization": f"{_join(mpo.row_shape, '·')} x {_join(mpo.col_shape, '·')}",
            "bonds": _join(mpo.bond_dims[1:-1]),
            "full_bonds": _join(mpo.full_bond_dims[1:-1]),
            "central_bond": mpo.central_bond,
            "central_entropy": mpo.entropy(mpo.central_bond),
            "entropies": list(mpo.entropies),
            "params": layer.num_params,
            "ratio": mpo.compression_ratio,
            "shared_by": users[id(layer.central)],
        })
    return Inspection(records, {"compressed": True}, networks, spectra,
                      columns=dict(COMPRESSED_COLUMNS), compressed=model)


def draw_shared_centrals(model: nn.Module, out: str | Path) -> dict[str, Path]:
    """Draw every group of MPO layers that shares a central tensor
    ([shared_central_groups][mpotn.compression.sharing.shared_central_groups]): the shared
    node once, with edges to each layer's chain ([shared_graph][mpotn.network.shared_graph]),
    to ``out/shared_<first layer>.png``, a run output ([mpotn.atomic.write_output][]: a
    file of the user's of that name is kept).

    Returns
    -------
    dict
        ``{first layer of the group: path}`` (``None`` for a kept file of the user's);
        empty when nothing is shared.
    """
    paths = {}
    for group in shared_central_groups(model):
        layers = layer_holder(model)
        chains = {}
        for name in group:
            index, expert = layer_index(name), re.search(r"experts\.(\d+)\.", name)
            label = name if index is None else f"L{index}" + (
                f"E{expert.group(1)}" if expert else "")
            chains[label if label not in chains else name] = [
                tuple(core.shape) for core in layers.get_submodule(name).cores]
        central = layers.get_submodule(group[0]).central
        title = (f"{group[0]} and {len(group) - 1} more layers (L<layer>[E<expert>]:A<k>: "
                 f"auxiliary tensor k)\nshare one central tensor {tuple(central.shape)} "
                 f"({central.numel():,} parameters)")
        paths[group[0]] = write_output(
            Path(out) / f"shared_{group[0].replace('.', '_')}.png",
            lambda path, chains=chains, title=title: draw_graph(shared_graph(chains), path,
                                                                title))
    return paths
