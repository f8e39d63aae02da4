"""The run loop: one (method, protocol, seed) run per RunSpec, handed to an executor.

A run: prepare the protocol's data -> Avalanche stream -> for each experience,
method.learn() then the harness's evaluation on every seen task -> metrics.csv
after each task, summary.json at the end. Runs are independent, so a sweep is a
list of RunSpecs that any executor (sequential, a process pool, Ray: harness.ray_executor)
can take.
"""
from __future__ import annotations

import logging
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from harness import data as data_mod
from harness import checkpoint, failures, loggers, metrics, results, threads
from harness.errors import HarnessError, RunDiverged, one_line
from harness.evaluation import Evaluator
from harness.method import CILMethod, MethodContext
from harness.params import resolve_params
from harness.protocol import get_protocol
from harness.registry import METHODS, discover
from harness.streams import build_benchmark

log = logging.getLogger("harness")


@dataclass(frozen=True)
class RunSpec:
    method: str
    protocol: str
    seed: int
    out: str
    device: str = "cpu"
    overrides: tuple[tuple[str | None, str, str], ...] = ()
    epochs: int | None = None
    max_train_per_class: int | None = None
    data_root: str | None = None
    download: bool = False
    force: bool = False
    restart: bool = False  # ignore an existing checkpoint and start the run over
    quiet: bool = False
    plugins: tuple[str, ...] = ()
    threads: int | None = None  # CPU threads; None: follow the idle cores (harness.threads)
    loggers: tuple[str, ...] = ()  # --logger: tensorboard, wandb, csv (harness.loggers); results do not depend on them
    fail_fast: bool = False  # a run that raises stops the sweep (else it is recorded and the others go on)


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
    label, protocol_dir, _, _ = plan_label(spec)
    path = results.run_dir(Path(spec.out), protocol_dir, label, spec.seed)
    return RunOutcome(spec, "failed", str(path), label, protocol_dir, error=message)


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


def plan_label(spec: RunSpec) -> tuple[str, str, dict, dict]:
    """(label, protocol dir, resolved params, changed params) without running anything."""
    cls = METHODS.get(spec.method)
    protocol = get_protocol(spec.protocol)
    # --epochs means every task, the first one included (methods such as iCaRL declare init_epochs)
    hp, changed = resolve_params(cls, protocol.family, spec.overrides, {"epochs": spec.epochs, "init_epochs": spec.epochs})
    changed = {k: v for k, v in changed.items() if cls.params[k].affects_results}  # names the row
    if "init_epochs" in changed and changed.get("epochs") == changed["init_epochs"]:
        del changed["init_epochs"]  # implied by epochs: keep labels short
    return (
        results.run_label(spec.method, changed),
        results.protocol_dirname(spec.protocol, spec.max_train_per_class),
        hp,
        changed,
    )


def execute(spec: RunSpec) -> RunOutcome:
    """One run. An exception is the run's failure, not the sweep's: it is recorded in the run's
    folder (harness.failures) and returned as a "failed" outcome, unless spec.fail_fast."""
    try:
        discover(spec.plugins)
        label, protocol_dir, hp, changed = plan_label(spec)
    except Exception as exc:
        if spec.fail_fast:
            raise
        return RunOutcome(spec, "failed", "", spec.method, spec.protocol, error=one_line(exc), refused=_refusal(exc))
    path = results.run_dir(Path(spec.out), protocol_dir, label, spec.seed)
    if results.is_finished(path) and not spec.force:
        return RunOutcome(spec, "skipped", str(path), label, protocol_dir, results.read_summary(path))

    state: dict[str, Any] = {"position": failures.where("setup")}
    try:
        path.mkdir(parents=True, exist_ok=True)
        with results.run_lock(path) as locked:
            if not locked:
                return RunOutcome(spec, "busy", str(path), label, protocol_dir)
            try:
                return _execute_locked(spec, label, protocol_dir, hp, changed, path, state)
            except Exception as exc:
                started = (path / "config.json").exists()
                record = None
                if started or not isinstance(exc, HarnessError):  # a refusal before any work leaves nothing
                    record = failures.write_record(path, exc, state.get("identity", {"label": label,
                                                   "method": spec.method, "seed": spec.seed}), state["position"])
                if spec.fail_fast:
                    raise
                outcome = RunOutcome(spec, "failed", str(path), label, protocol_dir, error=one_line(exc),
                                     record=None if record is None else str(record), refused=_refusal(exc))
                if record is not None:
                    _say(spec, outcome.failure_line() + "; the other runs go on")
                return outcome
    except OSError as exc:  # the run folder or its lock cannot be made
        if spec.fail_fast:
            raise
        return RunOutcome(spec, "failed", str(path), label, protocol_dir, error=one_line(exc), refused=True)


def _execute_locked(spec: RunSpec, label: str, protocol_dir: str, hp: dict, changed: dict, path: Path,
                    state: dict[str, Any]) -> RunOutcome:
    if spec.threads is not None:
        threads.fix(spec.threads)
    if results.is_finished(path) and not spec.force:  # finished while we waited for the lock
        return RunOutcome(spec, "skipped", str(path), label, protocol_dir, results.read_summary(path))
    protocol = get_protocol(spec.protocol)
    device = resolve_device(spec.device)
    data = _prepared(spec.protocol, spec.data_root, spec.download, spec.max_train_per_class)
    declared = METHODS.get(spec.method).params
    identity = {"method": spec.method, "label": label, "protocol": protocol.to_dict(),
                "params": {k: v for k, v in hp.items() if declared[k].affects_results},
                "seed": spec.seed, "max_train_per_class": spec.max_train_per_class}
    state["identity"] = {**identity, "protocol": protocol_dir}
    ckpt_path = path / checkpoint.FILENAME
    saved = None
    if ckpt_path.exists() and not (spec.force or spec.restart):
        saved = checkpoint.load(ckpt_path)
        if saved["fingerprint"] != checkpoint.fingerprint(identity):
            raise HarnessError(f"checkpoint {ckpt_path} was written by a different configuration of this run; "
                               "--restart starts it over")

    first_step = 0 if saved is None else saved["step"] + 1
    run_loggers = loggers.build(spec.loggers, path, label, spec.seed, first_step, identity)
    seed_everything(spec.seed)
    benchmark = build_benchmark(data)
    cls = METHODS.get(spec.method)
    context = MethodContext(protocol, data.class_names, device, spec.seed, data.in_memory, spec.quiet,
                            images=len(data.train) + len(data.test), data_root=spec.data_root,
                            evaluator=loggers.evaluation_plugin(run_loggers))
    method = cls(context=context, hp=hp)
    state["method"] = method

    (path / "summary.json").unlink(missing_ok=True)  # --force: the old result is no longer valid
    progress = {"matrix": [], "step_accuracy": [], "rows": [], "train_time_s": 0.0, "eval_time_s": 0.0,
                "wall_time_s": 0.0}
    if saved is not None:
        method.restore(saved["method"], list(benchmark.train_stream)[:first_step])
        progress = saved["progress"]
        checkpoint.set_rng_state(saved["rng"])
        _say(spec, f"{label} seed {spec.seed}: resuming after task {first_step}/{protocol.num_tasks} from {ckpt_path}")
    else:
        results.write_config(path, {
            **identity, "protocol": protocol_dir, "protocol_spec": protocol.to_dict(), "changed_params": changed,
            "device": str(device), "class_names": data.class_names, "train_samples": len(data.train),
            "test_samples": len(data.test), "command": " ".join(sys.argv), "environment": results.environment(),
            "method_info": method.run_info(),
        })

    evaluator = Evaluator(benchmark.test_stream, data.in_memory, data.task_classes())
    # Methods that can score classes before training on them (GMM names any class) get their
    # accuracy on each task's test data measured before that task: the zero-shot figure.
    zero_shot = type(method).zero_shot_scores is not CILMethod.zero_shot_scores
    progress.setdefault("zero_shot", [])
    for key in ("task_il_matrix", "task_il_step_accuracy"):  # absent from checkpoints of older runs
        progress.setdefault(key, [None] * len(progress["matrix"]))
    classes_seen = sum(protocol.classes_per_task()[:first_step])
    wall_before = progress["wall_time_s"]
    start = time.perf_counter()
    tasks = tqdm(total=protocol.num_tasks, initial=first_step, desc=f"{label} seed {spec.seed}", disable=spec.quiet,
                 file=sys.stderr, dynamic_ncols=True)
    for step, experience in enumerate(benchmark.train_stream):
        if step < first_step:
            continue
        classes_seen += len(experience.classes_in_this_experience)
        n_threads = threads.follow_load()
        t_zero = time.perf_counter()
        state["position"] = failures.where("zero-shot evaluation", step)
        if zero_shot:
            zs, n_zs, _ = evaluator.task_accuracy(lambda x: method.zero_shot_scores(x, classes_seen), step, classes_seen,
                                               f"method {method.name} (zero_shot_scores)")
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
        scores = evaluator.evaluate(method, step, classes_seen)
        state["position"] = failures.where("results", step)
        seen_acc = scores.seen
        t2 = time.perf_counter()
        progress["train_time_s"] += t1 - t0
        progress["eval_time_s"] += t2 - t1 + t0 - t_zero
        progress["wall_time_s"] = wall_before + (t2 - start)
        progress["matrix"].append(scores.row)
        progress["step_accuracy"].append(seen_acc)
        progress["task_il_matrix"].append(scores.task_il_row)
        progress["task_il_step_accuracy"].append(scores.task_il_seen)
        timing = {"train_time_s": round(t1 - t0, 3), "eval_time_s": round(t2 - t1, 3)}
        progress["rows"] += _metric_rows(step, classes_seen, scores, timing)
        if zero_shot:  # measured before this task's training, on its test data
            progress["rows"].append({"step": step, "classes_seen": classes_seen, "scope": "zero_shot",
                                     "eval_task": step, "n_samples": n_zs, "accuracy": round(zs, 4), **timing})
        results.write_metrics(path, progress["rows"])
        loggers.log_task(run_loggers, step, classes_seen, scores, zs if zero_shot else None,
                         method.clock.total_iterations)
        # Saved after evaluation: the RNG state is the one the next task starts from.
        checkpoint.save(ckpt_path, {"fingerprint": checkpoint.fingerprint(identity), "step": step,
                                    "method": method.checkpoint_state(), "progress": progress,
                                    "rng": checkpoint.rng_state()})
        tasks.update(1)
        tasks.set_postfix(acc=f"{seen_acc:.1f}%")
        if not spec.quiet:
            busy = (f", {n_threads} CPU threads: other cores were busy"
                    if n_threads < threads.usable_cores() and not threads.pinned() else "")
            tasks.write(f"{label} seed {spec.seed}: task {step + 1}/{protocol.num_tasks} "
                        f"accuracy on {classes_seen} classes {seen_acc:.1f}% ({t1 - t0:.1f}s train, {t2 - t1:.1f}s eval{busy})"
                        + (f"; before training, zero-shot {zs:.1f}% on its own test data" if zero_shot else ""))
    tasks.close()
    state["position"] = failures.where("results")
    loggers.log_final(run_loggers, progress["matrix"], protocol_dir, label, method.clock.total_iterations)
    loggers.close(run_loggers)

    exemplars, memory_bytes = method.memory_usage()
    summary = {
        "protocol": protocol_dir, "method": spec.method, "label": label, "seed": spec.seed,
        "num_tasks": protocol.num_tasks, "classes_per_task": protocol.classes_per_task(),
        "classes_seen": list(np.cumsum(protocol.classes_per_task()).tolist()),
        **metrics.summarise(progress["matrix"], progress["step_accuracy"]),
        "wall_time_s": progress["wall_time_s"], "train_time_s": progress["train_time_s"],
        "eval_time_s": progress["eval_time_s"], "trainable_params": method.trainable_parameters(),
        "memory_exemplars": int(exemplars), "memory_bytes": int(memory_bytes), "resumed": saved is not None,
    }
    if zero_shot:
        summary["zero_shot_accuracy"] = progress["zero_shot"]
    if None not in progress["task_il_step_accuracy"]:  # a run resumed from before Task-IL has no full record
        summary.update(metrics.summarise_task_il(progress["task_il_matrix"], progress["task_il_step_accuracy"]))
    results.write_summary(path, summary)
    failures.clear_record(path)  # an earlier failure of this run is history now
    return RunOutcome(spec, "done", str(path), label, protocol_dir, summary)


def _metric_rows(step: int, classes_seen: int, scores, timing: dict) -> list[dict[str, Any]]:
    """metrics.csv rows of one evaluation: per task then pooled, Class-IL ("task", "seen")
    then Task-IL ("task_il", "task_il_seen")."""
    rows: list[dict[str, Any]] = []
    for scope, pooled_scope, per_task, pooled in (("task", "seen", scores.row, scores.seen),
                                                  ("task_il", "task_il_seen", scores.task_il_row, scores.task_il_seen)):
        base = {"step": step, "classes_seen": classes_seen}
        rows += [{**base, "scope": scope, "eval_task": i, "n_samples": n, "accuracy": round(acc, 4), **timing}
                 for i, (acc, n) in enumerate(zip(per_task, scores.sizes))]
        rows.append({**base, "scope": pooled_scope, "eval_task": "", "n_samples": sum(scores.sizes),
                     "accuracy": round(pooled, 4), **timing})
    return rows


def _say(spec: RunSpec, text: str) -> None:
    if not spec.quiet:
        print(text, file=sys.stderr, flush=True)


def run_all(specs: Sequence[RunSpec], workers: int = 1, executor: str = "local", ray_address: str | None = None,
            cpus_per_run: float = 1.0, gpus_per_run: float = 0.0) -> list[RunOutcome]:
    """Execute runs sequentially, in a pool of processes when workers > 1, or as Ray tasks."""
    if executor == "ray":
        from harness.ray_executor import run_on_ray

        return run_on_ray(specs, ray_address, cpus_per_run, gpus_per_run)
    if workers <= 1:
        return [execute(s) for s in specs]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(execute, s) for s in specs]
        outcomes = []
        for spec, future in zip(specs, futures):
            try:
                outcomes.append(future.result())
            except BrokenProcessPool as exc:  # a worker was killed (signal, out of memory): the pool is gone
                if spec.fail_fast:
                    raise
                outcomes.append(failed_outcome(spec, f"a worker process died during the sweep ({exc}); "
                                                     "every finished task is checkpointed: the same command resumes"))
        return outcomes
