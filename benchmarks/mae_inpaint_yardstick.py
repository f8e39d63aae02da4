"""How hazy is the best a pixel-MSE inpainter gets on MAE-CIL's masked-patch task?

A yardstick for the background check of benchmarks/mae_rebuild_check.py. On the first task's
classes of a protocol (its training images; default quickdraw20_2x10: 10 classes, 800 doodles)
it trains, for reconstruction alone (no classification, no incremental stream):
- `mae`: MAE-CIL's own MaskedViT (harness/nn/mae.py) at QuickDraw's size, pixel MSE on the
  masked patches (mae_losses), as in the method but without the classifier sharing the encoder;
- `mae_refine`: the same with its pixel refiner (`mae_cil.refine_layers`, default 4 here);
- `convnet`: a dilated convolutional inpainter (the image with masked patches zeroed, plus the
  mask, as input), a learner with a strong local prior, as a point of comparison.
Both see the same random masks (`--keep` of the 49 patches kept per image) and are scored on
the test images of those classes with fixed masks: MSE of the filled pixels, against the MSE
of predicting the mean pixel (the pixel variance); the mean filled value where the real pixel
is 0 (the background of mae_rebuild_check.py, whose check is <= 0.05); and where it is > 0.5 (ink).

    python benchmarks/mae_inpaint_yardstick.py [--learner mae mae_refine convnet] [--refine-layers 4] [--steps 1000] [--keep 24]
        [--protocol quickdraw20_2x10] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.data import prepare  # noqa: E402
from harness.nn.mae import MaskedViT, mae_losses, patchify, random_keep, unpatchify  # noqa: E402
from harness.protocol import get_protocol  # noqa: E402
from harness.registry import discover  # noqa: E402

PATCH = 4


def keep_mask(images: torch.Tensor, keep: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 1, H, W) float: 1 on the pixels of `keep` random patches per image."""
    n = patchify(images, PATCH).shape[1]
    kept = torch.zeros(len(images), n, PATCH * PATCH * images.shape[1])
    kept.scatter_(1, random_keep(len(images), n, keep, generator).unsqueeze(-1).expand(-1, -1, kept.shape[-1]), 1.0)
    return unpatchify(kept, PATCH, images.shape[1])


class ConvInpainter(nn.Module):
    """Input: the kept pixels and the keep mask; dilated 3x3 convolutions see ~23 px around each pixel."""

    def __init__(self, channels: int, width: int = 64, layers: int = 5):
        super().__init__()
        body = [nn.Conv2d(channels + 1, width, 3, padding=1), nn.GELU()]
        for _ in range(layers):
            body += [nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.GELU()]
        self.net = nn.Sequential(*body, nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, images: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([images * kept, kept], 1))


def fill(learner: str, model: nn.Module, images: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The learner's full image from the kept pixels (kept pixels are the real ones)."""
    if learner == "convnet":
        return model(images, kept).clamp(0, 1) * (1 - kept) + images * kept
    positions = patchify(kept, PATCH)[..., 0].nonzero()[:, 1].reshape(len(images), -1)
    patches = patchify(images, PATCH).gather(1, positions.unsqueeze(-1).expand(-1, -1, PATCH * PATCH * images.shape[1]))
    return model.as_exemplar(model.reconstruct(patches, positions)["image"], patches, positions)  # as MAE-CIL replays


def train_loss(learner: str, model: nn.Module, x: torch.Tensor, keep: int, g: torch.Generator) -> torch.Tensor:
    if learner != "convnet":
        return mae_losses(model, x, keep, g, view=False)["recon"]
    kept = keep_mask(x, keep, g)
    pred = model(x, kept)
    return F.mse_loss(pred[kept == 0], x[kept == 0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--protocol", default="quickdraw20_2x10")
    ap.add_argument("--learner", nargs="+", default=["mae", "convnet"], choices=("mae", "mae_refine", "convnet"))
    ap.add_argument("--refine-layers", type=int, default=4, help="mae_refine: layers of its pixel refiner")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--keep", type=int, default=24, help="patches kept of 49 (24: QuickDraw's mask ratio 0.5)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    discover()
    protocol = get_protocol(args.protocol)
    data = prepare(protocol)
    first = protocol.first_task_classes
    train_y, test_y = torch.as_tensor(data.train.targets), torch.as_tensor(data.test.targets)
    train = data.train.images[train_y < first].float() / 255
    test = data.test.images[test_y < first].float() / 255
    test_kept = keep_mask(test, args.keep, torch.Generator().manual_seed(args.seed + 1))
    filled = test_kept == 0
    print(f"{args.protocol}, first task: {first} classes, {len(train)} training / {len(test)} test images; "
          f"{args.keep} of 49 patches kept; pixel mean {train.mean():.3f}, variance {train.var():.4f} "
          f"(the MSE of predicting the mean)")
    for learner in args.learner:
        torch.manual_seed(args.seed)
        model = ConvInpainter(protocol.channels) if learner == "convnet" else \
            MaskedViT(channels=protocol.channels, image_size=protocol.image_size, patch=PATCH, dim=64, depth=4, heads=4,
                      bilateral=False, refine_layers=args.refine_layers if learner == "mae_refine" else 0)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-6)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.05)
        g = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            loss = train_loss(learner, model.train(), train[torch.randint(len(train), (args.batch_size,), generator=g)],
                              args.keep, g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            if step % max(1, args.steps // 4) == 0 or step == args.steps:
                with torch.no_grad():
                    out = torch.cat([fill(learner, model.eval(), xb, kb)
                                     for xb, kb in zip(test.split(256), test_kept.split(256))])
                print(f"  {learner:8s} step {step:5d}: train MSE {loss.item():.4f}  test filled MSE "
                      f"{F.mse_loss(out[filled], test[filled]).item():.4f}  background "
                      f"{out[filled & (test == 0)].mean().item():.3f}  ink {out[filled & (test > 0.5)].mean().item():.3f}"
                      f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
