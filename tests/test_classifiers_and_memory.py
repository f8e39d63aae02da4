"""Both classifiers (PyCIL's CNN and NME) after every task, and the total memory a method keeps."""
import csv
import json
from pathlib import Path

from harness import checkpoint
from harness.planning import RunSpec
from harness.report import collect_runs, paper_table
from harness.runner import execute

QUICK = dict(epochs=1, max_train_per_class=16, quiet=True)


def _run(tmp_path, method, **overrides):
    spec = RunSpec(method, "quickdraw20_2x10", 0, str(tmp_path), **QUICK,
                   overrides=tuple((method, k, str(v)) for k, v in overrides.items()))
    outcome = execute(spec)
    return outcome.summary, outcome.path


def test_the_headline_is_one_of_the_two_classifiers_and_nme_is_the_nme_run(tmp_path):
    cnn, cnn_path = _run(tmp_path, "wa")
    nme, _ = _run(tmp_path, "wa", classifier="nme")
    assert cnn["headline_classifier"] == "cnn" and nme["headline_classifier"] == "nme"
    for s, name in ((cnn, "cnn"), (nme, "nme")):
        assert s["classifier_step_accuracy"][name] == s["step_accuracy"]
        assert s[f"avg_{name}_accuracy"] == s["avg_incremental_accuracy"]
        assert len(s["classifier_step_accuracy"]["cnn"]) == len(s["classifier_step_accuracy"]["nme"]) == 2
    # Same seed, same training: the two runs differ only in which classifier is the headline.
    assert cnn["classifier_step_accuracy"] == nme["classifier_step_accuracy"]
    assert cnn["last_nme_accuracy"] == nme["last_accuracy"] and nme["last_cnn_accuracy"] == cnn["last_accuracy"]
    rows = list(csv.DictReader(open(f"{cnn_path}/metrics.csv")))
    by_scope = {(r["step"], r["scope"]): float(r["accuracy"]) for r in rows}
    assert by_scope[("1", "nme_seen")] == round(cnn["last_nme_accuracy"], 4)
    assert by_scope[("1", "cnn_seen")] == by_scope[("1", "seen")]


def test_icarl_s_headline_stays_the_nearest_mean(tmp_path):
    s, _ = _run(tmp_path, "icarl")
    assert s["headline_classifier"] == "nme" and s["last_accuracy"] == s["last_nme_accuracy"]
    assert s["last_cnn_accuracy"] != s["last_nme_accuracy"]


def test_total_memory_counts_the_model_the_teacher_the_exemplars_and_the_means(tmp_path):
    s, path = _run(tmp_path, "icarl", memory=40)
    state = checkpoint.load(Path(path) / "checkpoint.pt")["method"]
    model_bytes = sum(t.numel() * t.element_size() for t in state["model"].values())
    # model + an equal teacher + 40 uint8 doodles + 20 class means of the backbone's width (float32)
    width = state["model"]["head.classifier.weight"].shape[1]
    assert s["total_memory_bytes"] == 2 * model_bytes + 40 * 784 + 20 * width * 4
    finetune, path = _run(tmp_path, "finetune")
    weights = checkpoint.load(Path(path) / "checkpoint.pt")["method"]["model"].values()
    assert finetune["total_memory_bytes"] == sum(t.numel() * t.element_size() for t in weights)


def test_the_table_shows_both_classifiers_and_the_memory_where_recorded(tmp_path):
    _run(tmp_path, "wa")
    _run(tmp_path, "finetune")
    table = paper_table(collect_runs([tmp_path]))
    headings = list(table.columns.get_level_values(1))
    assert headings[-1] == "Memory (MB)" and "CNN Last (%)" in headings and "NME Last (%)" in headings
    s = json.loads(next(tmp_path.rglob("wa*/seed0/summary.json")).read_text())
    wa = table.loc[[i for i in table.index if i.startswith("wa")][0]]
    assert wa.xs("NME Last (%)", level=1).iloc[0] == f"{s['last_nme_accuracy']:.1f}"
    assert wa.xs("Memory (MB)", level=1).iloc[0] == f"{s['total_memory_bytes'] / 1e6:.1f}"
    ft = table.loc[[i for i in table.index if i.startswith("finetune")][0]]
    assert ft.xs("CNN Last (%)", level=1).iloc[0] == "–"  # one classifier: no CNN / NME split
