"""cil-harness: a benchmarking harness for class-incremental learning."""

__version__ = "0.1.0"
