"""Name -> factory registries for methods, protocols, datasets, backbones and VLM stacks.

Methods and protocols register themselves with a decorator when their module is
imported. `discover()` imports every module of the `methods/` and `protocols/`
packages, the modules named by third-party packages in the entry-point groups
`cil_harness.methods` / `cil_harness.protocols`, and any user files or folders given
with `--plugins` (or the CIL_HARNESS_PLUGINS variable, os.pathsep-separated).

A module of a folder (`methods/`, `protocols/`, a plugin folder) that fails to import
does not stop the others: its error is kept in `IMPORT_ERRORS` (one line naming the
file), `list` shows it and `run` refuses only a method it would have defined. A file
named on its own with `--plugins` must import.
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
IMPORT_ERRORS: list[str] = []  # "<file>: <what went wrong>", one per module that failed to import
_importing: list[tuple[str, str | None]] = []  # (shown name, path) of the file being imported now, innermost last


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._sources: dict[str, str] = {}  # name -> file that registered it, as shown to users
        self._paths: dict[str, str] = {}  # name -> that file's path (None: not a file of its own)

    def register(self, name: str, item: T, source: str | None = None, defined_in: str | None = None) -> T:
        """`source`: where it is defined, as shown to users (default: the file being imported).
        `defined_in`: the file of the module that defines it, where known: a file imported by
        another (methods/bic.py imports methods/wa.py) is then named, not the importing one."""
        shown, path = _importing[-1] if _importing else ("<unknown file>", None)
        if defined_in and path is None:  # imported outside discover (a test, an API user): its folder/file
            shown, path = f"{Path(defined_in).parent.name}/{Path(defined_in).name}", os.path.realpath(defined_in)
        elif defined_in and os.path.realpath(defined_in) != os.path.realpath(path):
            same_folder = os.path.dirname(os.path.realpath(defined_in)) == os.path.dirname(os.path.realpath(path))
            shown = str(Path(shown).parent / Path(defined_in).name) if same_folder else defined_in
            path = os.path.realpath(defined_in)
        source = source or shown
        # The same definition imported twice (two copies of a plugin file) is harmless.
        if name in self._items and self._items[name] is not item and self._items[name] != item:
            raise HarnessError(f"{self.kind} '{name}' is registered twice: in {self._sources[name]} and in {source}")
        self._items[name] = item
        self._sources.setdefault(name, source)
        if path is not None:
            self._paths.setdefault(name, path)
        return item

    def source(self, name: str) -> str:
        return self._sources.get(name, "<unknown file>")

    def path(self, name: str) -> str | None:
        """The file that registered `name` (None when it was registered from no file of its own)."""
        return self._paths.get(name)

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            broken = f"; these files failed to import: {' | '.join(IMPORT_ERRORS)}" if IMPORT_ERRORS else ""
            plugin = (f"; a {self.kind} defined in a file of your own needs --plugins FILE"
                      if self.kind in ("method", "protocol") and not close else "")
            raise HarnessError(
                f"unknown {self.kind} '{name}'{hint}; known: {', '.join(sorted(self._items)) or 'none'}{broken}{plugin}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


METHODS: Registry = Registry("method")
PROTOCOLS: Registry = Registry("protocol")
DATASETS: Registry = Registry("dataset")
BACKBONES: Registry = Registry("backbone")  # harness.nn.backbones
VLM_STACKS: Registry = Registry("vision-language stack")  # harness.nn.vlm.stacks


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: `@register_method("icarl")` on a CILMethod subclass."""

    def deco(cls: type) -> type:
        cls.name = name
        declared = getattr(cls, "params", {})
        recipes = {**{family: r for family, r in getattr(cls, "protocol_defaults", {}).items()},
                   **{condition: r for condition, r in getattr(cls, "setting_defaults", {}).items()}}
        for condition in getattr(cls, "setting_defaults", {}):
            if condition.partition("=")[0] not in declared:
                raise HarnessError(f"method '{name}': its recipe for {condition} depends on a setting its params "
                                   "do not declare")
        for which, recipe in recipes.items():
            unknown = sorted(set(recipe) - set(declared))
            if unknown:
                raise HarnessError(f"method '{name}': its {which} recipe sets {', '.join(unknown)}, "
                                   f"which its params do not declare")
        return METHODS.register(name, cls, defined_in=getattr(sys.modules.get(cls.__module__), "__file__", None))

    return deco


def register_dataset(name: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        return DATASETS.register(name, fn)

    return deco


def _failure(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, HarnessError) else f"{type(exc).__name__}: {exc}"


def _import_package_modules(package: str) -> None:
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        file = str(Path(pkg.__path__[0]).name + "/" + info.name + ".py")
        module_path = Path(pkg.__path__[0]) / (info.name + ("/__init__.py" if info.ispkg else ".py"))
        _importing.append((file, str(module_path.resolve())))
        try:
            importlib.import_module(f"{package}.{info.name}")
        except Exception as exc:  # one broken file must not take the other methods down
            IMPORT_ERRORS.append(f"{file} failed to import: {_failure(exc)}")
        finally:
            _importing.pop()


def _import_file(path: Path, tolerant: bool = False) -> None:
    module_name = f"cil_harness_plugin_{abs(hash(str(path.resolve())))}"
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise HarnessError(f"cannot import plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    _importing.append((str(path), str(path.resolve())))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a user's file: say which one broke
        del sys.modules[module_name]
        message = f"plugin {path} failed to import: {_failure(exc)}"
        if not tolerant:
            raise HarnessError(message) from exc
        IMPORT_ERRORS.append(message)
    finally:
        _importing.pop()


def _module_file(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and spec.has_location else None


def load_plugins(paths: Iterable[str | os.PathLike]) -> None:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for file in sorted(path.glob("*.py")):
                if not file.name.startswith("_"):
                    _import_file(file, tolerant=True)
        elif path.is_file():
            _import_file(path)
        else:
            raise HarnessError(f"plugin path {path} does not exist")


_discovered = False
# Protocols this project defines (its `protocols/` package), as opposed to plugins and entry
# points: GMM's alignment set depends on these alone, never on what a user registers.
BUILTIN_PROTOCOLS: set[str] = set()


def discover(plugin_paths: Iterable[str | os.PathLike] = ()) -> None:
    """Import everything that registers methods and protocols (idempotent)."""
    global _discovered
    if not _discovered:
        _import_package_modules("protocols")
        BUILTIN_PROTOCOLS.update(PROTOCOLS.names())
        _import_package_modules("methods")
        for group in ENTRY_POINT_GROUPS:
            for ep in entry_points(group=group):
                _importing.append((f"entry point {ep.value}", _module_file(ep.module)))
                try:
                    ep.load()
                except Exception as exc:
                    IMPORT_ERRORS.append(f"entry point {ep.name} ({ep.value}) failed to import: {_failure(exc)}")
                finally:
                    _importing.pop()
        _discovered = True
    env = [p for p in os.environ.get(PLUGIN_ENV, "").split(os.pathsep) if p]
    load_plugins([*env, *plugin_paths])
