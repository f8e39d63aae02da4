"""SimpleCIL (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need", IJCV 2024; PILOT's models/simplecil.py).

Each class's prototype is the mean of its training images' features from the frozen
encoder; a test image goes to the prototype of highest cosine similarity. Nothing trains
and no exemplar is kept, so nothing is forgotten except by competition from new classes.
Scored with Avalanche's NCMClassifier on unit vectors (its distance ranks as cosine does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from avalanche.models import NCMClassifier

from harness.cil.frozen import FrozenFeatureMethod
from harness.registry import register_method


@register_method("simplecil")
class SimpleCIL(FrozenFeatureMethod):
    description = "class prototypes of a frozen pretrained encoder, cosine classifier (exemplar-free)"

    def __init__(self, **kwargs):
        self.ncm = NCMClassifier(normalize=True)
        super().__init__(**kwargs)

    def fit(self, features: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> None:
        self.ncm.update_class_means_dict(
            {c: F.normalize(features[labels == c].mean(0), dim=0) for c in classes}, momentum=1.0)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.ncm(features)

    def state_bytes(self) -> int:
        return self.nbytes(self.ncm.class_means)
