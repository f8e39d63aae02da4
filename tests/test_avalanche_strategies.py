"""Avalanche's strategies through the harness: settings from their signatures, `list`, resume of
EWC's importance data, buffers of replay, and a strategy's plugins' hooks at evaluation.

`harness check` of every wrapped strategy runs in tests/test_check.py (it covers every method).
"""
import json
import warnings

import pytest
import torch

from harness.cil.avalanche_strategies import NOT_OFFERED, StrategySpec, strategy_params
from harness.cli import main
from harness.errors import HarnessError
from harness.registry import METHODS, discover
from harness.state import capture_method, restore_method

discover()
warnings.filterwarnings("ignore", category=DeprecationWarning)


def test_a_strategy_s_own_arguments_become_settings_with_their_signature_s_types():
    from avalanche.training import EWC, DER

    ewc = strategy_params(EWC, StrategySpec("ewc", "EWC", "", defaults={"ewc_lambda": 1000.0}))
    assert ewc["ewc_lambda"].default == 1000.0 and ewc["mode"].default == "separate"
    assert ewc["decay_factor"].default is None and ewc["decay_factor"].coerce("d", "0.5") == 0.5  # Optional[float]
    assert ewc["keep_importance_data"].coerce("k", "yes") is True
    der = strategy_params(DER, StrategySpec("der", "DER", ""))
    assert der["mem_size"].default == 200 and der["batch_size_mem"].coerce("b", "32") == 32
    with pytest.raises(HarnessError, match="'alpha' has no default"):
        from avalanche.training import LwF
        strategy_params(LwF, StrategySpec("lwf", "LwF", ""))


def test_wrapped_strategies_are_listed_with_the_class_they_wrap_and_the_rest_with_a_reason(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    wrapped = [n for n in METHODS.names() if "Avalanche's" in METHODS.get(n).description]
    assert len(wrapped) >= 15
    for line in ("  ewc              Avalanche's EWC: Kirkpatrick", "  der              Avalanche's DER: Buzzega"):
        assert line in out
    assert "Avalanche strategies not offered:" in out
    for name in ("PackNet", "LearningToPrompt", "JointTraining", "ER_AML"):
        assert name in NOT_OFFERED and f"  {name} " in out
    assert main(["list", "ewc"]) == 0
    shown = capsys.readouterr().out
    assert "ewc_lambda" in shown and "mem_size" not in shown


def _resume_args(out, method, *extra):
    return ["run", "--methods", method, "--protocol", "quickdraw20_2x10", "--epochs", "1", "--max-train-per-class",
            "12", "--device", "cpu", "--threads", "1", "--quiet", "--out", str(out), *extra]


@pytest.mark.parametrize("method", ["ewc", "replay"])
def test_a_strategy_killed_mid_run_resumes_to_the_straight_run_s_matrix(tmp_path, method, monkeypatch):
    """EWC's importances (ParamData made during training) and Replay's buffer (Avalanche datasets)
    come back from the checkpoint: the resumed run ends where the straight one does."""
    assert main(_resume_args(tmp_path / "straight", method)) == 0
    cls = METHODS.get(method)
    learn, calls = cls.learn, []

    def crashing(self, experience):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return learn(self, experience)

    monkeypatch.setattr(cls, "learn", crashing)
    assert main(_resume_args(tmp_path / "resumed", method)) == 130
    monkeypatch.setattr(cls, "learn", learn)
    assert main(_resume_args(tmp_path / "resumed", method)) == 0

    def matrix(root):
        return json.loads(next(root.rglob("summary.json")).read_text())["accuracy_matrix"]
    assert matrix(tmp_path / "resumed") == matrix(tmp_path / "straight")


def test_ewc_importances_made_during_training_come_back_as_param_data():
    from avalanche.training.utils import ParamData

    from harness.method import MethodContext
    from harness.registry import PROTOCOLS

    ctx = MethodContext(protocol=PROTOCOLS.get("quickdraw20_2x10"), class_names=[], device=torch.device("cpu"),
                        seed=0, quiet=True)
    cls = METHODS.get("ewc")
    hp = {k: p.default for k, p in cls.params.items()}
    trained = cls(context=ctx, hp=hp)
    plugin = next(p for p in trained.plugins if type(p).__name__ == "EWCPlugin")
    plugin.importances[0] = {"w": ParamData("w", init_tensor=torch.arange(4.0).view(2, 2))}
    saved = capture_method(trained, trained._not_state())
    fresh = cls(context=ctx, hp=hp)
    restore_method(fresh, saved)
    back = next(p for p in fresh.plugins if type(p).__name__ == "EWCPlugin").importances[0]["w"]
    assert isinstance(back, ParamData) and back.shape == torch.Size([2, 2]) and back.device == torch.device("cpu")
    assert torch.equal(back.data, torch.arange(4.0).view(2, 2))
    back.expand(torch.Size([3, 2]))  # its init function (torch.zeros) came back by name
    assert back.data.shape == (3, 2) and back.data[2].eq(0).all()


def test_a_replay_buffer_comes_back_with_its_items_and_data_attributes():
    from avalanche.benchmarks.utils import _make_taskaware_classification_dataset
    from avalanche.benchmarks.utils.data_attribute import TensorDataAttribute
    from avalanche.benchmarks.utils.flat_data import FlatData

    from harness.data import ImageTensorDataset
    from harness.state import _Refs, capture, rebuild

    images = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    data = _make_taskaware_classification_dataset(ImageTensorDataset(images, [3, 1, 4, 1, 5]), task_labels=0)
    logits = torch.randn(5, 6)
    data = data.update_data_attribute("logits", TensorDataAttribute(
        FlatData([logits], discard_elements_not_in_indices=True), name="logits", use_in_getitem=True))
    buffer = data.subset([4, 0, 2])
    saved = capture(buffer, "owner.buffer", _Refs(object()))
    assert saved["fields"][0]["uint8"].dtype == torch.uint8  # images stored as the bytes they were
    back = rebuild(saved, None, "owner.buffer", _Refs(object()))
    assert len(back) == 3 and list(back.targets) == [5, 3, 4] and list(back.targets_task_labels) == [0, 0, 0]
    for i in range(3):
        assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(back[i], buffer[i]))
    grown = back.concat(data)  # and it still joins the stream's datasets, as a storage policy does
    assert len(grown) == 8 and len(grown[7]) == 4


def test_scores_go_through_the_strategy_s_eval_forward_hooks():
    """A plugin that rewrites the eval output (as BiC's bias layer and CoPE's prototypes do) is
    what the harness's evaluation sees."""
    from harness.method import MethodContext
    from harness.registry import PROTOCOLS

    class Doubling:
        def after_eval_forward(self, strategy, **kwargs):
            strategy.mb_output = strategy.mb_output * 2

    ctx = MethodContext(protocol=PROTOCOLS.get("quickdraw20_2x10"), class_names=[], device=torch.device("cpu"),
                        seed=0, quiet=True)
    cls = METHODS.get("naive")
    method = cls(context=ctx, hp={k: p.default for k, p in cls.params.items()}, plugins=[Doubling()])
    x = torch.rand(3, 1, 28, 28)
    method.model.eval()
    with torch.no_grad():
        plain = method.model(x)
    assert torch.equal(method.class_scores(x), plain * 2)


@pytest.mark.parametrize("kind, plugin, weight", [("ewc", "EWCPlugin", "ewc_lambda"), ("si", "CorrectedSIPlugin",
                                                  "si_lambda"), ("mas", "MASPlugin", "_lambda"),
                                                 ("rwalk", "TrainModeRWalkPlugin", "ewc_lambda")])
def test_a_regulariser_joins_any_method_that_declares_it(kind, plugin, weight):
    from harness.cil.regularisers import DEFAULT_LAMBDA
    from harness.method import MethodContext
    from harness.registry import PROTOCOLS

    ctx = MethodContext(protocol=PROTOCOLS.get("quickdraw20_2x10"), class_names=[], device=torch.device("cpu"),
                        seed=0, quiet=True)
    for name in ("finetune", "icarl", "lwm"):
        cls = METHODS.get(name)
        hp = {k: p.default for k, p in cls.params.items()}
        assert not [p for p in cls(context=ctx, hp=hp).plugins if type(p).__name__ == plugin]  # none by default
        for lam, expected in ((0.0, DEFAULT_LAMBDA[kind]), (5.0, 5.0)):
            method = cls(context=ctx, hp={**hp, "regularizer": kind, "regularizer_lambda": lam})
            found = [p for p in method.plugins if type(p).__name__ == plugin]
            value = getattr(found[0], weight)
            assert len(found) == 1 and (value[0] if isinstance(value, list) else value) == expected


@pytest.mark.parametrize("kind", ["ewc", "si", "mas", "rwalk"])
def test_a_method_with_a_regulariser_passes_the_check(kind, capsys):
    # RWalk updates its scores every 10 iterations: batches of 8 give the check's tasks 10
    extra = ["finetune.batch_size=8"] if kind == "rwalk" else []
    assert main(["check", "finetune", "--set", f"finetune.regularizer={kind}", *extra]) == 0, capsys.readouterr().out


@pytest.mark.parametrize("method,sets", [("rwalk", []), ("finetune", ["--set", "finetune.regularizer=rwalk"])])
def test_rwalk_trains_in_training_mode(tmp_path, method, sets):
    """Avalanche's RWalkPlugin leaves the model in eval mode after its first iteration; batch norm
    then never learns its statistics and the first task ends at chance. Trained in training mode,
    the first task is learnt like Naive's."""
    # 80 images a class: 13 iterations an epoch, more than delta_t (10) as RWalk assumes (else 0/0 NaN penalties)
    args = ["run", "--methods", method, "--protocol", "quickdraw20_2x10", "--epochs", "5", "--device", "cpu",
            "--threads", "1", "--quiet", "--out", str(tmp_path), *sets]
    assert main(args) == 0
    summary = next(tmp_path.rglob("summary.json"))
    first_task = json.loads(summary.read_text())["accuracy_matrix"][0][0]
    assert first_task > 30  # chance is 10%; the broken plugin gave exactly 10.0


def test_lfl_penalty_leaves_the_model_in_training_mode():
    """Avalanche's LFLPlugin computes its penalty in eval mode and leaves the model there (from the
    second experience on it trained with frozen batch norm, and its loss became NaN on QuickDraw);
    the harness's plugin adds the same penalty and restores training mode."""
    import copy
    import types

    import torch
    from avalanche.training.plugins import LFLPlugin

    from harness.cil.regularisers import TrainModeLFLPlugin

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))

        def get_features(self, x):
            return self.body(x)

    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    penalties = {}
    for plugin_class in (LFLPlugin, TrainModeLFLPlugin):
        torch.manual_seed(0)
        model = Net().train()
        plugin = plugin_class(lambda_e=0.5)
        plugin.prev_model = copy.deepcopy(model)
        with torch.no_grad():
            model.body[0].weight.add_(0.1)  # the models differ: the penalty is not zero
        strategy = types.SimpleNamespace(model=model, mb_x=x, loss=torch.tensor(0.0),
                                         clock=types.SimpleNamespace(train_exp_counter=1))
        plugin.before_backward(strategy)
        penalties[plugin_class] = (strategy.loss.item(), model.training)
    assert penalties[LFLPlugin][1] is False  # upstream: left in eval mode
    assert penalties[TrainModeLFLPlugin][1] is True
    assert penalties[TrainModeLFLPlugin][0] == penalties[LFLPlugin][0] > 0  # the same penalty


def test_si_measures_every_weight_s_path_and_no_importance_is_negative():
    """On CPU Avalanche's SI stores its weight snapshots as views of the live weights: the step it
    measures is zero, so no weight gets an importance and the penalty's anchor moves with the
    weights. Its importance is also clipped from above only: a weight that stepped uphill would
    get a negative one and the penalty would fall without bound as it moves away (-inf on
    quickdraw100_10x10). The harness's plugin copies the snapshots and clamps at 0."""
    import types

    from avalanche.training.plugins import SynapticIntelligencePlugin

    from harness.cil.regularisers import CorrectedSIPlugin

    results = {}
    for plugin_class in (SynapticIntelligencePlugin, CorrectedSIPlugin):
        model = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[1.0, 1.0]]))
        strategy = types.SimpleNamespace(model=model, device="cpu", loss=torch.tensor(0.0),
                                         clock=types.SimpleNamespace(train_exp_counter=1))
        plugin = plugin_class(si_lambda=1.0)
        plugin.before_training_exp(strategy)
        plugin.before_training_iteration(strategy)
        model.weight.grad = torch.tensor([[1.0, 1.0]])
        with torch.no_grad():  # an in-place step, as torch's optimisers take it
            model.weight.add_(torch.tensor([[0.1, -0.1]]))  # first weight uphill, second downhill
        plugin.after_training_iteration(strategy)
        plugin.after_training_exp(strategy)
        importance = plugin.ewc_data[1]["weight"].data.clone()
        path = plugin.syn_data["cum_trajectory"]["weight"].data.clone()
        with torch.no_grad():
            model.weight.add_(torch.tensor([[100.0, 1.0]]))  # both move away from the task's end
        plugin.before_backward(strategy)
        results[plugin_class] = importance, path, strategy.loss.item()
    (upstream_importance, upstream_path, upstream_penalty) = results[SynapticIntelligencePlugin]
    importance, path, penalty = results[CorrectedSIPlugin]
    assert upstream_path.eq(0).all() and upstream_importance.eq(0).all() and upstream_penalty == 0  # step unseen
    assert path.tolist() == pytest.approx([10.0, -10.0], rel=1e-4)  # g·Δθ / Δθ²: Avalanche's importance is -path
    assert importance.tolist() == pytest.approx([0.0, 0.001])  # -10 clamped at 0, +10 clipped at Avalanche's 0.001
    assert penalty == pytest.approx(0.5 * 0.001 * 1.0**2)  # only the downhill weight is held, by λ/2·Ω·Δ²
