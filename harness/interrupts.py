"""Ctrl-C (SIGINT) and SIGTERM that always stop a sweep.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread is. Where that is
a callback whose exceptions the interpreter prints and drops (a garbage-collector callback, a
weakref finaliser, `__del__`), the interrupt is lost. The handler installed here also records
the request; `check()` raises it again at the run loop's safe points (every training
iteration, after each task's checkpoint, between runs), so a swallowed interrupt still stops
the sweep with every finished task checkpointed.
"""
from __future__ import annotations

import signal
import threading

_requested: str | None = None


def _handler(signum, frame):
    global _requested
    _requested = signal.Signals(signum).name
    raise KeyboardInterrupt


def install() -> None:
    """SIGINT and SIGTERM (a pre-empted job) both stop like Ctrl-C; main thread only."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)


def requested() -> bool:
    return _requested is not None


def check() -> None:
    """Raise the interrupt a callback swallowed, if any (called at safe points)."""
    if _requested is not None:
        raise KeyboardInterrupt


def reset() -> None:
    global _requested
    _requested = None
