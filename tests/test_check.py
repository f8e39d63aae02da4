"""`python -m harness check`: every registered method keeps the contract; a method that forgets state fails."""
import pytest

from harness.cli import main
from harness.registry import METHODS, discover

discover()

# Tiny settings where a method's defaults would be slow on CPU (the offline GMM stack loads a 135M LM).
FAST = {"gmm": ["--set", "gmm.model=tiny"]}


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
    """Class means of raw pixels, kept in an attribute it never checkpoints."""
    description = "nearest class mean of raw pixels, state not saved"
    params = dict(TRAINING_PARAMS)

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
    assert line.startswith("  FAIL  killed after task 1, resumed: same matrix: straight [[")
    assert "extra_state" in line
    assert out.count("  ok    ") == 4  # the rest holds


def test_check_refuses_a_bad_setting_in_one_line(capsys):
    assert main(["check", "icarl", "--set", "icarl.memory=-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: icarl.memory=-3: must be >= 1"
