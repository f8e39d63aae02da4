"""Classifiers on a frozen encoder's features: the yardstick of methods built on a pretrained model.

`FrozenFeatureMethod` is a `CILMethod` whose model is an encoder (harness.nn.frozen_encoder)
with a growing head. Each task it computes the features of the task's training images once,
in eval mode and unaugmented, and hands them to `fit(features, labels, classes)`; to predict
it scores the features of the test images with `scores(features)`. A subclass writes those
two and `state_bytes()`; nothing is trained, no exemplar is kept.

Features of the pretrained encoder live in the process-wide feature cache
(harness.nn.feature_cache): with `encoder=gmm` it is GMM's own cache, so a sweep encodes each
image once for GMM and for every frozen-feature method and seed.

First-session adaptation (`first_session=train`): on the first task only, the encoder and a
linear head train end to end with the method's training settings (the protocol's supervised
recipe, or `setting_defaults` for a pretrained encoder), then the encoder freezes for good:
RanPAC's and APER's first stage, and with `encoder=backbone` the few-shot baseline "base
training + prototypes" from scratch. Its features are then the run's own (a private cache).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from harness.errors import HarnessError
from harness.method import TRAINING_PARAMS, CILMethod, materialise
from harness.nn.backbones import IncrementalNet, resize_incremental_head
from harness.nn.feature_cache import FeatureCache, feature_cache
from harness.nn.frozen_encoder import PooledTokens, build_encoder
from harness.params import Param
from harness.cil.recipes import SUPERVISED_RECIPES

FROZEN_PARAMS: dict[str, Param] = {
    **TRAINING_PARAMS,
    "encoder": Param("gmm", "frozen feature extractor: gmm (GMM's own image encoder on this protocol, tokens "
                     "mean-pooled), backbone (the `backbone` setting, random weights: needs first_session=train), "
                     "timm:<model> or hf:<CLIP/SigLIP hub name or folder>"),
    "encoder_weights": Param("", "timm encoders: a local weights file (.safetensors or torch), or hub to download"),
    "first_session": Param("none", "train the encoder and a linear head on the first task only, then freeze it "
                           "(epochs, lr, ... are that training's settings)", choices=("none", "train")),
}

# Fine-tuning the pretrained EfficientNet on the first task: a gentler lr than the from-scratch
# recipe (whose lr 0.1 would wipe out the ImageNet features) and fewer epochs.
PRETRAINED_ADAPTATION = {"encoder=gmm": {"lr": 0.01, "epochs": 5}}


class FrozenFeatureMethod(CILMethod):
    params = FROZEN_PARAMS
    protocol_defaults = SUPERVISED_RECIPES  # the recipe of first_session=train with encoder=backbone
    setting_defaults = PRETRAINED_ADAPTATION
    transient = ("cache", "encode_tokens")

    def __init__(self, **kwargs):
        self.adapted = False  # the encoder trained on the first task (first_session=train)
        super().__init__(**kwargs)
        if self.hp["encoder"] == "backbone" and self.hp["first_session"] == "none":
            raise HarnessError(f"{self.name}: encoder=backbone has random weights; use first_session=train "
                               "(base training) or a pretrained encoder")
        self.model.to(self.device)  # without first-session training Avalanche never moves it
        self.cache, self.encode_tokens = self._shared_cache()

    # ---- the model: encoder + a head used only by first-session training ----------------
    def build_model(self) -> nn.Module:
        p, hp = self.context.protocol, self.hp
        encoder = build_encoder(hp["encoder"], p, hp["encoder_weights"], hp["backbone"])
        self.encoder_id = encoder.id
        model = IncrementalNet(encoder)
        model.requires_grad_(hp["first_session"] == "train")
        return model.eval()

    def _shared_cache(self):
        """The process-wide cache of the pretrained encoder (None once the encoder is the run's own).
        For encoder=gmm it holds GMM's tokens, pooled here."""
        if self.hp["first_session"] == "train":  # the encoder becomes the run's own
            return None, False
        backbone = self.model.backbone
        if isinstance(backbone, PooledTokens):
            return feature_cache(backbone.token_encoder.id, False), True
        return feature_cache(backbone.id, False), False

    @torch.no_grad()
    def _encode(self, x: torch.Tensor, tokens: bool) -> torch.Tensor:
        backbone = self.model.backbone.eval()
        x = x.to(self.device)
        return (backbone.token_encoder(x) if tokens else backbone(x)).float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) float32 features of images in [0, 1]."""
        if self.cache is None:  # the run's adapted encoder: a cache of its own
            self.cache, self.encode_tokens = FeatureCache(), False
        f = self.cache.get(x, lambda b: self._encode(b, self.encode_tokens))
        return PooledTokens.pool(f) if self.encode_tokens else f.float()

    def dataset_features(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = materialise(dataset.eval())
        return torch.cat([self.features(b) for b in x.split(256)]), y

    # ---- the harness's contract ----------------------------------------------------------
    def learn(self, experience) -> None:
        if self.hp["first_session"] == "train" and not self.adapted:
            self.model.train()
            self.train(experience)
            self.model.requires_grad_(False).eval()
            self.adapted = True
        feats, labels = self.dataset_features(experience.dataset)
        self.fit(feats, labels, [int(c) for c in experience.classes_in_this_experience])

    @torch.no_grad()
    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(self.features(x))

    def fit(self, features: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> None:
        raise NotImplementedError

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Bytes of what the classifier keeps (prototypes, covariances, Gram matrix...)."""
        raise NotImplementedError

    def memory_usage(self) -> tuple[int, int]:
        return 0, self.state_bytes()  # no exemplar; the statistics' bytes

    def run_info(self) -> dict[str, Any]:
        return {"encoder": self.encoder_id}

    # ---- checkpoints: the encoder only once it is the run's own -----------------------------
    def model_state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict() if self.adapted else {}

    def restore_model(self, state: dict[str, Any], past_experiences: list) -> None:
        weights = state["model"]
        if weights:
            resize_incremental_head(self.model.head, weights["head.classifier.weight"].shape[0])
            self.model.load_state_dict(weights)
        self.model.to(self.device).requires_grad_(False).eval()

    def on_resume(self, past_experiences: list) -> None:
        self.cache, self.encode_tokens = self._shared_cache()

    def trainable_parameters(self) -> int:
        # The classifier is closed-form: only first-session training trains weights.
        return sum(p.numel() for p in self.model.parameters()) if self.hp["first_session"] == "train" else 0

    @staticmethod
    def nbytes(*tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
