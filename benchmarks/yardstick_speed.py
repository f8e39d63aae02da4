"""How long the frozen-encoder yardstick takes, and what sharing the encoding saves.

Runs simplecil, ranpac and fecam one after another in one process on a protocol (the
harness's own runs, in a temporary folder), the first with an empty feature cache: it pays
for encoding every image with GMM's encoder, the others read the cache. The same cache
serves GMM in a sweep (encoder=gmm is GMM's own encoder, under its id). Prints the
machine's CPU and fp32 GEMM rate beside every time, since timings differ between machines.

    python benchmarks/yardstick_speed.py [--protocol quickdraw100_10x10] [--threads N]
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.nn.feature_cache import _CACHES  # noqa: E402
from harness.registry import discover  # noqa: E402
from harness.runner import RunSpec, execute  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def fp32_gflops(seconds: float = 1.0) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        n += 1
    return n * 2 * 1024**3 / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", default="quickdraw100_10x10")
    ap.add_argument("--methods", nargs="+", default=["simplecil", "ranpac", "fecam"])
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: every idle core)")
    args = ap.parse_args()
    discover()
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, "
          f"fp32 GEMM 1024^3 {fp32_gflops():.0f} GFLOPS")
    _CACHES.clear()
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            cached = sum(len(c) for c in _CACHES.values())
            t = time.perf_counter()
            out = execute(RunSpec(method, args.protocol, 0, tmp, quiet=True, threads=args.threads))
            s = out.summary
            print(f"{method:10s} {time.perf_counter() - t:6.1f} s wall ({s['train_time_s']:.1f} s learning incl. "
                  f"encoding, {s['eval_time_s']:.1f} s evaluation), images already cached: {cached:,}; "
                  f"Avg {s['avg_incremental_accuracy']:.1f} Last {s['last_accuracy']:.1f}, "
                  f"memory {s['memory_bytes'] / 1e6:.1f} MB")
    print(f"machine after: fp32 GEMM 1024^3 {fp32_gflops():.0f} GFLOPS")


if __name__ == "__main__":
    main()
