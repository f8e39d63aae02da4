"""PODNet: the local-similarity classifier, NCA, POD-spatial/flat and the fine-tuning stage, against
PyCIL's podnet.py and CosineIncrementalNet."""
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from harness import checkpoint
from harness.cil.cosine_head import CosineHead, CosineNet
from harness.cil.distill import nca_loss, pod_flat, pod_spatial
from harness.nn.backbones import create_backbone
from harness.planning import RunSpec
from harness.runner import execute


def test_a_class_score_is_the_softmax_weighted_cosine_of_its_proxies_times_sigma():
    torch.manual_seed(0)
    head = CosineHead(4, nb_proxy=2)
    head.grow(3)
    with torch.no_grad():
        head.sigma.fill_(3.0)
    f = torch.randn(5, 4)
    cos = F.normalize(f, dim=1) @ F.normalize(head.blocks[0], dim=1).T  # (5, 6): class c's proxies 2c, 2c+1
    a, b = cos[:, 0::2], cos[:, 1::2]
    wa, wb = torch.exp(a) / (torch.exp(a) + torch.exp(b)), torch.exp(b) / (torch.exp(a) + torch.exp(b))
    assert torch.allclose(head(f), 3.0 * (wa * a + wb * b), atol=1e-6)
    assert head(f * 7).allclose(head(f), atol=1e-6)  # scale-free in the features


def test_a_new_task_s_block_trains_and_the_old_blocks_are_frozen():
    torch.manual_seed(0)
    net = CosineNet(create_backbone("convnet_bn", 1, 28), nb_proxy=10).train()
    net.adaptation(SimpleNamespace(classes_in_this_experience=[0, 1, 2]))
    net.adaptation(SimpleNamespace(classes_in_this_experience=[3, 4]))
    old, new = net.head.blocks
    assert old.shape == (30, 64) and new.shape == (20, 64) and net.head.num_classes == 5
    assert not old.requires_grad and new.requires_grad and net.head.sigma.requires_grad
    assert new.abs().max() <= 1 / math.sqrt(64)  # PyCIL's uniform init
    x = torch.rand(2, 1, 28, 28)
    logits, features, maps = net.forward_with_maps(x)
    assert logits.shape == (2, 5) and torch.allclose(features, net.features(x), atol=1e-6)
    assert torch.allclose(logits, net.head(features))
    assert [m.shape[1:] for m in maps] == [(16, 28, 28), (32, 14, 14), (64, 7, 7)]
    net.eval().adaptation(SimpleNamespace(classes_in_this_experience=[5]))
    assert net.head.num_classes == 5  # only training grows it


@pytest.mark.parametrize("name", ["convnet_bn", "resnet32"])
def test_the_stage_maps_end_in_the_map_the_features_pool(name):
    torch.manual_seed(0)
    net = create_backbone(name, 1, 28).eval()
    x = torch.rand(2, 1, 28, 28)
    maps = net.stage_maps(x)
    assert len(maps) == 3 and torch.allclose(maps[-1].mean(dim=(2, 3)), net(x), atol=1e-6)


def test_nca_is_cross_entropy_when_the_target_leads_and_counts_the_leader_twice_otherwise():
    scores = torch.tensor([[2.0, 0.5, -1.0], [0.3, 1.5, 0.2]])
    labels = torch.tensor([0, 0])
    assert torch.isclose(nca_loss(scores[:1], labels[:1]), F.cross_entropy(scores[:1], labels[:1]))
    s = scores[1]
    expected = torch.log(torch.exp(s.max()) + torch.exp(s[1]) + torch.exp(s[2])) - s[0]
    assert torch.isclose(nca_loss(scores[1:], labels[1:]), expected)
    # a margin on the target's score alone (the authors'); on every class (PyCIL's) it cancels
    assert nca_loss(scores, labels, margin=0.6) > nca_loss(scores, labels)
    assert torch.isclose(nca_loss(scores - 0.6, labels), nca_loss(scores, labels))


def test_pod_spatial_is_zero_for_the_same_maps_and_scale_free_and_pod_flat_is_one_minus_cosine():
    torch.manual_seed(0)
    maps = [torch.rand(3, 4, 5, 5), torch.rand(3, 8, 3, 3)]
    assert pod_spatial(maps, maps) == 0
    assert torch.isclose(pod_spatial(maps, [2 * m for m in maps]), torch.tensor(0.0), atol=1e-6)
    other = [torch.rand_like(m) for m in maps]
    a = maps[0].pow(2)
    pa = F.normalize(torch.cat([a.sum(3).flatten(1), a.sum(2).flatten(1)], 1), dim=1)
    b = other[0].pow(2)
    pb = F.normalize(torch.cat([b.sum(3).flatten(1), b.sum(2).flatten(1)], 1), dim=1)
    assert torch.isclose(pod_spatial(maps[:1], other[:1]), (pa - pb).norm(dim=1).mean())
    f, g = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.isclose(pod_flat(f, g), (1 - F.cosine_similarity(f, g)).mean())


def test_a_run_fine_tunes_after_the_second_task_only_and_keeps_the_first_task_s_proxies(tmp_path, monkeypatch):
    from methods.podnet import PODNet

    calls, first_block = [], {}
    finetune, learn = PODNet._finetune, PODNet.learn

    def counted(self):
        calls.append(self.experience.current_experience)
        finetune(self)

    def keep(self, experience):
        learn(self, experience)
        first_block.setdefault("w", self.model.head.blocks[0].detach().clone())

    monkeypatch.setattr(PODNet, "_finetune", counted)
    monkeypatch.setattr(PODNet, "learn", keep)
    outcome = execute(RunSpec("podnet", "quickdraw20_2x10", 0, str(tmp_path), epochs=1, max_train_per_class=20,
                              quiet=True, overrides=(("podnet", "memory", "100"), ("podnet", "ft_epochs", "1"))))
    assert calls == [1]
    final = checkpoint.load(Path(outcome.path) / "checkpoint.pt")["method"]["model"]
    assert torch.equal(final["head.blocks.0"], first_block["w"])
    s = outcome.summary
    assert s["headline_classifier"] == "nme" and s["last_accuracy"] == s["last_nme_accuracy"]
    assert 0 < s["last_cnn_accuracy"] <= 100
