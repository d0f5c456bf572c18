"""Report helpers: a Markdown report with tables (also saved as CSV) and figures (PNG)."""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # reports are written on headless nodes

from common.lazy import lazy_import

if TYPE_CHECKING:
    import pandas as pd
else:
    pd = lazy_import("pandas")


def format_number(value: object) -> str:
    """One table cell as a reader wants it: integers (also integer-valued floats such as token
    counts) without decimals, other floats to 4 significant figures, tiny ones in scientific notation
    (p-values: 3.2e-07, never 0.0000), and missing values (NaN: not measured or not computable) as n/a."""
    if value is None or value is pd.NA or value is pd.NaT:
        return "n/a"
    if isinstance(value, (bool, str)) or not isinstance(value, numbers.Real):
        return str(value)  # numpy booleans are not Real: True/False
    if isinstance(value, numbers.Integral):
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return "n/a"
    if math.isinf(value) or abs(value) >= 1e15:
        return f"{value:.4g}"
    if value.is_integer():
        return str(int(value))
    if abs(value) >= 1e4:  # 12345.6: all integer digits, not 1.235e+04
        return f"{value:.0f}"
    return f"{value:.4g}"


def markdown_table(frame: pd.DataFrame) -> str:
    """`frame` as a Markdown table, each cell by `format_number`, numeric columns right-aligned."""
    dtypes = frame.infer_objects().dtypes  # a column of numbers stored as objects is numeric too
    align = ["right" if pd.api.types.is_numeric_dtype(t) and not pd.api.types.is_bool_dtype(t) else "left"
             for t in dtypes]
    # disable_numparse: tabulate would otherwise read "2174" back as a number and format it again
    return frame.astype(object).map(format_number).to_markdown(index=False, disable_numparse=True, colalign=align)


class Report:
    """Collects sections, then writes `report.md` beside its CSV tables and PNG figures."""

    def __init__(self, folder: Path, title: str):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lines = [f"# {title}", ""]

    def text(self, text: str) -> None:
        self.lines += [text.strip(), ""]

    def heading(self, text: str) -> None:
        self.lines += [f"## {text}", ""]

    def table(self, frame: pd.DataFrame, name: str, shown: pd.DataFrame | None = None) -> None:
        """Save `frame` as `<name>.csv`; show `shown` (a summary of it) or its first 40 rows."""
        frame.to_csv(self.folder / f"{name}.csv", index=False)
        shown = frame.head(40) if shown is None else shown
        self.lines += [markdown_table(shown), ""]
        self.lines += [f"(full table, {len(frame)} rows: [{name}.csv]({name}.csv))", ""]

    def figure(self, fig: matplotlib.figure.Figure, name: str, caption: str) -> None:
        import matplotlib.pyplot as plt

        fig.savefig(self.folder / f"{name}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.lines += [f"![{caption}]({name}.png)", "", f"*{caption}*", ""]

    def write(self) -> Path:
        path = self.folder / "report.md"
        path.write_text("\n".join(self.lines))
        return path
