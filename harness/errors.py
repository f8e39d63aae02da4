"""Errors the user can fix: the CLI prints them as one line and exits with code 2."""
from __future__ import annotations

import errno


class HarnessError(Exception):
    """Bad input or a missing resource; the message is the whole explanation."""


class DataMissing(HarnessError):
    """A protocol's dataset is not on disk (the message says how to get it)."""


class RunDiverged(HarnessError):
    """A run's training loss or class scores stopped being finite numbers (NaN or inf)."""


# What the user can do about the operating system's refusals, by errno.
_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space (or choose another --out) and run the same command again",
    errno.EDQUOT: "the disk quota is exhausted: free space (or choose another --out) and run the same command again",
    errno.EACCES: "permission denied: choose a folder you can write (--out) or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write (--out) or fix its permissions",
    errno.EROFS: "the file system is read-only: choose a writable folder (--out)",
}


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError: what failed on which file, and what to do about it."""
    where = f" {exc.filename}" if exc.filename else ""
    advice = _OS_ADVICE.get(exc.errno)
    if advice is None:
        return f"cannot use{where}: {exc.strerror or exc}"
    return f"cannot write{where}: {advice}"


def one_line(exc: BaseException) -> str:
    """The one-line account of an exception the CLI prints (the traceback goes to a file)."""
    if isinstance(exc, HarnessError):
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, OSError) and exc.errno is not None:
        return describe_os_error(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
