"""Small user-facing fixes: repeated classes in a protocol's order, where an undeclared setting was
read, and the method pages' settings tables."""
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import pytest
import torch

from harness.errors import HarnessError
from harness.method import TRAINING_PARAMS, CILMethod, MethodContext, Settings
from harness.params import Param, resolve_params
from harness.protocol import Protocol, register_protocol
from harness.registry import METHODS, PROTOCOLS, discover

ROOT = Path(__file__).resolve().parents[1]
HERE = os.path.relpath(__file__)
if HERE.startswith(os.pardir):  # run from outside the checkout: messages name files by absolute path
    HERE = os.path.abspath(__file__)


# ---- 1. a class_order that repeats a class ----------------------------------------------

def test_a_repeated_class_in_class_order_is_refused_at_registration():
    protocol = Protocol(name="papercut_repeats", dataset="quickdraw", num_classes=4, num_tasks=2, increment=2,
                        class_order=["cat", "dog", "cat", "dog"])
    with pytest.raises(HarnessError) as info:
        register_protocol(protocol)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert "papercut_repeats" in message and "cat, dog" in message
    assert "papercut_repeats" not in PROTOCOLS


def test_a_class_order_without_repeats_passes():
    Protocol(name="papercut_distinct", dataset="quickdraw", num_classes=3, num_tasks=1, increment=3,
             class_order=["cat", "dog", "fish"]).validate()


# ---- 2. where an undeclared setting was read ------------------------------------------------

def _read_undeclared():
    settings = Settings("papercut", {"epochs": 1})
    settings["width"]


def test_an_undeclared_setting_names_the_line_that_read_it():
    with pytest.raises(HarnessError) as info:
        _read_undeclared()
    message = str(info.value)
    line = _read_undeclared.__code__.co_firstlineno + 2
    assert f"(read at {HERE}:{line})" in message
    assert message.startswith("method 'papercut' reads the setting 'width' but does not declare it")
    assert "add it to its params" in message


def _context():
    discover()
    return MethodContext(protocol=PROTOCOLS.get("quickdraw20_2x10"), class_names=[], device=torch.device("cpu"),
                         seed=0, quiet=True)


class ReadsWidth(CILMethod):
    name = "papercut_reads_width"
    params = dict(TRAINING_PARAMS)

    def build_model(self):
        type(self).read_line = sys._getframe().f_lineno + 1
        return torch.nn.Linear(self.hp["width"], 2)


class LacksBackbone(CILMethod):
    name = "papercut_lacks_backbone"
    params = {"epochs": Param(1, low=1), "batch_size": Param(8, low=1)}


def test_a_method_reading_an_undeclared_setting_is_pointed_at_its_own_line():
    with pytest.raises(HarnessError) as info:
        ReadsWidth(context=_context(), hp=resolve_params(ReadsWidth, "quickdraw")[0])
    assert f"(read at {HERE}:{ReadsWidth.read_line})" in str(info.value)


def test_a_setting_the_base_class_reads_points_at_the_method_class():
    with pytest.raises(HarnessError) as info:
        LacksBackbone(context=_context(), hp=resolve_params(LacksBackbone, "quickdraw")[0])
    message = str(info.value)
    line = inspect.getsourcelines(LacksBackbone)[1]
    assert "reads the setting 'backbone'" in message
    assert f"LacksBackbone, defined at {HERE}:{line})" in message
    assert "harness/method.py" not in message


# ---- 3. the method pages' settings tables ----------------------------------------------------

def _hooks():
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "scripts" / "mkdocs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells
    return header, rows


def test_settings_table_shows_what_each_protocol_family_runs_with():
    hooks = _hooks()
    markdown = hooks.settings_table("icarl")
    header, rows = _table(markdown)
    assert "``" not in markdown
    cls = METHODS.get("icarl")
    assert header[2] == "quickdraw"  # the default protocol's family first
    quickdraw = resolve_params(cls, "quickdraw")[0]
    cifar = resolve_params(cls, "cifar100")[0]
    column = header.index("cifar100")
    for key in ("lr", "epochs", "backbone"):
        assert rows[key][2] == f"`{quickdraw[key]}`"
        assert rows[key][column] == f"`{cifar[key]}`"
    # the declared defaults still have a column, for protocols of a family without a recipe
    assert rows["lr"][header.index("any other family")] == f"`{cls.params['lr'].default}`"
    assert rows["init_milestones"][2] == "(empty)"


def test_families_that_resolve_alike_share_a_column():
    hooks = _hooks()
    header, rows = _table(hooks.settings_table("gmm"))
    # GMM has a recipe for quickdraw only: every other family runs with the declared defaults
    assert header[2:4] == ["quickdraw", "cifar100, fmnist, imagenet100, imagenet_r, other families"]


def test_a_family_whose_recipe_the_method_cannot_take_is_said_to_be_refused():
    """MEMO cuts three-stage networks only: the ImageNet recipes' ResNet-18 gets a line, not a column
    (and the docs build does not stop on it)."""
    hooks = _hooks()
    markdown = hooks.settings_table("memo")
    header, _ = _table(markdown)
    assert not any("imagenet" in h for h in header)
    assert "On imagenet100 protocols a run is refused: `memo.backbone='resnet18'" in markdown
