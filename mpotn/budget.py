"""One parameter budget for a whole model (SPEC §7, model-wide budget).

Each matrix offers a *path*: the sequence of cuts it would take one after
another, each freeing some parameters at some increase of its (relative,
squared) error: for an MPO, the next one-dimension bond cut of the greedy of
[mpotn.truncation.dims_for_budget][] ([mpo_path][mpotn.budget.mpo_path]; a
truncated SVD is the MPO with rows ``(I, 1)`` and columns ``(1, J)``, whose
cuts are its ranks, and a whitened MPO's errors are output errors).
[spend][mpotn.budget.spend] merges the paths: it keeps taking, over all
matrices, the cut with the least error per freed parameter until the model is
within budget. For paths whose cost per
parameter grows along the path (a sorted spectrum) this is the optimum of
the separable problem "minimise the summed relative squared error subject to
the total parameter count".

Examples
--------
>>> a = Path("a", params=100, steps=[(10, 0.01), (10, 0.02), (10, 0.5)])
>>> b = Path("b", params=100, steps=[(10, 0.05), (10, 0.06)])
>>> spend([a, b], budget=160)
{'a': 2, 'b': 2}
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mpotn.mpo import MPO
from mpotn.truncation import greedy_path


@dataclass
class Path:
    """The cuts one matrix can take, in order.

    Attributes
    ----------
    name:
        The matrix (module name).
    params:
        Its parameter count before any cut.
    steps:
        ``(freed parameters, added relative squared error)`` per cut.
    """

    name: str
    params: int
    steps: list[tuple[int, float]] = field(default_factory=list)

    def params_after(self, cuts: int) -> int:
        """Parameters left after the first ``cuts`` cuts."""
        return self.params - sum(freed for freed, _ in self.steps[:cuts])

    def error_after(self, cuts: int) -> float:
        """Relative squared error added by the first ``cuts`` cuts."""
        return sum(added for _, added in self.steps[:cuts])

    def cuts_reaching(self, error: float) -> int:
        """The fewest cuts whose added error is at least ``error`` (all of them when
        none is).

        Examples
        --------
        >>> Path("m", 90, [(30, 0.001), (30, 0.02), (20, 0.5)]).cuts_reaching(0.01)
        2
        """
        added = 0.0
        for k, (_, step) in enumerate(self.steps, 1):
            added += step
            if added >= error:
                return k
        return len(self.steps)

    def weighted(self, weight: float) -> Path:
        """This path with every step's error multiplied by ``weight`` (a matrix's
        sensitivity, [mpotn.compression.sensitivity][]).

        Examples
        --------
        >>> Path("m", 90, [(30, 0.01), (30, 0.02)]).weighted(2.0)
        Path(name='m', params=90, steps=[(30, 0.02), (30, 0.04)])
        """
        return Path(self.name, self.params, [(freed, added * weight)
                                             for freed, added in self.steps])

    def from_dense(self, entries: int) -> Path:
        """This path with the dense matrix (``entries`` parameters, no error) as its start.

        A factorization that keeps at least ``entries`` parameters (a truncated SVD
        of an ``I x J`` matrix above rank ``IJ / (I + J)``, a full-rank MPO) is larger
        than the matrix it approximates: its cuts down to the first one below
        ``entries`` are merged into one step from the dense matrix. ``params_after``
        of this path after ``c >= 1`` cuts is that of the original after
        ``c + len(self.steps) - len(path.steps)``; after none, the matrix is dense. A path
        that starts below ``entries`` is returned as it is.

        Examples
        --------
        >>> Path("m", 150, [(30, 0.01), (30, 0.02), (30, 0.04)]).from_dense(100)
        Path(name='m', params=100, steps=[(10, 0.03), (30, 0.04)])
        """
        if self.params < entries:
            return self
        params, added, k = self.params, 0.0, 0
        while params >= entries and k < len(self.steps):
            params -= self.steps[k][0]
            added += self.steps[k][1]
            k += 1
        if params >= entries:  # no cut gets below the dense size
            return Path(self.name, entries)
        return Path(self.name, entries, [(entries - params, added), *self.steps[k:]])


def spend(paths: Sequence[Path], budget: int) -> dict[str, int]:
    """How many cuts each path takes so the total fits ``budget`` at least added error.

    Raises
    ------
    ValueError
        When every path cut to its end still exceeds the budget.
    """
    total = sum(p.params for p in paths)
    taken = {p.name: 0 for p in paths}
    heap = [(p.steps[0][1] / max(p.steps[0][0], 1), k) for k, p in enumerate(paths) if p.steps]
    heapq.heapify(heap)
    while total > budget and heap:
        _, k = heapq.heappop(heap)
        path = paths[k]
        freed, _ = path.steps[taken[path.name]]
        total -= freed
        taken[path.name] += 1
        nxt = taken[path.name]
        if nxt < len(path.steps):
            heapq.heappush(heap, (path.steps[nxt][1] / max(path.steps[nxt][0], 1), k))
    if total > budget:
        raise ValueError(
            f"a model-wide budget of {budget:,} parameters is below the smallest model these "
            f"matrices can reach ({total:,} parameters with every matrix cut to its end)"
        )
    return taken


def spend_keeping_dense(paths: Sequence[Path], sizes: Mapping[str, int], budget: int
                        ) -> dict[str, int | None]:
    """[spend][mpotn.budget.spend] where a matrix may also stay dense (``sizes[name]``
    parameters, no error): the cuts each path takes, ``None`` for a matrix kept dense.

    Of two greedy allocations, the one with the lower summed error (the first on a tie):
    over the paths that start at the dense matrix
    ([Path.from_dense][mpotn.budget.Path.from_dense]), and by
    re-spending (spend; keep dense every matrix whose share is at least its size; spend
    what is left over the others; until no share is). The first's merged steps can cost
    more per parameter than the steps after them, where its greedy is not optimal.

    Examples
    --------
    >>> a = Path("a", params=150, steps=[(30, 0.001), (30, 0.002), (30, 0.04)])
    >>> b = Path("b", params=100, steps=[(20, 0.05), (20, 0.06)])
    >>> spend_keeping_dense([a, b], {"a": 100, "b": 100}, budget=180)
    {'a': 3, 'b': None}
    """
    merged = [p.from_dense(sizes[p.name]) for p in paths]
    taken = spend(merged, budget)
    first: dict[str, int | None] = {}
    for path, dense in zip(paths, merged):
        if taken[path.name] == 0 and dense.params == sizes[path.name]:
            first[path.name] = None
        else:  # the merged path's steps are the original's last ones
            first[path.name] = taken[path.name] + len(path.steps) - len(dense.steps)
    second: dict[str, int | None] = {}
    while True:
        rest = [p for p in paths if p.name not in second]
        try:
            cuts = spend(rest, budget - sum(sizes[name] for name in second))
        except ValueError:  # only a matrix kept dense gets the model within the budget
            return first
        full = {p.name for p in rest if p.params_after(cuts[p.name]) >= sizes[p.name]}
        if not full:
            second.update(cuts)
            break
        second.update(dict.fromkeys(full))

    def error(cuts: Mapping[str, int | None]) -> float:
        return sum(p.error_after(cuts[p.name]) for p in paths if cuts[p.name] is not None)

    return first if error(first) <= error(second) else second


def mpo_path(name: str, mpo: MPO) -> Path:
    """The path of an MPO: the greedy one-dimension bond cuts of
    [mpotn.truncation.greedy_path][], errors relative to ``||M||_F^2``."""
    norm_sq = mpo.norm**2 or 1.0
    steps = greedy_path(mpo.singular_values, mpo.bond_dims, mpo.local_dims)
    return Path(name, mpo.num_params, [(freed, added / norm_sq) for freed, added in steps])
