"""BiC (Wu et al., "Large Scale Incremental Learning", CVPR 2019): rehearsal with distillation,
then a two-parameter bias correction of the newest task's logits fitted on a held-out split.

Follows PyCIL's `models/bic.py` (class BiC: `incremental_train`, `_run`, `_stage1_training`,
`_stage2_bias_correction`) and its network `IncrementalNetWithBias` (harness.cil.bias_correction):
- from the second task on, a class-balanced validation split is held out of the training data:
  `bic.split_ratio` x (exemplars per old class) samples of every class, new and old (PyCIL's
  `val_samples_per_class = int(split_ratio * memory_size / known_classes)`, memory_size /
  known_classes being the exemplars per old class);
- stage 1, on the rest: (1 - λ) CE + λ KD, λ = old classes / classes seen, KD at T = 2 with no
  T² factor, the teacher being the previous network with its bias layers (WA's loss,
  methods/wa.py); the bias layers are fixed;
- stage 2, after every task but the first: the newest task's (alpha, beta) alone trained on the
  held-out split, loss = cross-entropy of the softmax of the corrected logits (PyCIL's
  `F.cross_entropy(torch.softmax(logits))`), SGD momentum 0.9 with stage 1's lr, weight decay and
  schedule, for `bic.bias_epochs` epochs, the network in training mode (its batch-norm statistics
  follow the split's batches, as in PyCIL);
- then herding of the exemplars (from all of the new classes' data) and a frozen copy as the
  next teacher; prediction by the corrected head (the paper's and PyCIL's "CNN"; NME beside it).
The exemplar memory is iCaRL's (2,000 in total, class-balanced). The `cifar100` defaults are
PyCIL's module constants: 170 epochs on every task, milestones 60/100/140, lr 0.1, batch 128,
weight decay 2e-4 on every task, split ratio 0.1.

Departures, for the harness's contract: the held-out samples are drawn from the run's seed, the
task and nothing else (PyCIL's from numpy's global RNG); a class keeps at least one training
sample (never reached with PyCIL's ratio). PyCIL evaluates the test set after every epoch of both
stages; the harness evaluates after each task.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.cil.bias_correction import BiasCorrectedNet, held_out_split
from harness.nn.augment import batch_augment
from harness.nn.backbones import create_backbone
from harness.method import materialise
from harness.params import Param
from harness.registry import register_method
from methods.icarl import ICaRL
from methods.wa import RECIPES as WA_RECIPES, WA

# PyCIL's bic.py optimiser: weight decay 2e-4 from the first task on (iCaRL's and WA's start at 5e-4).
_ONE_WEIGHT_DECAY = {"init_weight_decay": -1.0, "weight_decay": 2e-4}
RECIPES = {
    **WA_RECIPES,
    "quickdraw": {**WA_RECIPES["quickdraw"], **_ONE_WEIGHT_DECAY},
    "fmnist": {**WA_RECIPES["fmnist"], **_ONE_WEIGHT_DECAY},
    # PyCIL's bic.py: one schedule for every task.
    "cifar100": {**WA_RECIPES["cifar100"], **_ONE_WEIGHT_DECAY, "init_epochs": 0, "epochs": 170,
                 "init_milestones": "", "milestones": "60,100,140"},
}


@register_method("bic")
class BiC(WA):
    description = ("BiC (Wu et al., CVPR 2019): iCaRL's exemplars, KD weighted by the old classes' share, a bias "
                   "layer on the newest task's logits fitted on a held-out split; headline: the head (CNN), NME beside it")
    params = {
        **WA.params,
        "classifier": Param("cnn", "cnn: the bias-corrected head (the paper's and PyCIL's headline); nme: nearest "
                                   "mean of exemplars (PyCIL's second figure)", choices=("cnn", "nme")),
        "split_ratio": Param(0.1, "share of each old class's exemplars held out (as many of every new class) "
                                  "to fit the bias layer", low=0.0, high=0.5),
        "bias_epochs": Param(0, "epochs of the bias-correction stage; 0 = epochs", low=0),
    }
    protocol_defaults = {family: {k: v for k, v in recipe.items() if k in WA.params}
                         for family, recipe in RECIPES.items()}
    transient = (*WA.transient, "held_out")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.held_out: tuple[torch.Tensor, torch.Tensor] | None = None  # this task's validation split

    def build_model(self):
        p = self.context.protocol
        return BiasCorrectedNet(create_backbone(self.hp["backbone"], p.channels, p.image_size),
                                p.classes_per_task())

    def head_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.bias(self.model.head(features))

    # ---- stage 1 on all but the held-out split --------------------------------------
    def train_dataset_adaptation(self, **kwargs):
        super().train_dataset_adaptation(**kwargs)
        self.held_out = None
        if self.old_model is None or self.hp["split_ratio"] <= 0:
            return
        old_classes = len(self.memory.classes)
        per_class = int(self.hp["split_ratio"] * len(self.memory) / old_classes)
        if per_class < 1:
            return  # too few exemplars per class to hold any out: no correction this task
        labels = torch.as_tensor(list(self.adapted_dataset.targets))
        task = self.experience.current_experience
        keep, held = held_out_split(labels, per_class, self.context.seed * 1_000_003 + task)
        self.held_out = materialise(self.adapted_dataset.subset(held.tolist()).eval(), self.eval_mb_size)
        self.adapted_dataset = self.adapted_dataset.subset(keep.tolist())

    def _after_training_exp(self, **kwargs):
        if self.held_out is not None:
            self._fit_bias(self.experience.current_experience)
        ICaRL._after_training_exp(self, **kwargs)  # WA's weight aligning is BiC's bias layer here

    # ---- stage 2 ------------------------------------------------------------------
    def _fit_bias(self, task: int) -> None:
        x, y = self.held_out
        self.held_out = None
        hp = self.hp
        pair = self.model.bias.train_only(task)
        optimizer = torch.optim.SGD(pair, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
        epochs = hp["bias_epochs"] or self.train_epochs
        scheduler = self.task_scheduler(optimizer, epochs, first=False)
        augment = self.augmentation()
        self.model.train()  # PyCIL's _run: batch-norm statistics follow these batches
        for _ in range(epochs):
            for idx in torch.randperm(len(y)).split(hp["batch_size"]):
                xb = x[idx] if augment == "none" else batch_augment(x[idx], augment, hp.get("crop_padding", 4))
                logits = self.model(xb.to(self.device))
                loss = F.cross_entropy(torch.softmax(logits, dim=1), y[idx].to(self.device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
        self.model.bias.requires_grad_(False)
        self.model.eval()
