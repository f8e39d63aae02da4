"""Experiment files: a TOML list of rows runs as one sweep, tables in the file's order."""
from pathlib import Path

import pytest

from harness.cli import main

REPO = Path(__file__).resolve().parents[1]

SMALL = '''
protocol = "quickdraw20_2x10"
seeds = [0]

[[row]]
method = "joint"
epochs = 1
max_train_per_class = 16

[[row]]
method = "finetune"
epochs = 1
max_train_per_class = 16
set = ["finetune.lr=0.05"]
name = "finetune at lr 0.05"

[[row]]
method = "finetune"
epochs = 1
max_train_per_class = 16
'''


def test_an_experiment_file_runs_its_rows_and_the_table_follows_it(tmp_path, capsys):
    exp = tmp_path / "small.toml"
    exp.write_text(SMALL)
    out = tmp_path / "out"
    args = ["run", "--experiment", str(exp), "--out", str(out), "--quiet", "--threads", "1", "--device", "cpu"]
    assert main(args) == 0
    table = (out / "quickdraw20_2x10+maxtrain=16" / "table.md").read_text().splitlines()[2:]
    assert [row.split("|")[1].strip() for row in table] == ["joint+epochs=1", "finetune at lr 0.05", "finetune+epochs=1"]
    summaries = sorted(out.rglob("summary.json"))
    assert len(summaries) == 3
    stamps = {p: p.stat().st_mtime_ns for p in summaries}
    capsys.readouterr()
    assert main(args) == 0  # every row finished: nothing trains again
    assert {p: p.stat().st_mtime_ns for p in summaries} == stamps
    assert main(["report", str(out), "--experiment", str(exp)]) == 0
    printed = capsys.readouterr().out.splitlines()[-3:]
    assert [row.split("|")[1].strip() for row in printed] == ["joint+epochs=1", "finetune at lr 0.05",
                                                              "finetune+epochs=1"]


@pytest.mark.parametrize("text,extra,message", [
    ('[[row]]\nmethod = "finetune"\n', [], "no protocol"),
    ('protocol = "quickdraw20_2x10"\n[[row]]\nmethods = ["finetune"]\nlr = 0.1\n', [], "unknown key(s) lr"),
    ('protocol = "quickdraw20_2x10"\n', [], "has no [[row]] table"),
    ('protocol = "quickdraw20_2x10"\n[[row]]\nmethod = "finetun"\n', [], "unknown method 'finetun'"),
    ('protocol = "quickdraw20_2x10"\n[[row]]\nmethod = "finetune"\nset = ["finetune.lr=fast"]\n', [], "expected float"),
    ('protocol = "quickdraw20_2x10"\n[[row]]\nmethod = "finetune"\n', ["--methods", "icarl"],
     "--methods cannot be given with it"),
    ('protocol = "quickdraw20_2x10"\n[[row]]\nmethod = "finetune"\nepochs = 2\n', ["--epochs", "1"], "both set it"),
    ('protocol = [\n', [], "is not valid TOML"),
])
def test_a_bad_experiment_file_is_one_line_before_any_work(text, extra, message, tmp_path, capsys):
    exp = tmp_path / "bad.toml"
    exp.write_text(text)
    assert main(["run", "--experiment", str(exp), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


@pytest.mark.parametrize("experiment", sorted((REPO / "experiments").glob("*.toml")), ids=lambda p: p.stem)
def test_each_committed_experiment_file_rebuilds_its_reference_folder(experiment):
    """Every row of a committed experiment file is a finished (or diverged) run in
    results/reference: the file is the one-line reproduction of that table (a rerun skips
    the finished ones)."""
    from harness import failures, results
    from harness.experiment import load_experiment
    from harness.params import expand_grid, parse_set_options
    from harness.registry import METHODS, discover
    from harness.runner import RunSpec, plan_label

    discover()
    e = load_experiment(experiment)
    missing = []
    for row in e.rows:
        classes = {m: METHODS.get(m) for m in row.methods}
        for combo in expand_grid(parse_set_options(row.sets), classes):  # every row of a grid
            for m in row.methods:
                for s in row.seeds:
                    spec = RunSpec(method=m, protocol=row.protocol, seed=s, out=str(REPO / e.out),
                                   overrides=tuple(combo))
                    label, protocol_dir, _, _ = plan_label(spec)
                    folder = results.run_dir(REPO / e.out, protocol_dir, label, s)
                    # a run that diverged is a measured result too (the table lists it as failed)
                    diverged = (failures.read_record(folder) or {}).get("error") == "RunDiverged"
                    if not (results.is_finished(folder) or diverged):
                        missing.append(f"{protocol_dir}/{label}/seed{s}")
    assert not missing, missing
