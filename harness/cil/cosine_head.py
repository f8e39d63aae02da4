"""Cosine-normalised classifiers (Hou et al., "Learning a Unified Classifier Incrementally via
Rebalancing", CVPR 2019, LUCIR; Douillard et al., "PODNet: Pooled Outputs Distillation for
Small-Tasks Incremental Learning", ECCV 2020), as PyCIL's `CosineLinear`, `SplitCosineLinear` and
`CosineIncrementalNet` (convs/linears.py, utils/inc_net.py):

- a class's score is the cosine between the unit features and its unit weight vector, times one
  learned scale `sigma` (starting at 1) shared by every class;
- with `nb_proxy` > 1 (PODNet's local similarity classifier, LSC), each class has several proxies
  and its score is their cosines weighted by a softmax over them (PyCIL's `reduce_proxies`);
- each task appends its classes' block of weights (uniform in +-1/sqrt(d), PyCIL's init); the
  blocks of earlier tasks are frozen (PyCIL trains them at lr 0 with no weight decay: the same).

`CosineNet` is an Avalanche `DynamicModule` (a backbone + this head) that grows the head through
the adaptation calls, so a resumed run rebuilds the same shapes before loading its weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from avalanche.models.dynamic_modules import DynamicModule
from torch import nn


class CosineHead(nn.Module):
    def __init__(self, in_features: int, nb_proxy: int = 1):
        super().__init__()
        self.in_features, self.nb_proxy = in_features, nb_proxy
        self.blocks = nn.ParameterList()  # one per task: (its classes x nb_proxy, in_features)
        self.sigma = nn.Parameter(torch.ones(1))

    @property
    def num_classes(self) -> int:
        return sum(len(b) for b in self.blocks) // self.nb_proxy

    def grow(self, n_new: int) -> None:
        """Append `n_new` classes; the existing blocks stop training."""
        for block in self.blocks:
            block.requires_grad_(False)
        bound = 1.0 / math.sqrt(self.in_features)
        weight = torch.empty(n_new * self.nb_proxy, self.in_features, device=self.sigma.device).uniform_(-bound, bound)
        self.blocks.append(nn.Parameter(weight))

    def cosines(self, features: torch.Tensor) -> torch.Tensor:
        """Each class's score before the scale: in [-1, 1] (LUCIR's margin ranking reads them)."""
        weights = torch.cat(list(self.blocks))
        cosines = F.linear(F.normalize(features, dim=1), F.normalize(weights, dim=1))
        if self.nb_proxy > 1:  # softmax-weighted mean of each class's proxies
            per_class = cosines.view(len(cosines), -1, self.nb_proxy)
            cosines = (per_class.softmax(dim=-1) * per_class).sum(-1)
        return cosines

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.sigma * self.cosines(features)


class CosineNet(DynamicModule):
    """A backbone and a `CosineHead` over its features; `stage_maps` gives the backbone's stage outputs."""

    def __init__(self, backbone: nn.Module, nb_proxy: int = 1):
        super().__init__()
        self.backbone = backbone
        self.head = CosineHead(backbone.out_dim, nb_proxy)

    def adaptation(self, experience) -> None:
        classes = experience.classes_in_this_experience
        new = max(classes) + 1 - self.head.num_classes if len(classes) else 0
        if self.training and new > 0:
            self.head.grow(new)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(logits, features, each stage's feature map) from one pass."""
        maps = self.backbone.stage_maps(x)
        features = F.adaptive_avg_pool2d(maps[-1], 1).flatten(1)
        return self.head(features), features, maps
