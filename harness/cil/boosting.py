"""FOSTER's network (Wang et al., "FOSTER: Feature Boosting and Compression for Class-Incremental
Learning", ECCV 2022), as PyCIL's `FOSTERNet` (utils/inc_net.py) and the student its
`_feature_compression` builds:

- after the first task it is one extractor and a classifier;
- each later task (boosting) adds a copy of the extractor beside it, frozen with its classifier (the
  "old" model, its batch-norm statistics fixed as well); a classifier over both extractors' features
  (the old classes' rows keep their weights on the old features, every new weight starts as PyCIL's
  `SimpleLinear`), and one over the new extractor's features alone (PyCIL's `fe_fc`), are trained;
- the same task's compression distils the two extractors into a student of one extractor, which
  starts as the old extractor with the old classifier's rows, and replaces the pair when the next task
  begins (PyCIL's `self._network = self._snet`).

The student is built here, by the same adaptation call that adds the new extractor, so that the
harness's resume rebuilds every shape before loading the weights (an Avalanche `DynamicModule`).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from avalanche.models.dynamic_modules import DynamicModule
from torch import nn

from harness.cil.expandable import grown_linear, simple_linear


class _Single(nn.Module):
    """One extractor and its classifier: the first task's network, and each compression's student."""

    def __init__(self, backbone: nn.Module, head: nn.Linear | None):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class BoostedNet(DynamicModule):
    def __init__(self, make_backbone: Callable[[], nn.Module]):
        super().__init__()
        backbone = make_backbone()
        self.out_dim = backbone.out_dim
        self.single = _Single(backbone, None)  # the network of the first task; its head comes with its classes
        self.old: _Single | None = None  # boosting: the frozen extractor and its classifier
        self.new_backbone: nn.Module | None = None
        self.head: nn.Linear | None = None  # over [old, new] features
        self.fe_head: nn.Linear | None = None  # over the new extractor's features
        self.student: _Single | None = None
        self.task_sizes: list[int] = []
        self.evaluate_student = False  # evaluate the compressed student rather than the boosted pair

    @property
    def known_classes(self) -> int:
        return sum(self.task_sizes)

    @property
    def boosting(self) -> bool:
        return self.old is not None

    def adaptation(self, experience) -> None:
        classes = experience.classes_in_this_experience
        new = max(classes) + 1 - self.known_classes if len(classes) else 0
        if not self.training or new <= 0:
            return
        total = self.known_classes + new
        if not self.task_sizes:  # the first task: one extractor
            self.single.head = simple_linear(self.out_dim, total).to(next(self.parameters()).device)
        else:
            old = self.student if self.student is not None else self.single  # the last compression's
            self.single = None
            self.old = old.requires_grad_(False).eval()
            self.new_backbone = copy.deepcopy(old.backbone).requires_grad_(True)
            self.head = grown_linear(old.head, 2 * self.out_dim, total)
            self.fe_head = simple_linear(self.out_dim, total).to(old.head.weight.device)
            self.student = _Single(copy.deepcopy(old.backbone), grown_linear(old.head, self.out_dim, total))
            self.student.requires_grad_(True)
        self.task_sizes.append(new)
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.old is not None:
            self.old.eval()  # its batch-norm statistics stay as its task left them
        return self

    def boosted(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits over [old, new] features, the new extractor's own logits, the old classifier's logits)."""
        old_features, new_features = self.old.backbone(x), self.new_backbone(x)
        return (self.head(torch.cat([old_features, new_features], dim=1)), self.fe_head(new_features),
                self.old.head(old_features))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluated network's features: the first task's extractor, both extractors after boosting
        (PyCIL evaluates the pair), or the student's with `evaluate_student`."""
        if not self.boosting:
            return self.single.backbone(x)
        if self.evaluate_student and not self.training:
            return self.student.backbone(x)
        return torch.cat([self.old.backbone(x), self.new_backbone(x)], dim=1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """The evaluated network's classifier on its `features`."""
        if not self.boosting:
            return self.single.head(features)
        if self.evaluate_student and not self.training:
            return self.student.head(features)
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.boosting and (self.training or not self.evaluate_student):
            return self.boosted(x)[0]
        return self.classify(self.features(x))


def effective_number_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Class-balanced weights by the effective number of samples (Cui et al., CVPR 2019), as FOSTER's
    `per_cls_weights`: (1 - beta) / (1 - beta^n) per class, scaled so that they average 1."""
    weights = (1.0 - beta) / (1.0 - torch.pow(beta, counts.double()))
    return (weights / weights.sum() * len(counts)).float()
