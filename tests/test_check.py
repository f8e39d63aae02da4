"""`python -m harness check`: every registered method keeps the contract; a method that forgets state fails."""
import pytest

from harness.cli import main
from harness.registry import METHODS, discover

discover()

# Tiny settings where a method's defaults would be slow on CPU (the offline GMM stack loads a 135M LM).
FAST = {"gmm": ["--set", "gmm.model=tiny"],
        # RWalk's scores update every delta_t iterations; the check's tasks have 2, and with no update
        # Avalanche's normalisation divides 0 by 0 (NaN penalties)
        "rwalk": ["--set", "rwalk.delta_t=1"]}


@pytest.mark.parametrize("method", METHODS.names())
def test_every_registered_method_passes_the_check(method, capsys):
    code = main(["check", method, *FAST.get(method, [])])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("  ok    ") == 5


FORGETFUL = '''
import torch
from harness.method import TRAINING_PARAMS, CILMethod
from harness.registry import register_method

@register_method("forgetful_mean")
class ForgetfulMean(CILMethod):
    """Class means of raw pixels, kept in an attribute it declares transient (wrongly)."""
    description = "nearest class mean of raw pixels, state not saved"
    params = dict(TRAINING_PARAMS)
    transient = ("means",)

    def __init__(self, **kw):
        super().__init__(**kw)
        self.means = {}

    def learn(self, experience):
        self.train(experience)  # the model is trained (and checkpointed), the means are not
        ds = experience.dataset
        for c in experience.classes_in_this_experience:
            xs = torch.stack([ds[i][0] for i, t in enumerate(ds.targets) if t == c])
            self.means[c] = xs.flatten(1).mean(0)

    def class_scores(self, x):
        scores = torch.full((len(x), max(self.means) + 1), -1e9)
        for c, m in self.means.items():
            scores[:, c] = -torch.cdist(x.flatten(1), m[None])[:, 0]
        return scores
'''


def test_a_method_that_does_not_checkpoint_its_state_fails(tmp_path, capsys):
    plugin = tmp_path / "forgetful.py"
    plugin.write_text(FORGETFUL)
    assert main(["--plugins", str(plugin), "check", "forgetful_mean"]) == 1
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if "resumed" in row)
    assert line.startswith("  FAIL  killed after task 1, resumed: same matrix and scores: straight [[")
    assert "transient" in line
    assert out.count("  ok    ") == 4  # the rest holds


def test_the_same_method_keeps_its_attribute_without_code_for_it(tmp_path, capsys):
    plugin = tmp_path / "mean.py"
    plugin.write_text(FORGETFUL.replace('    transient = ("means",)\n', "").replace("forgetful_mean", "kept_mean"))
    assert main(["--plugins", str(plugin), "check", "kept_mean"]) == 0, capsys.readouterr()
    assert capsys.readouterr().out.count("  ok    ") == 5


# LwF as a README reader writes it: Avalanche's own plugin, nothing about checkpoints.
LWF = '''
from avalanche.training.plugins import LwFPlugin
from harness.method import TRAINING_PARAMS, CILMethod
from harness.params import Param
from harness.cil.recipes import SUPERVISED_RECIPES
from harness.registry import register_method

class Distiller(LwFPlugin):
    transient = TRANSIENT

@register_method("lwf_plugin")
class LwF(CILMethod):
    description = "Learning without Forgetting through Avalanche's LwFPlugin"
    params = {**TRAINING_PARAMS, "alpha": Param(5.0, "distillation weight", low=0.0)}
    protocol_defaults = SUPERVISED_RECIPES

    def build_plugins(self, optimizer):
        return [*super().build_plugins(optimizer), Distiller(alpha=self.hp["alpha"], temperature=2)]
'''


def test_a_method_built_on_an_avalanche_plugin_resumes_with_the_plugins_state(tmp_path, capsys):
    plugin = tmp_path / "lwf.py"
    plugin.write_text(LWF.replace("TRANSIENT", "()"))
    assert main(["--plugins", str(plugin), "check", "lwf_plugin"]) == 0, capsys.readouterr().out
    # the plugin's teacher (prev_model) and its classes really are what the resumed run continues from
    forgetful = tmp_path / "lwf_forgetful.py"
    forgetful.write_text(LWF.replace("TRANSIENT", '("lwf",)').replace("lwf_plugin", "lwf_forgetful"))
    capsys.readouterr()
    assert main(["--plugins", str(forgetful), "check", "lwf_forgetful"]) == 1
    assert "  FAIL  killed after task 1, resumed: same matrix" in capsys.readouterr().out


UNSAVEABLE = FORGETFUL.replace('    transient = ("means",)\n', "").replace(
    "self.means = {}", "self.means = {}\n        self.batches = iter(range(3))").replace("forgetful_mean", "unsaveable")


def test_state_a_checkpoint_cannot_hold_is_refused_in_one_line(tmp_path, capsys):
    plugin = tmp_path / "unsaveable.py"
    plugin.write_text(UNSAVEABLE)
    assert main(["--plugins", str(plugin), "check", "unsaveable"]) == 1
    line = next(row for row in capsys.readouterr().out.splitlines() if "runs end to end" in row)
    assert line.startswith("  FAIL  runs end to end: UnsaveableState: unsaveable.batches is a ")
    assert "list 'batches' in the class's `transient`" in line


def test_check_refuses_a_bad_setting_in_one_line(capsys):
    assert main(["check", "icarl", "--set", "icarl.memory=-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: icarl.memory=-3: must be >= 1"


WRONG_DIM = '''
from harness.registry import register_method
from methods.finetune import Finetune

@register_method("wrong_dim")
class WrongDim(Finetune):
    description = "class_scores indexes a dimension its scores lack"

    def class_scores(self, x):
        return super().class_scores(x).sum(1).softmax(2)
'''


def test_a_failing_check_names_the_file_and_line_of_the_method(tmp_path, capsys):
    plugin = tmp_path / "wrong_dim.py"
    plugin.write_text(WRONG_DIM)
    assert main(["--plugins", str(plugin), "check", "wrong_dim"]) == 1
    line = next(row for row in capsys.readouterr().out.splitlines() if "runs end to end" in row)
    assert line.startswith("  FAIL  runs end to end: IndexError: Dimension out of range")
    assert line.endswith(f"(at {plugin}:10, in class_scores)")


def test_the_readme_s_method_passes_check_as_written(tmp_path, capsys):
    """The README's "Add a method" snippet, verbatim: it imports, trains and keeps every promise."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"\*\*Add a method\.\*\*.*?```python\n(.*?)```", readme, re.S).group(1)
    assert snippet.startswith("# methods/my_method.py")
    plugin = tmp_path / "my_method.py"
    plugin.write_text(snippet)
    assert main(["--plugins", str(plugin), "check", "my_method"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert out.count("  ok  ") == 5 and "FAIL" not in out
