"""Bias correction (Wu et al., "Large Scale Incremental Learning", CVPR 2019): a two-parameter
linear layer per task on that task's logits, q = alpha * o + beta, fitted after the task on a
small class-balanced set held out of the training data, the rest of the network fixed. A head
trained on many new images and few exemplars scores the new classes too high; alpha < 1 and
beta < 0 on the newest task's logits undo it.

As PyCIL's `IncrementalNetWithBias` and `BiasLayer_BIC` (utils/inc_net.py): every task's layer
stays in the forward pass after it was fitted (alpha 1, beta 0 until then), so later tasks'
teachers and predictions see the old corrections too.
"""
from __future__ import annotations

import torch
from torch import nn

from harness.nn.backbones import IncrementalNet


class TaskBias(nn.Module):
    """One (alpha, beta) per task, over that task's contiguous range of class outputs. Sized for
    the whole stream up front (the tasks' sizes are known), so a checkpoint loads without replaying
    growth; a task's pair only acts once the head has its classes."""

    def __init__(self, classes_per_task: list[int]):
        super().__init__()
        self.bounds = [sum(classes_per_task[:i]) for i in range(len(classes_per_task) + 1)]
        self.alpha = nn.ParameterList([nn.Parameter(torch.ones(1)) for _ in classes_per_task])
        self.beta = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in classes_per_task])
        self.requires_grad_(False)  # trained only in the correction stage (`train_only`)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        parts = []
        for t, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            if lo >= logits.shape[1]:
                break
            parts.append(self.alpha[t] * logits[:, lo:hi] + self.beta[t])
        return torch.cat(parts, dim=1)

    def train_only(self, task: int) -> list[nn.Parameter]:
        """Let task `task`'s pair alone take gradients; its two parameters."""
        self.requires_grad_(False)
        pair = [self.alpha[task], self.beta[task]]
        for p in pair:
            p.requires_grad_(True)
        return pair

    def values(self) -> list[tuple[float, float]]:
        return [(float(a), float(b)) for a, b in zip(self.alpha, self.beta)]


class BiasCorrectedNet(IncrementalNet):
    """Backbone + Avalanche's IncrementalClassifier + a TaskBias on its logits."""

    def __init__(self, backbone: nn.Module, classes_per_task: list[int]):
        super().__init__(backbone)
        self.bias = TaskBias(classes_per_task)

    def forward(self, x):
        return self.bias(self.head(self.backbone(x)))


def held_out_split(labels: torch.Tensor, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, held-out indices): `per_class` random samples of every class held out
    (all but one where a class has no more), drawn from `seed` alone, not the global RNG."""
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().squeeze(1)
        held.append(idx[torch.randperm(len(idx), generator=g)[:min(per_class, len(idx) - 1)]])
    held_out = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held_out] = False
    return keep.nonzero().squeeze(1), held_out
