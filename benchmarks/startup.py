"""How long the command line takes to answer: --help, list, list METHOD and a usage error.

    python benchmarks/startup.py [--repeats 5]

Each command runs as a new process (`python -m harness ...`), as a user types it; the figure is
the median wall time of --repeats runs with the catalogue cached (harness.catalog), and once
from an empty cache (the first command after a change to any source file). The machine's CPU,
core count and fp32 GEMM rate are printed beside the figures.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from yardstick_speed import cpu_name, fp32_gflops  # the machine's figures, printed beside every time

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "--help": ["--help"],
    "list": ["list"],
    "list icarl": ["list", "icarl"],
    "usage error (unknown method)": ["run", "--methods", "icarll"],
    "usage error (bad --set)": ["run", "--methods", "icarl", "--set", "icarl.memroy=100"],
}


def _time(args: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, fp32 GEMM {fp32_gflops():.0f} GFLOPS; "
          f"Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "CIL_CACHE": cache}
        cold = _time(["list"], env)  # builds the catalogue: every method module imported once
        print(f"{'list, empty catalogue cache':<32} {cold:6.2f} s")
        for name, command in COMMANDS.items():
            times = [_time(command, env) for _ in range(args.repeats)]
            print(f"{name:<32} {statistics.median(times):6.2f} s  (median of {args.repeats}; "
                  f"min {min(times):.2f}, max {max(times):.2f})")


if __name__ == "__main__":
    main()
