"""Report files of a compression: Markdown, JSON and plots, next to the weights.

Examples
--------
>>> import tempfile
>>> from torch import nn
>>> from mpotn.compression.compress import compress
>>> model = compress(nn.Sequential(nn.Linear(32, 64)), targets=["0"], n=3, max_bond=4,
...                  progress=False)
>>> sorted(write_compression_report(model, tempfile.mkdtemp(), "toy"))
['errors', 'json', 'markdown']
"""

from __future__ import annotations

import json
from pathlib import Path

from mpotn.atomic import write_output, written_files
from mpotn.compression.model import MPOModel
from mpotn.drawing import draw_entropy_heatmap, draw_errors

#: Printed columns of the compression report and their headers. ``ratio`` is Eq. 5 for MPO
#: layers and ``FactorNetwork.params_ratio`` (over the unpadded matrix) for other methods'.
COLUMNS = {
    "name": "matrix",
    "shape": "shape",
    "factorization": "factorization (rows x cols)",
    "bond_dims": "bonds",
    "ratio": "rho (Eq. 5)",
    "central_entropy": "S_central (Eq. 6)",
    "relative_bound": "bound/|M| (Eq. 4)",
    "relative_error": "error/|M|",
    "structure": "structure",
    "output_error": "output error (Eq. 7)",
}


#: Columns printed only when a row has them: the error a layer's matrix took when it came
#: to share a central tensor ([share_centrals][mpotn.compression.sharing.share_centrals]).
SHARING_COLUMNS = {"shared_group": "shared central", "sharing_error": "sharing error/|M|"}


#: Printed only when a model budget measured each matrix's sensitivity
#: ([mpotn.compression.sensitivity][]).
SENSITIVITY_COLUMNS = {"sensitivity": "sensitivity s"}


#: Printed only when a balanced MPO was fitted by Kronecker-factored whitening (SPEC §7):
#: the share of ``||C||^2`` its nearest Kronecker product keeps.
KRONECKER_COLUMNS = {"kronecker_kept": "C kept by C_1 x ... x C_n"}


def report_table(model: MPOModel) -> str:
    """The per-matrix report as Markdown, with readable headers (and the sharing columns
    when central tensors are shared, the sensitivity column when it was measured, the
    Kronecker column for Kronecker-whitened fits)."""
    report = model.report()
    shown = dict(COLUMNS)
    for columns, key in ((SHARING_COLUMNS, "sharing_error"),
                         (SENSITIVITY_COLUMNS, "sensitivity"),
                         (KRONECKER_COLUMNS, "kronecker_kept")):
        if any(row.get(key) is not None for row in report):
            shown.update(columns)
    return report.select(shown).to_markdown()


def write_compression_report(model: MPOModel, out: str | Path, model_name: str,
                             fidelity: dict[str, float] | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` (with ``fidelity``, what
    [FidelityProbe.measure][mpotn.analysis.fidelity.FidelityProbe.measure] gave, when
    given), ``entropy_heatmap.png`` (when a matrix has a central-bond entropy to draw: not
    one kept dense or of another decomposition; an earlier run's is removed otherwise) and
    ``errors.png``, each recorded in the manifest of ``out`` ([mpotn.atomic.write_output][];
    a file of the user's is kept, with a warning)."""
    out = Path(out)
    totals = model.totals()
    policy = {k: v for k, v in model.compression_config.to_dict().items()
              if v not in (None, {}, [])}
    measured = "" if fidelity is None else (
        "Expected fidelity against the original model (held-out sentences): "
        + ", ".join(f"{key.replace('_', ' ')} {value:.4f}" for key, value in fidelity.items())
        + "\n\n")
    markdown = (
        f"# mpotn compress: {model_name}\n\n"
        f"Settings: `{json.dumps(policy)}`\n\n{measured}{model.summary()}\n\n"
        f"{report_table(model)}\n"
    )
    summary = {"model": model_name, "config": model.compression_config.to_dict(),
               "totals": totals}
    if fidelity is not None:
        summary["fidelity"] = fidelity
    paths = {
        "markdown": write_output(out / "report.md", markdown),
        "json": write_output(out / "report.json", json.dumps(
            {**summary, "matrices": list(model.report())}, indent=2)),
    }
    paths["errors"] = write_output(out / "errors.png", lambda path: draw_errors(
        model.report(), path, f"reconstruction error per matrix, {model_name}"))
    paths["heatmap"] = write_output(out / "entropy_heatmap.png", lambda path: (
        draw_entropy_heatmap(model.report(), path, model_name)))
    if paths["heatmap"] is None and "entropy_heatmap.png" in written_files(out):
        # an earlier run's: this one has no MPO with a central bond entropy to draw
        (out / "entropy_heatmap.png").unlink(missing_ok=True)
    return {key: path for key, path in paths.items() if path}
