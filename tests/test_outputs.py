"""The files a grid's tables and report leave behind: LaTeX that compiles, figures whose legend and titles show
whole, every figure as PNG and PDF.

The LaTeX check needs no TeX: ``check_latex`` tokenises each .tex (specials escaped, braces and math balanced,
every row's cell count the tabular's column count). Where ``pdflatex`` or ``tectonic`` is installed each .tex is
also compiled inside a wrapper document.
"""
from __future__ import annotations

import math
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from persim_bench.analysis import build_report
from persim_bench.analysis.factors import draw_tsne_figure, tsne_figure
from persim_bench.analysis.paper import canonical, load_paper_values
from persim_bench.analysis.stats import performance_profile_figure
from persim_bench.analysis.tabular import (METHOD_COLOURS, latex_escape, method_colours, png_to_pdf, save_figure,
                                           to_latex, write_table)
from test_analysis import LABELS, RECORDS, SUMMARIES

PNG = b"\x89PNG\r\n\x1a\n"
PDF = b"%PDF"

# ---------------------------------------------------------------------------------------- the LaTeX checker

RULES = (r"\toprule", r"\midrule", r"\bottomrule")
# Written out here rather than read from tabular.py, so a misspelt command there fails the check.
COMMANDS = {"textbackslash", "textasciitilde", "textasciicircum", "pm", "mp", "times", "div", "cdot", "geq", "leq",
            "neq", "approx", "sim", "rightarrow", "leftarrow", "leftrightarrow", "Rightarrow", "infty", "surd", "in",
            "circ", "alpha", "beta", "gamma", "delta", "Delta", "epsilon", "lambda", "mu", "pi", "sigma", "tau",
            "ldots", "S", "P", "copyright", "pounds", "ss", "ae", "AE", "o", "O", "aa", "AA", "oe", "OE",
            "c", "v", "r", "u", "H"}  # the last five: accents (\c{c}, \v{s}, ...)
ESCAPES = set("&%$#_{}") | set("'`\"^~=.")  # \& ... \}, and the accents \'{e} \"{u} ...
TOKEN = re.compile(r"\\[A-Za-z]+|\\.|[{}$&%#_^~]|[^\\{}$&%#_^~]+", re.S)


def _check_text(text: str, where: str) -> int:
    """Tokenise one line of cells; return its number of cells (top-level ``&`` + 1). Fails on an unescaped
    special outside a command or math, an unknown command, unbalanced braces or ``$``."""
    depth, math_mode, cells = 0, False, 1
    for token in TOKEN.findall(text):
        if token.startswith("\\"):
            name = token[1:]
            assert name != "\\", f"{where}: a row break inside a row: {text!r}"
            assert name in COMMANDS or name in ESCAPES, f"{where}: command {token!r} unknown: {text!r}"
        elif token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            assert depth >= 0, f"{where}: '}}' closes nothing: {text!r}"
        elif token == "$":
            math_mode = not math_mode
        elif token == "&":
            assert not math_mode and depth == 0, f"{where}: '&' inside math or a group: {text!r}"
            cells += 1
        elif token in ("^", "_"):
            assert math_mode, f"{where}: unescaped {token!r} outside math: {text!r}"
        elif token in ("%", "#", "~"):
            raise AssertionError(f"{where}: unescaped {token!r}: {text!r}")
    assert depth == 0, f"{where}: {depth} unclosed '{{': {text!r}"
    assert not math_mode, f"{where}: unclosed '$': {text!r}"
    return cells


def check_latex(tex: str, name: str = "tex") -> None:
    """A .tex of ``tabular.to_latex``: ASCII; its title (the first line, a comment) escaped like cells; one booktabs tabular
    whose every row has as many cells as its column spec has columns, and none that starts with '[' or '*'
    (which LaTeX would read as an optional argument of the ``\\\\`` or rule before it)."""
    assert tex.isascii(), f"{name}: not ASCII"
    lines = tex.splitlines()
    assert lines[0].startswith("% "), f"{name}: no title comment"
    assert _check_text(lines[0][2:], f"{name} (title)") == 1, f"{name}: '&' in the title: {lines[0]!r}"
    body = [l for l in lines if not l.startswith("%")]
    spec = re.fullmatch(r"\\begin\{tabular\}\{([lcr]+)\}", body[0])
    assert spec, f"{name}: starts {body[0]!r}, not a \\begin{{tabular}}{{...}}"
    assert body[-1] == r"\end{tabular}", f"{name}: ends {body[-1]!r}"
    assert body[1] == r"\toprule" and body[3] == r"\midrule" and body[-2] == r"\bottomrule", name
    n_columns = len(spec.group(1))
    for number, line in enumerate(body[1:-1], 2):
        if line in RULES:
            continue
        where = f"{name} line {number}"
        assert line.endswith(r" \\"), f"{where}: a row not ended by \\\\: {line!r}"
        assert not line.lstrip().startswith(("[", "*")), f"{where}: starts with '[' or '*': {line!r}"
        assert _check_text(line[:-3], where) == n_columns, f"{where}: not {n_columns} cells: {line!r}"


TEX = shutil.which("pdflatex") or shutil.which("tectonic")
WRAPPER = (r"\documentclass{article}" "\n" r"\usepackage{booktabs}" "\n" r"\tracinglostchars=2" "\n"
           r"\begin{document}" "\n" r"\input{%s}" "\n" r"\end{document}" "\n")


def compile_latex(tex_files: list[Path], work: Path) -> None:
    """Compile a wrapper document around each .tex with the TeX installed; fails on a LaTeX error or a
    character the font lacks."""
    work.mkdir(parents=True, exist_ok=True)
    for tex in tex_files:
        shutil.copy(tex, work / tex.name)
        wrapper = work / f"wrap_{tex.stem}.tex"
        wrapper.write_text(WRAPPER % tex.stem)
        if Path(TEX).name == "tectonic":
            command = [TEX, "--chatter", "minimal", "--keep-logs", wrapper.name]
        else:
            command = [TEX, "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape", wrapper.name]
        done = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=120)
        log = wrapper.with_suffix(".log")
        log_text = log.read_text(errors="replace") if log.exists() else ""
        assert done.returncode == 0, f"{tex.name} does not compile:\n{done.stdout[-3000:]}{done.stderr[-2000:]}"
        assert wrapper.with_suffix(".pdf").exists(), tex.name
        assert "Missing character" not in log_text, f"{tex.name}: a character the font lacks:\n{log_text[-2000:]}"


def check_tex_files(folder: Path, work: Path) -> list[Path]:
    files = sorted(folder.glob("*.tex"))
    assert files, folder
    for tex in files:
        check_latex(tex.read_text(encoding="ascii"), tex.name)
    if TEX:
        compile_latex(files, work)
    return files


# ---------------------------------------------------------------------------------------- LaTeX cases

SPECIALS = "\\ & % $ # _ { } ~ ^ < > |"
UNICODE = "± × ≥ ≤ → − – … ° ² µ τ é ü ç ø ß “q” 中"
NASTY = {
    "title": f"Every special: {SPECIALS}; {UNICODE}; R^2, 1e^-3, 3 +- 1, 50%\nsecond line",
    "columns": ["regime_1", "method & co", "100% {x}", "a^b ~c", "$5 #1", "back\\slash"],
    "rows": [["[0, 1]", "*chosen", "{}", "}{", "\\\\", "%"],
             ["~/data/x_y", "R^2 = 0.9", "194.2 +- 3.23", "≥ 1 → 2", "a|b<c>d", "é中"],
             [SPECIALS, UNICODE, "$\\pm$", "\\toprule", "&&&", "\\begin{tabular}"],
             ["", " ", "-", "--", "\t\x00\x7f", "^^"]],
}


def test_latex_escape_examples():
    assert latex_escape("75%") == r"75\%"
    assert latex_escape("a_b & c") == r"a\_b \& c"
    assert latex_escape("194.2 +- 3.23") == r"194.2 $\pm$ 3.23"
    assert latex_escape("1 - R^2") == r"1 - R$^{2}$"
    assert latex_escape("x^y") == r"x\textasciicircum{}y"
    assert latex_escape("~\\{}$#") == r"\textasciitilde{}\textbackslash{}\{\}\$\#"
    assert latex_escape("±3 × 2 ≥ 1") == r"$\pm$3 $\times$ 2 $\geq$ 1"
    assert latex_escape("café") == r"caf\'{e}" and latex_escape("a中") == "a[U+4E2D]"
    assert latex_escape("[8, 8]") == "{}[8, 8]" and latex_escape("*") == "{}*"
    assert latex_escape("two\nlines") == "two lines"


def test_the_checker_catches_what_latex_would_reject():
    good = to_latex({"title": "t", "columns": ["a", "b", "c"], "rows": [["1", "2", "3"]]})
    check_latex(good)
    for broken, message in [(good.replace("1 & 2 & 3", "1 & 2 & 3 & 4"), "cells"),
                            (good.replace("1 & 2", "75% & 2"), "unescaped '%'"),
                            (good.replace("1 & 2", "a_b & 2"), "outside math"),
                            (good.replace("1 & 2", "{1 & 2"), "inside math or a group"),
                            (good.replace("1 & 2", "$1 & 2"), "inside math or a group"),
                            (good.replace("1 & 2", "1} & 2"), "closes nothing"),
                            (good.replace("1 & 2", "[1] & 2"), "starts with"),
                            (good.replace("1 & 2", r"\textbf{1} & 2"), "unknown"),
                            (good.replace("% t", "% t\nsecond line"), "not a"),
                            (good.replace("% t", "% t_1"), "title"),
                            (good.replace("1 & 2", "± & 2"), "ASCII")]:
        with pytest.raises(AssertionError, match=message):
            check_latex(broken)


def test_every_special_character_is_escaped(tmp_path):
    write_table(NASTY, tmp_path / "nasty", "nasty")
    write_table({"title": "one column, 50%", "columns": ["only_one"], "rows": [["x%"], ["[y]"]]},
                tmp_path / "nasty", "one_column")
    write_table({"title": "no rows", "columns": ["a", "b", "c"], "rows": []}, tmp_path / "nasty", "empty")
    check_tex_files(tmp_path / "nasty", tmp_path / "latex")
    tex = (tmp_path / "nasty" / "nasty.tex").read_text()
    assert r"\begin{tabular}{llcccc}" in tex and r"\begin{tabular}{l}" in (tmp_path / "nasty" / "one_column.tex").read_text()
    # the CSV and Markdown keep the text as it is
    assert "100% {x}" in (tmp_path / "nasty" / "nasty.csv").read_text()


def test_a_row_of_the_wrong_length_is_refused(tmp_path):
    with pytest.raises(ValueError, match="row 1 has 2 cells for 3 columns"):
        write_table({"title": "t", "columns": ["a", "b", "c"], "rows": [["1", "2", "3"], ["1", "2"]]}, tmp_path, "t")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_report_tables_compile(tmp_path):
    """Every .tex the report writes (agreement.tex's '75%' share was the reported failure), from the report of
    test_analysis's records and from the paper's own numbers (every table, claim and verdict filled)."""
    report = build_report(RECORDS, SUMMARIES, random_scores={"cartpole": 20.0}, n_boot=50, seed=0, labels=LABELS)
    for name, table in report.tables.items():
        write_table(table, tmp_path / "report", name)
    assert "%" in "".join(r[-1] for r in report.tables["agreement"]["rows"])
    check_tex_files(tmp_path / "report", tmp_path / "latex")

    values = load_paper_values()
    metrics: dict[tuple, dict] = {}
    for (quantity, env, regime, method, agent), v in canonical(values).items():
        if quantity in ("rmse", "r2", "reward"):
            metrics.setdefault((method, env, regime), {})[f"{quantity}_agent{agent}"] = v.value
    records = [{"algo": m, "env": e, "regime": r, "seed": 0, "metrics": x} for (m, e, r), x in metrics.items()]
    paper = canonical(values)
    summaries = {(env, regime): {"test_returns": [paper["data_return_test_agent", env, regime, "data", a].value
                                                  for a in range(5)],
                                 "mean_return": v.value,
                                 "mean_length": paper["data_mean_length", env, regime, "data", None].value}
                 for (quantity, env, regime, _, _), v in paper.items() if quantity == "data_mean_return"}
    full = build_report(records, summaries, n_boot=20, seed=0, labels=LABELS)
    assert all(table["rows"] for table in full.tables.values())
    for name, table in full.tables.items():
        write_table(table, tmp_path / "paper", name)
    check_tex_files(tmp_path / "paper", tmp_path / "latex_paper")


def test_grid_tables_compile(tmp_path):
    """The grid's own tables with the text they carry: covariate labels, an unreadable dataset's error, policies."""
    from persim_bench.analysis.factors import probe_table
    from persim_bench.analysis.grid_tables import dataset_table, policy_table

    summaries = {("cartpole", "pure"): {"test_returns": [1, 2, 3, 4, 5], "mean_return": 3.0, "mean_length": 50.0},
                 ("cartpole", "random"): {"error": "results/datasets/x_y/manifest.json: 100% {broken} & stale #2"}}
    headers = {"a": {"env": "cartpole", "role": "regime", "regime": "pure", "index": 0, "covariates": [0.5, 10.0],
                     "algorithm": "dqn_v2", "budget": 10_000, "env_steps": 5_000, "achieved_return": 190.0,
                     "achieved_return_std": 3.0, "train_seconds": 12.0, "chosen_checkpoint": 0,
                     "checkpoints": [[5_000, 190.0]], "target_return": 180.0, "target_rule": ">= target"}}
    records = [{"algo": "persim", "env": "cartpole", "regime": "pure", "seed": s,
                "metrics": {"probe_r2_length": 0.9 + s / 100, "probe_r2_force": 0.5}} for s in range(2)]
    tables = {"datasets": dataset_table(summaries, 50), "policies": policy_table([("logging-pure-0", headers["a"])]),
              "figure1_probe": probe_table(records, {"cartpole": ["length", "force"]})}
    for name, table in tables.items():
        write_table(table, tmp_path / "tables", name)
    check_tex_files(tmp_path / "tables", tmp_path / "latex")


# ---------------------------------------------------------------------------------------- figures

REGIMES = ["pure", "random", "pure-eps-20", "pure-eps-40"]
AGENTS = [f"length={0.5 * a:g}, force={10 + a:g}" for a in range(5)]
LEARNED = ["PerSim", "Vanilla CaDM", "PE-TS CaDM", "BCQ-P", "BCQ-A", "CQL-P", "IQL-A", "TD3+BC-P"]


def reward_table(methods: list[str], regimes: list[str], shared: tuple[str, ...] = ("True env + MPC",)) -> dict:
    rng = np.random.default_rng(0)
    cell = lambda: f"{rng.uniform(-50, 200):.4g} +- {rng.uniform(0, 20):.3g}"
    rows = [[regime, method, *(cell() for _ in AGENTS)] for regime in regimes for method in methods]
    rows += [["-", method, *(f"{rng.uniform(150, 200):.4g}" for _ in AGENTS)] for method in shared]
    return {"title": "Reward, cartpole: mean +- std over seeds of the mean over 20 episodes (model-free: 20), a "
                     "title long enough to need wrapping on any sensible width",
            "columns": ["regime", "method", *AGENTS], "rows": rows}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG, path
    return struct.unpack(">II", data[16:24])


def _inside(inner, outer, slack: float = 1.0) -> bool:
    return (inner.x0 >= outer.x0 - slack and inner.y0 >= outer.y0 - slack and inner.x1 <= outer.x1 + slack
            and inner.y1 <= outer.y1 + slack)


def _renderer(fig):
    """The renderer of a figure ``save_figure`` has closed (closing leaves it a bare canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not hasattr(fig.canvas, "get_renderer"):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _bar_colours(fig) -> set[tuple]:
    return {tuple(np.round(p.get_facecolor(), 4)) for ax in fig.axes for p in ax.patches}


def test_reward_figure_facets_colours_and_legend(tmp_path):
    from matplotlib.transforms import Bbox

    from persim_bench.analysis.grid_figures import reward_figure

    path = tmp_path / "figs" / "reward_cartpole.png"
    fig = reward_figure(reward_table(LEARNED, REGIMES), path, LABELS)
    methods = LEARNED + ["True env + MPC"]  # 9 methods x 4 regimes, True env + MPC in every panel

    assert len(fig.axes) == len(REGIMES)
    assert [ax.get_title() for ax in fig.axes] == [f"regime: {r}" for r in REGIMES]
    assert len(_bar_colours(fig)) == len(methods) == 9
    for ax in fig.axes:
        assert len(ax.patches) == len(methods) * len(AGENTS)
    legend, = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == methods
    assert len({tuple(np.round(h.get_facecolor(), 4)) for h in legend.legend_handles}) == 9

    renderer = _renderer(fig)
    legend_box = legend.get_window_extent(renderer)
    assert _inside(legend_box, fig.bbox), (legend_box, fig.bbox)  # on the canvas, not hanging off it
    for ax in fig.axes:
        assert not legend_box.overlaps(ax.get_window_extent(renderer))  # below the panels, covering none
    title_box = fig._suptitle.get_window_extent(renderer)
    assert _inside(title_box, fig.bbox)
    # the saved image is the tight box around everything drawn: it holds the legend
    saved = fig.get_tightbbox(renderer).padded(0.1)  # inches; savefig's default pad_inches
    legend_inches = Bbox(legend_box.get_points() / fig.dpi)
    assert _inside(legend_inches, saved, slack=0.01)
    width, height = _png_size(path)
    assert abs(width - saved.width * 120) <= 2 and abs(height - saved.height * 120) <= 2
    assert path.with_suffix(".pdf").read_bytes()[:4] == PDF


def test_a_method_keeps_its_colour_in_every_figure(tmp_path):
    from persim_bench.analysis.grid_figures import reward_figure

    first = reward_figure(reward_table(LEARNED, REGIMES[:1]), tmp_path / "a.png", LABELS)
    second = reward_figure(reward_table(["BCQ-A", "PerSim", "PerSim (rank 4)", "PerSim (rank 8)"], REGIMES[2:],
                                        shared=()), tmp_path / "b.png", LABELS)
    colour = lambda fig: {t.get_text(): tuple(np.round(h.get_facecolor(), 4))
                          for t, h in zip(fig.legends[0].get_texts(), fig.legends[0].legend_handles)}
    a, b = colour(first), colour(second)
    assert a["PerSim"] == b["PerSim"] and a["BCQ-A"] == b["BCQ-A"]
    assert len(set(b.values())) == 4  # PerSim's rank sweep: colours of their own
    assert len(second.axes) == 2 and len(first.axes) == 1


def test_method_colours_cover_the_registry():
    from matplotlib.colors import to_hex

    from persim_bench.algos.registry import ALGORITHMS

    assert set(ALGORITHMS) <= set(METHOD_COLOURS), "give a new algorithm its colour in tabular.METHOD_COLOURS"
    assert len(set(map(to_hex, METHOD_COLOURS.values()))) == len(METHOD_COLOURS)
    names = list(ALGORITHMS) + [f"persim@r{r}" for r in (2, 4, 8, 16)] + ["someone_new"]
    colours = method_colours(names)
    assert len(set(colours.values())) == len(names)
    assert method_colours(reversed(names)) == colours  # order does not matter
    assert method_colours(["persim@r4"]) == {"persim@r4": colours["persim@r4"]}


FIGURE1_TITLE = "PerSim agent factors, mountaincar / pure-eps-40 (rank 12, seed 3)"  # as algos/persim.py writes it


@pytest.mark.parametrize("names", [["gravity"], ["length", "force"]])
def test_figure1_titles_are_whole(tmp_path, names):
    rng = np.random.default_rng(0)
    covariates = rng.uniform(0, 1, (25, len(names)))
    factors = covariates @ rng.normal(size=(len(names), 3))
    fig = draw_tsne_figure(factors, covariates, names, seed=0, title=FIGURE1_TITLE)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle
    assert " ".join(title.get_text().split()) == FIGURE1_TITLE  # wrapped, not cut
    assert _inside(title.get_window_extent(renderer), fig.bbox), (title.get_window_extent(renderer), fig.bbox)
    for ax in fig.axes:
        if ax.get_title():
            assert _inside(ax.title.get_window_extent(renderer), fig.bbox)
    path = save_figure(fig, tmp_path / "figure1.png")
    assert path.read_bytes()[:8] == PNG and path.with_suffix(".pdf").read_bytes()[:4] == PDF


def test_every_figure_is_also_a_pdf(tmp_path):
    rng = np.random.default_rng(0)
    covariates = rng.uniform(0, 1, (25, 2))
    png = tsne_figure(covariates @ rng.normal(size=(2, 3)), covariates, ["length", "force"], tmp_path / "f1.png")
    assert png.with_suffix(".pdf").read_bytes()[:4] == PDF
    profile = performance_profile_figure({"persim": rng.uniform(0, 1, (3, 6)), "bcq_p": rng.uniform(0, 1, (3, 6))},
                                         tmp_path / "profile.png", n_boot=20)
    assert profile.with_suffix(".pdf").read_bytes()[:4] == PDF
    # a figure only logged as PNG (Figure 1 from MLflow) gets a PDF of its pixels at its size
    pdf = png_to_pdf(png)
    assert pdf.read_bytes()[:4] == PDF
    box = re.search(rb"/MediaBox \[ *0 0 ([0-9.]+) ([0-9.]+) *\]", pdf.read_bytes())
    width, height = _png_size(png)
    assert box and math.isclose(float(box.group(1)), width / 120 * 72, rel_tol=0.02)
    assert math.isclose(float(box.group(2)), height / 120 * 72, rel_tol=0.02)
