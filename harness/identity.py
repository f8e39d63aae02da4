"""What produced a run, recorded in its config.json and compared before a finished run is reused.

A run's folder is named by its label (the settings changed from their defaults), so the label
alone cannot tell that a default or the method's code changed since the run. Its identity can:
every resolved setting that affects results, the protocol's definition, and the code (a SHA-256
of the method's source files: the file that registered it and those that define its class and
the classes it extends outside the harness, and the harness's version, which names the shared code). A finished run whose recorded identity
differs from the command's is never reused: `run` refuses it in one line per run naming what
changed, and `--force` reruns it in place (README, "Results that are always current").
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import sysconfig
from pathlib import Path
from typing import Any, Mapping

import harness


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shown(path: str) -> str:
    """A source file as users name it: relative to the project for built-ins, else as given."""
    root = Path(harness.__file__).resolve().parent.parent
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


@functools.lru_cache(maxsize=1)
def _library_roots() -> tuple[str, ...]:
    return (os.path.dirname(os.path.realpath(harness.__file__)),
            *(os.path.realpath(p) for k, p in sysconfig.get_paths().items() if k in ("purelib", "platlib", "stdlib")))


def _library(path: str) -> bool:
    """A file of the harness package or of an installed package: named by a version, not hashed."""
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r + os.sep) for r in _library_roots())


def method_files(cls: type, registered_in: str | None) -> list[str]:
    """The method's own source files: where it registered, and where its class and the classes
    it builds on are defined (methods/wa.py's WA extends methods/icarl.py's ICaRL), outside the
    harness package and installed packages."""
    files = [registered_in] if registered_in else []
    for klass in cls.__mro__:
        try:
            defined_in = inspect.getsourcefile(klass)
        except TypeError:
            continue
        if (defined_in and os.path.isfile(defined_in) and not _library(defined_in)
                and all(os.path.realpath(defined_in) != os.path.realpath(f) for f in files)):
            files.append(defined_in)
    return files


def code_fingerprint(files: list[str]) -> dict[str, Any]:
    """{"files": {shown path: sha256}, "harness_version": ...}: the code a run is made with."""
    return {"files": {_shown(f): _sha256(f) for f in files if os.path.isfile(f)},
            "harness_version": harness.__version__}


def _plain(value: Any) -> Any:
    """As config.json holds it (tuples become lists, other objects their string)."""
    return json.loads(json.dumps(value, default=str))


def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value)


def changes(recorded: Mapping[str, Any], params: Mapping[str, Any], protocol_spec: Mapping[str, Any],
            code: Mapping[str, Any], defaults: Mapping[str, Any] = {}) -> list[str]:
    """What differs between a run's config.json and the identity a command gives it, in words
    (empty: the same run). A config written without a code fingerprint has its settings and
    protocol compared, not its code. A setting the method declares since the run, at its
    declared default (`defaults`), is not a change: the run was made without it."""
    out = []
    before, now, declared = recorded.get("params") or {}, _plain(dict(params)), _plain(dict(defaults))
    for key in sorted(set(before) | set(now)):
        if key not in now:
            out.append(f"setting {key} no longer exists (was {_fmt(before[key])})")
        elif key not in before:
            if key not in declared or declared[key] != now[key]:
                out.append(f"new setting {key}={_fmt(now[key])}")
        elif before[key] != now[key]:
            out.append(f"{key} {_fmt(before[key])} -> {_fmt(now[key])}")
    spec_before, spec_now = recorded.get("protocol_spec") or {}, _plain(dict(protocol_spec))
    moved = sorted(k for k in set(spec_before) & set(spec_now) if spec_before[k] != spec_now[k])
    if moved:
        out.append(f"protocol {spec_now.get('name', '')} defined differently ({', '.join(moved)})")
    code_before = recorded.get("code")
    if code_before:
        files_before, files_now = code_before.get("files", {}), code.get("files", {})
        for shown in sorted(set(files_before) | set(files_now)):
            if files_before.get(shown) != files_now.get(shown):
                out.append(f"{shown} changed" if shown in files_before and shown in files_now
                           else f"source file {shown} {'added' if shown in files_now else 'gone'}")
        if code_before.get("harness_version") != code.get("harness_version"):
            out.append(f"harness {code_before.get('harness_version')} -> {code.get('harness_version')}")
    return out


def read_config(run_path: Path) -> dict[str, Any] | None:
    """A run folder's config.json, or None where there is none or it cannot be read."""
    try:
        return json.loads((Path(run_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
