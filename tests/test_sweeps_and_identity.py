"""Results that are always current (a run's identity), grid sweeps and choosing the best row."""
import json
import textwrap
from pathlib import Path

import pytest

from harness import identity
from harness.cli import main
from harness.params import Param, expand_grid, parse_set_options
from harness.registry import METHODS

QUICK = ["--protocol", "quickdraw20_2x10", "--epochs", "1", "--max-train-per-class", "8", "--device", "cpu", "--quiet"]
PLUGIN = '''
import torch.nn.functional as F
from harness.cil.recipes import SUPERVISED_RECIPES
from harness.method import TRAINING_PARAMS, CILMethod
from harness.params import Param
from harness.registry import register_method


@register_method("smoothed_ft")
class Smoothed(CILMethod):
    description = "fine-tuning with label smoothing"
    params = {**TRAINING_PARAMS, "smoothing": Param(0.1, "label smoothing", low=0.0, high=1.0)}
    protocol_defaults = SUPERVISED_RECIPES

    def criterion(self):
        return F.cross_entropy(self.mb_output, self.mb_y, label_smoothing=self.hp["smoothing"])
'''


def cli(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code


def test_a_changed_default_and_a_changed_line_of_code_are_each_caught(tmp_path, capsys, monkeypatch):
    plugin = tmp_path / "smoothed.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "out"
    command = ["--plugins", plugin, "run", "--methods", "smoothed_ft", "--out", out, *QUICK]
    assert cli(*command) == 0
    run = out / "quickdraw20_2x10+maxtrain=8" / "smoothed_ft+epochs=1" / "seed0"
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["smoothing"] == 0.1 and config["settings"]["batch_size"] > 0  # every setting
    assert config["code"]["files"] == {str(plugin): identity._sha256(plugin)}
    summary = (run / "summary.json").read_bytes()
    figures = json.loads(summary)  # PyCIL's old/new split and top-5, per task
    assert figures["new_accuracy"][1] == pytest.approx(figures["accuracy_matrix"][1][1])
    assert figures["old_accuracy"][0] is None and figures["old_accuracy"][1] == pytest.approx(
        figures["accuracy_matrix"][1][0])  # tasks of equal size: the pooled old accuracy is task 1's
    assert all(t >= a for t, a in zip(figures["top5_accuracy"], figures["step_accuracy"]))

    # The same command, nothing changed: skipped (nothing rewritten).
    assert cli(*command) == 0
    assert (run / "summary.json").read_bytes() == summary

    # A changed default: refused in one line naming the setting; nothing rewritten.
    cls = METHODS.get("smoothed_ft")
    monkeypatch.setattr(cls, "params", {**cls.params, "smoothing": Param(0.3, "label smoothing")})
    assert cli(*command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "smoothing 0.1 -> 0.3" in err[0] and "--force" in err[0]
    assert (run / "summary.json").read_bytes() == summary
    monkeypatch.undo()

    # A changed line of the method's file: refused, naming the file.
    plugin.write_text(PLUGIN.replace("label_smoothing=self.hp", "label_smoothing=0.5 * self.hp"))
    assert cli(*command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{plugin} changed" in err[0]
    assert (run / "summary.json").read_bytes() == summary

    # --force reruns it in its folder and records the new code.
    assert cli(*command, "--force") == 0
    assert json.loads((run / "config.json").read_text())["code"]["files"][str(plugin)] == identity._sha256(plugin)
    rerun = (run / "summary.json").read_bytes()
    assert cli(*command) == 0 and (run / "summary.json").read_bytes() == rerun  # current again: skipped


def test_identity_changes_in_words():
    recorded = {"params": {"lr": 0.1, "gone": 1}, "protocol_spec": {"name": "p", "class_order_seed": 1},
                "code": {"files": {"methods/x.py": "a"}, "harness_version": "0.1.0"}}
    code = {"files": {"methods/x.py": "b"}, "harness_version": "0.2.0"}
    words = identity.changes(recorded, {"lr": 0.2, "new": 3, "quiet_new": 0}, {"name": "p", "class_order_seed": 2},
                             code, defaults={"quiet_new": 0, "new": 0})
    assert words == ["setting gone no longer exists (was 1)", "lr 0.1 -> 0.2", "new setting new=3",
                     "protocol p defined differently (class_order_seed)", "methods/x.py changed",
                     "harness 0.1.0 -> 0.2.0"]
    # A config written before code fingerprints: settings compared, code not.
    assert identity.changes({"params": {"lr": 0.1}}, {"lr": 0.1}, {}, code) == []


class _Icarl:
    name = "icarl"
    params = {"memory": Param(2000, low=0), "lr": Param(0.1), "milestones": Param("", "e.g. 80,120"),
              "loss": Param("ce", choices=("ce", "bce"))}


def test_a_grid_expands_to_its_cartesian_product_in_order():
    methods = {"icarl": _Icarl}
    combos = expand_grid(parse_set_options(["icarl.memory=500,1000", "icarl.loss=ce,bce", "icarl.lr=0.05"]), methods)
    assert [[v for _, _, v in c] for c in combos] == [["500", "ce", "0.05"], ["500", "bce", "0.05"],
                                                       ["1000", "ce", "0.05"], ["1000", "bce", "0.05"]]
    # Free text keeps its commas; the same key given twice is swept.
    combos = expand_grid(parse_set_options(["icarl.milestones=80,120", "icarl.milestones=60,120"]), methods)
    assert [c[0][2] for c in combos] == ["80,120", "60,120"]
    assert expand_grid([], methods) == [[]]


def test_a_grid_runs_as_ordinary_rows_and_best_picks_one(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli("run", "--methods", "finetune", "--set", "finetune.lr=0.01,0.05", "finetune.momentum=0,0.9",
               "--out", out, *QUICK) == 0
    proto = out / "quickdraw20_2x10+maxtrain=8"
    labels = sorted(p.name for p in proto.iterdir() if (p / "seed0" / "summary.json").exists())
    assert len(labels) == 4 and all("momentum=0" in p or "momentum" not in p for p in labels)
    summaries = {p: json.loads((proto / p / "seed0" / "summary.json").read_text()) for p in labels}
    best = max(sorted(summaries), key=lambda p: summaries[p]["last_accuracy"])  # ties: the first label
    capsys.readouterr()
    assert cli("report", proto, "--best", "last") == 0
    text = capsys.readouterr().out
    chosen = [line for line in text.splitlines() if line.lstrip().startswith("*")]
    assert len(chosen) == 1 and chosen[0].endswith(best)
    changed = json.loads((proto / best / "seed0" / "config.json").read_text())["changed_params"]
    assert "set = [" + ", ".join(f'"finetune.{k}={v:g}"' if isinstance(v, float) else f'"finetune.{k}={v}"'
                                 for k, v in sorted(changed.items())) + "]" in text


def test_an_experiment_row_takes_a_grid_and_names_each_combination(tmp_path, capsys):
    exp = tmp_path / "exp.toml"
    exp.write_text(textwrap.dedent('''
        protocol = "quickdraw20_2x10"
        out = "res"
        [[row]]
        methods = ["finetune"]
        name = "fine-tuning"
        epochs = 1
        max_train_per_class = 8
        grid = {"finetune.lr" = [0.01, 0.05]}
    '''))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    import os
    cwd = os.getcwd()
    os.chdir(elsewhere)  # `out` is the file's folder's, wherever the command runs from
    try:
        assert cli("run", "--experiment", exp, "--device", "cpu", "--quiet") == 0
    finally:
        os.chdir(cwd)
    table = (tmp_path / "res" / "quickdraw20_2x10+maxtrain=8" / "table.md").read_text()
    assert "fine-tuning (lr=0.01)" in table and "fine-tuning (lr=0.05)" in table
    assert not (elsewhere / "res").exists()


def test_a_bad_value_in_an_experiment_file_names_the_file_and_row(tmp_path, capsys):
    exp = tmp_path / "exp.toml"
    exp.write_text('protocol = "quickdraw20_2x10"\n[[row]]\nmethods = ["finetune"]\n'
                   '[[row]]\nmethods = ["icarl"]\nset = ["icarl.memory=lots"]\n')
    assert cli("run", "--experiment", exp, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: experiment file {exp}, row 2:") and "memory" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, expected", [
    (["run", "--methods", "icarl", "--set", "icarl.memroy=100"], "did you mean memory?"),
    (["run", "--methods", "icarl", "--set", "memroy=100"], "did you mean memory?"),
    (["run", "--methods", "not_a_method_anywhere"], "needs --plugins FILE"),
])
def test_usage_errors_suggest_the_fix(argv, expected, tmp_path, capsys):
    assert cli(*argv, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err
