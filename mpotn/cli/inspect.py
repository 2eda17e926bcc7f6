"""``mpotn inspect``: the bond structure of every weight matrix of a model (or ``--changes``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mpotn.cli.common import _cores, _positive_float, check_out
from mpotn.types import ALLOCATIONS, DEFAULT_RATIO, SVD_METHODS

if TYPE_CHECKING:  # the commands import torch only when they run
    import torch


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mpotn inspect`` to ``subparsers``."""
    inspect = subparsers.add_parser(
        "inspect",
        help="decompose every weight matrix of a model and report its bond structure",
        description=(
            "Decompose every embedding and linear weight of MODEL into an MPO "
            "(Algorithm 1) and report its factorization, full bonds (Eq. 2), "
            "central-bond entropy (Eq. 6) and, at a budget, the Eq. 4 error bound "
            "and the actual error. Writes inspect.md, inspect.json, an entropy "
            "heatmap, the entropy profiles along the chain, and a drawing and the bond "
            "spectra of one network to --out. Given an mpotn save "
            "(mpotn compress --out), it reports the bonds the save keeps instead, and "
            "draws each central tensor shared by several layers once."
        ),
    )
    inspect.add_argument(
        "model", nargs="?", default=None,
        help="local model folder or hub id (default: the embedded all-MiniLM-L6-v2), or an "
             "mpotn save",
    )
    inspect.add_argument("--n", type=_cores, default=5, help="cores per matrix (default: 5)")
    inspect.add_argument(
        "--ratio", type=_positive_float, default=DEFAULT_RATIO,
        help=f"budget as compression ratio rho, Eq. 5 (default: {DEFAULT_RATIO})",
    )
    inspect.add_argument(
        "--allocation", choices=ALLOCATIONS, default="optimal",
        help="how the budget is spread over bonds (default: optimal, minimising Eq. 4)",
    )
    inspect.add_argument(
        "--svd", choices=SVD_METHODS, default="auto",
        help="SVD flavour of the decomposition (default: auto)",
    )
    inspect.add_argument(
        "--draw", default=None, metavar="NAME",
        help="module name of the matrix to draw (default: the first FFN matrix)",
    )
    inspect.add_argument(
        "--changes", nargs=2, default=None, metavar=("BEFORE", "AFTER"),
        help="instead: compare two mpotn saves of the same model (e.g. a squeeze run's "
             "checkpoints/step-0000 and a fine-tuned model/) and report how far each "
             "matrix's central and auxiliary tensors moved",
    )
    inspect.add_argument(
        "--device", default=None, metavar="DEVICE",
        help="where to decompose the model's matrices (or read a save's, or compare two "
             "saves): cpu, cuda or cuda:N (default: CUDA when present, else the CPU)")
    inspect.add_argument(
        "--out", default="mpotn-inspect", help="output folder (default: ./mpotn-inspect)"
    )
    inspect.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_core_changes(before: str, after: str, out: str, device: torch.device) -> None:
    """Relative change of central and auxiliary tensors between two saves of one model,
    both loaded onto ``device``."""
    from mpotn.atomic import write_output
    from mpotn.compression import load
    from mpotn.finetune.core_changes import core_changes, snapshot_cores

    start, end = load(before, device=device), load(after, device=device)
    cores = snapshot_cores(start.base_model)
    if set(cores) != set(snapshot_cores(end.base_model)):
        raise ValueError(f"{before} and {after} do not hold the same MPO layers")
    for name, layer in end.mpo_layers().items():
        if [tuple(c.shape) for c in cores[name]] != [tuple(c.shape) for c in layer.cores]:
            raise ValueError(f"{name} has other bond dimensions in {after} than in {before}; "
                             "compare saves made before any cut")
    table = core_changes(cores, end.base_model)
    print(table.to_markdown(floatfmt=".4g"))
    write_output(Path(out) / "core_changes.csv", table.to_csv())
    print(f"\nwrote {out}/core_changes.csv")


def run_compressed(args: argparse.Namespace, start: float, device: torch.device) -> None:
    """Inspect an mpotn save, loaded onto ``device``: the bonds it keeps, and its shared
    central tensors."""
    from mpotn.analysis.inspection import inspect_compressed
    from mpotn.compression import load

    model = load(args.model, device=device)
    layers = model.mpo_layers()
    if not layers:
        raise ValueError(f"{args.model} has no MPO layers to inspect (it was compressed with "
                         "another method)")
    draw = args.draw or next((n for n in layers if n.endswith("intermediate.dense")),
                             next(iter(layers)))
    result = inspect_compressed(model, keep=[draw])
    print(f"model: {args.model} (an mpotn save)")
    print(result.table().to_markdown(floatfmt=".4g"))
    paths = result.write(args.out, str(args.model))
    print(f"\n{len(result.records)} MPO layers in {time.perf_counter() - start:.1f} s; wrote:")
    for path in paths.values():
        print(f"  {path}")


def run(args: argparse.Namespace) -> None:
    """Load the model, inspect it, print the table and write the files."""
    from mpotn.analysis.inspection import inspect_model
    from mpotn.compression.models import load_model, resolve_model, weight_matrices
    from mpotn.compression.serialization import is_saved_model
    from mpotn.devices import resolve_device

    check_out(args.out)
    device = resolve_device(args.device)
    if args.changes:
        run_core_changes(*args.changes, args.out, device)
        return
    start = time.perf_counter()
    if args.model is not None and is_saved_model(args.model):
        run_compressed(args, start, device)
        return
    model = load_model(args.model).to(device)
    name = args.model or "all-MiniLM-L6-v2 (embedded)"
    draw = args.draw
    if draw is None:
        matrices = weight_matrices(model)
        ffn = [m.name for m in matrices if m.type == "ffn_in"]
        draw = (ffn or [m.name for m in matrices])[0]
    result = inspect_model(
        model, n=args.n, ratio=args.ratio, allocation=args.allocation, svd=args.svd,
        keep=[draw], progress=not args.no_progress,
    )
    print(f"model: {name} ({resolve_model(args.model)})")
    print(result.table().to_markdown())
    paths = result.write(args.out, name)
    print(f"\n{len(result.records)} matrices in {time.perf_counter() - start:.1f} s; wrote:")
    for path in paths.values():
        print(f"  {path}")
