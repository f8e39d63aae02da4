"""cil-harness: a benchmarking harness for class-incremental learning."""

__version__ = "0.1.0"

from harness import imports as _imports  # noqa: E402

_imports.guard_avalanche_import()
