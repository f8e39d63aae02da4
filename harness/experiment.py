"""Experiment files: a list of rows (methods, settings, seeds, protocol) run as one sweep.

    python -m harness run --experiment experiments/quickdraw100_10x10.toml

```toml
protocol = "quickdraw100_10x10"   # default of every row
seeds = [0]                        # default of every row
out = "../results"                 # optional: the results folder, relative to this file (--out wins)

[[row]]
methods = ["finetune", "joint", "icarl"]
seeds = [0, 1]

[[row]]
methods = ["gmm"]
set = ["gmm.epochs=1", "gmm.memory=2000"]
name = "gmm, 2,000 exemplars"      # optional: how the table names this row

[[row]]                            # a grid: one row per combination (2 x 3 here)
methods = ["icarl"]
set = ["icarl.lr=0.05,0.1"]        # comma-separated values of a number, flag or choice
grid = {"icarl.milestones" = ["30,60", "40,70", "50,80"]}   # any setting: a list of values
```

Each row goes through exactly what `run --methods ... --set ...` does (checks, skip finished,
resume, any executor; a grid expands to its combinations as ordinary rows); the tables list
the rows in the file's order, under their names. Read with the standard library's tomllib.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

_ROW_KEYS = {"methods", "method", "set", "grid", "seeds", "protocol", "name", "epochs", "max_train_per_class"}
_TOP_KEYS = {"protocol", "seeds", "out", "row", "description"}


@dataclass
class ExperimentRow:
    methods: list[str]
    sets: list[str]
    seeds: list[int]
    protocol: str
    name: str | None = None
    epochs: int | None = None
    max_train_per_class: int | None = None
    where: str = ""  # "experiment file F, row N": named in every error about the row


@dataclass
class Experiment:
    path: Path
    rows: list[ExperimentRow]
    out: str | None = None
    description: str = ""
    names: dict[tuple[str, str], str] = field(default_factory=dict)  # (protocol dir, label) -> shown name
    order: list[tuple[str, str]] = field(default_factory=list)  # (protocol dir, label) in the file's order


def _toml(path: Path) -> dict[str, Any]:
    if sys.version_info < (3, 11):
        raise HarnessError("--experiment reads TOML with the standard library's tomllib: Python 3.11 or later")
    import tomllib

    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HarnessError(f"experiment file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HarnessError(f"experiment file {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise HarnessError(f"experiment file {path} is not valid TOML: {exc}") from None


def _strings(value, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise HarnessError(f"{where}: expected a string or a list of strings, got {value!r}")
    return list(value)


def _seeds(value, where: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise HarnessError(f"{where}: seeds must be non-negative integers, got {value!r}")
    return values


def load_experiment(path: str | Path) -> Experiment:
    """The experiment file's rows, checked for shape (the settings themselves are checked as
    `run` checks --set, before anything runs)."""
    path = Path(path)
    data = _toml(path)
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise HarnessError(f"experiment file {path}: unknown key(s) {', '.join(sorted(unknown))}; "
                           f"expected {', '.join(sorted(_TOP_KEYS))}")
    rows_in = data.get("row")
    if not isinstance(rows_in, list) or not rows_in:
        raise HarnessError(f"experiment file {path} has no [[row]] table")
    rows = []
    for i, row in enumerate(rows_in, 1):
        where = f"experiment file {path}, row {i}"
        unknown = set(row) - _ROW_KEYS
        if unknown:
            raise HarnessError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                               f"expected {', '.join(sorted(_ROW_KEYS))}")
        methods = _strings(row.get("methods", row.get("method", [])), f"{where}, methods")
        if not methods:
            raise HarnessError(f"{where}: no method")
        protocol = row.get("protocol", data.get("protocol"))
        if not isinstance(protocol, str):
            raise HarnessError(f"{where}: no protocol (set `protocol` in the row or at the top of the file)")
        seeds = _seeds(row.get("seeds", data.get("seeds", [0])), f"{where}, seeds")
        name = row.get("name")
        if name is not None and (not isinstance(name, str) or len(methods) > 1):
            raise HarnessError(f"{where}: `name` names a row of one method (a string)")
        for key in ("epochs", "max_train_per_class"):
            value = row.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise HarnessError(f"{where}, {key}: expected a positive integer, got {value!r}")
        sets = _strings(row.get("set", []), f"{where}, set") + _grid(row.get("grid", {}), f"{where}, grid")
        rows.append(ExperimentRow(methods, sets, seeds, protocol, name, row.get("epochs"),
                                  row.get("max_train_per_class"), where))
    out = data.get("out")
    if out is not None and not isinstance(out, str):
        raise HarnessError(f"experiment file {path}, out: expected a folder name")
    if out is not None:  # the file's own folder, wherever the command runs from
        out = str(path.parent / out) if not Path(out).is_absolute() else out
    return Experiment(path, rows, out, str(data.get("description", "")))


def _grid(value, where: str) -> list[str]:
    """{"icarl.lr": [0.05, 0.1]} -> ["icarl.lr=0.05", "icarl.lr=0.1"]: a key given twice is swept."""
    if not isinstance(value, dict):
        raise HarnessError(f"{where}: expected a table of setting = [values], e.g. grid = {{\"icarl.lr\" = [0.05, 0.1]}}")
    out = []
    for key, values in value.items():
        values = values if isinstance(values, list) else [values]
        if not values or any(isinstance(v, (dict, list)) for v in values):
            raise HarnessError(f"{where}, {key}: expected a list of values, got {value[key]!r}")
        out += [f"{key}={str(v).lower() if isinstance(v, bool) else v}" for v in values]
    return out
