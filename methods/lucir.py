"""LUCIR (Hou et al., "Learning a Unified Classifier Incrementally via Rebalancing", CVPR 2019): a
cosine-normalised classifier, the less-forget constraint on the features with its adaptive weight,
the margin ranking loss on the old classes' samples, and a class-balanced fine-tuning of the classifier.

Follows FACIL's `src/approach/lucir.py` (class Appr: `pre_train_process`, `_get_optimizer`,
`criterion`, `post_train_process`; `CosineLinear`, `BasicBlockNoRelu`):
- the network's last ReLU is removed, so the features take either sign (harness.nn.backbones.
  drop_last_relu; FACIL's BasicBlockNoRelu);
- a cosine classifier, one block of weights per task, one learned scale sigma shared by all, the
  blocks of earlier tasks frozen (harness.cil.cosine_head.CosineHead with one proxy per class);
- the first task: cross-entropy on sigma x cosine;
- every later task, on the new data + the exemplars: cross-entropy + lambda x (1 - cos(features,
  old model's features)) (harness.cil.distill.feature_cosine_distance), lambda = lambda_base x
  sqrt(old classes / new classes) (eq. 7; lambda_base 5, the paper's and FACIL's for CIFAR-100)
  + lambda_mr x the margin ranking loss: each old-class sample's own cosine above its K = 2
  highest new-class cosines by 0.5 (harness.cil.distill.margin_ranking; eq. 8);
- after training, herding of 20 exemplars per class (the paper's choice, FACIL's
  `--exemplar-selection herding`), then the class-balanced fine-tuning of the authors' ImageNet script
  (`cbf_class_incremental_cosine_imagenet.py`, `--cb_finetune`, `ft_flag` 2): on the exemplars of
  every class seen, the feature extractor and sigma fixed (BN statistics too), the old and new
  classes' weights trained by the same loss for `ft_epochs` at `ft_lr`, the lr divided by 10 halfway;
- SGD momentum 0.9, weight decay 5e-4, a fresh optimiser every task.
Headline: the classifier (CNN), the paper's main figure and FACIL's; the nearest mean of exemplars
(NME, the paper's second) is recorded beside it after every task.
On QuickDraw: the recipe's backbone, augmentation, 30 epochs and cosine schedule, FACIL's weight decay,
lr 0.05 and 4 epochs of fine-tuning (chosen on quickdraw40_4x10 against lr 0.1 and no fine-tuning).
The `cifar100` defaults: ResNet-32, lr 0.1, batch 128, weight decay 5e-4 (FACIL's), 160 epochs with the
lr divided by 10 at 80 and 120 (the authors' CIFAR-100 script), no fine-tuning (neither FACIL nor the
authors' CIFAR-100 script fine-tunes).

Departures:
- FACIL's schedule divides the lr by 10 when the loss on a 10% validation split held out from the
  training data has not improved for 8 epochs and restores the best model by that loss; the harness
  trains on all the training data with the recipe's schedule (cosine on QuickDraw; the authors'
  multistep on CIFAR-100);
- the authors' CIFAR-100 script initialises the new classes' weights from their normalised feature
  means ("imprint weights"); FACIL leaves it out ("doesn't seem to make a significant difference"),
  and so does this file;
- with a total exemplar budget (the reference rows' 2,000), the quota per class shrinks as classes
  arrive (iCaRL's memory); `lucir.memory_per_class=20` gives FACIL's fixed 20 per class.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harness.cil.cosine_head import CosineNet
from harness.cil.distill import feature_cosine_distance, margin_ranking
from harness.cil.memory import to_float
from harness.method import CILMethod
from harness.nn.augment import batch_augment
from harness.nn.backbones import create_backbone, drop_last_relu
from harness.params import Param
from harness.registry import register_method
from methods.icarl import ICaRL, RECIPES as ICARL_RECIPES

# FACIL's lucir.py optimiser: one weight decay for every task.
_FACIL = {"lr": 0.1, "batch_size": 128, "init_weight_decay": -1.0, "weight_decay": 5e-4}
RECIPES = {
    **ICARL_RECIPES,
    # lr and fine-tuning chosen on quickdraw40_4x10 (experiments/quickdraw40_4x10_lucir.toml)
    "quickdraw": {**ICARL_RECIPES["quickdraw"], **_FACIL, "lr": 0.05, "ft_epochs": 4},
    "fmnist": {**ICARL_RECIPES["fmnist"], **_FACIL, "ft_epochs": 1},
    "cifar100": {"backbone": "resnet32", **_FACIL, "init_epochs": 0, "epochs": 160, "lr_schedule": "multistep",
                 "init_milestones": "", "milestones": "80,120", "ft_epochs": 0},
}
BACKBONES_WITHOUT_LAST_RELU = ("convnet_bn", "resnet32")  # harness.nn.backbones.drop_last_relu
_NOT_LUCIR = ("loss", "bce", "temperature")  # iCaRL's distillation: LUCIR's is the less-forget constraint


@register_method("lucir")
class LUCIR(ICaRL):
    description = ("LUCIR (Hou et al., CVPR 2019): cosine classifier, less-forget constraint with adaptive weight, "
                   "margin ranking, class-balanced fine-tuning; headline: the classifier (CNN), NME beside it")
    params = {
        **{k: p for k, p in ICaRL.params.items() if k not in _NOT_LUCIR},
        "backbone": Param("convnet_bn", "feature extractor (its last ReLU is removed)",
                          choices=BACKBONES_WITHOUT_LAST_RELU),
        "classifier": Param("cnn", "cnn: the cosine classifier (the paper's headline and FACIL's); nme: nearest "
                                   "mean of exemplars (the paper's second figure)", choices=("cnn", "nme")),
        "lambda_base": Param(5.0, "weight of the less-forget constraint, times sqrt(old / new classes)", low=0.0),
        "lambda_mr": Param(1.0, "weight of the margin ranking loss", low=0.0),
        "mr_margin": Param(0.5, "margin ranking: the gap asked between the true and the new classes' cosines",
                           low=0.0),
        "mr_k": Param(2, "margin ranking: hardest new classes per old-class sample", low=1),
        "ft_epochs": Param(0, "epochs of the class-balanced fine-tuning of the classifier after each later "
                              "task (0: none, as FACIL)", low=0),
        "ft_lr": Param(0.01, "learning rate of the fine-tuning (the authors' 0.01)", low=0.0),
    }
    protocol_defaults = {family: {k: v for k, v in recipe.items() if k not in _NOT_LUCIR}
                         for family, recipe in RECIPES.items()}
    transient = (*ICaRL.transient, "features_now")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.features_now = None

    @property
    def headline(self) -> str:
        return self.hp["classifier"]

    def build_model(self):
        p = self.context.protocol
        return CosineNet(drop_last_relu(create_backbone(self.hp["backbone"], p.channels, p.image_size)))

    def precompute_teacher_logits(self) -> None:
        pass  # the teacher's features are needed, per augmented batch

    # ---- the loss -------------------------------------------------------------------
    def forward(self):
        if not self.is_training:
            return super().forward()
        self.features_now = self.model.features(self.mb_x)
        return self.model.head(self.features_now)

    def criterion(self):
        if not self.is_training:
            return CILMethod.criterion(self)
        loss = self._loss(self.mb_output, self.features_now, self.mb_x, self.mb_y)
        self.features_now = None
        return loss

    def _loss(self, logits, features, x, y) -> torch.Tensor:
        loss = F.cross_entropy(logits, y)
        if self.old_model is None:
            return loss
        n_old, total = self.old_model.head.num_classes, self.model.head.num_classes
        with torch.no_grad():
            old_features = self.old_model.features(x)
        lamda = self.hp["lambda_base"] * math.sqrt(n_old / (total - n_old))
        cosines = logits / self.model.head.sigma  # the scores before the scale, as FACIL's 'wosigma'
        return (loss + lamda * feature_cosine_distance(features, old_features)
                + self.hp["lambda_mr"] * margin_ranking(cosines, y, n_old, self.hp["mr_k"], self.hp["mr_margin"]))

    # ---- class-balanced fine-tuning ----------------------------------------------------
    def _update_memory(self, experience) -> None:
        super()._update_memory(experience)  # herding: the exemplars of every class seen, the new included
        if self.old_model is not None and self.hp["ft_epochs"] > 0:
            self._balanced_finetune()

    def _balanced_finetune(self) -> None:
        """The classifier's weights (all blocks) trained on the exemplars, the extractor and sigma fixed."""
        hp, augment, head = self.hp, self.augmentation(), self.model.head
        x, y = self.memory.tensors()
        trainable = [b.requires_grad for b in head.blocks]
        head.blocks.requires_grad_(True)
        head.sigma.requires_grad_(False)
        optimizer = torch.optim.SGD(head.blocks.parameters(), lr=hp["ft_lr"], momentum=hp["momentum"],
                                    weight_decay=hp["weight_decay"])
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [max(1, hp["ft_epochs"] // 2)], 0.1)
        self.model.eval()  # BN statistics fixed as well
        for _ in range(hp["ft_epochs"]):
            for idx in torch.randperm(len(y)).split(hp["batch_size"]):
                xb = to_float(x[idx])
                xb = (xb if augment == "none" else batch_augment(xb, augment, hp.get("crop_padding", 4))).to(self.device)
                with torch.no_grad():
                    features = self.model.features(xb)
                loss = self._loss(head(features), features, xb, y[idx].to(self.device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()
        for block, flag in zip(head.blocks, trainable):
            block.requires_grad_(flag)
        head.sigma.requires_grad_(True)
