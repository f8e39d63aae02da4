"""Fault injection: a run that raises, diverges or meets a full disk costs only itself; the
user reads one line; nothing written before is damaged; the same command resumes."""
import errno
import fcntl
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from harness import checkpoint
from harness.cli import main

QUICK = ["--protocol", "quickdraw20_2x10", "--epochs", "1", "--max-train-per-class", "16", "--device", "cpu",
         "--quiet", "--threads", "1"]
PROTOCOL_DIR = "quickdraw20_2x10+maxtrain=16"

# finetune that raises in the middle of task 2's training until the file <plugin>.fixed exists
BOOM = '''
from pathlib import Path
from harness.registry import register_method
from methods.finetune import Finetune

FIXED = Path(__file__).with_suffix(".fixed")

@register_method(NAME)
class Boom(Finetune):
    description = "finetune that raises in task 2 until its cause is fixed"

    def _before_forward(self, **kwargs):
        super()._before_forward(**kwargs)
        if self.experience.current_experience == 1 and self.clock.train_epoch_iterations == 1 and not FIXED.exists():
            raise RuntimeError("boom in task 2")
'''


def boom_plugin(folder: Path, name: str) -> Path:
    plugin = folder / f"{name}.py"
    plugin.write_text(BOOM.replace("NAME", repr(name)))
    return plugin


def run_dir(out: Path, label: str) -> Path:
    return out / PROTOCOL_DIR / label / "seed0"


def matrix(out: Path, label: str):
    return json.loads((run_dir(out, label) / "summary.json").read_text())["accuracy_matrix"]


def sweep_with_a_failure(tmp_path, capsys, name, *executor):
    """boom + finetune: finetune finishes, boom's failure is recorded and said, exit 1; fixed,
    the same command resumes boom from its checkpoint and leaves finetune alone."""
    plugin = boom_plugin(tmp_path, name)
    out = tmp_path / "out"
    args = ["--plugins", str(plugin), "run", "--methods", name, "finetune", *QUICK, "--out", str(out), *executor]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    record = run_dir(out, f"{name}+epochs=1") / "error.json"
    assert err[-2] == f"failed: {name}+epochs=1 seed 0: RuntimeError: boom in task 2 (details: {record})"
    assert err[-1].startswith("1 of 2 runs failed; once the cause is fixed the same command resumes them")
    info = json.loads(record.read_text())
    assert (info["phase"], info["task"], info["epoch"], info["step"]) == ("training", 2, 1, 2)
    assert "RuntimeError: boom in task 2" in info["traceback"] and info["params"]["lr"] == 0.1
    assert checkpoint.load(record.parent / checkpoint.FILENAME)["step"] == 0  # task 1 is kept
    table = pd.read_csv(out / PROTOCOL_DIR / "table.csv")
    assert list(table.label) == ["finetune+epochs=1"]  # the finished run is tabulated, the failed one is not
    assert "Failed runs, not in the table" in (out / PROTOCOL_DIR / "table.md").read_text()
    finished = run_dir(out, "finetune+epochs=1") / "summary.json"
    stamp = finished.stat().st_mtime_ns

    plugin.with_suffix(".fixed").touch()
    assert main(args) == 0
    assert finished.stat().st_mtime_ns == stamp  # not trained again
    assert not record.exists()
    summary = json.loads((record.parent / "summary.json").read_text())
    assert summary["resumed"] is True
    assert "Failed runs" not in (out / PROTOCOL_DIR / "table.md").read_text()
    # a straight run of the fixed method: the resumed one ends with the same matrix
    assert main(["--plugins", str(plugin), "run", "--methods", name, *QUICK, "--out", str(tmp_path / "straight")]) == 0
    assert matrix(out, f"{name}+epochs=1") == matrix(tmp_path / "straight", f"{name}+epochs=1")


def test_a_failing_run_does_not_stop_the_sweep(tmp_path, capsys):
    sweep_with_a_failure(tmp_path, capsys, "boom_seq")


def test_a_failing_run_does_not_stop_the_sweep_in_a_process_pool(tmp_path, capsys):
    sweep_with_a_failure(tmp_path, capsys, "boom_pool", "--workers", "2")


def test_fail_fast_stops_at_the_first_failure_with_its_traceback(tmp_path):
    plugin = boom_plugin(tmp_path, "boom_fast")
    with pytest.raises(RuntimeError, match="boom in task 2"):
        main(["--plugins", str(plugin), "run", "--methods", "boom_fast", "finetune", *QUICK,
              "--out", str(tmp_path), "--fail-fast"])
    assert (run_dir(tmp_path, "boom_fast+epochs=1") / "error.json").exists()
    assert not run_dir(tmp_path, "finetune+epochs=1").exists()


# ---- run health ------------------------------------------------------------------------

def test_a_diverging_loss_stops_the_run_with_one_line_and_no_row(tmp_path, capsys):
    args = ["run", "--methods", "finetune", *QUICK, "--out", str(tmp_path), "--set", "finetune.lr=1e12"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("failed: finetune+epochs=1+lr=1e+12 seed 0: finetune diverged: the training loss is ")
    assert "at task 1/2, epoch 1, step " in err[0]
    record = json.loads((run_dir(tmp_path, "finetune+epochs=1+lr=1e+12") / "error.json").read_text())
    assert record["error"] == "RunDiverged" and record["phase"] == "training"
    assert not any(tmp_path.rglob("summary.json")) and not any(tmp_path.rglob("table.*"))
    assert main(["report", str(tmp_path)]) == 2  # nothing finished: no table to print


NAN_SCORES = '''
import torch
from harness.registry import register_method
from methods.finetune import Finetune

@register_method("nan_scores")
class NanScores(Finetune):
    description = "finetune whose class scores are NaN after task 1"

    def class_scores(self, x):
        scores = super().class_scores(x)
        return scores * float("nan") if self.clock.train_exp_counter == 2 else scores
'''


def test_non_finite_class_scores_are_refused(tmp_path, capsys):
    plugin = tmp_path / "nan_scores.py"
    plugin.write_text(NAN_SCORES)
    out = tmp_path / "out"
    assert main(["--plugins", str(plugin), "run", "--methods", "nan_scores", "finetune", *QUICK, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2].startswith("failed: nan_scores+epochs=1 seed 0: method nan_scores returned non-finite class "
                              "scores (NaN or inf) on the test data of task 1 after training on 20 classes")
    assert list(pd.read_csv(out / PROTOCOL_DIR / "table.csv").label) == ["finetune+epochs=1"]
    report = json.loads((run_dir(out, "nan_scores+epochs=1") / "error.json").read_text())
    assert (report["phase"], report["task"]) == ("evaluation", 2)


# ---- the operating system's refusals ----------------------------------------------------

class _DiskFullAt:
    """os, except that committing a file whose name matches `victim` fails with ENOSPC."""

    def __init__(self, victim: str):
        self.victim = victim

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, src, dst):
        if Path(dst).match(self.victim):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return os.replace(src, dst)


def _valid(folder: Path) -> None:
    """Every file a run wrote is whole: JSON parses, the CSV reads, the checkpoint verifies."""
    for p in folder.rglob("*.json"):
        json.loads(p.read_text())
    for p in folder.rglob("metrics.csv"):
        assert len(pd.read_csv(p)) > 0
    for p in folder.rglob(checkpoint.FILENAME):
        checkpoint.load(p)
    assert not list(folder.rglob(".*.tmp")), "a temporary file was left behind"


@pytest.mark.parametrize("victim", ["checkpoint.pt", "metrics.csv", "summary.json", "table.md", "*.png"])
def test_a_full_disk_is_one_line_and_leaves_every_earlier_file_valid(victim, tmp_path, capsys, monkeypatch):
    import harness.atomic

    out = tmp_path / "out"
    args = ["run", "--methods", "finetune", *QUICK, "--out", str(out)]
    monkeypatch.setattr(harness.atomic, "os", _DiskFullAt(victim))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the disk is full: free space (or choose another --out)" in err[0], err
    assert victim.lstrip("*") in err[0]  # the file it could not write is named
    _valid(out)
    monkeypatch.setattr(harness.atomic, "os", os)  # space freed: the same command finishes the job
    assert main(args) == 0
    _valid(out)
    assert main(["run", "--methods", "finetune", *QUICK, "--out", str(tmp_path / "straight")]) == 0
    assert matrix(out, "finetune+epochs=1") == matrix(tmp_path / "straight", "finetune+epochs=1")


def test_plot_and_report_into_a_refusing_folder_are_one_line(tmp_path, capsys, monkeypatch):
    import harness.atomic

    out = tmp_path / "out"
    assert main(["run", "--methods", "finetune", *QUICK, "--out", str(out)]) == 0
    capsys.readouterr()

    class ReadOnly(_DiskFullAt):
        def replace(self, src, dst):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(src))

    monkeypatch.setattr(harness.atomic, "os", ReadOnly("*"))
    assert main(["plot", str(out), "--out", str(tmp_path / "figures")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write ") and "read-only" in err[0]
    assert main(["run", "--methods", "finetune", *QUICK, "--out", str(out)]) == 2  # the table cannot be rewritten
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "read-only" in err[0]
    _valid(out)


def test_an_output_folder_on_a_special_file_system_is_refused_before_any_work(capsys):
    assert main(["run", "--methods", "finetune", *QUICK, "--out", "/proc/cil-results"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: output folder /proc/cil-results cannot be written: No such file or directory"]


# ---- small cases --------------------------------------------------------------------------

def test_a_busy_run_is_said_even_when_quiet(tmp_path, capsys):
    folder = run_dir(tmp_path, "finetune+epochs=1")
    folder.mkdir(parents=True)
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process holds the run
        assert main(["run", "--methods", "finetune", *QUICK, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"skip finetune+epochs=1 seed 0: another process is running it ({folder})"]


def test_an_interrupt_while_the_table_is_written_says_what_is_missing(tmp_path, capsys, monkeypatch):
    import harness.plots

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.plots, "write_figures", interrupted)
    args = ["run", "--methods", "finetune", *QUICK, "--out", str(tmp_path)]
    assert main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"interrupted while writing the table and figures of {tmp_path / PROTOCOL_DIR}: every run is "
                   "finished; the same command writes them again without training"]
    summary = run_dir(tmp_path, "finetune+epochs=1") / "summary.json"
    stamp = summary.stat().st_mtime_ns
    monkeypatch.undo()
    assert main(args) == 0
    assert summary.stat().st_mtime_ns == stamp and (tmp_path / PROTOCOL_DIR / "table.md").exists()


DIES_ONCE = '''
import os, signal
from pathlib import Path
from harness.registry import register_method
from methods.finetune import Finetune

MARKER = Path(__file__).with_suffix(".killed")

@register_method("dies_in_pool")
class DiesOnce(Finetune):
    description = "finetune whose process is killed (SIGKILL) in task 2, once"

    def learn(self, experience):
        if experience.current_experience == 1 and not MARKER.exists():
            MARKER.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        super().learn(experience)
'''


def test_a_killed_pool_worker_is_reported_and_the_same_command_resumes(tmp_path, capsys):
    plugin = tmp_path / "dies_in_pool.py"
    plugin.write_text(DIES_ONCE)
    out = tmp_path / "out"
    args = ["--plugins", str(plugin), "run", "--methods", "dies_in_pool", *QUICK, "--out", str(out), "--workers", "2"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("failed: dies_in_pool+epochs=1 seed 0: a worker process died")
    assert main(args) == 0  # the marker exists now: the run resumes from task 1's checkpoint
    assert json.loads((run_dir(out, "dies_in_pool+epochs=1") / "summary.json").read_text())["resumed"] is True
    assert main(["--plugins", str(plugin), "run", "--methods", "dies_in_pool", *QUICK, "--out", str(tmp_path / "s")]) == 0
    assert matrix(out, "dies_in_pool+epochs=1") == matrix(tmp_path / "s", "dies_in_pool+epochs=1")
