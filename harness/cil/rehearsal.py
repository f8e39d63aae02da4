"""Building blocks of rehearsal methods, one concern each, to mix into a `CILMethod`:

- `ExemplarReplay`: an `ExemplarMemory` (`self.memory`) whose images join every task's
  training data, and the memory the harness reports (LwM, iCaRL, MAE-CIL, GMM);
- `NearestMeanClassifier`: prediction by the nearest class mean of the features
  (`self.means`: unit rows; None = predict with the model's head);
- `RehearsalMethod`: both, and a frozen previous model (`self.old_model`) whose logits are
  computed once per task (iCaRL, MAE-CIL);
- `HeadAndNearestMean`: a rehearsal method with a trained head, scored after every task by
  both classifiers, PyCIL's "CNN" (the head) and "NME" (the nearest mean of exemplars);
  `headline` says which one class_scores is.

The harness checkpoints the memory, the means and the teacher as the method's attributes.
"""
from __future__ import annotations

import torch
from torch import nn

from harness.cil.memory import ExemplarMemory, nme_scores
from harness.method import CILMethod, with_replay


class ExemplarReplay(CILMethod):
    memory: ExemplarMemory  # built by the subclass, with its budget

    def replay_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images, labels) replayed beside the new task's data: the memory as stored
        (MAE-CIL replays its exemplars rebuilt)."""
        return self.memory.tensors()

    def train_dataset_adaptation(self, **kwargs):
        super().train_dataset_adaptation(**kwargs)
        if len(self.memory):
            x, y = self.replay_images()
            self.adapted_dataset = with_replay(self.adapted_dataset, x, y)

    def memory_usage(self) -> tuple[int, int]:
        return len(self.memory), self.memory.nbytes


class NearestMeanClassifier(CILMethod):
    means: torch.Tensor | None = None  # (classes seen, d), unit rows

    @torch.no_grad()
    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        if self.means is None:
            return super().class_scores(x)
        self.model.eval()
        return nme_scores(self.model.features(x.to(self.device)), self.means)


class RehearsalMethod(ExemplarReplay, NearestMeanClassifier):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.old_model: nn.Module | None = None
        self.means = None

    def make_train_dataloader(self, **kwargs):
        super().make_train_dataloader(**kwargs)
        self.precompute_teacher_logits()


class HeadAndNearestMean(RehearsalMethod):
    headline = "nme"  # a subclass whose paper reports the head sets "cnn"

    def head_scores(self, features: torch.Tensor) -> torch.Tensor:
        """The trained head's logits for backbone features (a bias-corrected head overrides it)."""
        return self.model.head(features)

    def classifiers(self) -> tuple[str, ...]:
        return ("cnn", "nme") if self.means is not None else ()

    def headline_classifier(self) -> str:
        return self.headline

    @torch.no_grad()
    def scores_by_classifier(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.model.eval()
        features = self.model.features(x.to(self.device))
        return {"cnn": self.head_scores(features), "nme": nme_scores(features, self.means)}

    @torch.no_grad()
    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        if self.means is None:
            return CILMethod.class_scores(self, x)
        return self.scores_by_classifier(x)[self.headline]
