"""`--executor ray`: every run a Ray task, on a local Ray started on the fly or on a cluster.

The promises of the local executor hold because they live in `runner.execute`, which each
Ray task calls: a run that raises is recorded and the others go on; a finished run is skipped; a run another process holds (its lock file on the
shared results folder) is skipped; a run whose worker died resumes from its last checkpoint,
whether Ray retries it (`max_retries`) or the user submits the sweep again. Workers write
only their own run folders; the driver writes the table afterwards.

A cluster needs the same code and data on every node (install the project there; the
results folder on a shared file system) and is reached with --ray-address or RAY_ADDRESS.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Sequence

from harness.errors import HarnessError
from harness.runner import execute, failed_outcome

# A worker that dies (killed, out of memory, node lost) has its run retried this many times;
# each retry resumes from the run's last checkpoint.
MAX_RETRIES = 2


def _absolute(spec):
    """Paths as the driver means them, whatever folder a worker starts in."""
    def absolute(p):
        return None if p is None else os.path.abspath(p)
    return replace(spec, out=absolute(spec.out), data_root=absolute(spec.data_root),
                   plugins=tuple(map(absolute, spec.plugins)))


def run_on_ray(specs: Sequence, address: str | None = None, cpus_per_run: float = 1.0,
               gpus_per_run: float = 0.0) -> list:
    try:
        import ray
    except ImportError:
        raise HarnessError("--executor ray needs Ray: pip install 'cil-harness[ray]' (or pip install ray)") from None
    from harness.errors import one_line

    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        try:
            # No address: a Ray on this machine for this command, stopped at its end.
            ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                     configure_logging=False)
        except ConnectionError as exc:
            raise HarnessError(f"cannot reach the Ray cluster at {address}: {exc}") from None
    task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=MAX_RETRIES,
                      retry_exceptions=False)(execute)
    refs = [task.remote(_absolute(spec)) for spec in specs]
    outcomes = []
    for spec, ref in zip(specs, refs):  # a run's failure is its own: every other run finishes
        try:
            outcomes.append(ray.get(ref))
        except ray.exceptions.RayTaskError as exc:  # raised outside the run's own fault isolation
            cause = exc.cause if isinstance(exc.cause, Exception) else exc
            if spec.fail_fast:
                raise cause from None
            outcomes.append(failed_outcome(spec, one_line(cause)))
        except ray.exceptions.RayError as exc:  # the worker died (killed, out of memory, node lost)
            tries = MAX_RETRIES + 1
            message = (f"a Ray worker died during the run ({tries} {'try' if tries == 1 else 'tries'}, "
                       f"{type(exc).__name__}); its last checkpoint is kept: the same command resumes it")
            if spec.fail_fast:
                raise HarnessError(message) from None
            outcomes.append(failed_outcome(spec, message))
    return outcomes
