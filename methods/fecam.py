"""FeCAM (Goswami et al., "FeCAM: Exploiting the Heterogeneity of Class Distributions in
Exemplar-Free Continual Learning", NeurIPS 2023), on a frozen pretrained encoder.

Features are Tukey-transformed (x^beta, beta = 0.5; log for beta = 0) toward a Gaussian
(defined for non-negative features, as EfficientNet's pooled ReLU6 outputs are: negative
entries, e.g. of a CLIP tower, are clamped to 0 first; `tukey=1` skips the transform);
each class keeps its mean and its covariance, shrunk toward a scaled identity and a constant
off-diagonal (S + a1 V1 I + a2 V2 (1 - I), V1 and V2 the means of S's diagonal and
off-diagonal) and normalised to a correlation matrix; a test image goes to the class of
smallest Mahalanobis distance between the unit-normalised feature and class mean. The
transforms, means and covariances are Avalanche's FeCAMClassifier's; the inverse of each
class's matrix is computed once, when the class arrives (Avalanche's classifier takes a
pseudo-inverse of every class at every forward pass, ~1 s a class on 2 CPU cores), by
Cholesky: the shrunk matrix is positive definite. Avalanche shrinks twice; the paper, and
this method, once. The memory is one d x d matrix per class (655 MB for 100 classes of 1280-d).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from avalanche.models import FeCAMClassifier
from avalanche.models.fecam import compute_covariance, compute_means

from harness.cil.frozen import FROZEN_PARAMS, FrozenFeatureMethod
from harness.params import Param
from harness.registry import register_method


def _inverse(cov: torch.Tensor) -> torch.Tensor:
    """Cholesky's inverse; the reference's pseudo-inverse where the shrunk matrix is not positive
    definite (a negative mean off-diagonal covariance can make it so on few samples)."""
    chol, info = torch.linalg.cholesky_ex(cov)
    return torch.cholesky_inverse(chol) if info == 0 else torch.linalg.pinv(cov, hermitian=True)


@register_method("fecam")
class FeCAM(FrozenFeatureMethod):
    description = "per-class Mahalanobis distance on Tukey-transformed frozen pretrained features (exemplar-free)"
    params = {
        **FROZEN_PARAMS,
        "tukey": Param(0.5, "Tukey's ladder exponent beta applied to the features (0 = log; 1 = none)", low=0.0),
        "shrink1": Param(1.0, "covariance shrinkage toward the mean variance times I (the reference's alpha1)", low=0.0),
        "shrink2": Param(1.0, "covariance shrinkage toward the mean covariance off the diagonal (alpha2)", low=0.0),
        "covnorm": Param(True, "normalise each shrunk covariance to a correlation matrix"),
    }

    transient = (*FrozenFeatureMethod.transient, "transforms")  # built from the settings

    def __init__(self, **kwargs):
        self.means: dict[int, torch.Tensor] = {}  # class -> unit mean of transformed features
        self.precisions: dict[int, torch.Tensor] = {}  # class -> inverse of its shrunk, normalised covariance
        super().__init__(**kwargs)
        hp = self.hp  # Avalanche's transforms (Tukey, shrinkage, normalisation), from the settings
        self.transforms = FeCAMClassifier(tukey=hp["tukey"] != 1.0, tukey1=hp["tukey"], shrink1=hp["shrink1"],
                                          shrink2=hp["shrink2"], covnorm=hp["covnorm"])

    def _tukey(self, features: torch.Tensor) -> torch.Tensor:
        clf = self.transforms
        with warnings.catch_warnings():  # Avalanche copies the tensor with torch.tensor(), which warns
            warnings.simplefilter("ignore", UserWarning)
            return clf.apply_transforms(features.clamp_min(0) if clf.tukey else features)

    def fit(self, features: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> None:
        clf = self.transforms
        f = self._tukey(features.double())
        means, covs = compute_means(f, labels), compute_covariance(f, labels)
        for c in classes:
            cov = covs[c]
            if self.hp["shrink1"] or self.hp["shrink2"]:
                cov = clf._shrink_cov(cov)
            if self.hp["covnorm"]:
                cov = clf._normalize_cov({c: cov})[c]
            self.precisions[c] = _inverse(cov).float()
            self.means[c] = F.normalize(means[c].float(), dim=0)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self._tukey(features).float(), dim=1)
        n = max(self.means) + 1
        out = torch.full((len(x), n), -torch.inf)
        for c, mu in self.means.items():
            diff = x - mu
            out[:, c] = -((diff @ self.precisions[c]) * diff).sum(1)
        return out

    def state_bytes(self) -> int:
        return self.nbytes(*self.means.values(), *self.precisions.values())
