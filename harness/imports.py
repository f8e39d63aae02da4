"""Keep Avalanche's import from pulling in jax and wandb, which the harness does not use.

Avalanche imports qpsolvers (for GEM, which solves with quadprog), and qpsolvers imports
jax and jaxopt whenever they are installed. jax registers a garbage-collector callback
(`_xla_gc_callback`); a Ctrl-C that lands while it runs is printed as "Exception ignored"
and lost, so a sweep went on training. Avalanche's confusion-matrix metric also imports
wandb at module level. Together they are ~1.5 s of every command's start-up.

`guard_avalanche_import()` (called when the harness package is imported) waits for the first
`import avalanche`; just before it, qpsolvers is imported with jax and jaxopt hidden (it skips
its optional jaxopt solver) and wandb is bound to a lazy module that imports the real package
at its first attribute access (the wandb logger, which uses it, still works). Nothing is
hidden afterwards: code that imports jax itself gets the real jax.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_HIDDEN_FROM_QPSOLVERS = ("jax", "jaxopt")


def _lazy(name: str) -> None:
    """Bind `name` to a module that loads on first use (the standard library's LazyLoader)."""
    if name in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return
    if spec is None or spec.loader is None:
        return
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def _qpsolvers_without_jax() -> None:
    if "qpsolvers" in sys.modules or any(name in sys.modules for name in _HIDDEN_FROM_QPSOLVERS):
        return  # too late to matter, or jax is already the caller's own choice
    for name in _HIDDEN_FROM_QPSOLVERS:
        sys.modules[name] = None  # `import jax` raises ImportError: qpsolvers skips that solver
    try:
        import qpsolvers  # noqa: F401
    except ImportError:
        pass
    finally:
        for name in _HIDDEN_FROM_QPSOLVERS:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def prepare_avalanche_import() -> None:
    _qpsolvers_without_jax()
    _lazy("wandb")


class _BeforeAvalanche(importlib.abc.MetaPathFinder):
    """Runs prepare_avalanche_import once, when `avalanche` is first looked for."""

    def find_spec(self, name, path=None, target=None):
        if name == "avalanche":
            sys.meta_path.remove(self)
            prepare_avalanche_import()
        return None  # the ordinary finders import it


def guard_avalanche_import() -> None:
    if "avalanche" in sys.modules or any(isinstance(f, _BeforeAvalanche) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _BeforeAvalanche())
