"""FOSTER (Wang et al., "FOSTER: Feature Boosting and Compression for Class-Incremental Learning",
ECCV 2022): each later task trains a new extractor beside the frozen old one (boosting), then
distils the pair into a single extractor (compression), which the next task starts from.

Follows PyCIL's `models/foster.py` (class FOSTER: `incremental_train`, `_train`, `_init_train`,
`_feature_boosting`, `_feature_compression`, `BKD`) with `exps/foster.json`'s settings, and its
network `FOSTERNet` (harness.cil.boosting.BoostedNet):
- the first task: cross-entropy of one extractor and its classifier;
- boosting, every later task, on the new data + the exemplars: a copy of the extractor is added and
  trained, the old one and its classifier frozen (batch-norm statistics too); loss = CE of the
  classifier over both extractors' features, its logits divided by class-balanced weights (the
  effective number of each class's training samples, beta1 0.96; harness.cil.boosting.
  effective_number_weights) + CE of the new extractor's own classifier + lambda_okd (1) x KD of the
  old classes' logits from the old classifier at T 2 (no T^2 factor; harness.cil.distill.softmax_kd);
  every row of the classifier trains (PyCIL's `oofc` "ft");
- compression, the same task: a student (the old extractor and the old classifier's rows, new rows
  as PyCIL's SimpleLinear) learns from the boosted pair in eval mode by balanced KD (harness.cil.
  distill.balanced_kd: the teacher's softened probabilities weighted by beta2 0.97's effective-number
  weights), on the same data, for `compression_epochs`, SGD with no weight decay, a cosine schedule;
  the student replaces the pair when the next task begins;
- herding of the exemplars on the boosted pair's features (PyCIL's `build_rehearsal_memory` runs on
  `self._network`, the pair); no weight aligning (foster.json's `is_teacher_wa`, `is_student_wa`
  false);
- SGD momentum 0.9, weight decay 5e-4, a cosine schedule over each stage's epochs.
Evaluation: PyCIL's `eval_task` after a task scores `self._network`, the boosted pair (its student is
only logged, as "darknet eval"); so does this file by default (`foster.evaluate=teacher`), and
`foster.evaluate=student` scores the compressed network that the next task continues from. Headline:
the classifier (CNN, PyCIL's and the paper's); NME beside it. The `cifar100` defaults are
exps/foster.json's (ResNet-32; 200 epochs on the first task, 170 of boosting and 130 of compression
after; lr 0.1, batch 128, weight decay 5e-4).

Departures:
- the class-balanced weights count each class's samples in the training data of the task (the new
  classes' images, the old classes' exemplars); PyCIL counts the old classes at their nominal quota
  (`memory_per_class`, or the total budget over the old classes), which is the same with a fixed
  number per class and more than a class holds when the quota exceeds its training images;
- PyCIL evaluates the test set every 5 epochs of every stage; the harness evaluates after each task.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.cil.boosting import BoostedNet, effective_number_weights
from harness.cil.distill import balanced_kd, softmax_kd
from harness.cil.memory import to_float, to_uint8
from harness.method import CILMethod, materialise
from harness.nn.augment import batch_augment
from harness.nn.backbones import create_backbone
from harness.params import Param
from harness.registry import register_method
from methods.icarl import ICaRL, RECIPES as ICARL_RECIPES

# exps/foster.json's optimiser: one weight decay, a cosine schedule for every stage.
_PYCIL = {"lr": 0.1, "batch_size": 128, "init_weight_decay": 5e-4, "weight_decay": 5e-4, "lr_schedule": "cosine"}
RECIPES = {
    **ICARL_RECIPES,
    # Compression's 130 of 170 boosting epochs, in proportion to the recipe's 30 epochs per task.
    "quickdraw": {**ICARL_RECIPES["quickdraw"], **_PYCIL, "compression_epochs": 23},
    "fmnist": {**ICARL_RECIPES["fmnist"], **_PYCIL, "compression_epochs": 8},
    "cifar100": {**{k: v for k, v in ICARL_RECIPES["cifar100"].items() if "milestones" not in k}, **_PYCIL,
                 "init_epochs": 200, "epochs": 170, "compression_epochs": 130},
}
_NOT_FOSTER = ("loss", "bce")  # iCaRL's choice of loss: FOSTER has its own


@register_method("foster")
class FOSTER(ICaRL):
    description = ("FOSTER (Wang et al., ECCV 2022): a new extractor boosted beside the frozen old one, then both "
                   "compressed into one by balanced KD; headline: the head (CNN) of the boosted pair, NME beside it")
    params = {
        **{k: p for k, p in ICaRL.params.items() if k not in _NOT_FOSTER},
        "classifier": Param("cnn", "cnn: the classifier (PyCIL's and the paper's headline); nme: nearest mean "
                                   "of exemplars (PyCIL's second figure)", choices=("cnn", "nme")),
        "evaluate": Param("teacher", "teacher: the boosted pair after each task (what PyCIL's eval_task scores); "
                                     "student: the compressed network the next task starts from",
                          choices=("teacher", "student")),
        "beta1": Param(0.96, "effective-number beta of the boosting stage's logit weights", low=0.0, high=0.9999),
        "beta2": Param(0.97, "effective-number beta of the compression's balanced KD", low=0.0, high=0.9999),
        "lambda_okd": Param(1.0, "weight of the old classes' KD while boosting", low=0.0),
        "compression_epochs": Param(23, "epochs of the compression after each later task", low=0),
    }
    protocol_defaults = {family: {k: v for k, v in recipe.items() if k not in _NOT_FOSTER}
                         for family, recipe in RECIPES.items()}
    transient = (*ICaRL.transient, "fe_logits", "old_logits")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fe_logits = self.old_logits = None
        self.boost_weights = self.compress_weights = None

    @property
    def headline(self) -> str:
        return self.hp["classifier"]

    def build_model(self):
        p = self.context.protocol
        net = BoostedNet(lambda: create_backbone(self.hp["backbone"], p.channels, p.image_size))
        net.evaluate_student = self.hp["evaluate"] == "student"
        return net

    def head_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.classify(features)

    def precompute_teacher_logits(self) -> None:
        pass  # the old classifier's logits come from the same forward pass

    def learn(self, experience) -> None:
        known = self.model.known_classes
        if known:  # each class's samples in this task's training data: new images and exemplars
            _, labels = self.memory.tensors()
            counts = torch.bincount(torch.cat([labels, torch.as_tensor(list(experience.dataset.targets))]),
                                    minlength=max(experience.classes_in_this_experience) + 1)
            self.boost_weights = effective_number_weights(counts, self.hp["beta1"]).to(self.device)
            self.compress_weights = effective_number_weights(counts, self.hp["beta2"]).to(self.device)
        super().learn(experience)
        self.old_model = None  # the old extractor lives in the network; no separate teacher

    # ---- boosting -------------------------------------------------------------------
    def forward(self):
        if not self.is_training or not self.model.boosting:
            return super().forward()
        logits, self.fe_logits, self.old_logits = self.model.boosted(self.mb_x)
        return logits

    def criterion(self):
        if not self.is_training:
            return CILMethod.criterion(self)
        if not self.model.boosting:
            return F.cross_entropy(self.mb_output, self.mb_y)
        known = self.old_logits.shape[1]
        loss = (F.cross_entropy(self.mb_output / self.boost_weights, self.mb_y)
                + F.cross_entropy(self.fe_logits, self.mb_y)
                + self.hp["lambda_okd"] * softmax_kd(self.mb_output[:, :known], self.old_logits.detach(),
                                                     self.hp["temperature"], t_squared=False))
        self.fe_logits = self.old_logits = None
        return loss

    # ---- compression ----------------------------------------------------------------
    def _after_training_exp(self, **kwargs):
        if self.model.boosting and self.hp["compression_epochs"] > 0:
            self._compress()
        super()._after_training_exp(**kwargs)

    def _compress(self) -> None:
        """The student learns the boosted pair's balanced, softened outputs on the task's data."""
        images, labels = materialise(self.experience.dataset.eval(), self.eval_mb_size)
        old_x, old_y = self.memory.tensors()
        x, y = torch.cat([to_uint8(images), old_x]), torch.cat([labels, old_y])
        hp, augment, net = self.hp, self.augmentation(), self.model
        student = net.student
        optimizer = torch.optim.SGD(student.parameters(), lr=hp["lr"], momentum=hp["momentum"])
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp["compression_epochs"])
        net.eval()
        for _ in range(hp["compression_epochs"]):
            student.train()
            for idx in torch.randperm(len(y)).split(hp["batch_size"]):
                xb = to_float(x[idx])
                xb = (xb if augment == "none" else batch_augment(xb, augment, hp.get("crop_padding", 4))).to(self.device)
                with torch.no_grad():
                    teacher = net.boosted(xb)[0]
                loss = balanced_kd(student(xb), teacher, self.compress_weights, hp["temperature"])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()
        student.eval()
