"""Report helpers: a Markdown report with tables (also saved as CSV) and figures (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written on headless nodes
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


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
        # object dtype: tabulate then formats ints as ints and floats with 4 decimals
        self.lines += [shown.astype(object).to_markdown(index=False, floatfmt=".4f"), ""]
        self.lines += [f"(full table, {len(frame)} rows: [{name}.csv]({name}.csv))", ""]

    def figure(self, fig: plt.Figure, name: str, caption: str) -> None:
        fig.savefig(self.folder / f"{name}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.lines += [f"![{caption}]({name}.png)", "", f"*{caption}*", ""]

    def write(self) -> Path:
        path = self.folder / "report.md"
        path.write_text("\n".join(self.lines))
        return path
