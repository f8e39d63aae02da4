"""DER (Yan et al.): the network that grows an extractor per task, against PyCIL's DERNet."""
from types import SimpleNamespace

import torch
from torch import nn

from harness.cil.expandable import ExpandableNet, aux_targets
from harness.registry import METHODS, discover


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 4

    def forward(self, x):
        return self.body(x)


def _task(classes):
    return SimpleNamespace(classes_in_this_experience=list(classes))


def test_a_new_task_adds_a_copy_of_the_newest_extractor_and_freezes_the_old_ones():
    torch.manual_seed(0)
    net = ExpandableNet(_Tiny).train()
    net.adaptation(_task(range(3)))
    assert len(net.backbones) == 1 and net.head.out_features == 3 and net.aux_head.out_features == 4
    x = torch.rand(5, 1, 8, 8)
    net(x).sum().backward()  # moves the first extractor's batch-norm statistics
    old_head = net.head.weight.detach().clone()
    net.adaptation(_task(range(3, 5)))
    assert len(net.backbones) == 2 and net.task_sizes == [3, 2] and net.known_classes == 5
    first, second = net.backbones
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not any(p.requires_grad for p in first.parameters()) and all(p.requires_grad for p in second.parameters())
    assert not first.training and second.training  # the frozen extractor's BN statistics stay put
    # old classes keep their weights on the old features; the head reads both extractors
    assert net.head.weight.shape == (5, 8) and torch.equal(net.head.weight[:3, :4], old_head)
    assert torch.equal(net.head.bias[3:], torch.zeros(2)) and net.aux_head.out_features == 3
    logits, aux = net.forward_with_aux(x)
    assert logits.shape == (5, 5) and aux.shape == (5, 3)
    assert torch.allclose(net(x), logits)
    net.train()
    assert not first.training  # a later train() keeps it frozen


def test_eval_mode_and_a_task_of_known_classes_do_not_grow_it():
    net = ExpandableNet(_Tiny).train()
    net.adaptation(_task(range(3)))
    net.adaptation(_task(range(3)))
    net.eval().adaptation(_task(range(3, 6)))
    assert len(net.backbones) == 1 and net.task_sizes == [3]


def test_aux_targets_lump_the_old_classes_into_output_zero():
    assert aux_targets(torch.tensor([0, 4, 5, 6, 9]), 5).tolist() == [0, 0, 1, 2, 5]


def test_listed_apart_from_avalanche_s_dark_experience_replay():
    discover(())
    assert "Yan et al." in METHODS.get("der_expand").description
    assert "Dark Experience Replay" in METHODS.get("der").description
