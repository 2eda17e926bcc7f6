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

from typing import Any

from tabulate import tabulate


class Table(list):
    """Rows as dicts with the same keys; a plain ``list`` otherwise."""

    def to_markdown(self, floatfmt: str = ".4g") -> str:
        """GitHub-flavoured Markdown table."""
        return tabulate(self, headers="keys", tablefmt="github", floatfmt=floatfmt)

    def to_dataframe(self) -> Any:
        """A :class:`pandas.DataFrame` (pandas is imported on demand)."""
        import pandas as pd

        return pd.DataFrame.from_records(self)

    def __str__(self) -> str:
        return self.to_markdown()
