"""Where a run's files live and how they are written (always atomically).

<out>/<protocol>/<label>/seed<k>/{config.json, metrics.csv, summary.json}
A run is finished when its summary.json exists.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import re
import subprocess
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from harness.errors import HarnessError
from harness.atomic import atomic_write_json, atomic_write_text

METRIC_COLUMNS = ["step", "classes_seen", "scope", "eval_task", "n_samples", "accuracy", "train_time_s", "eval_time_s"]
_PACKAGES = ("torch", "torchvision", "avalanche-lib", "numpy", "pandas", "timm", "transformers", "peft")


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_label(method: str, changed: Mapping[str, Any]) -> str:
    """'icarl' or 'icarl+memory=1000': settings that differ from the defaults name the row."""
    parts = [f"{k}={_fmt(v)}" for k, v in sorted(changed.items())]
    label = "+".join([method, *parts])
    return re.sub(r"[^A-Za-z0-9_.=+,-]", "_", label)


def protocol_dirname(protocol: str, max_train_per_class: int | None) -> str:
    return f"{protocol}+maxtrain={max_train_per_class}" if max_train_per_class else protocol


def run_dir(out: Path, protocol_dir: str, label: str, seed: int) -> Path:
    return Path(out) / protocol_dir / label / f"seed{seed}"


@contextlib.contextmanager
def run_lock(path: Path) -> Iterator[bool]:
    """An exclusive lock on a run folder: two processes never train the same run at once."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): run unguarded
        yield True
        return
    with open(path / ".lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_finished(path: Path) -> bool:
    return (path / "summary.json").is_file()


def check_output_dir(out: Path) -> None:
    """Refuse an output folder that is a file or cannot be written, before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HarnessError(f"output folder {out} is a file")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise HarnessError(f"output folder {out} cannot be made: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise HarnessError(f"output folder {out} is not writable")
    # Permission bits do not tell everything (a read-only mount, /proc, a full disk's quota): try it.
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise HarnessError(f"output folder {out} cannot be written: {exc.strerror or exc}") from None


def environment() -> dict[str, Any]:
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "platform": platform.platform(), "versions": versions, "git_commit": commit}


def write_config(path: Path, config: Mapping[str, Any]) -> None:
    atomic_write_json(path / "config.json", dict(config))


def write_metrics(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path / "metrics.csv", buf.getvalue())


def write_summary(path: Path, summary: Mapping[str, Any]) -> None:
    atomic_write_json(path / "summary.json", dict(summary))


def read_summary(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        raise HarnessError(f"cannot read {path / 'summary.json'}: {exc}") from exc
