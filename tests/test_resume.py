"""Runs survive crashes: SIGKILL and Ctrl-C mid-task, then resume to the same result."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import checkpoint
from harness.cli import main

REPO = Path(__file__).resolve().parents[1]

PROTOCOL = '''
from harness.protocol import Protocol, register_protocol
register_protocol(Protocol(name="resume_tiny", dataset="quickdraw", num_classes=8, num_tasks=4, increment=2,
                           image_size=28, channels=1, family="quickdraw", class_order_seed={seed}))
'''
# Threads pinned: float sums depend on the thread count, and a run that follows the idle cores
# could use another count after resuming when the machine is busy at that moment (README).
ARGS = ["run", "--protocol", "resume_tiny", "--epochs", "6", "--max-train-per-class", "40", "--device", "cpu",
        "--threads", "2"]


def write_plugin(folder: Path, seed: int = 3) -> Path:
    plugin = folder / "resume_protocol.py"
    plugin.write_text(PROTOCOL.format(seed=seed))
    return plugin


def cli(plugin, out, *extra):
    return [sys.executable, "-m", "harness", "--plugins", str(plugin), *ARGS, "--out", str(out), *extra]


def summary(out: Path, method: str) -> dict:
    return json.loads((out / "resume_tiny+maxtrain=40" / f"{method}+epochs=6" / "seed0" / "summary.json").read_text())


def interrupt_mid_run(cmd, run_dir: Path, sig) -> subprocess.Popen:
    """Start a run and send `sig` once it has checkpointed at least one task."""
    # A child of a background job inherits SIGINT ignored; a terminal's Ctrl-C is not.
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt = run_dir / checkpoint.FILENAME
    deadline = time.time() + 240
    while not ckpt.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(0.3)  # into the next task
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


@pytest.mark.parametrize("method", ["finetune", "joint"])
def test_sigkill_then_resume_gives_the_uninterrupted_matrix(tmp_path, method):
    plugin = write_plugin(tmp_path)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    subprocess.run(cli(plugin, straight, "--methods", method, "--quiet"), cwd=REPO, check=True, timeout=300)
    run_dir = broken / "resume_tiny+maxtrain=40" / f"{method}+epochs=6" / "seed0"
    proc = interrupt_mid_run(cli(plugin, broken, "--methods", method, "--quiet"), run_dir, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()
    done_before = checkpoint.load(run_dir / checkpoint.FILENAME)["step"] + 1
    assert 1 <= done_before < 4
    resumed = subprocess.run(cli(plugin, broken, "--methods", method), cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after task {done_before}/4" in resumed.stderr
    a, b = summary(straight, method), summary(broken, method)
    assert b["resumed"] is True
    assert b["accuracy_matrix"] == a["accuracy_matrix"]


def test_ctrl_c_stops_cleanly_and_resumes(tmp_path):
    plugin = write_plugin(tmp_path)
    out = tmp_path / "out"
    run_dir = out / "resume_tiny+maxtrain=40" / "finetune+epochs=6" / "seed0"
    proc = interrupt_mid_run(cli(plugin, out, "--methods", "finetune", "--quiet"), run_dir, signal.SIGINT)
    err = proc.stderr.read()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    checkpoint.load(run_dir / checkpoint.FILENAME)  # intact
    assert main(["--plugins", str(plugin), *ARGS, "--out", str(out), "--methods", "finetune", "--quiet"]) == 0
    assert summary(out, "finetune")["resumed"] is True


@pytest.fixture
def unfinished(tmp_path):
    """A run with a checkpoint after its last task but no summary (killed while writing it)."""
    plugin = write_plugin(tmp_path)
    out = tmp_path / "out"
    argv = ["--plugins", str(plugin), *ARGS, "--out", str(out), "--methods", "finetune", "--quiet"]
    assert main(argv) == 0
    run_dir = out / "resume_tiny+maxtrain=40" / "finetune+epochs=6" / "seed0"
    (run_dir / "summary.json").unlink()
    return argv, run_dir


def test_corrupt_checkpoint_is_refused_and_restart_recovers(unfinished, capsys):
    argv, run_dir = unfinished
    ckpt = run_dir / checkpoint.FILENAME
    raw = bytearray(ckpt.read_bytes())
    raw[-100] ^= 0xFF
    ckpt.write_bytes(bytes(raw))
    metrics_before = (run_dir / "metrics.csv").read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "corrupt (checksum mismatch)" in err and "--restart" in err and len(err.splitlines()) == 1
    assert (run_dir / "metrics.csv").read_bytes() == metrics_before  # nothing lost
    assert main([*argv, "--restart"]) == 0
    assert (run_dir / "summary.json").exists()
    checkpoint.load(ckpt)


def test_checkpoint_of_another_configuration_is_refused(unfinished, tmp_path, capsys):
    argv, run_dir = unfinished
    other = tmp_path / "other"
    other.mkdir()
    changed = write_plugin(other, seed=4)  # same protocol name, other class order
    # The registry keeps the first definition within one process, so check in a fresh one.
    proc = subprocess.run([sys.executable, "-m", "harness", "--plugins", str(changed), *argv[2:]], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    # Refused before any work, in one line naming what changed
    assert "made with other settings or code" in proc.stderr and "class_order_seed" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_checkpoints_load_weights_only(unfinished):
    _, run_dir = unfinished
    state = checkpoint.load(run_dir / checkpoint.FILENAME)
    assert state["step"] == 3 and isinstance(state["method"]["model"]["head.classifier.weight"], torch.Tensor)
    assert state["method"]["model"]["head.classifier.weight"].shape[0] == 8


def test_a_run_held_by_another_process_is_skipped(tmp_path):
    import fcntl

    from harness.registry import discover
    from harness.runner import RunSpec, execute, plan_label

    discover()
    spec = RunSpec("finetune", "quickdraw20_2x10", 0, str(tmp_path), epochs=1, max_train_per_class=4, quiet=True)
    label, protocol_dir, _, _ = plan_label(spec)
    run_dir = tmp_path / protocol_dir / label / "seed0"
    run_dir.mkdir(parents=True)
    with open(run_dir / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # as a concurrent run holds it (flock locks are per open file)
        assert execute(spec).status == "busy"
        assert not (run_dir / "metrics.csv").exists()
    assert execute(spec).status == "done"
