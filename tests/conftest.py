import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# Under pytest-xdist (-n N) the workers share the cores: each takes its share, no oversubscription.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads() // _workers)))

from harness import threads  # noqa: E402

# Runs would otherwise pick their threads from the machine's load before each task, and float
# sums differ slightly with the thread count: straight-vs-resumed comparisons must not see that.
threads.fix(torch.get_num_threads())


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def straight_and_resumed(tmp_path, monkeypatch):
    """Run a spec straight, then again interrupted (Ctrl-C) on its second task and resumed
    with the same command; return both summaries."""
    from harness.registry import METHODS, discover
    from harness.runner import RunSpec, execute

    def run(**spec):
        discover()
        straight = execute(RunSpec(out=str(tmp_path / "straight"), fail_fast=True, **spec)).summary
        cls, calls = METHODS.get(spec["method"]), []
        learn = cls.learn

        def crash_on_task_2(self, experience):
            calls.append(experience)
            if len(calls) == 2:
                raise KeyboardInterrupt
            learn(self, experience)

        monkeypatch.setattr(cls, "learn", crash_on_task_2)
        with pytest.raises(KeyboardInterrupt):
            execute(RunSpec(out=str(tmp_path / "resumed"), **spec))
        monkeypatch.setattr(cls, "learn", learn)
        resumed = execute(RunSpec(out=str(tmp_path / "resumed"), fail_fast=True, **spec)).summary
        assert resumed["resumed"] is True
        return straight, resumed

    return run
