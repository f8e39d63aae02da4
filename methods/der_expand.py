"""DER, Dynamically Expandable Representation (Yan et al., "DER: Dynamically Expandable
Representation for Class Incremental Learning", CVPR 2021): a new feature extractor per task,
the old ones frozen, one classifier over all their features, an auxiliary classifier on the new
one. Registered as `der_expand`: Avalanche's `der` is Dark Experience Replay (Buzzega et al. 2020).

Follows PyCIL's `models/der.py` (class DER: `incremental_train`, `_init_train`,
`_update_representation`, `train`) and its network `DERNet` (harness.cil.expandable):
- the first task: cross-entropy of the classifier;
- every later task, on the new data + the exemplars, with a copy of the newest extractor added
  and trained, the older ones frozen and in eval mode: CE of the classifier over every class seen
  + CE of the auxiliary classifier (the new classes and one output for all old ones), summed;
- after training a later task, weight aligning of the new classes' rows (harness.cil.weight_aligning,
  PyCIL's `DERNet.weight_align`), then herding of the exemplars on the concatenated features;
- prediction by the classifier (PyCIL's "CNN", the paper's figure); NME is recorded beside it.
As PyCIL's, it has no channel masking or pruning (PyCIL's file says so: the authors' code does not
ship them), so the network grows by one extractor per task and the Memory column shows it.
Optimiser and exemplars as iCaRL's (methods/icarl.py): SGD momentum 0.9, a fresh optimiser each
task, 2,000 class-balanced exemplars. The `cifar100` defaults are PyCIL's module constants
(ResNet-32; 200 epochs, milestones 60/120/170, weight decay 5e-4 on the first task; 170 epochs,
milestones 80/120/150, weight decay 2e-4 after; lr 0.1, batch 128).

Departure, for the harness's contract: PyCIL evaluates the test set every 5 epochs while
training; the harness evaluates after each task.
"""
from __future__ import annotations

import torch.nn.functional as F

from harness.cil.expandable import ExpandableNet, aux_targets
from harness.cil.weight_aligning import align_new_class_weights
from harness.method import CILMethod
from harness.nn.backbones import create_backbone
from harness.params import Param
from harness.registry import register_method
from methods.icarl import ICaRL, RECIPES as ICARL_RECIPES

RECIPES = {
    **ICARL_RECIPES,
    # PyCIL's der.py schedule for ResNet-32 (its later tasks' milestones differ from iCaRL's).
    "cifar100": {**ICARL_RECIPES["cifar100"], "milestones": "80,120,150"},
}
_NOT_DER = ("loss", "bce", "temperature")  # iCaRL's distillation: DER distils nothing


@register_method("der_expand")
class DERExpand(ICaRL):
    description = ("DER (Yan et al., CVPR 2021), Dynamically Expandable Representation: a new feature extractor per "
                   "task, the old ones frozen, an auxiliary classifier; headline: the head (CNN), NME beside it")
    params = {
        **{k: p for k, p in ICaRL.params.items() if k not in _NOT_DER},
        "classifier": Param("cnn", "cnn: the classifier over every extractor (the paper's and PyCIL's headline); "
                                   "nme: nearest mean of exemplars (PyCIL's second figure)", choices=("cnn", "nme")),
        "aux_weight": Param(1.0, "weight of the auxiliary classifier's loss (PyCIL: 1)", low=0.0),
    }
    protocol_defaults = {family: {k: v for k, v in recipe.items() if k not in _NOT_DER}
                         for family, recipe in RECIPES.items()}
    transient = (*ICaRL.transient, "aux_logits")

    @property
    def headline(self) -> str:
        return self.hp["classifier"]

    def build_model(self):
        p = self.context.protocol
        return ExpandableNet(lambda: create_backbone(self.hp["backbone"], p.channels, p.image_size))

    def learn(self, experience) -> None:
        super().learn(experience)
        self.old_model = None  # DER distils nothing: no teacher to keep

    def forward(self):
        if not self.is_training:
            return super().forward()
        logits, self.aux_logits = self.model.forward_with_aux(self.mb_x)
        return logits

    def criterion(self):
        if not self.is_training:
            return CILMethod.criterion(self)
        loss = F.cross_entropy(self.mb_output, self.mb_y)
        known = self.model.known_classes - self.model.task_sizes[-1]
        if known > 0:  # the first task trains the classifier alone (PyCIL's _init_train)
            loss = loss + self.hp["aux_weight"] * F.cross_entropy(self.aux_logits, aux_targets(self.mb_y, known))
        self.aux_logits = None
        return loss

    def _after_training_exp(self, **kwargs):
        if len(self.model.task_sizes) > 1:  # before herding, as PyCIL's _train does it
            align_new_class_weights(self.model.head, self.model.task_sizes[-1])
        super()._after_training_exp(**kwargs)

