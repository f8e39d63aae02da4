"""BiC: the bias layer, the held-out split and the correction stage, against PyCIL's bic.py."""
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from harness import checkpoint
from harness.cil.bias_correction import TaskBias, held_out_split
from harness.method import MethodContext
from harness.nn.backbones import resize_incremental_head
from harness.params import resolve_params
from harness.protocol import get_protocol
from harness.registry import METHODS, discover
from harness.planning import RunSpec
from harness.runner import execute


def test_each_task_s_pair_acts_on_its_own_classes_only_once_they_exist():
    bias = TaskBias([3, 2, 2])
    with torch.no_grad():
        bias.alpha[0].fill_(2.0)
        bias.beta[1].fill_(-1.0)
    logits = torch.arange(10.0).reshape(2, 5)  # the head knows tasks 1 and 2 so far
    out = bias(logits)
    assert out.shape == (2, 5)
    assert torch.equal(out[:, :3], 2 * logits[:, :3]) and torch.equal(out[:, 3:], logits[:, 3:] - 1)
    assert not any(p.requires_grad for p in bias.parameters())
    pair = bias.train_only(1)
    assert [p.requires_grad for p in bias.parameters()] == [False, True, False, False, True, False]
    assert pair[0] is bias.alpha[1] and pair[1] is bias.beta[1]


def test_the_held_out_split_is_class_balanced_disjoint_and_seeded():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 3)
    keep, held = held_out_split(labels, 2, seed=5)
    assert sorted(keep.tolist() + held.tolist()) == list(range(len(labels)))
    assert torch.bincount(labels[held]).tolist() == [2, 2, 2]
    again_keep, again_held = held_out_split(labels, 2, seed=5)
    assert torch.equal(held, again_held) and not torch.equal(held, held_out_split(labels, 2, seed=6)[1])
    _, most = held_out_split(labels, 5, seed=0)  # a class of 3 keeps one sample to train on
    assert torch.bincount(labels[most]).tolist() == [5, 5, 2]


def test_a_run_fits_only_the_newest_task_s_pair_after_the_first_task(tmp_path):
    spec = RunSpec("bic", "quickdraw20_2x10", 0, str(tmp_path), epochs=2, max_train_per_class=30, quiet=True,
                   overrides=(("bic", "memory", "200"),))
    outcome = execute(spec)
    weights = checkpoint.load(Path(outcome.path) / "checkpoint.pt")["method"]["model"]
    first = weights["bias.alpha.0"], weights["bias.beta.0"]
    second = weights["bias.alpha.1"], weights["bias.beta.1"]
    assert float(first[0]) == 1.0 and float(first[1]) == 0.0  # nothing old to correct against after task 1
    assert (float(second[0]), float(second[1])) != (1.0, 0.0)
    s = outcome.summary
    assert s["headline_classifier"] == "cnn" and s["last_accuracy"] == s["last_cnn_accuracy"]
    config = json.loads((Path(outcome.path) / "config.json").read_text())
    assert config["settings"]["split_ratio"] == 0.1


def test_the_correction_stage_moves_the_newest_pair_alone_with_pycil_s_loss(monkeypatch):
    discover(())
    protocol = get_protocol("quickdraw20_2x10")
    hp, _ = resolve_params(METHODS.get("bic"), protocol.family, [("bic", "bias_epochs", "3")])
    m = METHODS.get("bic")(context=MethodContext(protocol, [str(i) for i in range(20)], torch.device("cpu"), 0,
                                                 quiet=True), hp=hp)
    resize_incremental_head(m.model.head, 20)
    m.train_epochs = 3
    torch.manual_seed(0)
    m.held_out = (torch.rand(12, 1, 28, 28), torch.arange(12) % 20)
    params = {k: v.clone() for k, v in m.model.named_parameters()}
    losses = []
    # PyCIL bic.py, stage "bias_correction": F.cross_entropy(torch.softmax(logits, dim=1), targets)
    real = F.cross_entropy

    def recorded(scores, y):
        losses.append(scores.detach())
        return real(scores, y)
    monkeypatch.setattr(F, "cross_entropy", recorded)
    m._fit_bias(1)
    moved = {k for k, v in m.model.named_parameters() if not torch.equal(v, params[k])}
    assert moved == {"bias.alpha.1", "bias.beta.1"}
    assert len(losses) == 3 and all(torch.allclose(s.sum(1), torch.ones(len(s))) for s in losses)  # softmax inputs
    assert m.held_out is None and not any(p.requires_grad for p in m.model.bias.parameters())


def test_a_method_file_imported_by_another_is_still_its_own_source():
    # methods/bic.py imports methods/wa.py and methods/icarl.py before discover reaches them
    from harness.identity import method_files
    discover(())
    assert METHODS.source("icarl") == "methods/icarl.py" and METHODS.source("wa") == "methods/wa.py"
    files = [Path(f).name for f in method_files(METHODS.get("wa"), METHODS.path("wa"))]
    assert files == ["wa.py", "icarl.py"]
