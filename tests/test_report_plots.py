"""Tables and figures from hand-made results folders (no training involved)."""
from __future__ import annotations

import ast
import io
import json
import shutil
import statistics
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from harness import html_report, plots, report
from harness.errors import HarnessError
from harness.metrics import summarise
from harness.plots import write_figures
from harness.report import collect_runs, paper_table, render
from harness.html_report import write_report

PROTOCOLS = {"toy_4x5": (4, 5), "toy_3x10": (3, 10)}  # name -> (tasks, classes per task)
LABELS = ("finetune", "gmm+memory=2000")
SEEDS = (0, 1)


def _matrix(T: int, label_i: int, seed: int) -> list[list[float]]:
    # Deterministic, distinct per run: new tasks learnt well, old ones decay.
    return [[round(90 - 10 * label_i - 2 * seed - 12 * (t - i) * (1 + label_i), 1)
             for i in range(t + 1)] for t in range(T)]


def _write_run(root: Path, protocol: str, label_i: int, seed: int) -> dict:
    T, k = PROTOCOLS[protocol]
    a = _matrix(T, label_i, seed)
    step = [sum(row) / len(row) for row in a]  # equal task sizes: A_t = mean of the row
    label = LABELS[label_i]
    s = {"protocol": protocol, "method": label.split("+")[0], "label": label, "seed": seed,
         "num_tasks": T, "classes_per_task": [k] * T,
         "classes_seen": [k * (t + 1) for t in range(T)], **summarise(a, step),
         "wall_time_s": 10.0 + seed + 100 * label_i, "train_time_s": 8.0, "eval_time_s": 2.0,
         "trainable_params": 1_234_567, "memory_exemplars": 2000 * label_i,
         "memory_bytes": 6_144_000 * label_i}
    d = root / protocol / label / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(s))
    (d / "config.json").write_text("{}")
    return s


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("results")
    summaries = {(p, LABELS[li], s): _write_run(root, p, li, s)
                 for p in PROTOCOLS for li in range(len(LABELS)) for s in SEEDS}
    # An unfinished run: started (config.json) but no summary.json yet.
    (root / "toy_4x5" / "icarl" / "seed0").mkdir(parents=True)
    (root / "toy_4x5" / "icarl" / "seed0" / "config.json").write_text("{}")
    return root, summaries


@pytest.fixture(scope="module")
def runs(results):
    return collect_runs([results[0]])


def test_collect_skips_unfinished(runs, results):
    assert len(runs) == len(PROTOCOLS) * len(LABELS) * len(SEEDS)
    assert "icarl" not in set(runs.label)
    assert len(runs.attrs["skipped"]) == 1 and runs.attrs["skipped"][0].endswith("seed0")
    # The same folder given twice (or nested) does not double-count runs.
    assert len(collect_runs([results[0], results[0] / "toy_4x5"])) == len(runs)


def test_paper_table_cell_by_hand(runs, results):
    _, summaries = results
    vals = [summaries[("toy_4x5", "gmm+memory=2000", s)]["avg_incremental_accuracy"] for s in SEEDS]
    expected = f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"
    t = paper_table(runs)
    assert list(t.index) == sorted(LABELS)
    assert t.loc["gmm+memory=2000", ("toy_4x5", "Avg (%)")] == expected
    assert t.loc["finetune", ("toy_3x10", "Seeds")] == "2"
    assert t.loc["finetune", ("toy_3x10", "Params")] == "1.2M"
    assert t.loc["gmm+memory=2000", ("toy_3x10", "Exemplars")] == "2,000 (6.1 MB)"
    assert t.loc["gmm+memory=2000", ("toy_3x10", "Wall time")] == "1.8 min"  # mean 110.5 s


def test_single_seed_and_one_task(tmp_path):
    a = [[80.0]]
    s = {"protocol": "one", "label": "m", "method": "m", "seed": 0, "classes_seen": [10],
         **summarise(a, [80.0])}
    (tmp_path / "summary.json").write_text(json.dumps(s))
    t = paper_table(collect_runs([tmp_path]))
    assert t.loc["m", ("one", "Avg (%)")] == "80.0"  # one seed: no "± std"
    assert t.loc["m", ("one", "Forgetting (%)")] == "–"
    assert sorted(p.name for p in write_figures(collect_runs([tmp_path]), tmp_path / "f")) == [
        "acc_vs_classes_one.pdf", "acc_vs_classes_one.png",
        "accuracy_matrix_one_m.pdf", "accuracy_matrix_one_m.png"]  # no forgetting plot


def test_a_figure_of_a_run_no_longer_in_the_results_is_removed(tmp_path):
    """plots/ holds what the table shows: a removed run's matrix goes, other protocols' and other files stay."""
    def write(label):
        d = tmp_path / "runs" / label
        d.mkdir(parents=True)
        s = {"protocol": "one", "label": label, "method": label, "seed": 0, "classes_seen": [10],
             **summarise([[80.0]], [80.0])}
        (d / "summary.json").write_text(json.dumps(s))
    write("a"), write("b")
    out = tmp_path / "plots"
    write_figures(collect_runs([tmp_path / "runs"]), out)
    assert (out / "accuracy_matrix_one_b.png").exists()
    kept = [out / "accuracy_matrix_other_x.png", out / "notes.png", out / "accuracy_matrix_one_b.txt"]
    for k in kept:
        k.write_bytes(b"x")
    shutil.rmtree(tmp_path / "runs" / "b")
    written = write_figures(collect_runs([tmp_path / "runs"]), out)
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in written] + [k.name for k in kept])
    assert not (out / "accuracy_matrix_one_b.pdf").exists()


def test_write_report_files_parse(runs, results, tmp_path):
    _, summaries = results
    paths = write_report(runs, tmp_path)
    assert sorted(p.name for p in paths) == ["report.html", "sessions.csv", "sessions.md", "table.csv", "table.md",
                                             "table.tex"]
    # harness.report draws no page itself (harness.html_report's): it says so, before writing anything
    with pytest.raises(HarnessError, match="html_page"):
        report.write_report(runs, tmp_path / "none")
    assert not (tmp_path / "none").exists()
    assert [p.name for p in report.write_report(runs, tmp_path / "md", formats=("md",))] == ["table.md", "sessions.md"]

    csv = pd.read_csv(tmp_path / "table.csv")
    assert len(csv) == len(PROTOCOLS) * len(LABELS)
    row = csv[(csv.protocol == "toy_3x10") & (csv.label == "finetune")].iloc[0]
    f = [summaries[("toy_3x10", "finetune", s)]["average_forgetting"] for s in SEEDS]
    assert row.average_forgetting_mean == pytest.approx(statistics.mean(f))
    assert row.average_forgetting_std == pytest.approx(statistics.stdev(f))
    assert row.n_seeds == 2
    assert (tmp_path / "table.csv").read_text() == render(runs, "csv")

    md = (tmp_path / "table.md").read_text().strip().splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in md]
    assert len(md) == 2 + len(LABELS) and len({len(c) for c in cells}) == 1
    t = paper_table(runs)
    assert cells[2][0] == "finetune" and cells[2][1:] == list(t.loc["finetune"])

    tex = (tmp_path / "table.tex").read_text()
    assert tex.startswith(r"\begin{tabular}") and tex.rstrip().endswith(r"\end{tabular}")
    body = [line for line in tex.splitlines() if line.startswith(("Method", "finetune", "gmm"))]
    ncols = 1 + len(PROTOCOLS) * 7
    assert len(body) == 1 + len(LABELS)
    assert all(line.replace(r"\&", "").count("&") == ncols - 1 for line in body)
    assert r"gmm+memory=2000" in tex and r"$\pm$" in tex and "toy\\_4x5" in tex


def test_session_table_by_hand(runs, results):
    _, summaries = results
    t = render(runs, "md", sessions=True).splitlines()
    head = [c.strip() for c in t[0].strip("|").split("|")]
    assert head[:4] == ["Method", "toy_3x10 1 (10)", "toy_3x10 2 (20)", "toy_3x10 3 (30)"]
    assert head[4:6] == ["toy_3x10 Avg", "toy_3x10 PD"]
    runs_3x10 = [summaries[("toy_3x10", "finetune", s)] for s in SEEDS]
    drops = [r["step_accuracy"][0] - r["step_accuracy"][-1] for r in runs_3x10]
    second = [r["step_accuracy"][1] for r in runs_3x10]
    row = next(line for line in t if line.startswith("| finetune"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{statistics.mean(second):.1f} ± {statistics.stdev(second):.1f}"
    assert cells[5] == f"{statistics.mean(drops):.1f} ± {statistics.stdev(drops):.1f}"
    csv = pd.read_csv(__import__("io").StringIO(render(runs, "csv", sessions=True)), header=[0, 1], index_col=0)
    assert csv.loc["finetune", ("toy_3x10", "PD")] == cells[5]
    with pytest.raises(HarnessError, match="md, latex or csv"):
        render(runs, "html", sessions=True)


def test_render_unknown_format(runs):
    with pytest.raises(HarnessError):
        render(runs, "pdf")


def test_figures(runs, tmp_path):
    paths = write_figures(runs, tmp_path)
    stems = {p.stem for p in paths}
    for p in PROTOCOLS:
        assert {f"acc_vs_classes_{p}", f"forgetting_{p}", f"performance_drop_{p}"} <= stems
        assert {f"accuracy_matrix_{p}_finetune", f"accuracy_matrix_{p}_gmm_memory_2000"} <= stems
    assert len(paths) == 2 * len(stems) == 2 * len(PROTOCOLS) * (3 + len(LABELS))
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 5_000, p
        if p.suffix == ".png":
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            img = mpimg.imread(p)
            assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 300
            assert img[..., :3].std() > 0.05  # not a blank canvas
        else:
            assert data[:5] == b"%PDF-" and data.rstrip().endswith(b"%%EOF")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes left no temporaries


def test_errors(tmp_path):
    with pytest.raises(HarnessError, match="does not exist"):
        collect_runs([tmp_path / "nope"])
    (tmp_path / "empty" / "p" / "m" / "seed0").mkdir(parents=True)
    with pytest.raises(HarnessError, match="no finished run.*1 unfinished"):
        collect_runs([tmp_path / "empty"])
    bad = tmp_path / "bad" / "p" / "m" / "seed0" / "summary.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"protocol": "p", ')  # cut short
    with pytest.raises(HarnessError, match="summary.json") as exc:
        collect_runs([tmp_path / "bad"])
    assert "\n" not in str(exc.value) and str(bad.resolve()) in str(exc.value)
    bad.write_text('{"protocol": "p"}')
    with pytest.raises(HarnessError, match="lacks"):
        collect_runs([tmp_path / "bad"])


# ---------------------------------------------------------------- the modules' dependencies

def _harness_imports(module: str) -> set[str]:
    """Every harness module `module` imports, at its top or inside a function (a lazy import is an edge too)."""
    tree = ast.parse(Path(report.__file__).with_name(f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {name.split(".")[1] for name in found if name.startswith("harness.")}


def test_report_modules_depend_one_way():
    edges = {m: _harness_imports(m) & {"report", "plots", "html_report", "presentation"}
             for m in ("report", "plots", "html_report", "presentation")}
    assert edges == {"presentation": set(), "report": {"presentation"}, "plots": {"presentation"},
                     "html_report": {"report", "plots", "presentation"}}


# ---------------------------------------------------------------- names and figures ready for a paper

def _write_summary(root: Path, protocol: str, label: str, seed: int, matrix: list[list[float]], **extra) -> None:
    d = root / protocol / label / f"seed{seed}"
    d.mkdir(parents=True)
    T = len(matrix)
    s = {"protocol": protocol, "method": label.split("+")[0], "label": label, "seed": seed, "num_tasks": T,
         "classes_seen": [10 * (t + 1) for t in range(T)],
         **summarise(matrix, [sum(row) / len(row) for row in matrix]), "wall_time_s": 42.0, **extra}
    (d / "summary.json").write_text(json.dumps(s))
    (d / "config.json").write_text("{}")


def _same_runs(root: Path, labels, T: int = 4, remembered: float = 60.0) -> pd.DataFrame:
    """Rows with the very same results (new tasks at 95 %, old ones at `remembered`)."""
    matrix = [[95.0 if i == t else remembered for i in range(t + 1)] for t in range(T)]
    for label in labels:
        _write_summary(root, "toy", label, 0, matrix)
    return collect_runs([root])


def _pixels(fig, ax) -> np.ndarray:
    """The RGB pixels inside `ax` as drawn (rows from the top)."""
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255
    box = ax.get_window_extent()
    height = rgb.shape[0]
    return rgb[int(height - box.y1) + 2: int(height - box.y0) - 2, int(box.x0) + 2: int(box.x1) - 2]


NAMES = {"finetune": "Fine-tuning (lower bound)", "gmm+memory=2000": "GMM, 2,000 exemplars"}


def test_figures_name_rows_as_the_experiment_file_does(runs):
    named = runs.copy()
    named.attrs = {**runs.attrs, "names": NAMES}
    shown = set()
    for f in plots.figures(named[named.protocol == "toy_4x5"]):
        texts = {t.get_text() for t in f.fig.findobj(lambda a: hasattr(a, "get_text"))}
        shown |= texts
        assert not {"finetune", "gmm+memory=2000"} & texts, f.stem  # no raw label anywhere in a figure
        if f.kind == "accuracy_matrix":
            assert f.name == NAMES[f.label] and NAMES[f.label] in f.fig.axes[0].get_title()
        elif f.kind == "performance_drop":
            assert [t.get_text() for t in f.fig.axes[0].get_yticklabels()] == list(NAMES.values())
        else:  # the curves' and the forgetting bars' legends
            assert [t.get_text() for t in f.fig.legends[0].get_texts()] == list(NAMES.values())
        plots.plt.close(f.fig)
    assert set(NAMES.values()) <= shown


def test_forgetting_legend_never_covers_a_bar(tmp_path):
    # every task forgets 95 points: bars as tall as the axes, no room for a legend inside them
    runs = _same_runs(tmp_path, ["a", "b", "c"], remembered=0.0)
    f = next(f for f in plots.figures(runs) if f.kind == "forgetting")
    f.fig.canvas.draw()
    legend = (f.fig.legends or [f.fig.axes[0].get_legend()])[0].get_window_extent()
    bars = [p.get_window_extent() for p in f.fig.axes[0].patches if p.get_height() > 0]
    assert len(bars) == 3 * 3 and not any(legend.overlaps(b) for b in bars)
    plots.plt.close(f.fig)


def test_identical_curves_both_show(tmp_path):
    runs = _same_runs(tmp_path, ["first", "second"])
    style = plots.styles(["first", "second"])
    f = next(f for f in plots.figures(runs) if f.kind == "acc_vs_classes")
    ax = f.fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    a, b = lines["first"], lines["second"]
    assert list(a.get_ydata()) == list(b.get_ydata())  # the very same curve...
    assert a.get_marker() != b.get_marker() and a.get_linestyle() != b.get_linestyle()
    assert a.get_markersize() > b.get_markersize()  # ...the one on top smaller: the one beneath shows around it
    pixels = _pixels(f.fig, ax)
    for lab in ("first", "second"):  # both colours visible inside the axes (the legend left out)
        near = np.abs(pixels - np.array(style[lab].colour)).max(-1) < 0.08
        assert near.sum() > 150, lab
    plots.plt.close(f.fig)


def _blank_margin(png: Path) -> float:
    """The blank columns left and right of the figure's lower part (below any title), as a fraction of
    its width: what a title or label wider than the data leaves beside it once cropped."""
    img = mpimg.imread(png)[..., :3]
    height, width = img.shape[:2]
    ink = np.flatnonzero((img[int(0.3 * height): int(0.97 * height)] < 0.9).any(-1).any(0))
    return (ink[0] + width - 1 - ink[-1]) / width


LONG = "gmm+align=none+decay_biases=True+lr=0.001+lr_schedule=none"


def test_saved_figures_have_no_wide_blank_margin(tmp_path):
    # a long label, a long experiment-file name and a short one: titles wider than the data beneath them
    runs = _same_runs(tmp_path / "runs", [LONG, "b", "c"], T=2)
    runs.attrs["names"] = {"b": "gmm, 2,000 exemplars, 1 epoch a task (the released run's setting)"}
    paths = [p for p in write_figures(runs, tmp_path / "plots") if p.suffix == ".png"]
    assert len(paths) == 3 + 3
    for png in paths:
        assert _blank_margin(png) < 0.03, png.name
    fig = plots.matrix_figure(runs[runs.label == "c"], "toy", "c")
    fig.canvas.draw()
    heatmap, bar = (ax.get_window_extent() for ax in fig.axes)
    assert bar.height == pytest.approx(heatmap.height, rel=0.02)  # the colour bar as tall as the matrix
    assert bar.x0 - heatmap.x1 < 0.05 * heatmap.width  # and beside it
    plots.plt.close(fig)


def test_styles_tell_forty_rows_apart():
    style = plots.styles([f"m{i}" for i in range(40)])
    assert len({(s.colour, s.marker, s.dashes) for s in style.values()}) == 40
    first = list(style.values())[:10]
    assert len({s.dashes for s in first[:4]}) == 4  # neighbours differ in their lines too, not only colour
    assert all(a.size > b.size for a, b in zip(first, first[1:]))


# ---------------------------------------------------------------- optional columns

def _extras(T: int, shift: float) -> dict:
    old = [None] + [40.0 + shift + t for t in range(1, T)]
    top5 = [90.0 + shift - t for t in range(T)]
    return {"old_accuracy": old, "new_accuracy": [80.0 + shift] * T, "top5_accuracy": top5,
            "last_old_accuracy": old[-1], "last_new_accuracy": 80.0 + shift,
            "avg_top5_accuracy": sum(top5) / T, "last_top5_accuracy": top5[-1]}


@pytest.fixture()
def mixed_runs(tmp_path) -> pd.DataFrame:
    """"new" has the optional keys (two seeds), "old" (an older summary) lacks them."""
    matrix = [[90.0], [50.0, 85.0], [30.0, 40.0, 80.0]]
    for seed, shift in ((0, 0.0), (1, 2.0)):
        _write_summary(tmp_path, "toy", "new", seed, matrix, **_extras(3, shift))
    _write_summary(tmp_path, "toy", "old", 0, matrix)
    return collect_runs([tmp_path])


def test_optional_columns_off_by_default(mixed_runs):
    t = paper_table(mixed_runs)
    assert list(t.columns.get_level_values(1)) == list(report.COLUMNS)
    assert render(mixed_runs, "md") == render(mixed_runs, "md", columns=())
    assert "last_old_accuracy_mean" not in render(mixed_runs, "csv")


def test_optional_columns_by_hand(mixed_runs):
    new = mixed_runs[mixed_runs.label == "new"]
    assert list(new.old_accuracy.iloc[0]) == [None, 41.0, 42.0]  # the per-task lists, loaded as written
    assert mixed_runs.loc[mixed_runs.label == "old", "last_top5_accuracy"].isna().all()
    t = paper_table(mixed_runs, columns=("top5", "old_new"))  # shown in the table's order, not the caller's
    heads = list(t.columns.get_level_values(1))
    assert heads[:3] == list(report.COLUMNS[:3]) and heads[-4:] == list(report.COLUMNS[3:])
    assert heads[3:7] == ["Old (%)", "New (%)", "Top-5 Avg (%)", "Top-5 Last (%)"]
    row = t.loc["new", "toy"]
    assert row["Old (%)"] == f"{statistics.mean([42.0, 44.0]):.1f} ± {statistics.stdev([42.0, 44.0]):.1f}"
    assert row["New (%)"] == "81.0 ± 1.4"
    assert row["Top-5 Avg (%)"] == "90.0 ± 1.4" and row["Top-5 Last (%)"] == "89.0 ± 1.4"
    assert list(t.loc["old", "toy"][["Old (%)", "New (%)", "Top-5 Avg (%)", "Top-5 Last (%)"]]) == ["–"] * 4
    md = render(mixed_runs, "md", columns=("old_new",))
    assert "| Old (%) | New (%) |" in md and "Top-5" not in md
    assert r"Top-5 Last (\%)" in render(mixed_runs, "latex", columns=("top5",))
    csv = pd.read_csv(io.StringIO(render(mixed_runs, "csv", columns=("old_new", "top5"))))
    assert csv.set_index("label").loc["new", "avg_top5_accuracy_mean"] == pytest.approx(90.0)
    with pytest.raises(HarnessError, match="unknown column group 'top1'"):
        paper_table(mixed_runs, columns=("top1",))
    with pytest.raises(HarnessError, match="as a list"):
        paper_table(mixed_runs, columns="top5")  # one group is still a tuple of them


def test_optional_columns_written_everywhere(mixed_runs, tmp_path):
    write_report(mixed_runs, tmp_path / "out", embedded=[], columns=("old_new", "top5"))
    for name in ("table.md", "table.tex", "report.html"):
        assert "Top-5 Avg" in (tmp_path / "out" / name).read_text(), name
    assert "last_new_accuracy_mean" in (tmp_path / "out" / "table.csv").read_text()
    assert "Old (%)" in html_report.render(mixed_runs, "html", embedded=[], columns=("old_new",))
