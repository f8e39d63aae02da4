"""MEMO, Memory-efficient Expandable MOdel (Zhou et al., "A Model or 603 Exemplars: Towards
Memory-Efficient Class-Incremental Learning", ICLR 2023): DER's growth, but only of the network's
specialised last stage; the generalised earlier stages are one trunk that every task shares and
keeps training.

Follows PyCIL's `models/memo.py` (class MEMO: `incremental_train`, `set_network`, `_train`,
`_init_train`, `_update_representation`, `after_task`) with `exps/memo.json` (`train_base`
true, `train_adaptive` false) and its network `AdaptiveNet` (harness.cil.expandable with a trunk):
- the backbone is cut after its second stage (harness.nn.backbones.split_last_stage; PyCIL's
  memo_resnet32: stages 1-2 generalised, stage 3 specialised);
- each task appends a copy of the newest specialised block and trains it with the trunk; the
  older blocks are frozen, weights and batch-norm statistics;
- the losses, the weight aligning after each later task, herding on the concatenated features and
  the prediction by the classifier are DER's (methods/der_expand.py, which this extends): CE of
  the classifier, plus from the second task on CE of the auxiliary classifier on the newest block;
- the headline is the classifier (PyCIL's "CNN", the paper's figure); NME is recorded beside it.
Optimiser and exemplars as DER's: SGD momentum 0.9, a fresh optimiser each task, 2,000
class-balanced exemplars. The `cifar100` defaults are `exps/memo.json`'s (ResNet-32; 200 epochs,
milestones 60/120/170, weight decay 5e-4 on the first task; 170 epochs, milestones 80/120/150,
weight decay 2e-4 after; lr 0.1, batch 128; `alpha_aux` 1).

Departure, for the harness's contract: PyCIL evaluates the test set every 5 epochs while
training; the harness evaluates after each task.
"""
from __future__ import annotations

import copy

from harness.cil.expandable import ExpandableNet
from harness.nn.backbones import create_backbone, split_last_stage
from harness.params import Param
from harness.registry import register_method
from methods.der_expand import DERExpand

SPLITTABLE = ("convnet_bn", "resnet32")  # three-stage networks: harness.nn.backbones.split_last_stage


@register_method("memo")
class MEMO(DERExpand):
    description = ("MEMO (Zhou et al., ICLR 2023): a shared trunk of generalised blocks that keeps training and a "
                   "new specialised last stage per task, the old ones frozen; headline: the head (CNN), NME beside it")
    params = {
        **DERExpand.params,
        "backbone": Param("convnet_bn", "the network, cut after its second stage", choices=SPLITTABLE),
    }

    def build_model(self):
        p = self.context.protocol
        trunk, block = split_last_stage(create_backbone(self.hp["backbone"], p.channels, p.image_size))
        return ExpandableNet(lambda: copy.deepcopy(block), trunk=trunk)
