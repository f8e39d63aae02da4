"""What is registered (methods, their settings, protocols, data present), cached on disk, so that
`list`, `list NAME` and every usage error answer without importing torch and Avalanche.

Registering a method means importing its module, and every method module imports torch and
Avalanche: ~8 s on 2 cores. The catalogue is what those imports register, written once as JSON
under $CIL_CACHE/catalog/ (default ~/.cache/cil-harness) and keyed by everything it depends on:
the size and modification time of every source file of the harness, `methods/`, `protocols/`
and the plugins, the entry points, the Python and package versions. Any change to them makes a
new key: the next command imports everything once and writes the new catalogue. Which datasets
are present is kept beside it with the listing of the data folders it was read from, and read
again when that listing changes.

A method whose settings cannot be written as JSON (a Param of another type) keeps the catalogue
from being written: commands then import everything, as they would without it.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.params import Param
from harness.registry import PLUGIN_ENV, Registry

FORMAT = 1
_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_ROOT = Path(__file__).resolve().parent.parent  # the project: harness/, methods/, protocols/
_PACKAGES = ("torch", "avalanche-lib", "transformers", "timm")


@dataclass
class MethodEntry:
    """A registered method as the catalogue holds it: what validation and labels need."""

    name: str
    description: str
    params: dict[str, Param]
    protocol_defaults: dict[str, dict[str, Any]]
    setting_defaults: dict[str, dict[str, Any]]


@dataclass
class Catalog:
    methods: Registry
    protocols: Registry
    not_offered: dict[str, str]
    import_errors: list[str]
    datasets: dict[str, dict] = field(default_factory=dict)  # dataset -> {"present": bool, "why": str}
    method_files: dict[str, list[str]] = field(default_factory=dict)  # harness.identity.method_files


# ---- the key: every file and version the registrations depend on -----------------------------

def _plugin_files(plugin_paths) -> list[Path]:
    env = [p for p in os.environ.get(PLUGIN_ENV, "").split(os.pathsep) if p]
    files = []
    for raw in [*env, *plugin_paths]:
        path = Path(raw)
        files += sorted(path.glob("*.py")) if path.is_dir() else [path]
    return files


def _stat_line(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return f"{path} missing"
    return f"{path.resolve()} {st.st_size} {st.st_mtime_ns}"


def _key(plugin_paths) -> str:
    from importlib.metadata import PackageNotFoundError, entry_points, version

    lines = [f"format {FORMAT}", sys.version]
    for folder in ("harness", "methods", "protocols"):
        lines += [_stat_line(p) for p in sorted((_ROOT / folder).rglob("*.py"))]
    lines += [_stat_line(p) for p in _plugin_files(plugin_paths)]
    for group in ("cil_harness.methods", "cil_harness.protocols"):
        lines += [f"{ep.name}={ep.value}" for ep in entry_points(group=group)]
    for pkg in _PACKAGES:
        try:
            lines.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            lines.append(f"{pkg} absent")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:24]


def _cache_dir() -> Path:
    return Path(os.environ.get("CIL_CACHE", "~/.cache/cil-harness")).expanduser() / "catalog"


# ---- writing: from the real registries ----------------------------------------------------

def _param_json(key: str, p: Param) -> dict:
    kind = p.type.__name__ if (p.default is not None or p.kind) else "str"
    if kind not in _TYPES:
        raise TypeError(f"{key}: settings of type {kind}")
    json.dumps([p.default, p.choices])  # TypeError where a value is no JSON
    return {"default": p.default, "help": p.help, "choices": None if p.choices is None else list(p.choices),
            "low": p.low, "high": p.high, "nullable": p.nullable, "affects_results": p.affects_results,
            "kind": kind if p.kind is not None else None}


def _snapshot(plugin_paths) -> dict:
    """Import everything (the slow path) and describe what registered."""
    from harness import identity
    from harness.registry import IMPORT_ERRORS, METHODS, PROTOCOLS, discover

    discover(plugin_paths)
    from harness.cil.avalanche_strategies import NOT_OFFERED

    methods = {}
    for name in METHODS.names():
        cls = METHODS.get(name)
        methods[name] = {
            "description": cls.description, "source": METHODS.source(name),
            "params": {k: _param_json(f"{name}.{k}", p) for k, p in cls.params.items()},
            "protocol_defaults": getattr(cls, "protocol_defaults", {}),
            "setting_defaults": getattr(cls, "setting_defaults", {}),
            "files": identity.method_files(cls, METHODS.path(name)),
        }
    protocols = {name: {**PROTOCOLS.get(name).to_dict(), "source": PROTOCOLS.source(name)}
                 for name in PROTOCOLS.names()}
    snapshot = {"format": FORMAT, "methods": methods, "protocols": protocols, "not_offered": dict(NOT_OFFERED),
                "import_errors": list(IMPORT_ERRORS)}
    json.dumps(snapshot)  # TypeError where a recipe holds no JSON value
    return snapshot


def _data_signature(data_root: str | None) -> str:
    """The listing of the folders datasets are read from: it changes when data arrives or goes."""
    from protocols._paths import resolve_root

    lines = []
    for folder in (resolve_root(data_root), _ROOT / "protocols" / "data"):
        lines.append(_stat_line(folder))
        if folder.is_dir():
            lines += [_stat_line(p) for p in sorted(folder.iterdir())]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:24]


def _presence(data_root: str | None) -> dict[str, dict]:
    """Whether each dataset loads (the slow path: imports the loaders and reads the data)."""
    from harness import data as data_mod
    from harness.errors import DataMissing
    from harness.registry import PROTOCOLS

    out: dict[str, dict] = {}
    for name in PROTOCOLS.names():
        p = PROTOCOLS.get(name)
        if p.dataset in out:
            continue
        try:
            data_mod.load_splits(p, data_root)
            out[p.dataset] = {"present": True, "why": ""}
        except DataMissing as exc:
            out[p.dataset] = {"present": False, "why": str(exc)}
    return out


def _write(path: Path, value: dict) -> None:
    from harness.atomic import atomic_write_json

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, value)
    except OSError:
        pass  # a read-only cache: every command takes the slow path, nothing breaks


def _read(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and value.get("format") == FORMAT else None


# ---- reading ----------------------------------------------------------------------------------

def _param(spec: dict) -> Param:
    kind = _TYPES[spec["kind"]] if spec["kind"] else None
    choices = None if spec["choices"] is None else tuple(spec["choices"])
    return Param(spec["default"], spec["help"], choices, spec["low"], spec["high"], spec["nullable"],
                 spec["affects_results"], kind)


def _build(snapshot: dict) -> Catalog:
    from harness.protocol import Protocol

    methods: Registry = Registry("method")
    protocols: Registry = Registry("protocol")
    files = {}
    for name, m in snapshot["methods"].items():
        entry = MethodEntry(name, m["description"], {k: _param(p) for k, p in m["params"].items()},
                            m["protocol_defaults"], m["setting_defaults"])
        methods.register(name, entry, m["source"])
        files[name] = m["files"]
    for name, p in snapshot["protocols"].items():
        fields = {k: v for k, v in p.items() if k != "source"}
        protocols.register(name, Protocol(**fields), p["source"])
    return Catalog(methods, protocols, snapshot["not_offered"], snapshot["import_errors"], method_files=files)


def load(plugin_paths=(), data_root: str | None = None, with_data: bool = False) -> Catalog:
    """The catalogue of the registrations `plugin_paths` (and the project) make: from the cache
    when its key matches, else by importing everything (and caching it). with_data: also which
    datasets are present under data_root."""
    from harness import registry

    plugin_paths = list(plugin_paths)
    if registry._discovered or registry.METHODS.names() or registry.PROTOCOLS.names():
        # Registrations in this process already (a second command, an API user's own methods or
        # protocols): the registries themselves, which hold them all
        registry.discover(plugin_paths)
        return _live(plugin_paths, data_root, with_data)
    path = _cache_dir() / f"{_key(plugin_paths)}.json"
    snapshot = _read(path)
    if snapshot is None:
        try:
            snapshot = _snapshot(plugin_paths)
        except TypeError:  # a setting or recipe with no JSON form: no catalogue, the slow path
            return _live(plugin_paths, data_root, with_data)
        if not snapshot["import_errors"]:  # a broken file is reported afresh every time
            _write(path, snapshot)
    catalog = _build(snapshot)
    if with_data:
        signature = _data_signature(data_root)
        data_path = path.with_name(f"{path.stem}-data-{hashlib.sha256(str(data_root).encode()).hexdigest()[:12]}.json")
        cached = _read(data_path)
        if cached is None or cached.get("signature") != signature:
            from harness.registry import discover

            discover(plugin_paths)
            cached = {"format": FORMAT, "signature": signature, "datasets": _presence(data_root)}
            _write(data_path, cached)
        catalog.datasets = cached["datasets"]
    return catalog


def _live(plugin_paths, data_root: str | None, with_data: bool) -> Catalog:
    """The catalogue read from the registries themselves (no cache)."""
    from harness import identity
    from harness.cil.avalanche_strategies import NOT_OFFERED
    from harness.registry import IMPORT_ERRORS, METHODS, PROTOCOLS

    files = {n: identity.method_files(METHODS.get(n), METHODS.path(n)) for n in METHODS.names()}
    catalog = Catalog(METHODS, PROTOCOLS, dict(NOT_OFFERED), list(IMPORT_ERRORS), method_files=files)
    if with_data:
        catalog.datasets = _presence(data_root)
    return catalog
