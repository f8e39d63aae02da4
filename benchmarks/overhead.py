"""Harness overhead: `finetune` through the harness vs a bare PyTorch loop.

Both do the same work on the same machine in the same process: QuickDraw protocol
data (same classes, order and split), the same ConvNet, SGD (lr 0.01, momentum 0.9),
batch 64, the same epochs per task, and after every task an evaluation on the test
data of every seen task. The bare loop is what one would write by hand: a
DataLoader over a TensorDataset, logits sliced to the classes seen so far.
Runs alternate (bare, harness, bare, ...) so machine noise hits both alike.

    python benchmarks/overhead.py [--protocol quickdraw100_10x10] [--epochs 10] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import runner  # noqa: E402
from harness.nn.backbones import ConvNet  # noqa: E402
from harness.protocol import get_protocol  # noqa: E402
from harness.registry import discover  # noqa: E402
from protocols.quickdraw import BUNDLE, TRAIN_PER_CLASS  # noqa: E402


def bare_run(protocol_name: str, epochs: int, seed: int) -> tuple[float, float]:
    """(seconds, last accuracy %) of a hand-written class-incremental fine-tuning loop."""
    start = time.perf_counter()
    p = get_protocol(protocol_name)
    with np.load(BUNDLE) as npz:
        images = npz["images"]
    order = np.random.RandomState(p.class_order_seed).permutation(images.shape[0])[: p.num_classes]
    chosen = torch.from_numpy(images[order]).float().div_(255).unsqueeze(2)  # (classes, 100, 1, 28, 28)
    torch.manual_seed(seed)
    backbone = ConvNet(1, 28)
    head = nn.Linear(backbone.out_dim, p.num_classes)
    model = nn.Sequential(backbone, head)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    seen = 0
    for n_new in p.classes_per_task():
        classes = torch.arange(seen, seen + n_new)
        seen += n_new
        x = chosen[classes, :TRAIN_PER_CLASS].reshape(-1, 1, 28, 28)
        y = classes.repeat_interleave(TRAIN_PER_CLASS)
        model.train()
        for _ in range(epochs):
            for xb, yb in DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xb)[:, :seen], yb)
                loss.backward()
                opt.step()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for c0 in range(0, seen, n_new):  # per seen task, as the harness evaluates
                cls = torch.arange(c0, min(c0 + n_new, seen))
                xt = chosen[cls, TRAIN_PER_CLASS:].reshape(-1, 1, 28, 28)
                yt = cls.repeat_interleave(images.shape[1] - TRAIN_PER_CLASS)
                for xb, yb in zip(xt.split(512), yt.split(512)):
                    correct += (model(xb)[:, :seen].argmax(1) == yb).sum().item()
                    total += len(yb)
    return time.perf_counter() - start, 100.0 * correct / total


def harness_run(protocol_name: str, epochs: int, seed: int, out: str) -> tuple[float, float]:
    runner._prepared.cache_clear()  # count data preparation every time, as the bare loop does
    start = time.perf_counter()
    outcome = runner.execute(runner.RunSpec("finetune", protocol_name, seed, out, device="cpu", epochs=epochs,
                                            force=True, quiet=True))
    return time.perf_counter() - start, outcome.summary["last_accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", default="quickdraw100_10x10")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    discover()
    times: dict[str, list[float]] = {"bare": [], "harness": []}
    with tempfile.TemporaryDirectory() as out:
        for r in range(args.repeats):
            for name in ("bare", "harness"):
                fn = bare_run if name == "bare" else (lambda *a: harness_run(*a, out))
                seconds, last = fn(args.protocol, args.epochs, 0)
                times[name].append(seconds)
                print(f"repeat {r + 1}: {name:<8} {seconds:7.1f} s  last accuracy {last:5.1f}%", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    print(f"\n{args.protocol}, finetune, {args.epochs} epochs/task, torch threads {torch.get_num_threads()}")
    print(f"bare PyTorch : median {med['bare']:.1f} s, best {best['bare']:.1f} s")
    print(f"harness      : median {med['harness']:.1f} s, best {best['harness']:.1f} s")
    print(f"ratio harness/bare: median {med['harness'] / med['bare']:.3f}, best {best['harness'] / best['bare']:.3f} "
          f"(target <= 1.05)")


if __name__ == "__main__":
    main()
