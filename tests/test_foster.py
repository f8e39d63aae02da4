"""FOSTER: the boosted pair, the student, the class-balanced weights and the balanced KD, against
PyCIL's foster.py and FOSTERNet."""
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from harness.cil.boosting import BoostedNet, effective_number_weights
from harness.cil.distill import balanced_kd
from harness.nn.backbones import create_backbone
from harness.planning import RunSpec
from harness.runner import execute


def _task(*classes):
    return SimpleNamespace(classes_in_this_experience=list(classes))


def test_effective_number_weights_are_pycil_s_per_class_weights():
    counts = torch.tensor([20, 20, 80, 80, 80])
    beta = 0.96
    raw = [(1 - beta) / (1 - beta ** n) for n in counts.tolist()]
    expected = torch.tensor([w / sum(raw) * len(raw) for w in raw])
    got = effective_number_weights(counts, beta)
    assert torch.allclose(got, expected) and got[0] > got[-1]  # the rarer classes weigh more
    assert torch.isclose(got.mean(), torch.tensor(1.0))


def test_balanced_kd_is_the_cross_entropy_to_the_reweighted_teacher_and_plain_kd_with_equal_weights():
    torch.manual_seed(0)
    s, t, w = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([2.0, 2.0, 1.0, 1.0, 1.0])
    soft = F.softmax(t / 2, dim=1) * w
    soft = soft / soft.sum(1, keepdim=True)
    assert torch.isclose(balanced_kd(s, t, w, 2.0), -(soft * F.log_softmax(s / 2, dim=1)).sum(1).mean())
    plain = -(F.softmax(t / 2, dim=1) * F.log_softmax(s / 2, dim=1)).sum(1).mean()
    assert torch.isclose(balanced_kd(s, t, torch.ones(5), 2.0), plain)


def test_boosting_adds_a_trained_copy_beside_the_frozen_old_network_and_a_student_from_the_old():
    torch.manual_seed(0)
    net = BoostedNet(lambda: create_backbone("convnet_bn", 1, 28)).train()
    net.adaptation(_task(0, 1, 2))
    assert not net.boosting and net.single.head.out_features == 3
    first = {k: v.clone() for k, v in net.single.state_dict().items()}
    net.adaptation(_task(3, 4))
    assert net.boosting and net.known_classes == 5
    assert all(not p.requires_grad for p in net.old.parameters()) and not net.old.training
    assert all(p.requires_grad for p in net.new_backbone.parameters())
    assert net.head.weight.shape == (5, 128) and net.fe_head.weight.shape == (5, 64)
    # the old classes' rows keep their weights on the old features; the student starts as the old network
    assert torch.equal(net.head.weight[:3, :64], first["head.weight"]) and torch.equal(net.head.bias[:3], first["head.bias"])
    assert torch.equal(net.student.head.weight[:3], first["head.weight"]) and net.student.head.out_features == 5
    for k, v in net.student.backbone.state_dict().items():
        assert torch.equal(v, first[f"backbone.{k}"])
    x = torch.rand(2, 1, 28, 28)
    logits, fe_logits, old_logits = net.boosted(x)
    assert logits.shape == (2, 5) and fe_logits.shape == (2, 5) and old_logits.shape == (2, 3)
    net.eval()
    assert torch.allclose(net(x), net.classify(net.features(x)))
    net.evaluate_student = True
    assert torch.allclose(net(x), net.student(x)) and net.features(x).shape == (2, 64)
    # the next task boosts from the student
    student = {k: v.clone() for k, v in net.student.state_dict().items()}
    net.train().adaptation(_task(5))
    for k, v in net.old.state_dict().items():
        assert torch.equal(v, student[k])


def test_a_run_compresses_after_the_second_task_and_scores_the_pair_or_the_student(tmp_path, monkeypatch):
    from methods.foster import FOSTER

    calls, compress = [], FOSTER._compress

    def counted(self):
        calls.append(self.model.known_classes)
        before = {k: v.clone() for k, v in self.model.state_dict().items() if not k.startswith("student.")}
        compress(self)
        after = {k: v for k, v in self.model.state_dict().items() if not k.startswith("student.")}
        assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher is left as it was

    monkeypatch.setattr(FOSTER, "_compress", counted)
    runs = {}
    for evaluate in ("teacher", "student"):
        outcome = execute(RunSpec("foster", "quickdraw20_2x10", 0, str(tmp_path / evaluate), epochs=1,
                                  max_train_per_class=20, quiet=True,
                                  overrides=(("foster", "memory", "100"), ("foster", "compression_epochs", "1"),
                                             ("foster", "evaluate", evaluate))))
        assert outcome.status == "done", outcome
        runs[evaluate] = outcome.summary
    assert calls == [20, 20]  # after the second task of each run
    s = runs["teacher"]
    assert s["headline_classifier"] == "cnn" and s["last_accuracy"] == s["last_cnn_accuracy"]
    # the same training, scored on another network after the second task only
    assert runs["student"]["accuracy_matrix"][0] == s["accuracy_matrix"][0]
    assert runs["student"]["accuracy_matrix"][1] != s["accuracy_matrix"][1]
