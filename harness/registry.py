"""Name -> factory registries for methods, protocols and datasets.

Methods and protocols register themselves with a decorator when their module is
imported. `discover()` imports every module of the `methods/` and `protocols/`
packages, the modules named by third-party packages in the entry-point groups
`cil_harness.methods` / `cil_harness.protocols`, and any user files or folders given
with `--plugins` (or the CIL_HARNESS_PLUGINS variable, os.pathsep-separated).
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import pkgutil
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Generic, Iterable, TypeVar

from harness.errors import HarnessError

T = TypeVar("T")
ENTRY_POINT_GROUPS = ("cil_harness.methods", "cil_harness.protocols")
PLUGIN_ENV = "CIL_HARNESS_PLUGINS"


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        # The same definition imported twice (two copies of a plugin file) is harmless.
        if name in self._items and self._items[name] is not item and self._items[name] != item:
            raise HarnessError(f"{self.kind} '{name}' is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise HarnessError(
                f"unknown {self.kind} '{name}'{hint}; known: {', '.join(sorted(self._items)) or 'none'}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


METHODS: Registry = Registry("method")
PROTOCOLS: Registry = Registry("protocol")
DATASETS: Registry = Registry("dataset")


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: `@register_method("icarl")` on a CILMethod subclass."""

    def deco(cls: type) -> type:
        cls.name = name
        return METHODS.register(name, cls)

    return deco


def register_dataset(name: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        return DATASETS.register(name, fn)

    return deco


def _import_package_modules(package: str) -> None:
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def _import_file(path: Path) -> None:
    module_name = f"cil_harness_plugin_{abs(hash(str(path.resolve())))}"
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise HarnessError(f"cannot import plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except HarnessError:
        raise
    except Exception as exc:  # a user's file: say which one broke
        del sys.modules[module_name]
        raise HarnessError(f"plugin {path} failed to import: {type(exc).__name__}: {exc}") from exc


def load_plugins(paths: Iterable[str | os.PathLike]) -> None:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for file in sorted(path.glob("*.py")):
                if not file.name.startswith("_"):
                    _import_file(file)
        elif path.is_file():
            _import_file(path)
        else:
            raise HarnessError(f"plugin path {path} does not exist")


_discovered = False


def discover(plugin_paths: Iterable[str | os.PathLike] = ()) -> None:
    """Import everything that registers methods and protocols (idempotent)."""
    global _discovered
    if not _discovered:
        _import_package_modules("protocols")
        _import_package_modules("methods")
        for group in ENTRY_POINT_GROUPS:
            for ep in entry_points(group=group):
                ep.load()
        _discovered = True
    env = [p for p in os.environ.get(PLUGIN_ENV, "").split(os.pathsep) if p]
    load_plugins([*env, *plugin_paths])
