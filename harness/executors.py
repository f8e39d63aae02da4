"""Where a sweep's runs execute: in this process, a pool of processes, or Ray tasks.

Every executor calls `runner.execute` for each RunSpec, so a run's promises (skip, resume,
fault isolation) are the same whichever runs it; between runs a swallowed Ctrl-C stops the sweep.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Sequence

from harness import interrupts
from harness.runner import RunOutcome, RunSpec, execute, failed_outcome


def run_all(specs: Sequence[RunSpec], workers: int = 1, executor: str = "local", ray_address: str | None = None,
            cpus_per_run: float = 1.0, gpus_per_run: float = 0.0) -> list[RunOutcome]:
    """Execute runs sequentially, in a pool of processes when workers > 1, or as Ray tasks."""
    if executor == "ray":
        from harness.ray_executor import run_on_ray

        return run_on_ray(specs, ray_address, cpus_per_run, gpus_per_run)
    if workers <= 1:
        outcomes = []
        for spec in specs:
            interrupts.check()
            outcomes.append(execute(spec))
        return outcomes
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
