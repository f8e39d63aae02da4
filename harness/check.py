"""`python -m harness check METHOD`: does a method keep the harness's promises?

Runs the method through a tiny protocol (2 tasks, 1 epoch, a few images per class, one
pinned CPU thread) in a temporary folder, four times, and checks:
- it runs end to end;
- `class_scores` returns (batch, >= classes seen) at every evaluation;
- two straight runs give the same accuracy matrix (determinism);
- a run killed after its first task (as Ctrl-C does, once that task is checkpointed) and
  resumed by the same command ends with the straight run's matrix and, to the bit, its final
  scores: every piece of state the method needs to continue is in its checkpoint;
- the exemplars it reports stay within the budget its settings declare.
"""
from __future__ import annotations

import tempfile
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from harness import threads
from harness.cil.memory import ExemplarMemory
from harness.registry import METHODS
from harness.runner import RunSpec, execute, plan_label


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@contextmanager
def _patched(cls: type, name: str, wrap: Callable):
    """Temporarily replace cls.name by wrap(original) (restored whatever happens)."""
    original = cls.__dict__.get(name)
    inherited = getattr(cls, name)
    setattr(cls, name, wrap(inherited))
    try:
        yield
    finally:
        if original is None:
            delattr(cls, name)
        else:
            setattr(cls, name, original)


@contextmanager
def _threads_restored():
    """The check pins one thread (float sums depend on the count); the caller's setting comes back."""
    fixed, count = threads._fixed, torch.get_num_threads()
    try:
        yield
    finally:
        threads.fix(fixed)
        torch.set_num_threads(count)


def _crash_on_second_task(learn):
    calls = []

    def crashing(self, experience):
        calls.append(experience)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C does: task 1 is checkpointed, task 2 is lost
        return learn(self, experience)
    return crashing


class _FinalScores:
    """The scores of the last evaluation of a run: straight and resumed runs must agree on them
    exactly, a far finer test than accuracies (on a tiny protocol those sit near chance)."""

    def __init__(self):
        self.learned, self.by_task = 0, {}
        self.memory = None  # the method's ExemplarMemory, if it keeps one: its budget is checked

    def learn(self, learn):
        def counting(method, experience):
            out = learn(method, experience)
            self.learned += 1
            self.memory = getattr(method, "memory", None)
            return out
        return counting

    def class_scores(self, class_scores):
        def recording(method, x):
            out = class_scores(method, x)
            self.by_task.setdefault(self.learned, []).append(out.detach().cpu().clone())
            return out
        return recording

    def scores_by_classifier(self, scores_by_classifier):
        def recording(method, x):  # every classifier's scores (a method scored by several, e.g. CNN and NME)
            out = scores_by_classifier(method, x)
            self.by_task.setdefault(self.learned, []).append(
                torch.cat([out[k].detach().cpu() for k in sorted(out)], dim=1))
            return out
        return recording

    def last(self) -> torch.Tensor:
        return torch.cat(self.by_task[max(self.by_task)])


@contextmanager
def _recording(cls: type, recorder: _FinalScores):
    with _patched(cls, "learn", recorder.learn), _patched(cls, "class_scores", recorder.class_scores), \
            _patched(cls, "scores_by_classifier", recorder.scores_by_classifier):
        yield


def _one_line(exc: BaseException) -> str:
    """The exception in one line, with the file and line of the deepest frame outside the
    installed packages (the method's own code, where the fix usually is)."""
    text = str(exc).strip().splitlines()
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "site-packages" not in f.filename
              and "/lib/python" not in f.filename]
    where = f" (at {frames[-1].filename}:{frames[-1].lineno}, in {frames[-1].name})" if frames else ""
    return f"{type(exc).__name__}: {text[0] if text else ''}{where}"


def _budget(hp: dict, num_classes: int, memory) -> tuple[str, int, int] | None:
    """(what, limit, index into (exemplars, bytes)): the budget of the method's ExemplarMemory,
    else the one its settings declare, if any."""
    if isinstance(memory, ExemplarMemory):
        if memory.max_bytes is not None:
            return "bytes", memory.max_bytes, 1
        if memory.max_items is not None:
            return "exemplars", memory.max_items, 0
        return "exemplars", memory.per_class * num_classes, 0
    if hp.get("memory_bytes", 0) > 0:
        return "bytes", hp["memory_bytes"], 1
    if hp.get("memory_per_class", 0) > 0:
        return "exemplars", hp["memory_per_class"] * num_classes, 0
    for key in ("memory", "mem_size", "memory_size"):  # the harness's, Avalanche's strategies' names
        if isinstance(hp.get(key), int) and not isinstance(hp[key], bool) and hp[key] > 0:
            return "exemplars", hp[key], 0
    return None


def check_method(method: str, protocol: str = "quickdraw20_2x10", overrides: Sequence = (), plugins: Sequence = (),
                 epochs: int = 1, max_train_per_class: int = 8, seed: int = 0) -> list[Check]:
    cls = METHODS.get(method)
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="harness-check-") as tmp, _threads_restored():
        base = RunSpec(method=method, protocol=protocol, seed=seed, out=str(Path(tmp) / "straight"), device="cpu",
                       overrides=tuple(overrides), epochs=epochs, max_train_per_class=max_train_per_class,
                       quiet=True, plugins=tuple(plugins), threads=1, fail_fast=True)  # a failure is the finding
        _, _, hp, _ = plan_label(base)  # bad --set values fail here, with the usual one line
        straight_scores = _FinalScores()
        try:
            with _recording(cls, straight_scores):
                straight = execute(base).summary
        except Exception as exc:  # the method's own failure (a wrong score shape included): that is the finding
            return [Check("runs end to end", False, _one_line(exc))]
        matrix = straight["accuracy_matrix"]
        checks.append(Check("runs end to end", True, f"{len(matrix)} tasks, last accuracy {straight['last_accuracy']:.1f}%"))
        # The evaluator refuses any other shape (harness.evaluation): a finished run had it at every batch.
        checks.append(Check("scores are (batch, >= classes seen)", True))

        again = execute(replace(base, out=str(Path(tmp) / "again"))).summary
        checks.append(Check("same matrix when run twice", again["accuracy_matrix"] == matrix,
                            "" if again["accuracy_matrix"] == matrix else f"{matrix} vs {again['accuracy_matrix']}"))

        resumed_spec = replace(base, out=str(Path(tmp) / "resumed"))
        name = "killed after task 1, resumed: same matrix and scores"
        try:
            with _patched(cls, "learn", _crash_on_second_task):
                execute(resumed_spec)
            checks.append(Check(name, False, "the run never reached task 2"))
        except KeyboardInterrupt:
            try:
                resumed_scores = _FinalScores()
                with _recording(cls, resumed_scores):
                    resumed = execute(resumed_spec).summary
                same_matrix = resumed["accuracy_matrix"] == matrix
                same = same_matrix and torch.equal(resumed_scores.last(), straight_scores.last())
                differ = (f"straight {matrix} vs resumed {resumed['accuracy_matrix']}" if not same_matrix else
                          f"same matrix {matrix}, but the scores differ by up to "
                          f"{(resumed_scores.last() - straight_scores.last()).abs().max().item():.3g}")
                checks.append(Check(name, same, "" if same else
                                    f"{differ}: some state the "
                                    "method needs is not in its checkpoint (an attribute listed in `transient`, state "
                                    "outside the method, or missing from extra_state / load_extra_state)"))
            except Exception as exc:
                checks.append(Check(name, False, f"resuming failed: {_one_line(exc)}"))

        budget = _budget(hp, sum(straight["classes_per_task"]), straight_scores.memory)
        used = (straight["memory_exemplars"], straight["memory_bytes"])
        if budget is None:
            checks.append(Check("memory within its budget", True, f"no budget declared; {used[0]} exemplars kept"))
        else:
            what, limit, i = budget
            checks.append(Check("memory within its budget", used[i] <= limit, f"{used[i]} {what} <= {limit}"))
    return checks


def report(method: str, protocol: str, checks: list[Check]) -> str:
    lines = [f"check {method} on {protocol}:"]
    for c in checks:
        lines.append(f"  {'ok  ' if c.ok else 'FAIL'}  {c.name}" + (f": {c.detail}" if c.detail else ""))
    return "\n".join(lines)
