"""The figures behind the QuickDraw recipe (harness/cil/recipes.py): the joint bound of a development protocol.

Trains one network on all classes of a development protocol at once (its joint upper
bound, no incremental steps) for each candidate recipe and prints test accuracy in eval
mode (batch-norm running statistics) and in train mode (batch statistics: a large gap says
the running statistics are stale), with wall time. The data, backbones, augmentation and
per-epoch cosine schedule are the harness's own. Choose on quickdraw40_4x10 or
quickdraw20_2x10, never on the reported quickdraw100_10x10.

    python benchmarks/recipe_search.py [--protocol quickdraw40_4x10] [--seed 0] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.nn.augment import batch_augment  # noqa: E402
from harness.nn.backbones import IncrementalNet, create_backbone  # noqa: E402
from harness.data import prepare  # noqa: E402
from harness.method import materialise  # noqa: E402
from harness.protocol import get_protocol  # noqa: E402
from harness.registry import discover  # noqa: E402

_NEW = {"lr": 0.1, "weight_decay": 5e-4, "batch_size": 64, "epochs": 30, "cosine": True, "augment": "crop_flip",
        "padding": 2}
CANDIDATES = {
    # Avalanche's QuickDraw peer recipe, the harness's recipe before this one.
    "convnet, SGD 0.01, 10 ep, constant lr, no aug": {"backbone": "convnet", "lr": 0.01, "weight_decay": 0.0,
                                                      "batch_size": 64, "epochs": 10, "cosine": False,
                                                      "augment": "none", "padding": 2},
    "convnet, new recipe": {**_NEW, "backbone": "convnet"},
    "convnet_bn, new recipe, no flip": {**_NEW, "backbone": "convnet_bn", "augment": "crop"},
    "convnet_bn, new recipe (chosen)": {**_NEW, "backbone": "convnet_bn"},
    "convnet_bn, new recipe, 50 ep": {**_NEW, "backbone": "convnet_bn", "epochs": 50},
    "resnet32, new recipe, batch 128": {**_NEW, "backbone": "resnet32", "batch_size": 128},
}


def train_joint(recipe: dict, x, y, xt, yt, n_classes: int, seed: int) -> tuple[float, float, float, int]:
    torch.manual_seed(seed)
    model = IncrementalNet(create_backbone(recipe["backbone"], x.shape[1], x.shape[-1]))
    model.resize_head(n_classes)
    model.head.active_units[:] = 1
    opt = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=0.9, weight_decay=recipe["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe["epochs"]) if recipe["cosine"] else None
    start = time.perf_counter()
    for _ in range(recipe["epochs"]):
        model.train()
        for idx in torch.randperm(len(y)).split(recipe["batch_size"]):
            loss = F.cross_entropy(model(batch_augment(x[idx], recipe["augment"], recipe["padding"])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if sched:
            sched.step()
    seconds = time.perf_counter() - start

    def accuracy(train_mode: bool) -> float:
        model.train(train_mode)
        with torch.no_grad():
            pred = torch.cat([model(b).argmax(1) for b in xt.split(256)])
        return 100.0 * (pred == yt).float().mean().item()

    return accuracy(False), accuracy(True), seconds, sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", default="quickdraw40_4x10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="candidate names (substrings) to run")
    args = ap.parse_args()
    discover(())
    data = prepare(get_protocol(args.protocol))
    x, y = materialise(data.train)
    xt, yt = materialise(data.test)
    print(f"{args.protocol}: all {data.protocol.num_classes} classes at once, {len(y)} training / {len(yt)} test "
          f"images, seed {args.seed}, {torch.get_num_threads()} threads", flush=True)
    width = max(map(len, CANDIDATES))
    print(f"{'recipe':{width}}  {'eval %':>6} {'batch-stat %':>12} {'time s':>6} {'params':>8}")
    for name, recipe in CANDIDATES.items():
        if args.only and not any(o in name for o in args.only):
            continue
        acc, acc_batch, seconds, params = train_joint(recipe, x, y, xt, yt, data.protocol.num_classes, args.seed)
        print(f"{name:{width}}  {acc:6.1f} {acc_batch:12.1f} {seconds:6.0f} {params:8d}", flush=True)


if __name__ == "__main__":
    main()
