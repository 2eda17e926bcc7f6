"""One model-wide budget (mpotn.budget): spend, and spend_keeping_dense."""

from __future__ import annotations

import random

from mpotn.budget import Path, spend, spend_keeping_dense


def _random_paths(rng: random.Random) -> tuple[list[Path], dict[str, int]]:
    """Paths of sorted-spectrum cuts from a factorization that may be larger than its
    matrix (as a truncated SVD above its break-even rank is)."""
    paths, sizes = [], {}
    for k in range(rng.randint(2, 5)):
        size = rng.randint(50, 400)
        steps = [(rng.randint(5, 40), rng.random() * 0.02) for _ in range(rng.randint(3, 12))]
        steps.sort(key=lambda step: step[1] / step[0])  # cost per parameter grows
        params = rng.randint(size // 2, 2 * size)
        paths.append(Path(f"m{k}", params, steps))
        sizes[f"m{k}"] = size
    return paths, sizes


def test_keeping_dense_fits_the_budget_keeps_no_oversized_factorization_adds_no_error():
    rng = random.Random(0)
    checked = kept_dense = 0
    for _ in range(2000):
        paths, sizes = _random_paths(rng)
        smallest = sum(p.params_after(len(p.steps)) for p in paths)
        budget = rng.randint(smallest, sum(max(p.params, sizes[p.name]) for p in paths))
        plain = spend(paths, budget)
        kept = spend_keeping_dense(paths, sizes, budget)
        params = {p.name: sizes[p.name] if kept[p.name] is None else p.params_after(kept[p.name])
                  for p in paths}
        assert sum(params.values()) <= budget
        assert all(params[p.name] < sizes[p.name] for p in paths if kept[p.name] is not None)
        error = sum(p.error_after(kept[p.name]) for p in paths if kept[p.name] is not None)
        assert error <= sum(p.error_after(plain[p.name]) for p in paths) + 1e-12
        checked += 1
        kept_dense += any(c is None for c in kept.values())
    assert checked == 2000 and kept_dense > 500  # the dense option is often taken


def test_a_budget_above_every_factorization_keeps_every_matrix_dense():
    paths = [Path("a", 128, [(8, 0.0), (8, 0.01)]), Path("b", 128, [(8, 0.0)])]
    assert spend_keeping_dense(paths, {"a": 64, "b": 64}, budget=10**6) == {"a": None, "b": None}
