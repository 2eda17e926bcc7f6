"""Benchmark: MPOLinear forward (and forward + backward) against nn.Linear and tltorch.

Run from the repository root::

    python benchmarks/forward.py            # full grid, about 8 minutes on 2 cores
    python benchmarks/forward.py --quick    # one shape, two bonds, three batches

For 768 x 3072 and 384 x 1536 (``in x out``), bonds from small to full and
batches of 1 to 4096 tokens, it times, in one process and with the same cores:

* ``MPOLinear`` with its automatic choice by the cost model (``auto``), by
  measurement (``tuned``: :func:`mpotn.contraction.autotuning`), and each of its
  two paths forced (``contract``: input through the cores; ``rebuild``: weight,
  then matmul);
* tensorly-torch's ``FactorizedLinear`` (``blocktt``, the same network with the
  same ranks) in both its implementations (``factorized`` and ``reconstructed``);
* dense ``nn.Linear``.

Layers are in training mode (no cached weight; the eval-mode cache makes a
repeated forward as fast as dense). The candidates run in interleaved rounds, in a
shuffled order, and each time is the best of its rounds.
The table reports ratios measured in the same run:

* ``auto/best_path``, ``tuned/best_path``: each automatic choice against the
  faster of the two paths (goal: <= 1.10 everywhere);
* ``auto/tltorch``, ``tuned/tltorch``: against the faster tltorch
  implementation (goal: <= 1.0);
* ``auto/dense``, ``tuned/dense``: against ``nn.Linear`` (goal: < 1 wherever the
  chosen path needs fewer than half the dense FLOPs, flagged in ``flops<dense/2``);
* ``aa_noise``: ``|dense / dense_again - 1|``, the same ``nn.Linear`` timed twice
  as two candidates -- the noise floor of this row's ratios.

Writes ``benchmarks/results/forward.json`` and ``forward.md`` (included by the docs).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tltorch import FactorizedLinear
from torch import nn

from mpotn import MPO, MPOLinear, Table
from mpotn.atomic import write_text
from mpotn.contraction import autotuning

RESULTS = Path(__file__).parent / "results" / "forward.json"
SHAPES = [(768, 3072), (384, 1536)]
BATCHES = [1, 16, 128, 1024, 4096]
MAX_BONDS = [8, 32, 128, None]  # None: full rank


def best_times(fns: dict[str, Callable[[], object]], budget: float = 1.0,
               most: int = 40) -> dict[str, float]:
    """Best time of each function over rounds that run every function once.

    Interleaving spreads slow periods of a shared machine over all candidates;
    shuffling the order each round keeps one candidate from always following a
    cache-flushing one; the best of the rounds is the least disturbed run.
    """
    for fn in fns.values():
        fn()  # warm-up: plans, caches, allocator
    best = dict.fromkeys(fns, float("inf"))
    order = list(fns)
    shuffle = random.Random(0).shuffle
    start, rounds = time.perf_counter(), 0
    while rounds < 5 or (time.perf_counter() - start < budget and rounds < most):
        shuffle(order)
        for name in order:
            fn = fns[name]
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
        rounds += 1
    return best


def runner(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
           params: list[torch.Tensor], backward: bool) -> Callable[[], object]:
    if not backward:
        def run() -> object:
            with torch.no_grad():
                return forward(x)
        return run

    def run_backward() -> object:
        for p in params:
            p.grad = None
        forward(x).sum().backward()
    return run_backward


def tltorch_layer(layer: MPOLinear, implementation: str) -> FactorizedLinear:
    factorized = FactorizedLinear(layer.row.factors, layer.col.factors, factorization="blocktt",
                                  rank=list(layer.bond_dims), implementation=implementation)
    with torch.no_grad():
        for factor, core in zip(factorized.weight.factors, layer.cores):
            factor.copy_(core.permute(0, 2, 1, 3))  # tltorch: (d, out_k, in_k, d)
        factorized.bias.copy_(layer.bias)
    return factorized


def measure(shape: tuple[int, int], max_bond: int | None, batch: int, backward: bool,
            mpo: MPO) -> dict:
    dense = nn.Linear(*shape)
    with torch.no_grad():
        dense.weight.copy_(mpo.to_matrix().T)
    layer = MPOLinear.from_linear(dense, mpo=mpo if max_bond is None
                                  else mpo.truncate(max_bond=max_bond))
    x = torch.randn(batch, shape[0])
    cores = list(layer.cores)

    def contract(v: torch.Tensor) -> torch.Tensor:
        return layer.contractor.apply(v, cores, method="contract") + layer.bias

    def rebuild(v: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(v, layer.contractor.rebuild(cores).mT, layer.bias)

    def tuned(v: torch.Tensor) -> torch.Tensor:
        with autotuning():
            return layer(v)

    candidates = {
        "auto": (layer, list(layer.parameters())),
        "tuned": (tuned, list(layer.parameters())),
        "contract": (contract, list(layer.parameters())),
        "rebuild": (rebuild, list(layer.parameters())),
        "dense": (dense, list(dense.parameters())),
        "dense_again": (dense, list(dense.parameters())),  # A/A: the run's own noise
    }
    for implementation in ("factorized", "reconstructed"):
        tl = tltorch_layer(layer, implementation)
        candidates[f"tltorch_{implementation}"] = (tl, list(tl.parameters()))
    with torch.no_grad():  # every candidate computes the same layer
        reference = dense(x) if max_bond is None else None
        outputs = {name: fn(x) for name, (fn, _) in candidates.items()
                   if not name.startswith("dense")}
    first = outputs["auto"]
    scale = float(first.abs().max())
    output_diff = max(float((y - first).abs().max()) for y in outputs.values()) / scale
    if reference is not None:  # full rank: equal to nn.Linear as well
        output_diff = max(output_diff, float((reference - first).abs().max()) / scale)
    times = best_times({name: runner(fn, x, params, backward)
                        for name, (fn, params) in candidates.items()})
    cost = layer.contractor.cost(batch, [c.shape for c in cores])
    chosen = min(cost.contract_flops, cost.rebuild_flops)
    with torch.set_grad_enabled(backward), autotuning():
        tuned_choice = layer.contractor.tuned_method(batch, cores, bias=True)
    best_path = min(times["contract"], times["rebuild"])
    best_tl = min(times["tltorch_factorized"], times["tltorch_reconstructed"])
    return {
        "shape": f"{shape[0]}x{shape[1]}",
        "bonds": ",".join(map(str, layer.bond_dims[1:-1])),
        "batch": batch,
        "pass": "fwd+bwd" if backward else "fwd",
        "choice": cost.method,
        "tuned_choice": tuned_choice,
        "flops<dense/2": chosen < cost.dense_flops / 2,
        "auto/best_path": times["auto"] / best_path,
        "tuned/best_path": times["tuned"] / best_path,
        "auto/tltorch": times["auto"] / best_tl,
        "tuned/tltorch": times["tuned"] / best_tl,
        "auto/dense": times["auto"] / times["dense"],
        "tuned/dense": times["tuned"] / times["dense"],
        "params/dense": sum(c.numel() for c in cores) / (shape[0] * shape[1]),
        "aa_noise": abs(times["dense"] / times["dense_again"] - 1),
        "max_output_diff": output_diff,
        **{f"{name}_ms": 1e3 * t for name, t in times.items()},
    }


def report(rows: list[dict]) -> tuple[str, Table]:
    """The summary (per choice: cost model ``auto``, measured ``tuned``) and the full table.

    ``chosen path within 10%`` compares the forced-path times of the chosen
    and the better path (is the choice right?); ``/best_path`` compares the
    layer's own time, which adds call overhead and this machine's noise.
    """
    flagged = [r for r in rows if r["flops<dense/2"]]
    summary = Table({
        "choice": choice,
        "rows": len(rows),
        "chosen path within 10%": sum(
            r[f"{r[key]}_ms"] <= 1.1 * min(r["contract_ms"], r["rebuild_ms"]) for r in rows),
        "worst /best_path": max(r[f"{choice}/best_path"] for r in rows),
        "rows within 10% of best path": sum(r[f"{choice}/best_path"] <= 1.1 for r in rows),
        "worst /tltorch": max(r[f"{choice}/tltorch"] for r in rows),
        "rows not slower than tltorch": sum(r[f"{choice}/tltorch"] <= 1.0 for r in rows),
        "rows within 5% of tltorch": sum(r[f"{choice}/tltorch"] <= 1.05 for r in rows),
        "rows within A/A noise of tltorch": sum(
            r[f"{choice}/tltorch"] <= 1 + r["aa_noise"] for r in rows),
        "median A/A noise": statistics.median(r["aa_noise"] for r in rows),
        "faster than dense where flops<dense/2": (
            f"{sum(r[f'{choice}/dense'] < 1 for r in flagged)}/{len(flagged)}"),
    } for choice, key in (("auto", "choice"), ("tuned", "tuned_choice")))
    columns = ["shape", "bonds", "batch", "pass", "choice", "tuned_choice", "flops<dense/2",
               "auto/best_path", "tuned/best_path", "auto/tltorch", "tuned/tltorch",
               "tuned/dense", "params/dense", "aa_noise", "tuned_ms", "dense_ms"]
    table = (summary.to_markdown(floatfmt=".3g") + "\n\n"
             + Table({c: r[c] for c in columns} for r in rows).to_markdown(floatfmt=".3g")
             + "\n")
    return table, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape, two bonds, 3 batches")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    parser.add_argument("--report-only", action="store_true",
                        help="remake the tables from the rows already in --out, measuring nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads(args.out.read_text())
        table, summary = report(saved["rows"])
        write_text(args.out, json.dumps({**saved, "summary": list(summary)}, indent=2))
        write_text(args.out.with_suffix(".md"), table)
        print(table)
        return 0
    torch.manual_seed(0)
    shapes = SHAPES[1:] if args.quick else SHAPES
    bonds = [8, None] if args.quick else MAX_BONDS
    batches = [1, 128, 4096] if args.quick else BATCHES
    rows = Table()
    for shape in shapes:
        mpo = MPO.from_matrix(torch.randn(*shape) / shape[0] ** 0.5)
        for max_bond in bonds:
            for batch in batches:
                for backward in (False, True):
                    rows.append(measure(shape, max_bond, batch, backward, mpo))
                    r = rows[-1]
                    print(f"{r['shape']} bonds {r['bonds']} batch {batch} {r['pass']}: "
                          f"auto/best {r['auto/best_path']:.2f} tuned/best "
                          f"{r['tuned/best_path']:.2f} auto/tltorch {r['auto/tltorch']:.2f} "
                          f"tuned/tltorch {r['tuned/tltorch']:.2f}",
                          file=sys.stderr)
    table, summary = report(rows)
    print(table)
    write_text(args.out, json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                                     "summary": list(summary), "rows": list(rows)}, indent=2))
    write_text(args.out.with_suffix(".md"), table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
