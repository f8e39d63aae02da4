"""Frozen image encoders: images (B, C, H, W) in [0, 1] -> visual tokens (B, N, D)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.errors import HarnessError


def _grid(n_tokens: int) -> int:
    g = math.isqrt(n_tokens)
    if g * g != n_tokens:
        raise HarnessError(f"visual tokens must be a square number (1, 4, 9, ...), not {n_tokens}")
    return g


class EfficientNetTokens(nn.Module):
    """EfficientNet-Lite0's last feature map average-pooled to a g x g grid of tokens."""

    def __init__(self, in_channels: int, n_tokens: int, image_size: int = 224, pretrained: bool = True):
        super().__init__()
        from harness.nn.pretrained import EfficientNetLite0Features

        self.grid = _grid(n_tokens)
        self.net = EfficientNetLite0Features(in_channels, image_size, pretrained=pretrained, pool=False)
        # Channels-last weights make oneDNN run the convolutions in NHWC: 1.6x faster on 2 CPU
        # cores (90 -> 147 images/s at 112 px, outputs equal to 2e-5); the encoder is frozen.
        self.net.to(memory_format=torch.channels_last)
        self.out_dim = self.net.out_dim
        self.id = f"effnet_lite0-{'in1k' if pretrained else 'random'}-c{in_channels}-{image_size}px-{n_tokens}tok"

    def forward(self, x: Tensor) -> Tensor:
        fmap = F.adaptive_avg_pool2d(self.net(x), self.grid)  # (B, 1280, g, g)
        return fmap.flatten(2).transpose(1, 2)


class TinyConvEncoder(nn.Module):
    """Random frozen convolutions: enough signal for tests, no weights to load."""

    def __init__(self, in_channels: int, n_tokens: int, dim: int = 32, seed: int = 0):
        super().__init__()
        self.grid, self.out_dim = _grid(n_tokens), dim
        g = torch.Generator().manual_seed(seed)  # same encoder in every process: feature caches stay valid
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, dim, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.0))
        self.id = f"tinyconv-c{in_channels}-{n_tokens}tok-d{dim}-s{seed}"

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.relu(self.conv1(x)))
        return F.adaptive_avg_pool2d(F.relu(h), self.grid).flatten(2).transpose(1, 2)


class HFVisionTokens(nn.Module):
    """A LLaVA vision tower: the chosen hidden layer, CLS dropped for strategy 'default'."""

    def __init__(self, tower: nn.Module, layer: int, strategy: str, image_size: int,
                 mean: Sequence[float], std: Sequence[float], name: str):
        super().__init__()
        self.tower, self.layer, self.strategy, self.image_size = tower, layer, strategy, image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.out_dim = tower.config.hidden_size
        self.id = f"hf-{name.replace('/', '--')}-L{layer}-{strategy}-{image_size}px"

    def forward(self, x: Tensor) -> Tensor:
        x = tower_pixels(x, self.image_size, self.mean, self.std)
        h = self.tower(x, output_hidden_states=True).hidden_states[self.layer]
        return h[:, 1:] if self.strategy == "default" else h


def tower_resize(x: Tensor, image_size: int) -> Tensor:
    """Images in [0, 1] at a vision tower's resolution: three channels (a grey doodle repeated),
    bicubic-resized, still in [0, 1] (for image processors that normalise themselves)."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False).clamp(0, 1)
    return x


def tower_pixels(x: Tensor, image_size: int, mean: Tensor, std: Tensor) -> Tensor:
    """Images in [0, 1] as a pretrained vision tower reads them: tower_resize, then normalised by
    its processor's statistics."""
    x = tower_resize(x, image_size)
    return (x - mean.to(x.dtype)) / std.to(x.dtype)
