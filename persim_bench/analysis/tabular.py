"""Tables as plain data ({"title", "columns", "rows"} of strings), their Markdown, LaTeX and CSV files, and PNG figures.

Shared by the MLflow tables (``orchestration/tables.py``) and the reproduction report (``analysis/report.py``).
"""
from __future__ import annotations

import csv
from pathlib import Path


def to_markdown(table: dict) -> str:
    if not table["rows"]:
        return f"**{table['title']}**\n\n(nothing yet)\n"
    lines = [f"**{table['title']}**", "", "| " + " | ".join(table["columns"]) + " |",
             "|" + "---|" * len(table["columns"])]
    lines += ["| " + " | ".join(row) + " |" for row in table["rows"]]
    return "\n".join(lines) + "\n"


def to_latex(table: dict) -> str:
    escape = lambda text: text.replace("_", r"\_").replace("+-", r"$\pm$").replace("^2", r"$^2$")
    lines = [r"\begin{tabular}{ll" + "c" * (len(table["columns"]) - 2) + "}", r"\toprule",
             " & ".join(map(escape, table["columns"])) + r" \\", r"\midrule"]
    lines += [" & ".join(map(escape, row)) + r" \\" for row in table["rows"]]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return f"% {escape(table['title'])}\n" + "\n".join(lines) + "\n"


def write_table(table: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(to_markdown(table))
    (out / f"{name}.tex").write_text(to_latex(table))
    with open(out / f"{name}.csv", "w", newline="") as f:
        csv.writer(f).writerows([table["columns"], *table["rows"]])


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG (creating its folder) and free it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
