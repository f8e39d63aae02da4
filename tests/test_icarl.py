"""iCaRL and its building blocks: herding, the exemplar memory, NME, sigmoid distillation, the CLI."""
import copy
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

from harness.cil.distill import frozen_copy, sigmoid_distillation_loss
from harness.cil.memory import ExemplarMemory, class_means, herding, nme_scores
from harness.method import MethodContext, TensorBatches
from harness.params import resolve_params
from harness.protocol import get_protocol
from harness.cli import main
from harness.registry import METHODS, discover
from harness.runner import RunSpec, execute
from harness.state import restore_method


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def test_herding_keeps_the_running_mean_closest_to_the_class_mean():
    # Unit vectors at these angles; their mean points at about 9.1 degrees. Step by step:
    # 10 (nearest); 0 (mean of {10, 0} = 5 beats {10, 20} = 15); 20; then -25 before 40,
    # although 40 is nearer the class mean: the running mean of {10, 0, 20} sits above 9
    # degrees and -25 pulls it back. Norms differ: herding normalises first.
    angles = [0, 10, 20, -25, 40]
    norms = [1.0, 5.0, 0.2, 3.0, 7.0]
    f = torch.tensor([[r * math.cos(math.radians(a)), r * math.sin(math.radians(a))] for a, r in zip(angles, norms)])
    assert herding(f, 5).tolist() == [1, 0, 2, 3, 4]
    assert herding(f, 2).tolist() == [1, 0]  # a smaller m is a prefix: shrinking keeps the best
    assert herding(f, 9).tolist() == [1, 0, 2, 3, 4]  # m > n: all, no repeats


def test_herding_never_repeats_duplicates_are_separate_samples():
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    picks = herding(f, 3).tolist()
    assert sorted(picks) == [0, 1, 2]


def test_count_memory_stays_within_budget_and_balanced():
    mem = ExemplarMemory(max_items=50)
    for step, n_new in enumerate([10, 10, 10, 7]):
        first = len(mem.classes)
        quota = mem.make_room(n_new, item_bytes=784)
        for c in range(first, first + n_new):
            # items numbered by rank: shrinking must keep the best (first) ones
            mem.add(c, torch.arange(30, dtype=torch.uint8)[:quota, None].expand(-1, 784).clone())
        seen = first + n_new
        counts = {c: len(t) for c, t in mem.items.items()}
        assert len(mem) <= 50 and set(counts.values()) == {50 // seen}, (step, counts)
        assert all(t[:, 0].tolist() == list(range(50 // seen)) for t in mem.items.values())
        assert mem.nbytes == len(mem) * 784
    with pytest.raises(ValueError, match="exceed"):
        mem.add(99, torch.zeros(50, 784, dtype=torch.uint8))


def test_byte_memory_stays_within_budget():
    budget = 784 * 45 + 100
    mem = ExemplarMemory(max_bytes=budget)
    expected = []
    for n_new in [10, 10, 10]:
        first = len(mem.classes)
        quota = mem.make_room(n_new, item_bytes=784)
        for c in range(first, first + n_new):
            mem.add(c, torch.zeros(min(quota, 80), 1, 28, 28, dtype=torch.uint8))
        expected.append(budget // (first + n_new) // 784)
        assert mem.nbytes <= budget and {len(t) for t in mem.items.values()} == {expected[-1]}
    assert expected == [4, 2, 1]
    x, y = mem.tensors()
    assert x.shape == (30, 1, 28, 28) and y.tolist() == sorted(y.tolist())


def test_nme_classifies_a_separable_toy_set():
    torch.manual_seed(0)
    centres = torch.eye(4)[:3] * 3
    y = torch.arange(3).repeat_interleave(20)
    feats = centres[y] + 0.3 * torch.randn(60, 4)
    ex = torch.cat([herding(feats[y == c], 5) + 20 * c for c in range(3)])  # 5 exemplars per class
    means = class_means(feats[ex], y[ex], range(3))
    assert torch.allclose(means.norm(dim=1), torch.ones(3))
    test = centres[y] + 0.3 * torch.randn(60, 4)
    scores = nme_scores(test, means)
    assert scores.shape == (60, 3) and (scores.argmax(1) == y).all()


@pytest.fixture(scope="module")
def icarl_method():
    discover(())
    cls = METHODS.get("icarl")
    protocol = get_protocol("quickdraw20_2x10")
    hp, _ = resolve_params(cls, protocol.family, [("icarl", "memory", "40")])
    return cls(context=MethodContext(protocol, [str(i) for i in range(20)], torch.device("cpu"), 0, quiet=True), hp=hp)


def test_distillation_targets_come_from_the_frozen_old_model(icarl_method, monkeypatch):
    m = icarl_method
    monkeypatch.setitem(m.hp, "loss", "bce")
    m.model.head.classifier = torch.nn.Linear(m.model.backbone.out_dim, 4)  # 4 "old" classes
    m.model.head.active_units = torch.ones(4, dtype=torch.int8)
    m.old_model = frozen_copy(m.model)
    x = torch.rand(6, 1, 28, 28)
    old_logits = m.old_model(x).clone()
    with torch.no_grad():  # the current model moves on; the teacher must not
        for p in m.model.parameters():
            p.add_(0.5)
    assert torch.equal(m.old_model(x), old_logits)
    assert not any(p.requires_grad for p in m.old_model.parameters())

    y = torch.tensor([4, 5, 6, 4, 5, 6])  # new classes 4..6
    logits = torch.randn(6, 7, requires_grad=True)
    m.mbatch, m.mb_output, m.is_training = [x, y, torch.zeros(6, dtype=torch.long)], logits, True
    loss = m.criterion()
    targets = F.one_hot(y, 7).float()
    targets[:, :4] = torch.sigmoid(old_logits)
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 6)
    assert torch.allclose(sigmoid_distillation_loss(logits, y, old_logits, per_class="mean"),
                          F.binary_cross_entropy_with_logits(logits, targets))

    # The fast path: teacher logits computed once per task ride along in the batches.
    m.dataloader = TensorBatches(x, y, 4, shuffle=True)
    m.precompute_teacher_logits()
    batches = m.dataloader
    for bx, by, teacher, _ in batches:
        assert torch.allclose(teacher, m.old_model(bx), atol=1e-6)
        m.mbatch, m.mb_output = [bx, by, teacher, torch.zeros(len(by), dtype=torch.long)], logits[: len(by)]
        expected = sigmoid_distillation_loss(logits[: len(by)], by, m.old_model(bx))
        assert torch.allclose(m.criterion(), expected, atol=1e-6)
    m.is_training = False


def test_ce_kd_is_cross_entropy_plus_pycils_kd_without_t_squared(icarl_method):
    m = icarl_method
    assert m.hp["loss"] == "ce_kd" and m.hp["temperature"] == 2.0  # the default: PyCIL's iCaRL
    m.model.head.classifier = torch.nn.Linear(m.model.backbone.out_dim, 4)
    m.model.head.active_units = torch.ones(4, dtype=torch.int8)
    m.old_model = frozen_copy(m.model)
    x, y = torch.rand(6, 1, 28, 28), torch.tensor([4, 5, 6, 4, 5, 6])
    old = m.old_model(x)
    logits = torch.randn(6, 7, requires_grad=True)
    m.mbatch, m.mb_output, m.is_training = [x, y, torch.zeros(6, dtype=torch.long)], logits, True
    try:
        loss = m.criterion()
    finally:
        m.is_training = False
    # PyCIL's _KD_loss: -sum(softmax(old/T) * log_softmax(new[:, :old]/T)) / batch, added to CE.
    q = torch.softmax(old / 2, 1)
    pycil_kd = -(q * torch.log_softmax(logits[:, :4] / 2, 1)).sum() / 6
    entropy = -torch.xlogy(q, q).sum() / 6  # KL = PyCIL's cross-entropy form - the teacher's entropy
    assert torch.allclose(loss, F.cross_entropy(logits, y) + pycil_kd - entropy, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    (pycil_grad,) = torch.autograd.grad(F.cross_entropy(logits, y) + pycil_kd, logits)
    assert torch.allclose(grad, pycil_grad, atol=1e-7)


def test_each_task_starts_a_fresh_optimizer_with_its_own_weight_decay(monkeypatch, tmp_path):
    discover(())
    cls, seen = METHODS.get("icarl"), []
    train = cls.train

    def spy(self, experience, **kw):
        seen.append((len(self.optimizer.state), {g["weight_decay"] for g in self.optimizer.param_groups}))
        train(self, experience, **kw)
        seen.append((len(self.optimizer.state), None))

    monkeypatch.setattr(cls, "train", spy)
    spec = RunSpec("icarl", "quickdraw20_2x10", 0, str(tmp_path), epochs=1, max_train_per_class=8, quiet=True,
                   overrides=(("icarl", "init_weight_decay", "0.003"), ("icarl", "weight_decay", "0.001")))
    execute(spec)
    (before1, decay1), (after1, _), (before2, decay2), (after2, _) = seen
    assert decay1 == {0.003} and decay2 == {0.001}
    assert after1 > 0 and before2 == 0 and after2 > 0  # momentum buffers: kept within a task, not across


def test_per_class_memory_grows_with_the_classes():
    mem = ExemplarMemory(per_class=3)
    for c in range(5):
        assert mem.make_room(2, 784) == 3  # no shrinking: every class keeps 3
        mem.add(c, torch.zeros(3, 1, 28, 28, dtype=torch.uint8))
    assert len(mem) == 15 and all(len(t) == 3 for t in mem.items.values())
    with pytest.raises(ValueError, match="per class"):
        mem.add(9, torch.zeros(4, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="exactly one"):
        ExemplarMemory(max_items=10, per_class=2)


def test_memory_means_and_teacher_round_trip_through_a_weights_only_checkpoint(icarl_method):
    m = icarl_method
    mem = m.memory
    mem.items = {0: torch.randint(0, 255, (2, 1, 28, 28), dtype=torch.uint8),
                 1: torch.randint(0, 255, (2, 1, 28, 28), dtype=torch.uint8)}
    m.means = m._exemplar_means()
    m.old_model = frozen_copy(m.model)
    buf = io.BytesIO()
    torch.save(m.checkpoint_state(), buf)  # no code in iCaRL for it: the harness saves its attributes
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    fresh = type(m)(context=m.context, hp=m.hp)
    fresh.model = copy.deepcopy(m.model)  # restore_model's part: the model grown as training grew it
    restore_method(fresh, state["state"])
    assert fresh.memory_usage() == m.memory_usage() == (4, 4 * 784)
    assert torch.equal(fresh.means, m.means)
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(fresh.old_model(x), m.old_model(x))


QUICK = ["--protocol", "quickdraw20_2x10", "--epochs", "1", "--max-train-per-class", "16", "--quiet", "--device", "cpu"]


def test_cli_run_reports_the_memory(tmp_path):
    # quickdraw20_2x10: 20 classes share 40 exemplars -> 2 per class after the second task
    assert run_cli("run", "--methods", "icarl", *QUICK, "--set", "icarl.memory=40", "--out", tmp_path) == 0
    s = json.loads((tmp_path / "quickdraw20_2x10+maxtrain=16" / "icarl+epochs=1+memory=40" / "seed0"
                    / "summary.json").read_text())
    assert s["memory_exemplars"] == 40 and s["memory_bytes"] == 40 * 784
    assert len(s["accuracy_matrix"]) == 2 and s["last_accuracy"] > 10  # chance is 5%


def test_per_class_memory_run(tmp_path):
    spec = RunSpec("icarl", "quickdraw20_2x10", 0, str(tmp_path), epochs=1, max_train_per_class=16, quiet=True,
                   overrides=(("icarl", "memory_per_class", "3"),))
    s = execute(spec).summary
    assert s["memory_exemplars"] == 20 * 3 and s["memory_bytes"] == 60 * 784


def test_byte_budget_run(tmp_path):
    # 23520 bytes = 30 doodles of 784 bytes: 3 per class after task 1, 1 per class after task 2
    spec = RunSpec("icarl", "quickdraw20_2x10", 0, str(tmp_path), epochs=1, max_train_per_class=16, quiet=True,
                   overrides=(("icarl", "memory_bytes", "23520"),))
    s = execute(spec).summary
    assert s["memory_exemplars"] == 20 and s["memory_bytes"] == 20 * 784


def test_a_run_interrupted_after_task_1_resumes_to_the_same_result(straight_and_resumed):
    straight, resumed = straight_and_resumed(method="icarl", protocol="quickdraw20_2x10", seed=0, epochs=1,
                                             max_train_per_class=16, quiet=True, overrides=(("icarl", "memory", "40"),))
    assert resumed["accuracy_matrix"] == straight["accuracy_matrix"]
    assert resumed["memory_exemplars"] == straight["memory_exemplars"] == 40


def test_memory_update_selects_by_herding_or_by_a_per_class_seed():
    torch.manual_seed(0)
    images = torch.randint(0, 255, (30, 1, 4, 4), dtype=torch.uint8)
    labels = torch.arange(3).repeat_interleave(10)
    feats = torch.randn(30, 8)
    herded = ExemplarMemory(max_items=12)
    herded.update(images, labels, [0, 1, 2], seed=5, features=feats)  # 4 per class, best first
    assert torch.equal(herded.items[1], images[10 + herding(feats[10:20], 4)])
    # random: a class's choice depends on the seed and the class only, not on its neighbours
    alone, together = ExemplarMemory(max_items=4), ExemplarMemory(max_items=12)
    alone.update(images[10:20], labels[10:20], [1], seed=5)
    together.update(images, labels, [2, 0, 1], seed=5)
    assert torch.equal(alone.items[1], together.items[1]) and not torch.equal(together.items[1], images[10:14])
    other = ExemplarMemory(max_items=12)
    other.update(images, labels, [0, 1, 2], seed=6)
    assert not torch.equal(other.items[1], together.items[1])
    # new classes shrink the old ones to the new share; encode stores what it returns
    together.update(images[:10], torch.full((10,), 3), [3], seed=5, encode=lambda x, g: x[:, :, :2], item_bytes=8)
    assert [len(together.items[c]) for c in range(4)] == [3, 3, 3, 3] and together.items[3].shape == (3, 1, 2, 4)
