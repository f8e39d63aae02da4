"""LwM: Learning without Memorizing (Dhar, Singh, Peng, Wu, Chellappa; CVPR 2019).

Loss on a new task = CE on the new classes + beta * KD (T=2) of the previous model's
logits on the old classes + gamma * L_AD, the attention distillation: the Grad-CAM
maps of the previous model's top old class at the last convolutional block, computed
for the previous and the current model on the same input, vectorised, L2-normalised,
L1 distance. The current model's map is built with create_graph=True so L_AD trains it.

Exemplar-free by default. `memory=N` keeps N class-balanced *random* exemplars (a
simple memory of our own, not iCaRL's herding) replayed with the new data; CE then
covers all seen classes, since the replayed samples carry old labels.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from avalanche.benchmarks.utils import _make_taskaware_classification_dataset
from torch import nn

from harness.data import ImageTensorDataset
from harness.distill import frozen_copy, softmax_kd
from harness.gradcam import FeatureMapHook, attention_distance, cam_from, grad_cam, last_conv_block
from harness.method import TRAINING_PARAMS, CILMethod
from harness.params import Param
from harness.recipes import SUPERVISED_RECIPES
from harness.registry import register_method


class RandomMemory:
    """Class-balanced random exemplars within a total budget, kept as uint8 images."""

    def __init__(self, budget: int, seed: int):
        self.budget, self.seed = budget, seed
        self.per_class: dict[int, torch.Tensor] = {}

    def update(self, dataset, classes: list[int]) -> None:
        m = self.budget // (len(self.per_class) + len(classes))
        # Shrinking keeps a prefix of a random pick, so it stays a random pick.
        self.per_class = {c: x[:m] for c, x in self.per_class.items()}
        targets = torch.as_tensor(list(dataset.targets))
        g = torch.Generator().manual_seed(self.seed * 100_003 + len(self.per_class))
        for c in classes:
            idx = (targets == c).nonzero().flatten()
            pick = idx[torch.randperm(len(idx), generator=g)[:m]].tolist()
            if pick:
                imgs = torch.stack([dataset[i][0] for i in pick])
                self.per_class[c] = imgs.mul(255).round().clamp(0, 255).to(torch.uint8)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs = list(self.per_class.values())
        ys = [torch.full((len(x),), c, dtype=torch.long) for c, x in self.per_class.items()]
        return (torch.cat(xs), torch.cat(ys)) if xs else (torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long))

    def load(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.per_class = {int(c): x[y == c] for c in y.unique()}

    def dataset(self):
        x, y = self.tensors()
        return _make_taskaware_classification_dataset(ImageTensorDataset(x, y), task_labels=0)


@register_method("lwm")
class LwM(CILMethod):
    description = "Learning without Memorizing: KD + Grad-CAM attention distillation, exemplar-free (Dhar et al. 2019)"
    params = {
        **TRAINING_PARAMS,
        "beta": Param(1.0, "weight of the logit distillation", low=0.0),
        "gamma": Param(1.0, "weight of the attention distillation L_AD", low=0.0),
        "temperature": Param(2.0, "distillation temperature", low=1e-3),
        "memory": Param(0, "exemplars kept in total (class-balanced, random); 0 = exemplar-free", low=0),
    }
    # The finetune recipe unchanged: LwM changes the loss only, so tables compare at equal epochs.
    protocol_defaults = SUPERVISED_RECIPES

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.old_model: nn.Module | None = None
        self.n_old = 0  # classes seen before the current task (labels 0..n_old-1)
        self.memory = RandomMemory(self.hp["memory"], self.context.seed)
        self._layer_name: str | None = None  # Grad-CAM layer, found on the first batch
        self._fmap: torch.Tensor | None = None

    # ---- training ----------------------------------------------------------------------
    def learn(self, experience) -> None:
        self.train(experience)
        self.n_old = max(self.n_old, max(experience.classes_in_this_experience) + 1)
        self.old_model = frozen_copy(self.model)
        if self.hp["memory"] > 0:
            self.memory.update(experience.dataset.eval(), list(experience.classes_in_this_experience))

    def train_dataset_adaptation(self, **kwargs):
        super().train_dataset_adaptation(**kwargs)
        if self.memory.per_class:
            self.adapted_dataset = self.adapted_dataset.concat(self.memory.dataset())

    def _cam_layer(self, model: nn.Module) -> nn.Module:
        if self._layer_name is None:
            layer = last_conv_block(model, self.mb_x)
            self._layer_name = next(n for n, m in model.named_modules() if m is layer)
        return model.get_submodule(self._layer_name)

    def forward(self):
        if self.old_model is None or not self.is_training:
            return super().forward()
        # Keep the current model's feature map: its Grad-CAM is built from this forward.
        with FeatureMapHook(self._cam_layer(self.model)) as hook:
            out = self.model(self.mb_x)
        self._fmap = hook.output
        return out

    def criterion(self):
        logits, y, n = self.mb_output, self.mb_y, self.n_old
        if self.old_model is None:
            return F.cross_entropy(logits, y)
        # Exemplar-free: CE over the new classes' logits only, so it does not push the
        # old classes' logits down; the distillation terms take care of them.
        ce = F.cross_entropy(logits, y) if self.memory.per_class else F.cross_entropy(logits[:, n:], y - n)
        # Old model: its logits (head of n outputs) and the Grad-CAM of its top old class.
        old_cams, old_logits = grad_cam(self.old_model, self.mb_x, None, self._cam_layer(self.old_model))
        top = old_logits.argmax(1)
        cams = cam_from(self._fmap, logits.gather(1, top[:, None]).squeeze(1), create_graph=True)
        kd = softmax_kd(logits, old_logits.detach(), self.hp["temperature"])
        ad = attention_distance(cams, old_cams.detach())
        return ce + self.hp["beta"] * kd + self.hp["gamma"] * ad

    # ---- harness contract -----------------------------------------------------------
    def memory_usage(self) -> tuple[int, int]:
        x, _ = self.memory.tensors()
        return len(x), x.numel() * x.element_size()

    def extra_state(self) -> dict[str, Any]:
        x, y = self.memory.tensors()
        old = self.old_model.state_dict() if self.old_model is not None else {}
        return {"n_old": self.n_old, "old_model": old, "memory_x": x, "memory_y": y}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.n_old = int(state["n_old"])
        self.memory.load(state["memory_x"], state["memory_y"])
        if state["old_model"]:
            # The head must have n_old outputs before the old weights fit into it.
            old = copy.deepcopy(self.model)
            head = old.head
            head.classifier = nn.Linear(head.classifier.in_features, self.n_old)
            head.active_units = torch.zeros(self.n_old, dtype=torch.int8)
            old.load_state_dict(state["old_model"])
            self.old_model = frozen_copy(old)
