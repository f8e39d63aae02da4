"""CPU threads follow the idle cores, unless the user fixed them."""
import torch

from harness import threads


def test_thread_count_for_measured_idle_cores():
    assert threads.threads_for(2.0, 2) == 2  # idle machine: every core
    assert threads.threads_for(1.1, 2) == 1  # another process holds a core
    assert threads.threads_for(0.2, 2) == 1  # never fewer than one
    assert threads.threads_for(7.9, 4) == 4  # never more than usable cores
    assert threads.threads_for(None, 3) == 3  # no /proc/stat: all usable cores


def test_idle_cores_are_measured_from_proc_stat_differences(monkeypatch):
    samples = iter([(100.0, 400.0), (150.0, 600.0)])  # idle 50 of 200 jiffies over the window
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    assert threads.idle_cores(window_s=0) == 1.0


def test_follow_load_sets_torch_threads_unless_fixed(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "idle_cores", lambda: 0.9)  # one of two cores busy elsewhere
    try:
        threads.fix(None)
        assert threads.follow_load() == 1 and torch.get_num_threads() == 1
        threads.fix(2)  # --threads 2: the load is no longer consulted
        assert threads.follow_load() == 2 and torch.get_num_threads() == 2
    finally:
        threads.fix(before)


def test_threads_option_pins_the_run(tmp_path):
    from harness.cli import main

    before = torch.get_num_threads()
    try:
        code = main(["run", "--methods", "finetune", "--protocol", "quickdraw20_2x10", "--epochs", "1",
                     "--max-train-per-class", "4", "--threads", "1", "--quiet", "--out", str(tmp_path)])
        assert code == 0 and torch.get_num_threads() == 1 and threads.follow_load() == 1
    finally:
        threads.fix(before)
