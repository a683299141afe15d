"""Tables as plain data ({"title", "columns", "rows"} of strings), their Markdown, LaTeX and CSV files, and figures.

Shared by the grid tables (``analysis/grid_tables.py``) and the reproduction report (``analysis/reproduction.py``).

Method labels: a table row names a method by its label, never by a label written here. The caller passes
``labels``, {method key: label} (orchestration builds it from the algorithm registry); ``method_label``
adds PerSim's rank-sweep suffix and ``method_key_of`` reads a label back.

LaTeX: every ``.tex`` is a bare ``tabular`` (``\\input`` it inside a document that loads ``booktabs``)
and plain ASCII, so it compiles under pdflatex, XeLaTeX and LuaLaTeX alike: LaTeX's specials are
escaped, the conventions our cells use (``+-``, ``R^2``) and the usual Unicode symbols (``±``, ``×``,
``≥``, ...) become math, and any other non-ASCII character is written as ``[U+XXXX]``.

Figures: ``save_figure`` writes every figure as a PNG and, beside it, a PDF; ``method_colours`` gives each
method one fixed colour across every figure; ``fit_text_width`` wraps a title that would not fit.
"""
from __future__ import annotations

import csv
import re
import textwrap
import unicodedata
import zlib
from pathlib import Path
from typing import Iterable, Mapping

# ---------------------------------------------------------------------------------------- method labels


def method_label(key: str, labels: Mapping[str, str]) -> str:
    """A method's row label: ``labels[algo]`` (the algorithm itself if unlabelled), ``" (rank r)"`` added for
    PerSim's rank sweep (key ``persim@r<r>``)."""
    algo, _, rank = key.partition("@r")
    return labels.get(algo, algo) + (f" (rank {rank})" if rank else "")


def method_key_of(label: str, labels: Mapping[str, str]) -> str:
    """The inverse of ``method_label``: ``"PerSim (rank 4)"`` -> ``persim@r4``; an unknown label is its own key."""
    algo, rank = label, ""
    if label.endswith(")") and " (rank " in label:
        algo, _, rank = label[:-1].rpartition(" (rank ")
    key = next((name for name, text in labels.items() if text == algo), algo)
    return key + (f"@r{rank}" if rank else "")

# ---------------------------------------------------------------------------------------- Markdown / CSV


def to_markdown(table: dict) -> str:
    """The table under its bold title; a table without rows shows its ``empty`` text (default: nothing yet)."""
    if not table["rows"]:
        return f"**{table['title']}**\n\n{table.get('empty', '(nothing yet)')}\n"
    lines = [f"**{table['title']}**", "", "| " + " | ".join(table["columns"]) + " |",
             "|" + "---|" * len(table["columns"])]
    lines += ["| " + " | ".join(row) + " |" for row in table["rows"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- LaTeX

LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
    "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    # not specials, but OT1 (pdflatex's default font encoding) prints them as other glyphs (¡ ¿ —)
    "<": "$<$", ">": "$>$", "|": r"$|$",
}
"""Text-mode replacement of every character LaTeX would not print as itself."""

LATEX_UNICODE = {
    "±": r"$\pm$", "∓": r"$\mp$", "×": r"$\times$", "÷": r"$\div$", "·": r"$\cdot$", "≥": r"$\geq$",
    "≤": r"$\leq$", "≠": r"$\neq$", "≈": r"$\approx$", "∼": r"$\sim$", "→": r"$\rightarrow$",
    "←": r"$\leftarrow$", "↔": r"$\leftrightarrow$", "⇒": r"$\Rightarrow$", "∞": r"$\infty$", "−": r"$-$",
    "√": r"$\surd$", "∈": r"$\in$", "°": r"$^{\circ}$", "²": r"$^{2}$", "³": r"$^{3}$", "¹": r"$^{1}$",
    "α": r"$\alpha$", "β": r"$\beta$", "γ": r"$\gamma$", "δ": r"$\delta$", "Δ": r"$\Delta$", "ε": r"$\epsilon$",
    "λ": r"$\lambda$", "μ": r"$\mu$", "µ": r"$\mu$", "π": r"$\pi$", "σ": r"$\sigma$", "τ": r"$\tau$",
    "–": "--", "—": "---", "…": r"\ldots{}", "‘": "`", "’": "'", "“": "``", "”": "''", "\u00a0": " ",
    "§": r"\S{}", "¶": r"\P{}", "©": r"\copyright{}", "£": r"\pounds{}", "ß": r"\ss{}", "æ": r"\ae{}",
    "Æ": r"\AE{}", "ø": r"\o{}", "Ø": r"\O{}", "å": r"\aa{}", "Å": r"\AA{}", "œ": r"\oe{}", "Œ": r"\OE{}",
}
"""Non-ASCII characters with an ASCII LaTeX spelling that needs no package beyond the LaTeX kernel."""

_ACCENTS = {"\u0301": "'", "\u0300": "`", "\u0308": '"', "\u0302": "^", "\u0303": "~", "\u0304": "=",
            "\u0327": "c", "\u030c": "v", "\u030a": "r", "\u0306": "u", "\u030b": "H", "\u0307": "."}
# the conventions our cells are written in: "mean +- std", "R^2", "1e^-3"
_CONVENTIONS = re.compile(r"\+-|\^(-?[0-9]+)")


def _latex_char(char: str) -> str:
    if char in LATEX_SPECIALS:
        return LATEX_SPECIALS[char]
    if char.isascii():
        return " " if not char.isprintable() else char  # newlines, tabs, control characters
    if char in LATEX_UNICODE:
        return LATEX_UNICODE[char]
    base, *marks = unicodedata.normalize("NFD", char)
    if base.isascii() and base.isalpha() and marks and all(m in _ACCENTS for m in marks):
        for mark in marks:  # é -> \'{e}
            base = f"\\{_ACCENTS[mark]}{{{base}}}"
        return base
    return f"[U+{ord(char):04X}]"


def latex_escape(text: str) -> str:
    """``text`` as LaTeX text-mode ASCII that prints as ``text``: specials escaped, ``+-`` as $\\pm$, ``^2`` as a
    superscript, Unicode symbols as their LaTeX commands (see ``LATEX_UNICODE``), newlines as spaces."""
    out, last = [], 0
    for match in _CONVENTIONS.finditer(text):
        out += map(_latex_char, text[last:match.start()])
        out.append(r"$\pm$" if match.group(0) == "+-" else f"$^{{{match.group(1)}}}$")
        last = match.end()
    out += map(_latex_char, text[last:])
    escaped = "".join(out)
    # After \\ (row end), \toprule or \midrule LaTeX looks past spaces for "[" or "*" (an optional argument):
    # a cell starting with either gets an empty group in front.
    return "{}" + escaped if escaped[:1] in ("[", "*") else escaped


def latex_column_spec(n_columns: int) -> str:
    """Two label columns left-aligned (regime, method / env, regime), the numbers centred."""
    return "l" * min(n_columns, 2) + "c" * max(n_columns - 2, 0)


def to_latex(table: dict) -> str:
    """A booktabs ``tabular`` of the table, its title as a comment line above it. Raises ``ValueError`` if a
    row's cell count is not the column count (LaTeX would fail or silently misalign)."""
    columns = table["columns"]
    if not columns:
        raise ValueError(f"table {table['title']!r}: no columns")
    for index, row in enumerate(table["rows"]):
        if len(row) != len(columns):
            raise ValueError(f"table {table['title']!r}: row {index} has {len(row)} cells for {len(columns)} "
                             f"columns: {row!r}")
    row = lambda cells: " & ".join(latex_escape(str(cell)) for cell in cells) + r" \\"
    lines = [f"% {latex_escape(table['title'])}", r"% needs \usepackage{booktabs}",
             r"\begin{tabular}{" + latex_column_spec(len(columns)) + "}", r"\toprule", row(columns), r"\midrule"]
    lines += [row(cells) for cells in table["rows"]]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_table(table: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    latex = to_latex(table)  # first: a malformed table fails before any of its files is written
    (out / f"{name}.md").write_text(to_markdown(table))
    (out / f"{name}.tex").write_text(latex, encoding="ascii")
    with open(out / f"{name}.csv", "w", newline="") as f:
        csv.writer(f).writerows([table["columns"], *table["rows"]])


# ---------------------------------------------------------------------------------------- figures

DPI = 120

TAB20 = ("#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#9467bd", "#c5b0d5",
         "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d", "#17becf", "#9edae5")
"""matplotlib's tab20: ten hues, each dark then light."""

METHOD_COLOURS = {
    "persim": TAB20[6], "persim_no_factors": TAB20[7], "true_env_mpc": TAB20[14],
    "bcq_p": TAB20[0], "bcq_a": TAB20[1], "cadm_vanilla": TAB20[2], "cadm_pets": TAB20[3],
    "cql_p": TAB20[4], "cql_a": TAB20[5], "iql_p": TAB20[8], "iql_a": TAB20[9],
    "td3bc_p": TAB20[10], "td3bc_a": TAB20[11],
}
"""One fixed colour per registered algorithm (``algos.registry.ALGORITHMS``), the same in every figure: PerSim
red (its ablation without agent factors light red), the True-env reference grey, each baseline family one hue
(its two variants dark and light)."""

SPARE_COLOURS = (TAB20[16], TAB20[18], TAB20[12], TAB20[17], TAB20[19], TAB20[13], "#9c9ede", TAB20[15],
                 "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#5254a3", "#8ca252", "#bd9e39",
                 "#ad494a", "#a55194", "#6b6ecf", "#b5cf6b", "#e7ba52", "#d6616b", "#ce6dbd", "#3182bd")
"""For methods without a fixed colour (PerSim's rank sweep, an algorithm added since): tab20's unused colours,
then tab20b's."""


def method_colours(methods: Iterable[str]) -> dict[str, str]:
    """{method: colour} for algorithm names (``persim``, ``bcq_p``, ``persim@r4``, ...): registered algorithms get
    ``METHOD_COLOURS``; any other name a spare colour chosen from its name (so the same in every figure where
    no other unregistered name claims it first), never one another method of this call has."""
    methods = list(dict.fromkeys(methods))
    colours = {m: METHOD_COLOURS[m] for m in methods if m in METHOD_COLOURS}
    used = set(colours.values())
    for method in sorted(m for m in methods if m not in colours):
        start = zlib.crc32(method.encode())
        free = [SPARE_COLOURS[(start + i) % len(SPARE_COLOURS)] for i in range(len(SPARE_COLOURS))]
        colours[method] = next((c for c in free if c not in used), free[0])  # past 24 extra methods, colours repeat
        used.add(colours[method])
    return {m: colours[m] for m in methods}


def fit_text_width(fig, text, max_fraction: float = 0.96, min_fontsize: float = 6.0) -> None:
    """Re-wrap a figure text (e.g. a suptitle) on spaces until its width is at most ``max_fraction`` of the
    figure's, shrinking its font only if wrapping alone cannot (a single word wider than the figure)."""
    renderer = fig.canvas.get_renderer()
    original = " ".join(text.get_text().split())
    limit = fig.bbox.width * max_fraction
    text.set_text(original)
    width = len(original)
    while text.get_window_extent(renderer).width > limit and width > 10:
        width = max(10, int(width * 0.85))
        text.set_text(textwrap.fill(original, width, break_long_words=False, break_on_hyphens=False))
        if width == 10:
            break
    while text.get_window_extent(renderer).width > limit and text.get_fontsize() > min_fontsize:
        text.set_fontsize(text.get_fontsize() - 0.5)


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG at ``path`` and a PDF beside it (creating the folder), cropped to
    everything drawn (``bbox_inches="tight"``: a legend outside the axes is kept, nothing is clipped), and free
    it; returns the PNG's path. A figure without a layout engine gets ``tight_layout`` first."""
    import matplotlib
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    with matplotlib.rc_context({"pdf.fonttype": 42}):  # TrueType in the PDF: text stays text, editable
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
        fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    return path


def png_to_pdf(png: str | Path) -> Path:
    """A PDF beside a PNG we only have as pixels (e.g. a figure logged to MLflow as PNG alone), at its size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = Path(png)
    image = plt.imread(png)
    height, width = image.shape[:2]
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.figimage(image, resize=False)
    pdf = png.with_suffix(".pdf")
    fig.savefig(pdf, dpi=DPI)
    plt.close(fig)
    return pdf
