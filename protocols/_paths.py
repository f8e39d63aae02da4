"""Where dataset loaders look when no --data-root is given (shared by every loader)."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_ROOT = Path(os.environ.get("CIL_DATA", "~/.cache/cil-harness/data")).expanduser()


def resolve_root(root: str | Path | None) -> Path:
    return Path(root).expanduser() if root else DEFAULT_DATA_ROOT


def one_line(exc: BaseException) -> str:
    """An exception as one line, for DataMissing messages the CLI prints on one line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())
