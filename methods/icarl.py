"""iCaRL (Rebuffi et al., CVPR 2017): herding exemplars, distillation, nearest mean of exemplars.

- Training data of task t = its new data + the exemplars of every old class, with a
  fresh optimizer (no momentum carried over) as in the paper and PyCIL.
- Loss (`icarl.loss`):
  - `ce_kd` (default), PyCIL's iCaRL, the figures most papers compare against: softmax
    cross-entropy on all seen classes + KL distillation of the old classes' outputs
    at T=2, no T^2 factor (harness.cil.distill.softmax_kd);
  - `bce`, the paper's: BCE on all seen-class outputs; targets one-hot for the labels,
    the previous model's sigmoid outputs for the old classes
    (harness.cil.distill.sigmoid_distillation_loss).
- After training: shrink old classes to the new per-class quota, herd the new classes'
  exemplars with the updated feature extractor, recompute every class mean from its
  exemplars, freeze a copy of the model as the next task's teacher.
- Prediction: nearest mean of exemplars on L2-normalised features (cosine scores), the
  paper's; the head's accuracy (PyCIL's "CNN") is recorded beside it after every task.
"""
from __future__ import annotations

import torch

from harness.cil.regularisers import REGULARISER_PARAMS
from harness.cil.distill import frozen_copy, sigmoid_distillation_loss, softmax_kd
from harness.errors import HarnessError
from harness.cil.memory import ExemplarMemory, check_budget, class_means, to_float, to_uint8
from harness.method import SESSION_PARAMS, TRAINING_PARAMS, materialise
from harness.params import Param
from harness.cil.recipes import SUPERVISED_RECIPES
from harness.registry import register_method
from harness.cil.rehearsal import HeadAndNearestMean

# PyCIL's iCaRL optimiser (models/icarl.py): SGD lr 0.1, momentum 0.9, batch 128, weight
# decay 5e-4 on the first task and 2e-4 after.
_PYCIL_OPTIMISER = {"lr": 0.1, "batch_size": 128, "init_weight_decay": 5e-4, "weight_decay": 2e-4}
RECIPES = {
    **SUPERVISED_RECIPES,
    # On doodles: the shared recipe's backbone, augmentation, epochs and cosine schedule.
    "quickdraw": {**SUPERVISED_RECIPES["quickdraw"], **_PYCIL_OPTIMISER},
    "fmnist": {**SUPERVISED_RECIPES["fmnist"], **_PYCIL_OPTIMISER},
    # PyCIL's iCaRL schedule for ResNet-32 (docs/methods.md).
    "cifar100": {"backbone": "resnet32", **_PYCIL_OPTIMISER, "init_epochs": 200, "epochs": 170,
                 "lr_schedule": "multistep", "init_milestones": "60,120,170", "milestones": "80,120"},
}


def _milestones(text: str, key: str) -> list[int]:
    try:
        out = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise HarnessError(f"icarl.{key}={text!r}: expected comma-separated epochs, e.g. 80,120") from None
    if out != sorted(out) or any(m < 1 for m in out):
        raise HarnessError(f"icarl.{key}={text!r}: epochs must be positive and increasing")
    return out


@register_method("icarl")
class ICaRL(HeadAndNearestMean):
    description = ("iCaRL: herding exemplars, distillation (PyCIL's CE+KD or the paper's BCE); headline: the "
                   "nearest mean of exemplars (NME), the head (CNN) beside it")
    params = {
        **TRAINING_PARAMS,
        **SESSION_PARAMS,
        **REGULARISER_PARAMS,
        "loss": Param("ce_kd", "ce_kd: PyCIL's softmax CE + KD (T=2); bce: the paper's sigmoid BCE + distillation",
                      choices=("ce_kd", "bce")),
        "temperature": Param(2.0, "ce_kd: distillation temperature", low=0.01),
        "memory": Param(2000, "exemplars kept in total (class-balanced)", low=1),
        "memory_bytes": Param(0, "byte budget of the exemplars as uint8 images; > 0 replaces memory", low=0),
        "memory_per_class": Param(0, "fixed exemplars per class, the total grows with the classes "
                                     "(PyCIL's fixed_memory); > 0 replaces memory", low=0),
        "init_epochs": Param(0, "epochs of the first task; 0 = epochs", low=0),
        "init_weight_decay": Param(-1.0, "weight decay of the first task; -1 = weight_decay", low=-1.0),
        "lr_schedule": Param("none", "per-task learning-rate schedule", choices=("none", "cosine", "multistep")),
        "milestones": Param("", "multistep: epochs where the lr is multiplied by lr_decay, e.g. 80,120"),
        "init_milestones": Param("", "multistep milestones of the first task; empty = milestones"),
        "lr_decay": Param(0.1, "multistep: lr factor at each milestone", low=0.0, high=1.0),
        "bce": Param("sum", "loss=bce: BCE over classes summed (CE-sized gradients) or averaged "
                            "(Avalanche's ICaRL)", choices=("sum", "mean")),
    }
    protocol_defaults = RECIPES
    transient = ("milestones", "scheduler")  # from the settings; a new scheduler starts every task

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        hp, p = self.hp, self.context.protocol
        if hp["memory_per_class"] > 0:
            self.memory = ExemplarMemory(per_class=hp["memory_per_class"])
        elif hp["memory_bytes"] > 0:
            self.memory = ExemplarMemory(max_bytes=hp["memory_bytes"])
        else:
            self.memory = ExemplarMemory(max_items=hp["memory"])
        check_budget(self.memory, p.num_classes, p.channels * p.image_size ** 2, "icarl")
        self.milestones = {"init": _milestones(hp["init_milestones"] or hp["milestones"], "init_milestones"),
                           "later": _milestones(hp["milestones"], "milestones")}
        self.scheduler = None

    def build_plugins(self, optimizer):
        return []  # the schedule changes between the first and later tasks: see learn()

    # ---- training -----------------------------------------------------------------
    def learn(self, experience) -> None:
        first = self.old_model is None
        hp = self.hp
        self.train_epochs = hp["init_epochs"] if first and hp["init_epochs"] else hp["epochs"]
        decay = hp["init_weight_decay"] if first and hp["init_weight_decay"] >= 0 else hp["weight_decay"]
        self.restart_optimizer(weight_decay=decay)
        self.scheduler = self.task_scheduler(self.optimizer, self.train_epochs, first)
        self.train(experience)
        self._update_memory(experience)
        self.means = self._exemplar_means()
        self.old_model = frozen_copy(self.model)

    def task_scheduler(self, optimizer, epochs: int, first: bool):
        """This task's lr schedule (`lr_schedule`) over `epochs`, stepped after each epoch; None for none."""
        if self.hp["lr_schedule"] == "multistep":
            return torch.optim.lr_scheduler.MultiStepLR(
                optimizer, self.milestones["init" if first else "later"], self.hp["lr_decay"])
        if self.hp["lr_schedule"] == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return None

    def _after_training_epoch(self, **kwargs):
        super()._after_training_epoch(**kwargs)
        if self.scheduler is not None:
            self.scheduler.step()

    def criterion(self):
        if not self.is_training:
            return super().criterion()
        teacher = self.teacher_logits()
        if self.hp["loss"] == "bce":
            return sigmoid_distillation_loss(self.mb_output, self.mb_y, teacher, per_class=self.hp["bce"])
        loss = torch.nn.functional.cross_entropy(self.mb_output, self.mb_y)
        if teacher is not None:
            loss = loss + softmax_kd(self.mb_output, teacher, self.hp["temperature"], t_squared=False)
        return loss

    # ---- exemplars and class means ------------------------------------------------
    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features of uint8 or float images, in eval mode, batch by batch."""
        self.model.eval()
        out = []
        for xb in images.split(self.eval_mb_size):
            xb = to_float(xb) if xb.dtype == torch.uint8 else xb
            out.append(self.model.features(xb.to(self.device)).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def _update_memory(self, experience) -> None:
        # One pass over the new data (it must not move the global RNG: resumed runs replay it);
        # the memory stores uint8 images.
        images, labels = materialise(experience.dataset.eval(), self.eval_mb_size)
        images = to_uint8(images)
        self.memory.update(images, labels, experience.classes_in_this_experience, self.context.seed,
                           features=self._features(images))

    def _exemplar_means(self) -> torch.Tensor:
        x, y = self.memory.tensors()
        return class_means(self._features(x), y, self.memory.classes).to(self.device)
