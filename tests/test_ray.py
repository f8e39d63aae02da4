"""--executor ray on a local Ray (2 CPUs, one per run): same results as the local executor; a killed
worker's run resumes from its checkpoint, by Ray's retry or by submitting the sweep again."""
import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from harness.cli import main  # noqa: E402

QUICK = ["--protocol", "quickdraw20_2x10", "--epochs", "1", "--max-train-per-class", "8", "--quiet", "--device", "cpu"]
PROTOCOL_DIR = "quickdraw20_2x10+maxtrain=8"

# finetune, except that its worker process dies (SIGKILL) in task 2 while MARKER does not exist
DIES_ONCE = '''
import os, signal
from pathlib import Path
from harness.registry import register_method
from methods.finetune import Finetune

MARKER = Path(MARKER_PATH)

@register_method(NAME)
class DiesOnce(Finetune):
    description = "finetune whose process is killed in task 2, once"

    def learn(self, experience):
        if experience.current_experience == 1 and not MARKER.exists():
            MARKER.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        super().learn(experience)
'''


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def _matrices(out: Path) -> dict:
    return {(p.parent.parent.name, p.parent.name): json.loads(p.read_text())["accuracy_matrix"]
            for p in (out / PROTOCOL_DIR).glob("*/seed*/summary.json")}


def _plugin(tmp_path: Path, name: str) -> tuple[Path, Path]:
    marker = tmp_path / f"{name}.killed"
    plugin = tmp_path / f"{name}.py"
    plugin.write_text(DIES_ONCE.replace("MARKER_PATH", repr(str(marker))).replace("NAME", repr(name)))
    return plugin, marker


def test_a_sweep_on_ray_equals_the_local_executor(tmp_path):
    sweep = ["run", "--methods", "finetune", "icarl", "--seeds", "0", "1", *QUICK, "--threads", "1"]
    assert main([*sweep, "--out", str(tmp_path / "local")]) == 0
    assert main([*sweep, "--out", str(tmp_path / "ray"), "--executor", "ray", "--cpus-per-run", "1"]) == 0
    local, on_ray = _matrices(tmp_path / "local"), _matrices(tmp_path / "ray")
    assert len(local) == 4 and on_ray == local
    table = (tmp_path / "ray" / PROTOCOL_DIR / "table.csv").read_text()
    assert (tmp_path / "local" / PROTOCOL_DIR / "table.csv").read_text().split("\n")[1].split(",")[:5] == \
        table.split("\n")[1].split(",")[:5]
    # submitted again: every run is finished, none is trained twice
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("summary.json")}
    assert main([*sweep, "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_killed_worker_is_retried_by_ray_and_resumes(tmp_path):
    plugin, marker = _plugin(tmp_path, "dies_retried")
    args = ["--plugins", str(plugin), "run", "--methods", "dies_retried", *QUICK, "--threads", "1"]
    assert main([*args, "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    assert marker.exists()  # the worker really died once
    summary = json.loads((tmp_path / "ray" / PROTOCOL_DIR / "dies_retried+epochs=1" / "seed0" / "summary.json").read_text())
    assert summary["resumed"] is True
    assert main([*args, "--out", str(tmp_path / "local")]) == 0  # the marker exists: a straight run
    assert _matrices(tmp_path / "ray") == _matrices(tmp_path / "local")


def test_without_retries_the_next_submission_resumes(tmp_path, monkeypatch, capsys):
    import harness.ray_executor as R

    monkeypatch.setattr(R, "MAX_RETRIES", 0)
    plugin, marker = _plugin(tmp_path, "dies_resubmitted")
    args = ["--plugins", str(plugin), "run", "--methods", "dies_resubmitted", *QUICK, "--threads", "1",
            "--executor", "ray", "--out", str(tmp_path / "ray")]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "failed: dies_resubmitted+epochs=1 seed 0: a Ray worker died during the run (1 try, ")
    assert err[0].endswith("its last checkpoint is kept: the same command resumes it")
    run = tmp_path / "ray" / PROTOCOL_DIR / "dies_resubmitted+epochs=1" / "seed0"
    assert (run / "checkpoint.pt").exists() and not (run / "summary.json").exists()
    assert main(args) == 0  # the same command again
    assert json.loads((run / "summary.json").read_text())["resumed"] is True
    assert main(["--plugins", str(plugin), "run", "--methods", "dies_resubmitted", *QUICK, "--threads", "1",
                 "--out", str(tmp_path / "local")]) == 0
    assert _matrices(tmp_path / "ray") == _matrices(tmp_path / "local")


def test_a_failing_run_does_not_stop_a_sweep_on_ray(tmp_path, capsys):
    from test_faults import sweep_with_a_failure

    sweep_with_a_failure(tmp_path, capsys, "boom_ray", "--executor", "ray")


def test_a_sweep_whose_driver_is_killed_resumes_to_the_straight_matrices(tmp_path):
    """kill -9 of the driver (and of the local Ray it started) in the middle of a sweep: the
    same command, submitted again, finishes every run with the matrices of a straight sweep."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    sweep = ["run", "--methods", "finetune", "icarl", *QUICK, "--threads", "1", "--executor", "ray"]
    broken = tmp_path / "broken"
    proc = subprocess.Popen([sys.executable, "-m", "harness", *sweep, "--out", str(broken)], cwd=repo,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list(broken.rglob("checkpoint.pt")):  # one task of some run is done: mid-sweep
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not list(broken.rglob("summary.json")) or len(list(broken.rglob("summary.json"))) < 2
    deadline = time.time() + 120  # a Ray worker outside the session may take a moment to notice
    while True:
        try:
            assert main([*sweep, "--out", str(broken)]) == 0
            if len(_matrices(broken)) == 2:
                break
        except AssertionError:
            pass
        assert time.time() < deadline, "the resubmitted sweep never finished both runs"
        time.sleep(1)
    assert main([*sweep[:-2], "--out", str(tmp_path / "straight")]) == 0
    assert _matrices(broken) == _matrices(tmp_path / "straight")
