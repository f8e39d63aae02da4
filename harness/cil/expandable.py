"""A network that grows a feature extractor per task (Yan et al., "DER: Dynamically Expandable
Representation for Class Incremental Learning", CVPR 2021), as PyCIL's `DERNet` (utils/inc_net.py):

- each new task appends a copy of the newest extractor and trains it; the older ones are frozen,
  weights and batch-norm statistics;
- the classifier reads the concatenation of every extractor's features; when it grows, the old
  classes' rows keep their weights on the old features, and every new weight starts as PyCIL's
  `SimpleLinear` (Kaiming-uniform with a linear gain, zero bias);
- an auxiliary classifier on the newest extractor's features alone tells the new classes apart
  and lumps every old class into one output (index 0), trained beside the main loss.

With a `trunk` (Zhou et al., "A Model or 603 Exemplars: Towards Memory-Efficient Class-Incremental
Learning", ICLR 2023, MEMO; PyCIL's `AdaptiveNet`), the extractors that grow are the network's
specialised last blocks, and they all read one shared trunk of generalised blocks, which keeps
training on every task (PyCIL's `train_base`); without one (DER) each extractor reads the image.

It is an Avalanche `DynamicModule`: the harness's training and its checkpoints' resume grow it
through the same adaptation calls, so a resumed run rebuilds the same shapes before loading.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from avalanche.models.dynamic_modules import DynamicModule
from torch import nn


def simple_linear(in_features: int, out_features: int) -> nn.Linear:
    """nn.Linear initialised as PyCIL's SimpleLinear."""
    layer = nn.Linear(in_features, out_features)
    nn.init.kaiming_uniform_(layer.weight, nonlinearity="linear")
    nn.init.zeros_(layer.bias)
    return layer


def grown_linear(head: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """A `simple_linear` of the new shape holding `head`'s weights and biases in its top-left corner:
    the old classes keep their weights on the old features (DER's, MEMO's and FOSTER's classifiers)."""
    new = simple_linear(in_features, out_features).to(head.weight.device)
    with torch.no_grad():
        new.weight[:head.out_features, :head.in_features] = head.weight
        new.bias[:head.out_features] = head.bias
    return new


class ExpandableNet(DynamicModule):
    def __init__(self, make_backbone: Callable[[], nn.Module], trunk: nn.Module | None = None):
        super().__init__()
        self.trunk = trunk if trunk is not None else nn.Identity()
        self.backbones = nn.ModuleList([make_backbone()])
        self.out_dim = self.backbones[0].out_dim
        self.head: nn.Linear | None = None  # over every extractor's features, built by adaptation
        self.aux_head: nn.Linear | None = None  # newest extractor: its task's classes + one "old" output
        self.task_sizes: list[int] = []

    @property
    def known_classes(self) -> int:
        return sum(self.task_sizes)

    def adaptation(self, experience) -> None:
        classes = experience.classes_in_this_experience
        new = max(classes) + 1 - self.known_classes if len(classes) else 0
        if not self.training or new <= 0:
            return
        device = next(self.parameters()).device
        known = self.known_classes
        if self.task_sizes:
            self.backbones.requires_grad_(False)
            self.backbones.append(copy.deepcopy(self.backbones[-1]).requires_grad_(True))
        if self.head is None:
            self.head = simple_linear(self.out_dim, new).to(device)
        else:
            self.head = grown_linear(self.head, self.out_dim * len(self.backbones), known + new)
        self.aux_head = simple_linear(self.out_dim, new + 1).to(device)
        self.task_sizes.append(new)
        self.train()  # the frozen extractors to eval mode

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in self.backbones[:-1]:
            frozen.eval()  # their batch-norm statistics stay as their task left them
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk(x)
        return torch.cat([b(x) for b in self.backbones], dim=1)

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.trunk(x)
        parts = [b(x) for b in self.backbones]
        return self.head(torch.cat(parts, dim=1)), self.aux_head(parts[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def aux_targets(labels: torch.Tensor, known_classes: int) -> torch.Tensor:
    """The auxiliary classifier's targets: 0 for every old class, 1 + k for the task's k-th new class."""
    return torch.where(labels >= known_classes, labels - known_classes + 1, torch.zeros_like(labels))
