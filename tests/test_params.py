"""Declared hyperparameters, per-protocol defaults and --set overrides."""
import pytest

from harness.errors import HarnessError
from harness.params import Param, parse_set_options, resolve_params, validate_set_options
from harness.registry import METHODS, discover

discover()


def test_param_coercion_and_bounds():
    assert Param(10, low=1).coerce("k", "20") == 20
    assert Param(0.1).coerce("k", "1e-3") == pytest.approx(1e-3)
    assert Param(True).coerce("k", "off") is False
    assert Param("a", choices=("a", "b")).coerce("k", "b") == "b"
    with pytest.raises(HarnessError, match="expected int"):
        Param(10).coerce("icarl.memory", "lots")
    with pytest.raises(HarnessError, match="must be >= 1"):
        Param(10, low=1).coerce("k", "0")
    with pytest.raises(HarnessError, match="must be one of"):
        Param("a", choices=("a", "b")).coerce("k", "c")
    with pytest.raises(HarnessError, match="expected int"):
        Param(10).coerce("k", 2.5)


def test_parse_set_options():
    assert parse_set_options(["finetune.lr=0.1", "epochs=3"]) == [("finetune", "lr", "0.1"), (None, "epochs", "3")]
    for bad in ["lr", "=3", "finetune.=1"]:
        with pytest.raises(HarnessError):
            parse_set_options([bad])


def test_resolution_order_default_family_cli_set():
    cls = METHODS.get("finetune")
    hp, changed = resolve_params(cls, "cifar100")
    assert hp["backbone"] == "resnet32" and hp["lr"] == 0.1 and changed == {}
    hp, changed = resolve_params(cls, "quickdraw", [("finetune", "lr", "0.5"), (None, "epochs", "2")], {"epochs": 7})
    assert hp["lr"] == 0.5 and hp["epochs"] == 2 and changed == {"lr": 0.5, "epochs": 2}
    hp, _ = resolve_params(cls, "quickdraw", [("joint", "lr", "0.5")])
    assert hp["lr"] == 0.1  # an override for another method leaves this one alone


def test_validate_refuses_unknown_keys_and_methods():
    methods = {"finetune": METHODS.get("finetune")}
    validate_set_options([("finetune", "lr", "0.2")], methods)
    with pytest.raises(HarnessError, match="has no parameter 'memory'"):
        validate_set_options([("finetune", "memory", "10")], methods)
    with pytest.raises(HarnessError, match="not in --methods"):
        validate_set_options([("icarl", "memory", "10")], methods)
    with pytest.raises(HarnessError, match="no selected method declares"):
        validate_set_options([(None, "nonsense", "1")], methods)
    with pytest.raises(HarnessError, match="expected float"):
        validate_set_options([("finetune", "lr", "fast")], methods)


def test_none_is_a_value_where_the_choices_name_it():
    cls = METHODS.get("finetune")
    hp, changed = resolve_params(cls, "quickdraw", [("finetune", "lr_schedule", "none"), ("finetune", "augment", "none")])
    assert hp["lr_schedule"] == "none" and hp["augment"] == "none" and changed == {"lr_schedule": "none", "augment": "none"}


def test_a_setting_can_bring_its_own_recipe_and_the_user_still_wins():
    from harness.registry import METHODS, discover

    discover()
    gmm = METHODS.get("gmm")
    hp, changed = resolve_params(gmm, "quickdraw", [("gmm", "model", "hf_llava")])
    assert (hp["lr"], hp["min_lr"], hp["warmup_steps"], hp["epochs"], hp["batch_size"]) == (3e-6, 1e-6, 200, 5, 2)
    assert changed == {"model": "hf_llava"}  # the row is labelled by what the user set
    hp, _ = resolve_params(gmm, "quickdraw", [("gmm", "model", "hf_llava"), ("gmm", "lr", "1e-5")])
    assert hp["lr"] == 1e-5 and hp["epochs"] == 5
    hp, _ = resolve_params(gmm, "quickdraw", [])
    assert hp["lr"] == gmm.params["lr"].default and hp["image_size"] == 112
