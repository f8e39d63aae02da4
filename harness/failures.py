"""A failed run's record: `error.json` in its folder, beside the checkpoint it resumes from.

A sweep goes on past a run that raises; the run's folder then holds what went wrong (the
exception, its traceback, where training stood, the settings) until the same command finishes
it, which removes the record. `report` names such runs and never tabulates them.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from harness.atomic import atomic_write_json
from harness.errors import one_line

FILENAME = "error.json"


def where(phase: str, task: int | None = None, method=None) -> dict[str, Any]:
    """Where a run stood: its phase (setup, zero-shot evaluation, training, evaluation, results),
    the 1-based task, and in training the epoch and step of the epoch (Avalanche's clock)."""
    out: dict[str, Any] = {"phase": phase, "task": None if task is None else task + 1}
    clock = getattr(method, "clock", None)
    if phase == "training" and clock is not None and getattr(method, "_task_in_training", None) == task:
        out.update(epoch=clock.train_exp_epochs + 1, step=clock.train_epoch_iterations + 1)
    return out


def write_record(path: Path, exc: BaseException, identity: Mapping[str, Any], position: Mapping[str, Any]) -> Path | None:
    """Write the record of `exc` into the run folder `path`; None where the disk refuses it too."""
    record = {
        "label": identity.get("label"), "method": identity.get("method"), "seed": identity.get("seed"),
        "protocol": identity.get("protocol"), **position,
        "error": type(exc).__name__, "message": one_line(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "params": identity.get("params"), "command": " ".join(sys.argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    target = Path(path) / FILENAME
    try:
        atomic_write_json(target, json.loads(json.dumps(record, default=str)))
    except OSError:
        return None  # a full disk: the one-line message still reaches the user
    return target


def read_record(path: Path) -> dict[str, Any] | None:
    """The failure record of a run folder, or None (no record, or an unreadable one)."""
    try:
        data = json.loads((Path(path) / FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def clear_record(path: Path) -> None:
    (Path(path) / FILENAME).unlink(missing_ok=True)
