"""Ctrl-C stops the command at any moment: during imports, during training, and when a callback
swallows the KeyboardInterrupt (as jax's garbage-collector callback did)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--protocol", "quickdraw20_2x10", "--epochs", "2", "--max-train-per-class", "24", "--device", "cpu",
         "--threads", "1", "--quiet"]
# A method whose 3rd training iteration gets a SIGINT inside __del__, where Python prints the
# KeyboardInterrupt as "Exception ignored" and carries on: the interrupt is swallowed.
SWALLOWING = '''
import os, signal
from harness.cil.recipes import SUPERVISED_RECIPES
from harness.method import CILMethod
from harness.registry import register_method


class _Swallow:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10 ** 6):  # the handler runs between these bytecodes, inside __del__
            pass


@register_method("swallowing_ft")
class SwallowingFineTune(CILMethod):
    description = "fine-tuning that swallows a Ctrl-C once"
    protocol_defaults = SUPERVISED_RECIPES
    _iterations = 0

    def _after_training_iteration(self, **kwargs):
        type(self)._iterations += 1
        if type(self)._iterations == 3:
            _Swallow()  # dropped at once: __del__ runs here
        super()._after_training_iteration(**kwargs)
'''


def _start(args, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "harness", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _interrupted(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 130, err[-2000:]
    # No traceback of ours (Python's own "Exception ignored" report of a swallowed one carries one)
    assert err.count("Traceback") == err.count("Exception ignored"), err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted:")
    return err


def test_ctrl_c_during_the_imports(tmp_path):
    proc = _start(["run", "--methods", "finetune", "--out", tmp_path / "out", *QUICK], tmp_path)
    time.sleep(0.4)  # python has started; torch and the methods are still being imported
    proc.send_signal(signal.SIGINT)
    _interrupted(proc)
    assert not list((tmp_path / "out").rglob("summary.json"))


def test_ctrl_c_during_training_keeps_the_finished_task(tmp_path):
    proc = _start(["run", "--methods", "finetune", "--seeds", "0", "1", "--out", tmp_path / "out", *QUICK], tmp_path)
    run = tmp_path / "out" / "quickdraw20_2x10+maxtrain=24" / "finetune+epochs=2" / "seed0"
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _interrupted(proc)
    assert (run / "checkpoint.pt").exists()  # task 1 is kept: the same command resumes from it
    assert not (run.parent / "seed1").exists()  # the sweep stopped: the next run never started


def test_a_swallowed_ctrl_c_still_stops_the_sweep(tmp_path):
    plugin = tmp_path / "swallowing.py"
    plugin.write_text(SWALLOWING)
    proc = _start(["--plugins", plugin, "run", "--methods", "swallowing_ft", "--seeds", "0", "1",
                   "--out", tmp_path / "out", *QUICK], tmp_path)
    err = _interrupted(proc)
    assert "Exception ignored" in err  # Python did swallow it ...
    assert not list((tmp_path / "out").rglob("summary.json"))  # ... and the sweep stopped all the same
    assert not list((tmp_path / "out").rglob("seed1"))
