"""WA (Zhao et al., "Maintaining Discrimination and Fairness in Class Incremental Learning",
CVPR 2020): iCaRL's rehearsal and distillation with the head as classifier, its new classes'
weights aligned to the old ones' norm after every task.

Follows PyCIL's `models/wa.py` (class WA: `_train`, `_update_representation`, `after_task`):
- the first task: softmax cross-entropy;
- every later task, on the new data + the exemplars: (1 - λ) CE + λ KD, λ = old classes /
  classes seen, KD the old classes' outputs distilled at T = 2 with no T² factor (PyCIL's
  `_KD_loss`, the cross-entropy form of harness.cil.distill.softmax_kd: same gradients);
- after training each later task, weight aligning (harness.cil.weight_aligning, PyCIL's
  `weight_align`), then herding of the exemplars and a frozen copy as the next teacher;
- prediction by the aligned head (PyCIL's "CNN" accuracy, the paper's); `wa.classifier=nme`
  predicts by the nearest mean of exemplars instead (PyCIL's "NME", printed beside it).
Optimiser, schedule and exemplar memory are iCaRL's (methods/icarl.py): SGD with momentum
0.9, a fresh optimiser every task, a total of 2,000 class-balanced exemplars. The `cifar100`
defaults are PyCIL's module constants (200 epochs, milestones 60/120/170 on the first task;
170 epochs, milestones 60/100/140 after; lr 0.1, batch 128, weight decay 5e-4 then 2e-4).

Departures from PyCIL, each for the harness's contract: PyCIL aligns twice after a task (in
`_train` and `after_task`); the second scaling is by a factor of 1, so it is done once. PyCIL
evaluates the test set every 5 epochs while training; the harness evaluates after each task.
"""
from __future__ import annotations

import torch

from harness.cil.distill import softmax_kd
from harness.cil.weight_aligning import align_new_class_weights
from harness.method import CILMethod
from harness.params import Param
from harness.registry import register_method
from methods.icarl import ICaRL, RECIPES as ICARL_RECIPES

RECIPES = {
    **ICARL_RECIPES,
    # PyCIL's wa.py schedule for ResNet-32 (its later tasks' milestones differ from iCaRL's).
    "cifar100": {**ICARL_RECIPES["cifar100"], "milestones": "60,100,140"},
}
_NOT_WA = ("loss", "bce")  # iCaRL's choice of loss: WA has one


def wa_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None,
            temperature: float) -> torch.Tensor:
    """CE on every seen class; with a teacher, (1 - λ) CE + λ KD, λ = old classes / classes seen."""
    ce = torch.nn.functional.cross_entropy(logits, labels)
    if teacher is None:
        return ce
    share = teacher.shape[1] / logits.shape[1]
    return (1 - share) * ce + share * softmax_kd(logits, teacher, temperature, t_squared=False)


@register_method("wa")
class WA(ICaRL):
    description = ("WA (Zhao et al., CVPR 2020): iCaRL's exemplars and KD weighted by the old classes' share, "
                   "new classes' weights aligned to the old norms; headline: the head (CNN), NME beside it")
    params = {
        **{k: p for k, p in ICaRL.params.items() if k not in _NOT_WA},
        "classifier": Param("cnn", "cnn: the aligned head (the paper's and PyCIL's headline); nme: nearest mean "
                                   "of exemplars (PyCIL's second figure)", choices=("cnn", "nme")),
    }
    protocol_defaults = {family: {k: v for k, v in recipe.items() if k not in _NOT_WA}
                         for family, recipe in RECIPES.items()}

    @property
    def headline(self) -> str:
        return self.hp["classifier"]

    def criterion(self):
        if not self.is_training:
            return CILMethod.criterion(self)
        return wa_loss(self.mb_output, self.mb_y, self.teacher_logits(), self.hp["temperature"])

    def _after_training_exp(self, **kwargs):
        # Before herding and the teacher's copy, as PyCIL's _train does it.
        if self.old_model is not None:
            align_new_class_weights(self.model.head.classifier, len(self.experience.classes_in_this_experience))
        super()._after_training_exp(**kwargs)

