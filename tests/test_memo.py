"""MEMO (Zhou et al.): the generalised/specialised cut and the network that grows only its last stage,
against PyCIL's AdaptiveNet and memo_resnet32."""
import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harness import checkpoint
from harness.cil.expandable import ExpandableNet
from harness.errors import HarnessError
from harness.nn.backbones import create_backbone, split_last_stage
from harness.planning import RunSpec
from harness.runner import execute


@pytest.mark.parametrize("name", ["convnet_bn", "resnet32"])
def test_the_trunk_and_the_last_stage_are_the_whole_network(name):
    torch.manual_seed(0)
    net = create_backbone(name, 1, 28).eval()
    trunk, block = split_last_stage(net)
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(block(trunk(x)), net(x)) and block.out_dim == net.out_dim
    n_block = sum(p.numel() for p in block.parameters())
    assert 0.5 < n_block / sum(p.numel() for p in net.parameters()) < 1  # the last stage holds most weights


def test_a_backbone_with_no_stages_to_cut_is_refused():
    with pytest.raises(HarnessError, match="no generalised/specialised split"):
        split_last_stage(create_backbone("convnet", 1, 28))


def test_a_new_task_adds_a_last_stage_on_the_shared_trunk_which_keeps_training():
    torch.manual_seed(0)
    trunk, block = split_last_stage(create_backbone("convnet_bn", 1, 28))
    net = ExpandableNet(lambda: copy.deepcopy(block), trunk=trunk).train()
    net.adaptation(SimpleNamespace(classes_in_this_experience=[0, 1, 2]))
    x = torch.rand(4, 1, 28, 28)
    net(x)  # moves batch-norm statistics
    net.adaptation(SimpleNamespace(classes_in_this_experience=[3, 4]))
    first, second = net.backbones
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not any(p.requires_grad for p in first.parameters()) and not first.training
    assert all(p.requires_grad for p in net.trunk.parameters()) and net.trunk.training  # PyCIL's train_base
    assert net.features(x).shape == (4, 2 * block.out_dim)
    logits, aux = net.forward_with_aux(x)
    assert logits.shape == (4, 5) and aux.shape == (4, 3)


def test_a_run_trains_the_trunk_on_the_second_task_and_not_the_first_task_s_block(tmp_path, monkeypatch):
    """Task 1's specialised block leaves task 2 as task 1 left it; the trunk does not; the stored
    memory grows by one last stage, not one network."""
    from methods.memo import MEMO

    after_first = {}
    learn = MEMO.learn

    def keep_first(self, experience):
        learn(self, experience)
        if not after_first:
            after_first.update({k: v.clone() for k, v in self.model.state_dict().items()})

    monkeypatch.setattr(MEMO, "learn", keep_first)
    outcome = execute(RunSpec("memo", "quickdraw20_2x10", 0, str(tmp_path), epochs=1, max_train_per_class=20,
                              quiet=True, overrides=(("memo", "memory", "100"),)))
    final = checkpoint.load(Path(outcome.path) / "checkpoint.pt")["method"]["model"]
    block = [k for k in after_first if k.startswith("backbones.0.")]
    trunk = [k for k in after_first if k.startswith("trunk.") and after_first[k].is_floating_point()]
    assert block and trunk and all(k.replace("backbones.0.", "backbones.1.") in final for k in block)
    assert all(torch.equal(final[k], after_first[k]) for k in block)
    assert not all(torch.equal(final[k], after_first[k]) for k in trunk)
    s = outcome.summary
    assert s["headline_classifier"] == "cnn" and s["last_accuracy"] == s["last_cnn_accuracy"]


def test_a_backbone_that_cannot_be_cut_is_a_refused_setting(tmp_path):
    with pytest.raises(HarnessError, match="backbone"):
        execute(RunSpec("memo", "quickdraw20_2x10", 0, str(tmp_path), epochs=1, quiet=True,
                        overrides=(("memo", "backbone", "convnet"),), fail_fast=True))
