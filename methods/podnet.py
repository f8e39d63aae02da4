"""PODNet (Douillard et al., "PODNet: Pooled Outputs Distillation for Small-Tasks Incremental
Learning", ECCV 2020): a cosine local-similarity classifier with several proxies per class, trained
with the NCA loss; the old model's stage outputs distilled by POD-spatial and its features by
POD-flat; a class-balanced fine-tuning after every later task.

Follows PyCIL's `models/podnet.py` (class PODNet: `_train`, `_run`, `after_task`; `pod_spatial_loss`,
`nca`) and its network `CosineIncrementalNet` with `nb_proxy` 10 (harness.cil.cosine_head):
- every task: NCA on the classifier's scores; from the second task on, plus
  factor x (lambda_f x POD-flat + lambda_c x POD-spatial), factor = sqrt(classes seen / new
  classes), lambda_f 1, lambda_c 5 (harness.cil.distill.pod_flat / pod_spatial); the earlier
  tasks' proxies are frozen;
- POD-spatial reads each stage's output (ResNet-32's three stages as PyCIL's `fmaps`; ConvNetBN's
  three stages here);
- after training a later task, fine-tuning on a class-balanced set (the old classes' exemplars and as
  many herded images of each new class) for `ft_epochs` at `ft_lr`, with the same loss, a fresh SGD
  and a cosine schedule; then herding of the exemplars with the fine-tuned network and a frozen copy
  as the next teacher;
- SGD momentum 0.9, weight decay 5e-4, a cosine schedule over each task's epochs.
Headline: the nearest mean of exemplars (PyCIL's file shows its NME results; the paper's CIFAR-100
figures PyCIL compares them with are NME); the classifier's accuracy (CNN) is recorded beside it.
The `cifar100` defaults are PyCIL's module constants (ResNet-32; 160 epochs per task, lr 0.1,
batch 128; fine-tuning 20 epochs at lr 0.005).

Departures:
- the NCA margin: PyCIL subtracts its margin (0.6) from every class's score, where it cancels, so
  `margin` defaults to 0, which computes PyCIL's loss; the authors' code subtracts it from the
  target's score alone: `podnet.margin=0.6`;
- with a total exemplar budget (not `memory_per_class`), the fine-tuning set holds the per-class
  quota of the classes seen after the task (PyCIL: the budget over the old classes); with a fixed
  number per class, as in the side-by-side benchmark, they are the same;
- PyCIL evaluates the test set after every epoch; the harness evaluates after each task.
"""
from __future__ import annotations

import copy
import math

import torch

from harness.cil.cosine_head import CosineNet
from harness.cil.distill import nca_loss, pod_flat, pod_spatial
from harness.cil.memory import to_float, to_uint8
from harness.method import CILMethod, materialise
from harness.nn.augment import batch_augment
from harness.nn.backbones import create_backbone
from harness.params import Param
from harness.registry import register_method
from methods.icarl import ICaRL, RECIPES as ICARL_RECIPES

# PyCIL's podnet.py optimiser: one weight decay, a cosine schedule for every task.
_PYCIL = {"lr": 0.1, "batch_size": 128, "init_weight_decay": -1.0, "weight_decay": 5e-4, "lr_schedule": "cosine"}
RECIPES = {
    **ICARL_RECIPES,
    # The fine-tuning's 20 of 160 epochs, in proportion to the recipe's 30 epochs per task.
    "quickdraw": {**ICARL_RECIPES["quickdraw"], **_PYCIL, "ft_epochs": 4},
    "fmnist": {**ICARL_RECIPES["fmnist"], **_PYCIL, "ft_epochs": 1},
    "cifar100": {**{k: v for k, v in ICARL_RECIPES["cifar100"].items() if "milestones" not in k}, **_PYCIL,
                 "init_epochs": 0, "epochs": 160, "ft_epochs": 20},
}
SPLITTABLE = ("convnet_bn", "resnet32")  # backbones that give their stages' maps (stage_maps)
_NOT_PODNET = ("loss", "bce", "temperature")  # iCaRL's distillation: PODNet's is POD


@register_method("podnet")
class PODNet(ICaRL):
    description = ("PODNet (Douillard et al., ECCV 2020): cosine classifier with proxies (LSC) and NCA, POD-spatial "
                   "and POD-flat distillation, class-balanced fine-tuning; headline: NME, the classifier (CNN) beside it")
    params = {
        **{k: p for k, p in ICaRL.params.items() if k not in _NOT_PODNET},
        "backbone": Param("convnet_bn", "feature extractor (its stages' outputs are distilled)", choices=SPLITTABLE),
        "classifier": Param("nme", "nme: nearest mean of exemplars (PyCIL's and the paper's CIFAR-100 figure); "
                                   "cnn: the local-similarity classifier", choices=("nme", "cnn")),
        "nb_proxy": Param(10, "proxies per class of the local-similarity classifier", low=1),
        "lambda_c": Param(5.0, "weight of POD-spatial", low=0.0),
        "lambda_f": Param(1.0, "weight of POD-flat", low=0.0),
        "margin": Param(0.0, "NCA margin on the target's score (0 computes PyCIL's loss; the authors' code: 0.6)",
                        low=0.0),
        "ft_epochs": Param(4, "epochs of the class-balanced fine-tuning after each later task", low=0),
        "ft_lr": Param(0.005, "learning rate of the fine-tuning", low=0.0),
    }
    protocol_defaults = {family: {k: v for k, v in recipe.items() if k not in _NOT_PODNET}
                         for family, recipe in RECIPES.items()}
    transient = (*ICaRL.transient, "maps", "features_now")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.maps = self.features_now = None

    @property
    def headline(self) -> str:
        return self.hp["classifier"]

    def build_model(self):
        p = self.context.protocol
        return CosineNet(create_backbone(self.hp["backbone"], p.channels, p.image_size), self.hp["nb_proxy"])

    def precompute_teacher_logits(self) -> None:
        pass  # the teacher's features and maps are needed, per augmented batch

    # ---- the loss -------------------------------------------------------------------
    def forward(self):
        if not self.is_training:
            return super().forward()
        logits, self.features_now, self.maps = self.model.forward_with_maps(self.mb_x)
        return logits

    def criterion(self):
        if not self.is_training:
            return CILMethod.criterion(self)
        loss = self._loss(self.mb_output, self.features_now, self.maps, self.mb_x, self.mb_y)
        self.features_now = self.maps = None
        return loss

    def _loss(self, logits, features, maps, x, y) -> torch.Tensor:
        loss = nca_loss(logits, y, self.hp["margin"])
        if self.old_model is None:
            return loss
        with torch.no_grad():
            _, old_features, old_maps = self.old_model.forward_with_maps(x)
        total = self.model.head.num_classes
        factor = math.sqrt(total / (total - self.old_model.head.num_classes))
        return loss + factor * (self.hp["lambda_f"] * pod_flat(features, old_features)
                                + self.hp["lambda_c"] * pod_spatial(maps, old_maps))

    # ---- class-balanced fine-tuning ----------------------------------------------------
    def _after_training_exp(self, **kwargs):
        if self.old_model is not None and self.hp["ft_epochs"] > 0:
            self._finetune()
        super()._after_training_exp(**kwargs)

    def _finetune(self) -> None:
        balanced = copy.deepcopy(self.memory)  # the old classes' exemplars + as many herded new ones
        images, labels = materialise(self.experience.dataset.eval(), self.eval_mb_size)
        images = to_uint8(images)
        balanced.update(images, labels, self.experience.classes_in_this_experience, self.context.seed,
                        features=self._features(images))
        x, y = balanced.tensors()
        hp, augment = self.hp, self.augmentation()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=hp["ft_lr"], momentum=hp["momentum"],
                                    weight_decay=hp["weight_decay"])
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp["ft_epochs"])
        self.model.train()
        for _ in range(hp["ft_epochs"]):
            for idx in torch.randperm(len(y)).split(hp["batch_size"]):
                xb = to_float(x[idx])
                xb = (xb if augment == "none" else batch_augment(xb, augment, hp.get("crop_padding", 4))).to(self.device)
                yb = y[idx].to(self.device)
                logits, features, maps = self.model.forward_with_maps(xb)
                loss = self._loss(logits, features, maps, xb, yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()
        self.model.eval()
