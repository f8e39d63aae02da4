"""The command line end to end: results, tables, figures, plugins and bad input."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--protocol", "quickdraw20_2x10", "--epochs", "1", "--max-train-per-class", "16", "--device", "cpu", "--quiet"]


def run_cli(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as exc:  # argparse's own errors
        return exc.code


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    assert run_cli("run", "--methods", "finetune", "joint", "--seeds", "0", "1", "--out", out, *QUICK) == 0
    return out


def test_run_writes_every_result_file(finished):
    proto = finished / "quickdraw20_2x10+maxtrain=16"
    for label in ("finetune+epochs=1", "joint+epochs=1"):
        for seed in (0, 1):
            run = proto / label / f"seed{seed}"
            config = json.loads((run / "config.json").read_text())
            assert config["params"]["epochs"] == 1 and config["seed"] == seed
            assert config["environment"]["versions"]["avalanche-lib"] == "0.6.0"
            summary = json.loads((run / "summary.json").read_text())
            assert len(summary["accuracy_matrix"]) == 2 and len(summary["accuracy_matrix"][1]) == 2
            assert 0 <= summary["last_accuracy"] <= 100 and summary["trainable_params"] > 0
            metrics = pd.read_csv(run / "metrics.csv")
            seen = metrics[metrics.scope == "seen"]
            assert seen.accuracy.round(4).tolist() == [round(a, 4) for a in summary["step_accuracy"]]
            assert seen.classes_seen.tolist() == [10, 20]
            assert (metrics[metrics.scope == "task"].n_samples == 200).all()
    for name in ("table.md", "table.tex", "table.csv"):
        assert (proto / name).stat().st_size > 0
    pngs = sorted(p.name for p in (proto / "plots").glob("*.png"))
    assert any(n.startswith("acc_vs_classes_quickdraw") for n in pngs) and any(n.startswith("forgetting") for n in pngs)
    assert sum(n.startswith("accuracy_matrix") for n in pngs) == 2
    assert len(list((proto / "plots").glob("*.pdf"))) == len(pngs)


def test_task_il_is_recorded_beside_class_il(finished):
    proto = finished / "quickdraw20_2x10+maxtrain=16"
    run = proto / "finetune+epochs=1" / "seed0"
    s = json.loads((run / "summary.json").read_text())
    til = s["task_il_accuracy_matrix"]
    assert [len(r) for r in til] == [1, 2] and til[0] == s["accuracy_matrix"][0]  # one task: the same question
    assert til[1][0] > s["accuracy_matrix"][1][0]  # finetune's old task, once its classes are the only choice
    assert s["task_il_last_accuracy"] == s["task_il_step_accuracy"][-1]
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics[metrics.scope == "task_il_seen"].accuracy.round(4).tolist() == [
        round(a, 4) for a in s["task_il_step_accuracy"]]
    assert "Task-IL Avg (%)" in (proto / "table.md").read_text()
    assert (proto / "plots" / "acc_vs_classes_task_il_quickdraw20_2x10_maxtrain_16.png").exists() or any(
        p.name.startswith("acc_vs_classes_task_il") for p in (proto / "plots").glob("*.png"))


def test_finetune_forgets_its_first_task(finished):
    s = json.loads((finished / "quickdraw20_2x10+maxtrain=16" / "finetune+epochs=1" / "seed0" / "summary.json").read_text())
    a = s["accuracy_matrix"]
    assert a[1][0] < a[0][0]  # the new head swamps the old classes


def test_finished_runs_are_skipped_and_force_reruns(finished, capsys):
    summary = finished / "quickdraw20_2x10+maxtrain=16" / "finetune+epochs=1" / "seed0" / "summary.json"
    before = summary.read_bytes(), summary.stat().st_mtime_ns
    assert run_cli("run", "--methods", "finetune", "--seeds", "0", "--out", finished, *QUICK) == 0
    assert (summary.read_bytes(), summary.stat().st_mtime_ns) == before
    out = capsys.readouterr().out
    assert "finetune+epochs=1" in out and "joint+epochs=1" in out  # the table keeps every finished method
    assert run_cli("run", "--methods", "finetune", "--seeds", "0", "--out", finished, "--force", *QUICK) == 0
    assert summary.stat().st_mtime_ns != before[1]


def test_same_seed_same_matrix(finished, tmp_path):
    assert run_cli("run", "--methods", "finetune", "--seeds", "1", "--out", tmp_path, *QUICK) == 0
    again = json.loads((tmp_path / "quickdraw20_2x10+maxtrain=16" / "finetune+epochs=1" / "seed1" / "summary.json").read_text())
    first = json.loads((finished / "quickdraw20_2x10+maxtrain=16" / "finetune+epochs=1" / "seed1" / "summary.json").read_text())
    assert again["accuracy_matrix"] == first["accuracy_matrix"]


def test_report_command_formats(finished, capsys):
    proto = finished / "quickdraw20_2x10+maxtrain=16"
    for fmt, marker in (("md", "|"), ("latex", "\\begin{tabular}"), ("csv", ",")):
        assert run_cli("report", proto, "--format", fmt) == 0
        assert marker in capsys.readouterr().out
    assert run_cli("plot", proto, "--out", proto / "again") == 0
    assert list((proto / "again").glob("*.png"))


PLUGIN = textwrap.dedent('''
    import torch
    from harness.method import TRAINING_PARAMS, CILMethod, Param
    from harness.protocol import Protocol, register_protocol
    from harness.registry import register_method

    register_protocol(Protocol(name="tiny_{tag}", dataset="quickdraw", num_classes=6, num_tasks=3, increment=2,
                               image_size=28, channels=1, family="quickdraw", class_order_seed=7))

    @register_method("nearest_mean_{tag}")
    class NearestMean(CILMethod):
        """Class means of raw pixels: no training at all."""
        description = "nearest class mean of raw pixels"
        params = {{**TRAINING_PARAMS, "scale": Param(1.0, low=0.0)}}

        def __init__(self, **kw):
            super().__init__(**kw)
            self.means = {{}}

        def learn(self, experience):
            ds = experience.dataset
            for c in experience.classes_in_this_experience:
                xs = torch.stack([ds[i][0] for i, t in enumerate(ds.targets) if t == c])
                self.means[c] = xs.flatten(1).mean(0)

        def class_scores(self, x):
            m = torch.stack([self.means[c] for c in sorted(self.means)])
            return -torch.cdist(x.flatten(1), m) * self.hp["scale"]
''')


def test_a_method_and_protocol_in_a_user_file_are_found_and_run(tmp_path):
    plugin = tmp_path / "my_method.py"
    plugin.write_text(PLUGIN.format(tag="a"))
    out = tmp_path / "out"
    code = run_cli("--plugins", plugin, "run", "--methods", "nearest_mean_a", "--protocol", "tiny_a", "--out", out,
                   "--set", "nearest_mean_a.scale=2", "--quiet", "--device", "cpu")
    assert code == 0
    s = json.loads((out / "tiny_a" / "nearest_mean_a+scale=2" / "seed0" / "summary.json").read_text())
    assert len(s["step_accuracy"]) == 3 and s["step_accuracy"][0] > 50  # 2-way nearest mean on doodles


BAD = [
    (["run", "--methods", "nosuch"], "unknown method 'nosuch'"),
    (["run", "--protocol", "nosuch"], "unknown protocol 'nosuch'"),
    (["run", "--methods", "finetune", "--set", "finetune.lr=fast"], "expected float"),
    (["run", "--methods", "finetune", "--set", "finetune.memory=3"], "has no parameter 'memory'"),
    (["run", "--methods", "finetune", "--set", "lr"], "expected KEY=VALUE"),
    (["run", "--methods", "finetune", "--set", "finetune.epochs=0"], "must be >= 1"),
    (["run", "--seeds", "-1"], "seeds must be >= 0"),
    (["run", "--epochs", "zero"], "positive integer"),
    (["run", "--protocol", "cifar100_10x10", "--data-root", "{tmp}/nodata"], "CIFAR-100 not found"),
    (["run", "--out", "{tmp}/a_file"], "is a file"),
    (["run", "--out", "{tmp}/a_file/results"], "a_file is a file"),
    (["--plugins", "{tmp}/bad_protocol.py", "list"], "but num_classes is 50"),
    (["--plugins", "{tmp}/broken_plugin.py", "list"], "failed to import: NameError"),
    (["run", "--device", "cuda"] if not __import__("torch").cuda.is_available() else ["run", "--device", "tpu"],
     "no CUDA device" if not __import__("torch").cuda.is_available() else "invalid choice"),
    (["report", "{tmp}/nothing_here"], "does not exist"),
    (["run", "--methods", "finetune", "--set", "finetune.epochs=3", "--epochs", "1"], "both set the epochs"),
    (["--plugins", "{tmp}/missing.py", "list"], "does not exist"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    (tmp_path / "a_file").write_text("precious")
    (tmp_path / "bad_protocol.py").write_text(
        "from harness.protocol import Protocol, register_protocol\n"
        "register_protocol(Protocol(name='bad', dataset='quickdraw', num_classes=50, num_tasks=4, increment=10))\n")
    (tmp_path / "broken_plugin.py").write_text("this_name_is_not_defined\n")
    code = run_cli(*[a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "a_file").read_text() == "precious"


def test_module_entry_point_exit_code(tmp_path):
    """The real `python -m harness` process: a clear line and exit code 2."""
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "--methods", "finetun"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown method 'finetun' (did you mean finetune?); known: ")


# ---- errors for method authors ---------------------------------------------------------

@pytest.fixture
def import_errors(monkeypatch):
    """A fresh list of failed imports, so files broken on purpose here do not reach other tests."""
    from harness import registry

    monkeypatch.setattr(registry, "IMPORT_ERRORS", [])
    return registry


def test_a_broken_file_in_a_method_folder_leaves_the_others_working(tmp_path, capsys, import_errors):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "good.py").write_text(PLUGIN.format(tag="b"))
    (folder / "broken.py").write_text("this_name_is_not_defined\n")
    assert run_cli("--plugins", folder, "list") == 2
    out, err = capsys.readouterr()
    assert "nearest_mean_b" in out and "icarl" in out and "tiny_b" in out
    assert err.strip().splitlines() == [f"error: plugin {folder / 'broken.py'} failed to import: "
                                        "NameError: name 'this_name_is_not_defined' is not defined"]

    out_dir = tmp_path / "out"
    assert run_cli("--plugins", folder, "run", "--methods", "nearest_mean_b", "--protocol", "tiny_b",
                   "--out", out_dir, "--device", "cpu") == 0
    assert "warning: plugin" in capsys.readouterr().err  # said, but the run of a sound method goes on
    assert run_cli("--plugins", folder, "run", "--methods", "nearest_mean_bb", "--out", out_dir, "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown method 'nearest_mean_bb'" in err and "broken.py failed" in err


def test_a_name_registered_twice_names_both_files(tmp_path, capsys, import_errors):
    folder = tmp_path / "twice"
    folder.mkdir()
    for name in ("one.py", "two.py"):
        (folder / name).write_text(PLUGIN.format(tag="c").replace("tiny_c", f"tiny_c_{name[:3]}"))
    assert run_cli("--plugins", folder, "list") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: plugin {folder / 'two.py'} failed to import: method 'nearest_mean_c' is registered "
                   f"twice: in {folder / 'one.py'} and in {folder / 'two.py'}")


LACKING = '''
from harness.method import CILMethod
from harness.params import Param
from harness.registry import register_method

@register_method("lacking_d")
class Lacking(CILMethod):
    description = "declares epochs only"
    params = {"epochs": Param(1, low=1)}
'''

UNDECLARED_RECIPE = '''
from harness.method import TRAINING_PARAMS, CILMethod
from harness.registry import register_method

@register_method("recipe_e")
class RecipeE(CILMethod):
    description = "a recipe key it does not declare"
    params = dict(TRAINING_PARAMS)
    protocol_defaults = {"quickdraw": {"epochs": 2, "warmup": 5}}
'''


def test_a_setting_read_but_not_declared_is_one_line(tmp_path, capsys):
    plugin = tmp_path / "lacking.py"
    plugin.write_text(LACKING)
    assert run_cli("--plugins", plugin, "run", "--methods", "lacking_d", "--out", tmp_path / "out", *QUICK) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: method 'lacking_d' reads the setting 'backbone' but does not declare it")


def test_a_recipe_key_not_declared_is_refused_at_import(tmp_path, capsys):
    plugin = tmp_path / "recipe.py"
    plugin.write_text(UNDECLARED_RECIPE)
    assert run_cli("--plugins", plugin, "list") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: plugin {plugin} failed to import: method 'recipe_e': its quickdraw recipe sets warmup, "
                   "which its params do not declare")


def test_list_method_shows_its_settings_and_recipes(capsys):
    assert run_cli("list", "icarl") == 0
    out = capsys.readouterr().out
    assert "defined in methods/icarl.py" in out
    line = next(row for row in out.splitlines() if row.strip().startswith("memory_per_class"))
    assert line.split()[:3] == ["memory_per_class", "int", "0"]
    assert "quickdraw protocols: backbone=convnet_bn" in out
    assert run_cli("list", "icarll") == 2  # a typo: the usual one line with a suggestion
    assert "did you mean icarl?" in capsys.readouterr().err


def test_every_option_of_every_command_explains_itself():
    from harness.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        assert sub.epilog and "example" in sub.epilog, name
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    assert "(default: quickdraw20_2x10)" in " ".join(commands["run"].format_help().split())


def test_list_shows_a_protocol_and_a_method_as_a_protocol_resolves_it(capsys):
    assert run_cli("list", "quickdraw40_4x10") == 0
    out = capsys.readouterr().out
    assert "40 classes, 4 tasks, B0 Inc10" in out and "data: present" in out
    assert "task 1: parachute, computer, zebra" in out  # the class order, task by task
    assert run_cli("list", "icarl", "--protocol", "quickdraw100_10x10") == 0
    rows = {line.split()[0]: line.split()[2] for line in capsys.readouterr().out.splitlines()
            if line.startswith("  ") and len(line.split()) > 2}
    assert rows["epochs"] == "30" and rows["backbone"] == "convnet_bn" and rows["lr"] == "0.1"
