"""LUCIR: the ReLU-free features, the margin ranking loss, the adaptive less-forget weight and the
class-balanced fine-tuning, against FACIL's lucir.py and the authors' CBF."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness import checkpoint
from harness.cil.distill import margin_ranking
from harness.errors import HarnessError
from harness.nn.backbones import create_backbone, drop_last_relu
from harness.planning import RunSpec
from harness.runner import execute


@pytest.mark.parametrize("name", ["convnet_bn", "resnet32"])
def test_without_the_last_relu_the_features_take_both_signs(name):
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28)
    net = create_backbone(name, 1, 28).eval()
    assert net(x).min() >= 0
    assert drop_last_relu(net)(x).min() < 0


def test_a_backbone_with_no_known_last_relu_is_refused():
    with pytest.raises(HarnessError, match="no last ReLU"):
        drop_last_relu(create_backbone("convnet", 1, 28))


def test_margin_ranking_asks_each_old_sample_s_cosine_to_beat_its_k_hardest_new_classes_by_the_margin():
    # 2 old classes (0, 1), 3 new (2, 3, 4); samples of class 0, 1 and a new one (ignored)
    cos = torch.tensor([[0.9, 0.1, 0.5, 0.7, -0.2],
                        [0.0, 0.3, 0.6, 0.1, 0.5],
                        [0.0, 0.0, 0.9, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 2])
    # sample 0: 0.9 vs 0.7 and 0.5 -> hinge 0.5 - 0.2 = 0.3 and 0.5 - 0.4 = 0.1; sample 1: 0.3 vs 0.6, 0.5 ->
    # 0.8 and 0.7; FACIL's MarginRankingLoss averages the 4 pairs
    expected = (0.3 + 0.1 + 0.8 + 0.7) / 4
    assert torch.isclose(margin_ranking(cos, labels, n_old=2, k=2, margin=0.5), torch.tensor(expected))
    assert margin_ranking(cos, labels, n_old=2, k=2, margin=0.0) == pytest.approx((0.0 + 0.0 + 0.3 + 0.2) / 4)
    assert margin_ranking(cos[2:], labels[2:], n_old=2) == 0  # no old-class sample in the batch


def test_the_loss_of_a_later_task_is_ce_plus_the_adaptive_less_forget_term_plus_margin_ranking(tmp_path, monkeypatch):
    from methods.lucir import LUCIR

    seen, loss = {}, LUCIR._loss

    def probe(self, logits, features, x, y):
        out = loss(self, logits, features, x, y)
        if self.old_model is not None and "parts" not in seen:
            with torch.no_grad():
                n_old, total = self.old_model.head.num_classes, self.model.head.num_classes
                lamda = 5.0 * math.sqrt(n_old / (total - n_old))
                old_f = self.old_model.features(x)
                cos = self.model.head.cosines(features)
                seen["parts"] = (F.cross_entropy(logits, y) + lamda * (1 - F.cosine_similarity(features, old_f)).mean()
                                 + margin_ranking(cos, y, n_old, 2, 0.5))
                seen["loss"], seen["sizes"] = out.detach(), (n_old, total)
        return out

    monkeypatch.setattr(LUCIR, "_loss", probe)
    execute(RunSpec("lucir", "quickdraw20_2x10", 0, str(tmp_path), epochs=1, max_train_per_class=10,
                    quiet=True, overrides=(("lucir", "memory", "40"),)))
    assert seen["sizes"] == (10, 20)
    assert torch.isclose(seen["loss"], seen["parts"], atol=1e-5)


def test_the_balanced_fine_tuning_trains_every_class_s_weights_and_nothing_else(tmp_path, monkeypatch):
    from methods.lucir import LUCIR

    states, calls = {}, []
    finetune = LUCIR._balanced_finetune

    def watched(self):
        calls.append(len(self.model.head.blocks) - 1)  # the task just trained
        states["before"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        finetune(self)
        states["after"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        states["grad"] = [b.requires_grad for b in self.model.head.blocks] + [self.model.head.sigma.requires_grad]

    monkeypatch.setattr(LUCIR, "_balanced_finetune", watched)
    outcome = execute(RunSpec("lucir", "quickdraw20_2x10", 0, str(tmp_path), epochs=1, max_train_per_class=20,
                              quiet=True, overrides=(("lucir", "memory", "100"), ("lucir", "ft_epochs", "2"))))
    assert outcome.status == "done", outcome
    assert calls == [1]  # after the second task only
    before, after = states["before"], states["after"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.blocks.0", "head.blocks.1"}  # the backbone, its BN statistics and sigma fixed
    assert states["grad"] == [False, True, True]  # the old block frozen again for the next task
    s = outcome.summary
    assert s["headline_classifier"] == "cnn" and s["last_accuracy"] == s["last_cnn_accuracy"]
    assert 0 < s["last_nme_accuracy"] <= 100
    final = checkpoint.load(Path(outcome.path) / "checkpoint.pt")["method"]["model"]
    assert torch.equal(final["head.blocks.0"], after["head.blocks.0"])
