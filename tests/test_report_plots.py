"""Tables and figures from hand-made results folders (no training involved)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest

from harness.errors import HarnessError
from harness.metrics import summarise
from harness.plots import write_figures
from harness.report import collect_runs, paper_table, render, write_report

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


def test_write_report_files_parse(runs, results, tmp_path):
    _, summaries = results
    paths = write_report(runs, tmp_path)
    assert sorted(p.name for p in paths) == ["report.html", "sessions.csv", "sessions.md", "table.csv", "table.md",
                                             "table.tex"]

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
