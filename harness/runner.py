"""The run loop: one (method, protocol, seed) run per RunSpec.

`execute(spec)` reads top to bottom as the run's phases: plan (label, settings, identity),
prepare (data, stream, method), restore (a checkpoint, or a new config.json), then for each
task train, evaluate and checkpoint, then finish (summary.json). Runs are independent, so a
sweep is a list of RunSpecs that any executor (harness.executors: sequential, a process pool,
Ray) can take.
"""
from __future__ import annotations

import logging
import random
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from harness import data as data_mod
from harness import checkpoint, failures, interrupts, loggers, metrics, results, threads
from harness.errors import HarnessError, RunDiverged, one_line
from harness.evaluation import Evaluator, StepScores
from harness.method import CILMethod, MethodContext
from harness.planning import Plan, RunSpec, plan_label, plan_run, refusal  # noqa: F401 (re-exported)
from harness.protocol import Protocol, get_protocol
from harness.registry import METHODS, discover
from harness.streams import build_benchmark

log = logging.getLogger("harness")


@dataclass
class RunOutcome:
    spec: RunSpec
    status: str  # "done", "skipped" (finished before), "busy" (another process runs it) or "failed"
    path: str
    label: str
    protocol_dir: str
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # failed: the one-line account
    record: str | None = None  # failed: its error.json (None: refused before it started, or the disk refused)
    refused: bool = False  # failed on the user's input, a missing resource or the OS's refusal: exit code 2

    def failure_line(self) -> str:
        if self.record is None and self.refused:
            return f"error: {self.error}"
        where = f" (details: {self.record})" if self.record else ""
        return f"failed: {self.label} seed {self.spec.seed}: {self.error}{where}"


def _refusal(exc: BaseException) -> bool:
    """Input the user fixes or a resource the system refused (exit code 2), not a run that broke."""
    return (isinstance(exc, HarnessError) and not isinstance(exc, RunDiverged)) or (
        isinstance(exc, OSError) and exc.errno is not None)


def failed_outcome(spec: RunSpec, message: str) -> RunOutcome:
    """A run that failed outside its own process (a worker that died): its folder, no record."""
    plan = plan_run(spec)
    return RunOutcome(spec, "failed", str(plan.path), plan.label, plan.protocol_dir, error=message)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@lru_cache(maxsize=4)
def _prepared(protocol_name: str, data_root: str | None, download: bool, max_train_per_class: int | None):
    # Several methods and seeds in one process share the prepared protocol data.
    return data_mod.prepare(get_protocol(protocol_name), data_root, download, max_train_per_class)


# ---- the run ---------------------------------------------------------------------------------

def execute(spec: RunSpec) -> RunOutcome:
    """One run. An exception is the run's failure, not the sweep's: it is recorded in the run's
    folder (harness.failures) and returned as a "failed" outcome, unless spec.fail_fast."""
    try:
        discover(spec.plugins)
        plan = plan_run(spec)
        why = refusal(spec, plan)
        if why:
            raise HarnessError(why)
    except Exception as exc:
        if spec.fail_fast:
            raise
        return RunOutcome(spec, "failed", "", spec.method, spec.protocol, error=one_line(exc), refused=_refusal(exc))
    if results.is_finished(plan.path) and not spec.force:
        return _skipped(spec, plan)

    state: dict[str, Any] = {"position": failures.where("setup")}
    try:
        plan.path.mkdir(parents=True, exist_ok=True)
        with results.run_lock(plan.path) as locked:
            if not locked:
                return RunOutcome(spec, "busy", str(plan.path), plan.label, plan.protocol_dir)
            try:
                return _run_locked(spec, plan, state)
            except Exception as exc:
                return _failed(spec, plan, state, exc)
    except OSError as exc:  # the run folder or its lock cannot be made
        if spec.fail_fast:
            raise
        return RunOutcome(spec, "failed", str(plan.path), plan.label, plan.protocol_dir, error=one_line(exc),
                          refused=True)


def _skipped(spec: RunSpec, plan: Plan) -> RunOutcome:
    return RunOutcome(spec, "skipped", str(plan.path), plan.label, plan.protocol_dir, results.read_summary(plan.path))


def _failed(spec: RunSpec, plan: Plan, state: dict, exc: Exception) -> RunOutcome:
    started = (plan.path / "config.json").exists()
    record = None
    if started or not isinstance(exc, HarnessError):  # a refusal before any work leaves nothing
        record = failures.write_record(plan.path, exc, state.get("identity", {"label": plan.label,
                                       "method": spec.method, "seed": spec.seed}), state["position"])
    if spec.fail_fast:
        raise exc
    outcome = RunOutcome(spec, "failed", str(plan.path), plan.label, plan.protocol_dir, error=one_line(exc),
                         record=None if record is None else str(record), refused=_refusal(exc))
    if record is not None:
        _say(spec, outcome.failure_line() + "; the other runs go on")
    return outcome


@dataclass
class _Run:
    """Everything one run holds while it trains (built by _prepare)."""

    spec: RunSpec
    plan: Plan
    protocol: Protocol
    data: Any
    device: torch.device
    identity: dict
    benchmark: Any = None
    method: CILMethod | None = None
    loggers: list = field(default_factory=list)
    evaluator: Evaluator | None = None
    saved: dict | None = None  # the checkpoint resumed from
    first_step: int = 0
    progress: dict = field(default_factory=dict)
    progress_bar: Any = None  # tqdm over the tasks
    wall_before: float = 0.0  # wall time of the tasks run before a resume
    started: float = 0.0  # perf_counter when this process started on its tasks

    @property
    def checkpoint_path(self) -> Path:
        return self.plan.path / checkpoint.FILENAME

    @property
    def zero_shot(self) -> bool:
        # Methods that can score classes before training on them (GMM names any class) get their
        # accuracy on each task's test data measured before that task: the zero-shot figure.
        return type(self.method).zero_shot_scores is not CILMethod.zero_shot_scores


def _run_locked(spec: RunSpec, plan: Plan, state: dict[str, Any]) -> RunOutcome:
    if spec.threads is not None:
        threads.fix(spec.threads)
    if results.is_finished(plan.path) and not spec.force:  # finished while we waited for the lock
        return _skipped(spec, plan)
    run = _prepare(spec, plan, state)
    _restore_or_start(run)
    for step, experience in enumerate(run.benchmark.train_stream):
        if step >= run.first_step:
            _task(run, step, experience, state)
    return _finish(run, state)


def _prepare(spec: RunSpec, plan: Plan, state: dict[str, Any]) -> _Run:
    """Data, the checkpoint to resume (checked against the run's identity), stream and method."""
    protocol = get_protocol(spec.protocol)
    device = resolve_device(spec.device)
    data = _prepared(spec.protocol, spec.data_root, spec.download, spec.max_train_per_class)
    run_identity = {"method": spec.method, "label": plan.label, "protocol": protocol.to_dict(),
                    "params": plan.params, "seed": spec.seed, "max_train_per_class": spec.max_train_per_class,
                    "code": plan.code}
    state["identity"] = {**run_identity, "protocol": plan.protocol_dir}
    run = _Run(spec, plan, protocol, data, device, run_identity)
    if run.checkpoint_path.exists() and not (spec.force or spec.restart):
        run.saved = checkpoint.load(run.checkpoint_path)
        if run.saved["fingerprint"] != checkpoint.fingerprint(run_identity):
            raise HarnessError(f"checkpoint {run.checkpoint_path} was written by a different configuration of this "
                               "run; --restart starts it over")
        run.first_step = run.saved["step"] + 1
    run.loggers = loggers.build(spec.loggers, plan.path, plan.label, spec.seed, run.first_step, run_identity)
    seed_everything(spec.seed)
    run.benchmark = build_benchmark(data)
    context = MethodContext(protocol, data.class_names, device, spec.seed, data.in_memory, spec.quiet,
                            images=len(data.train) + len(data.test), data_root=spec.data_root,
                            evaluator=loggers.evaluation_plugin(run.loggers))
    run.method = METHODS.get(spec.method)(context=context, hp=plan.hp)
    state["method"] = run.method
    run.evaluator = Evaluator(run.benchmark.test_stream, data.in_memory, data.task_classes())
    return run


def _restore_or_start(run: _Run) -> None:
    """Resume from the checkpoint (method, progress, RNG) or record the new run's config.json."""
    spec, plan = run.spec, run.plan
    (plan.path / "summary.json").unlink(missing_ok=True)  # --force: the old result is no longer valid
    run.progress = {"matrix": [], "step_accuracy": [], "rows": [], "train_time_s": 0.0, "eval_time_s": 0.0,
                    "wall_time_s": 0.0}
    if run.saved is not None:
        run.method.restore(run.saved["method"], list(run.benchmark.train_stream)[:run.first_step])
        run.progress = run.saved["progress"]
        checkpoint.set_rng_state(run.saved["rng"])
        _say(spec, f"{plan.label} seed {spec.seed}: resuming after task {run.first_step}/{run.protocol.num_tasks} "
                   f"from {run.checkpoint_path}")
    else:
        results.write_config(plan.path, {
            **run.identity, "protocol": plan.protocol_dir, "protocol_spec": plan.protocol_spec,
            "changed_params": plan.changed, "settings": plan.hp, "device": str(run.device),
            "class_names": run.data.class_names, "train_samples": len(run.data.train),
            "test_samples": len(run.data.test), "command": " ".join(sys.argv), "environment": results.environment(),
            "method_info": run.method.run_info(),
        })
    progress = run.progress
    progress.setdefault("zero_shot", [])
    progress.setdefault("classifiers", {})  # {name: Class-IL accuracy after each task}, methods with several
    for key in ("task_il_matrix", "task_il_step_accuracy", "top5_step_accuracy", "old_accuracy",
                "new_accuracy"):  # absent from checkpoints of older runs
        progress.setdefault(key, [None] * len(progress["matrix"]))
    run.wall_before, run.started = progress["wall_time_s"], time.perf_counter()
    run.progress_bar = tqdm(total=run.protocol.num_tasks, initial=run.first_step, desc=f"{plan.label} seed {spec.seed}",
                            disable=spec.quiet, file=sys.stderr, dynamic_ncols=True)


def _task(run: _Run, step: int, experience, state: dict[str, Any]) -> None:
    """One task: zero-shot score (where the method has one), train, evaluate, checkpoint."""
    method, progress = run.method, run.progress
    classes_seen = sum(run.protocol.classes_per_task()[:step + 1])
    n_threads = threads.follow_load()
    t_zero = time.perf_counter()
    zs, n_zs = None, 0
    state["position"] = failures.where("zero-shot evaluation", step)
    if run.zero_shot:
        zs, n_zs, _ = run.evaluator.task_accuracy(lambda x: method.zero_shot_scores(x, classes_seen), step,
                                                  classes_seen, f"method {method.name} (zero_shot_scores)")
        progress["zero_shot"].append(zs)
    t0 = time.perf_counter()
    state["position"] = failures.where("training", step)
    try:
        method.learn(experience)
    except Exception:
        state["position"] = failures.where("training", step, method)  # the epoch and step it stopped in
        raise
    t1 = time.perf_counter()
    state["position"] = failures.where("evaluation", step)
    scores = run.evaluator.evaluate(method, step, classes_seen)
    state["position"] = failures.where("results", step)
    t2 = time.perf_counter()
    _record(run, step, classes_seen, scores, t0, t1, t2, t_zero, zs, n_zs)
    # Saved after evaluation: the RNG state is the one the next task starts from.
    checkpoint.save(run.checkpoint_path, {"fingerprint": checkpoint.fingerprint(run.identity), "step": step,
                                          "method": method.checkpoint_state(), "progress": progress,
                                          "rng": checkpoint.rng_state()})
    _report_task(run, step, classes_seen, scores, t1 - t0, t2 - t1, n_threads, zs)
    interrupts.check()  # a Ctrl-C swallowed during the task stops here, the task checkpointed


def _record(run: _Run, step: int, classes_seen: int, scores: StepScores, t0: float, t1: float, t2: float,
            t_zero: float, zs: float | None, n_zs: int) -> None:
    """The task's figures into the run's progress, metrics.csv and loggers."""
    progress = run.progress
    progress["train_time_s"] += t1 - t0
    progress["eval_time_s"] += t2 - t1 + t0 - t_zero
    progress["wall_time_s"] = run.wall_before + (t2 - run.started)
    progress["matrix"].append(scores.row)
    progress["step_accuracy"].append(scores.seen)
    progress["task_il_matrix"].append(scores.task_il_row)
    progress["task_il_step_accuracy"].append(scores.task_il_seen)
    progress["top5_step_accuracy"].append(scores.top5_seen)
    progress["old_accuracy"].append(scores.old)
    progress["new_accuracy"].append(scores.new)
    for name, acc in scores.by_classifier.items():
        progress["classifiers"].setdefault(name, [None] * step).append(acc)
    timing = {"train_time_s": round(t1 - t0, 3), "eval_time_s": round(t2 - t1, 3)}
    progress["rows"] += _metric_rows(step, classes_seen, scores, timing)
    if zs is not None:  # measured before this task's training, on its test data
        progress["rows"].append({"step": step, "classes_seen": classes_seen, "scope": "zero_shot",
                                 "eval_task": step, "n_samples": n_zs, "accuracy": round(zs, 4), **timing})
    results.write_metrics(run.plan.path, progress["rows"])
    loggers.log_task(run.loggers, step, classes_seen, scores, zs, run.method.clock.total_iterations)


def _report_task(run: _Run, step: int, classes_seen: int, scores: StepScores, train_s: float, eval_s: float,
                 n_threads: int, zs: float | None) -> None:
    spec, bar = run.spec, run.progress_bar
    bar.update(1)
    bar.set_postfix(acc=f"{scores.seen:.1f}%")
    if spec.quiet:
        return
    busy = (f", {n_threads} CPU threads: other cores were busy"
            if n_threads < threads.usable_cores() and not threads.pinned() else "")
    bar.write(f"{run.plan.label} seed {spec.seed}: task {step + 1}/{run.protocol.num_tasks} "
              f"accuracy on {classes_seen} classes {scores.seen:.1f}%"
              + (f" (old {scores.old:.1f}%, new {scores.new:.1f}%)" if scores.old is not None else "")
              + f", top-5 {scores.top5_seen:.1f}%"
              + "".join(f", {name.upper()} {acc:.1f}%" for name, acc in scores.by_classifier.items())
              + f" ({train_s:.1f}s train, {eval_s:.1f}s eval{busy})"
              + (f"; before training, zero-shot {zs:.1f}% on its own test data" if zs is not None else ""))


def _finish(run: _Run, state: dict[str, Any]) -> RunOutcome:
    """summary.json: the run's figures, time and memory; the run is finished once it exists."""
    spec, plan, method, progress, protocol = run.spec, run.plan, run.method, run.progress, run.protocol
    run.progress_bar.close()
    state["position"] = failures.where("results")
    loggers.log_final(run.loggers, progress["matrix"], plan.protocol_dir, plan.label, method.clock.total_iterations)
    loggers.close(run.loggers)
    exemplars, memory_bytes = method.memory_usage()
    summary = {
        "protocol": plan.protocol_dir, "method": spec.method, "label": plan.label, "seed": spec.seed,
        "num_tasks": protocol.num_tasks, "classes_per_task": protocol.classes_per_task(),
        "classes_seen": list(np.cumsum(protocol.classes_per_task()).tolist()),
        **metrics.summarise(progress["matrix"], progress["step_accuracy"]),
        "wall_time_s": progress["wall_time_s"], "train_time_s": progress["train_time_s"],
        "eval_time_s": progress["eval_time_s"], "trainable_params": method.trainable_parameters(),
        "memory_exemplars": int(exemplars), "memory_bytes": int(memory_bytes), "resumed": run.saved is not None,
    }
    if run.zero_shot:
        summary["zero_shot_accuracy"] = progress["zero_shot"]
    if None not in progress["task_il_step_accuracy"]:  # a run resumed from before Task-IL has no full record
        summary.update(metrics.summarise_task_il(progress["task_il_matrix"], progress["task_il_step_accuracy"]))
    if None not in progress["top5_step_accuracy"]:  # likewise for the optional columns
        summary.update(metrics.summarise_old_new_top5(progress["old_accuracy"], progress["new_accuracy"],
                                                      progress["top5_step_accuracy"]))
    classifiers = progress["classifiers"]
    if classifiers and all(None not in accs and len(accs) == protocol.num_tasks for accs in classifiers.values()):
        summary.update(metrics.summarise_classifiers(classifiers, method.headline_classifier()))
    summary["total_memory_bytes"] = int(method.stored_bytes())
    results.write_summary(plan.path, summary)
    failures.clear_record(plan.path)  # an earlier failure of this run is history now
    return RunOutcome(spec, "done", str(plan.path), plan.label, plan.protocol_dir, summary)


def _metric_rows(step: int, classes_seen: int, scores: StepScores, timing: dict) -> list[dict[str, Any]]:
    """metrics.csv rows of one evaluation: per task then pooled, Class-IL ("task", "seen")
    then Task-IL ("task_il", "task_il_seen"), then Class-IL top-5 ("top5_seen")."""
    rows: list[dict[str, Any]] = []
    base = {"step": step, "classes_seen": classes_seen}
    for scope, pooled_scope, per_task, pooled in (("task", "seen", scores.row, scores.seen),
                                                  ("task_il", "task_il_seen", scores.task_il_row, scores.task_il_seen)):
        rows += [{**base, "scope": scope, "eval_task": i, "n_samples": n, "accuracy": round(acc, 4), **timing}
                 for i, (acc, n) in enumerate(zip(per_task, scores.sizes))]
        rows.append({**base, "scope": pooled_scope, "eval_task": "", "n_samples": sum(scores.sizes),
                     "accuracy": round(pooled, 4), **timing})
    rows.append({**base, "scope": "top5_seen", "eval_task": "", "n_samples": sum(scores.sizes),
                 "accuracy": round(scores.top5_seen, 4), **timing})
    rows += [{**base, "scope": f"{name}_seen", "eval_task": "", "n_samples": sum(scores.sizes),
              "accuracy": round(acc, 4), **timing} for name, acc in scores.by_classifier.items()]
    return rows


def _say(spec: RunSpec, text: str) -> None:
    if not spec.quiet:
        print(text, file=sys.stderr, flush=True)
