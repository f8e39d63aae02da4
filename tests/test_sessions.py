"""Settings of the tasks after the first (few-shot sessions): epochs, lr, a frozen backbone."""
from __future__ import annotations

import torch

from harness import data as data_mod
from harness.method import MethodContext
from harness.params import resolve_params
from harness.protocol import get_protocol
from harness.registry import METHODS, discover
from harness.streams import build_benchmark

discover()


def _finetune(**overrides):
    protocol = get_protocol("quickdraw20_2x10")
    cls = METHODS.get("finetune")
    hp, _ = resolve_params(cls, protocol.family, [(None, k, str(v)) for k, v in overrides.items()])
    data = data_mod.prepare(protocol, max_train_per_class=4)
    torch.manual_seed(0)
    ctx = MethodContext(protocol, data.class_names, torch.device("cpu"), 0, True, True)
    return cls(context=ctx, hp=hp), build_benchmark(data)


class _Watch:
    """Epochs run and the lr of every iteration, per task."""

    def __init__(self, method):
        self.epochs, self.lrs = [], []
        before_exp, after_epoch, before_it = (method._before_training_exp, method._after_training_epoch,
                                              method._before_training_iteration)

        def exp(**kw):
            before_exp(**kw)
            self.epochs.append(0)
            self.lrs.append([])
        def epoch(**kw):  # noqa: E306
            after_epoch(**kw)
            self.epochs[-1] += 1
        def iteration(**kw):  # noqa: E306
            before_it(**kw)
            self.lrs[-1].append(method.optimizer.param_groups[0]["lr"])
        method._before_training_exp, method._after_training_epoch = exp, epoch
        method._before_training_iteration = iteration


def test_later_tasks_take_their_own_epochs_and_lr():
    method, bench = _finetune(epochs=3, lr=0.1, incremental_epochs=2, incremental_lr=0.01, lr_schedule="cosine")
    watch = _Watch(method)
    for exp in bench.train_stream:
        method.learn(exp)
    assert watch.epochs == [3, 2]
    assert watch.lrs[0][0] == 0.1 and watch.lrs[1][0] == 0.01
    assert max(watch.lrs[1]) <= 0.01 and watch.lrs[1][-1] < 0.01  # the cosine runs over the 2 epochs


def test_defaults_change_nothing_after_the_first_task():
    method, bench = _finetune(epochs=2, lr=0.05)
    watch = _Watch(method)
    for exp in bench.train_stream:
        method.learn(exp)
    assert watch.epochs == [2, 2] and watch.lrs[1][0] == 0.05


def test_frozen_backbone_keeps_weights_and_batch_norm_statistics():
    method, bench = _finetune(epochs=1, freeze_backbone=True)
    first, second = list(bench.train_stream)
    method.learn(first)
    backbone = {k: v.clone() for k, v in method.model.backbone.state_dict().items()}
    head = method.model.head.classifier.weight[:10].clone()
    method.learn(second)
    after = method.model.backbone.state_dict()
    assert any("running_mean" in k for k in backbone)
    assert all(torch.equal(v, after[k]) for k, v in backbone.items())  # weights and BN buffers
    assert not torch.equal(head, method.model.head.classifier.weight[:10])  # the head still learns
