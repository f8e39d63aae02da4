"""harness.state: a method's attributes and plugins go through a weights-only checkpoint and come back."""
import io
from collections import defaultdict

import numpy as np
import pytest
import torch
from torch import nn

from harness.state import UnsaveableState, capture_method, restore_method


class Plugin:
    def __init__(self):
        self.count = 0
        self.by_task = defaultdict(set)
        self.teacher = None


class Owner:
    """Stands in for a method: a model, an optimizer, plugins and attributes of every kind."""
    name = "owner"

    def __init__(self):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.plugins = [Plugin()]
        self.head = self.model[2]  # an alias of a part of the model
        self.teacher = None  # a module made during training
        self.means = None
        self.table = {}
        self.pixels = np.zeros(3, dtype=np.uint8)
        self.pair = (1, "a")
        self.activation = torch.relu  # configuration: skipped
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=2)


def roundtrip(obj):
    saved = capture_method(obj, {"model", "optimizer", "plugins"})
    buf = io.BytesIO()
    torch.save(saved, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


def trained_owner():
    o = Owner()
    o.model[0].weight.data.fill_(0.5)
    o.teacher = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    o.teacher.load_state_dict(o.model.state_dict())
    o.teacher.eval().requires_grad_(False)
    o.means = torch.arange(6.0).view(2, 3)
    o.table = {0: torch.ones(2, dtype=torch.uint8), "k": [1.5, None]}
    o.pixels = np.arange(3, dtype=np.uint8)
    o.pair = (7, "b")
    o.scheduler.step()
    o.plugins[0].count = 3
    o.plugins[0].by_task[0].update({1, 2})
    o.plugins[0].teacher = o.teacher
    return o


def test_every_kind_of_attribute_comes_back_through_weights_only():
    saved = roundtrip(trained_owner())
    fresh = Owner()
    restore_method(fresh, saved)
    assert fresh.head is fresh.model[2]  # still the model's own layer
    assert torch.equal(fresh.teacher[0].weight, torch.full((3, 4), 0.5))
    assert not fresh.teacher.training and not any(p.requires_grad for p in fresh.teacher.parameters())
    assert torch.equal(fresh.means, torch.arange(6.0).view(2, 3))
    assert torch.equal(fresh.table[0], torch.ones(2, dtype=torch.uint8)) and fresh.table["k"] == [1.5, None]
    assert fresh.pixels.tolist() == [0, 1, 2] and fresh.pixels.dtype == np.uint8
    assert fresh.pair == (7, "b")
    assert fresh.activation is torch.relu
    assert fresh.scheduler.last_epoch == 1
    plugin = fresh.plugins[0]
    assert plugin.count == 3 and isinstance(plugin.by_task, defaultdict) and plugin.by_task[0] == {1, 2}
    assert plugin.by_task[5] == set()  # still a defaultdict(set)
    assert torch.equal(plugin.teacher[0].weight, fresh.teacher[0].weight)


def test_data_in_an_attribute_is_refused_in_one_line_naming_it():
    o = Owner()
    o.buffer = torch.utils.data.TensorDataset(torch.zeros(2, 1))
    with pytest.raises(UnsaveableState) as err:
        capture_method(o, {"model", "optimizer", "plugins"})
    msg = str(err.value)
    assert "\n" not in msg and "owner.buffer" in msg and "'buffer'" in msg and "transient" in msg


def test_a_generator_is_refused_and_transient_names_are_left_out():
    o = Owner()
    o.stream = (i for i in range(3))
    with pytest.raises(UnsaveableState, match="owner.stream"):
        capture_method(o, {"model", "optimizer", "plugins"})
    saved = capture_method(o, {"model", "optimizer", "plugins", "stream"})
    assert "stream" not in saved["attributes"]


def test_an_object_made_during_training_that_cannot_be_rebuilt_is_named_at_resume():
    o = Owner()
    o.later = torch.optim.lr_scheduler.StepLR(o.optimizer, step_size=2)
    saved = roundtrip(o)
    with pytest.raises(UnsaveableState, match=r"owner.later .*create it in __init__"):
        restore_method(Owner(), saved)
