"""Batch-level augmentation on tensors (per-sample randomness, no per-item Python)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop after zero padding (a random shift of up to `padding` pixels), plus a
    random horizontal flip, as in the CIFAR recipes."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,))
    dx = torch.randint(0, 2 * padding + 1, (b,))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if flip:
        flipped = torch.rand(b) < 0.5
        out[flipped] = out[flipped].flip(-1)
    return out


AUGMENTATIONS = ("none", "crop", "crop_flip")


def batch_augment(x: torch.Tensor, kind: str, padding: int = 4) -> torch.Tensor:
    if kind in ("crop", "crop_flip"):
        return random_crop_flip(x, padding, flip=kind == "crop_flip")
    return x
