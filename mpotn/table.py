"""A list of records that prints as Markdown and converts to a DataFrame.

Examples
--------
>>> t = Table([{"bond": 1, "dim": 12}, {"bond": 2, "dim": 192}])
>>> print(t.to_markdown())
|   bond |   dim |
|--------|-------|
|      1 |    12 |
|      2 |   192 |
"""

from __future__ import annotations

import math
from typing import Any

from tabulate import tabulate


class Table(list):
    """Rows as dicts with the same keys; a plain ``list`` otherwise."""

    def to_markdown(self, floatfmt: str = ".4g") -> str:
        """GitHub-flavoured Markdown table."""
        return tabulate(self, headers="keys", tablefmt="github", floatfmt=floatfmt)

    def to_dataframe(self) -> Any:
        """A ``pandas.DataFrame`` (pandas is imported on demand)."""
        import pandas as pd

        return pd.DataFrame.from_records(self)

    def to_csv(self) -> str:
        """CSV text with a header row (the union of the rows' keys, in order of appearance).

        Examples
        --------
        >>> print(Table([{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]).to_csv(), end="")
        step,loss
        1,0.5
        2,0.25
        """
        import csv
        import io

        keys = list(dict.fromkeys(k for row in self for k in row))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self)
        return out.getvalue()

    def select(self, columns: dict[str, str]) -> Table:
        """The ``columns`` (``{key: header}``) of every row, renamed to their headers.

        Examples
        --------
        >>> Table([{"a": 1, "b": 2}]).select({"b": "B"})
        [{'B': 2}]
        """
        return Table({header: row.get(key) for key, header in columns.items()} for row in self)

    def pivot(self, rows: str, cols: str, values: str) -> tuple[list[list[float]], list, list]:
        """Grid of ``values`` by distinct ``rows`` x ``cols`` (NaN where absent).

        Records whose ``rows`` or ``cols`` entry is ``None`` are left out.

        Examples
        --------
        >>> t = Table([{"t": "q", "l": 0, "s": 1.0}, {"t": "k", "l": 1, "s": 2.0}])
        >>> t.pivot("t", "l", "s")
        ([[1.0, nan], [nan, 2.0]], ['q', 'k'], [0, 1])
        """
        kept = [r for r in self if r[rows] is not None and r[cols] is not None]
        row_labels = list(dict.fromkeys(r[rows] for r in kept))
        col_labels = sorted({r[cols] for r in kept})
        grid = [[math.nan] * len(col_labels) for _ in row_labels]
        for r in kept:
            grid[row_labels.index(r[rows])][col_labels.index(r[cols])] = r[values]
        return grid, row_labels, col_labels

    def __str__(self) -> str:
        return self.to_markdown()
