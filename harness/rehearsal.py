"""What rehearsal methods with a teacher and a nearest-mean classifier share (iCaRL, MAE-CIL).

`RehearsalMethod` keeps an `ExemplarMemory` (`self.memory`, built by the subclass), the
class means (`self.means`: unit rows; None = predict with the model's head) and the
frozen previous model (`self.old_model`); it predicts by the nearest mean when there are
means and reports the memory (the harness checkpoints all three, see harness.state).
"""
from __future__ import annotations

import torch
from torch import nn

from harness.memory import ExemplarMemory, nme_scores
from harness.method import CILMethod


class RehearsalMethod(CILMethod):
    memory: ExemplarMemory

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.old_model: nn.Module | None = None
        self.means: torch.Tensor | None = None  # (classes seen, d), unit rows

    def make_train_dataloader(self, **kwargs):
        super().make_train_dataloader(**kwargs)
        self.precompute_teacher_logits()

    @torch.no_grad()
    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        if self.means is None:
            return super().class_scores(x)
        self.model.eval()
        return nme_scores(self.model.features(x.to(self.device)), self.means)

    def memory_usage(self) -> tuple[int, int]:
        return len(self.memory), self.memory.nbytes
