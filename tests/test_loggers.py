"""--logger: TensorBoard event files and Avalanche's CSV hold the run's curves; results do not change."""
import csv
import json

import pytest

from harness.cli import main

QUICK = ["--protocol", "quickdraw20_2x10", "--epochs", "2", "--max-train-per-class", "8", "--quiet", "--device", "cpu",
         "--threads", "1"]
RUN = "quickdraw20_2x10+maxtrain=8/finetune+epochs=2/seed0"


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("logged")
    assert main(["run", "--methods", "finetune", *QUICK, "--out", str(out), "--logger", "tensorboard", "csv"]) == 0
    return out / RUN


def test_tensorboard_holds_per_task_accuracy_loss_curves_and_the_matrix(logged):
    summary = json.loads((logged / "summary.json").read_text())
    acc = _events(logged)
    tags = acc.Tags()
    seen = [(e.step, round(e.value, 4)) for e in acc.Scalars("accuracy_seen_classes/class_il")]
    assert seen == [(t + 1, round(a, 4)) for t, a in enumerate(summary["step_accuracy"])]
    task1 = [round(e.value, 4) for e in acc.Scalars("accuracy_task_1/class_il")]
    assert task1 == [round(row[0], 4) for row in summary["accuracy_matrix"]]
    til = [round(e.value, 4) for e in acc.Scalars("accuracy_seen_classes/task_il")]
    assert til == [round(a, 4) for a in summary["task_il_step_accuracy"]]
    minibatch = [t for t in tags["scalars"] if t.startswith("Loss_MB")]
    epoch = [t for t in tags["scalars"] if t.startswith("Loss_Epoch")]
    assert minibatch and epoch
    assert sum(len(acc.Scalars(t)) for t in epoch) == 2 * 2  # 2 tasks x 2 epochs
    assert sum(len(acc.Scalars(t)) for t in minibatch) == 2 * 2 * 2  # 80 images, batch 64: 2 batches an epoch
    assert "accuracy_matrix" in tags["images"]


def test_csv_logger_writes_avalanche_training_results(logged):
    with (logged / "csvlogs" / "training_results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["training_exp"], r["epoch"]) for r in rows] == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    assert all(float(r["training_loss"]) > 0 for r in rows)


def test_logging_does_not_change_results(logged, tmp_path):
    assert main(["run", "--methods", "finetune", *QUICK, "--out", str(tmp_path)]) == 0
    plain = json.loads((tmp_path / RUN / "summary.json").read_text())
    assert plain["accuracy_matrix"] == json.loads((logged / "summary.json").read_text())["accuracy_matrix"]
    assert not (tmp_path / RUN / "tensorboard").exists()


def test_a_resumed_run_keeps_what_was_logged(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from harness.registry import METHODS, discover

    discover()
    cls = METHODS.get("finetune")
    learn, calls = cls.learn, []

    def crash(self, experience):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C: task 1 is checkpointed, task 2 is lost
        return learn(self, experience)

    args = ["run", "--methods", "finetune", *QUICK, "--out", str(tmp_path), "--logger", "tensorboard", "csv"]
    with monkeypatch.context() as patch:
        patch.setattr(cls, "learn", crash)
        assert main(args) != 0
    assert main(args) == 0
    run = tmp_path / RUN
    steps = [e.step for e in _events(run).Scalars("accuracy_seen_classes/class_il")]
    assert steps == [1, 2]  # task 1 from the first process, task 2 from the resumed one
    first = list(csv.DictReader((run / "csvlogs" / "training_results.csv").open()))
    resumed = list(csv.DictReader((run / "csvlogs" / "from_task_2" / "training_results.csv").open()))
    assert [r["training_exp"] for r in first] == ["0", "0"] and [r["training_exp"] for r in resumed] == ["1", "1"]


def test_wandb_logs_offline_into_the_run_folder(tmp_path):
    pytest.importorskip("wandb")
    assert main(["run", "--methods", "finetune", *QUICK, "--out", str(tmp_path), "--logger", "wandb"]) == 0
    runs = list((tmp_path / RUN / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # no network needed: `wandb sync` uploads it later
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (b"accuracy_seen_classes/class_il", b"accuracy_task_2/task_il", b"Loss_MB", b"Loss_Epoch"):
        assert key in record
    assert list((runs[0] / "files" / "media" / "images").glob("accuracy_matrix_*.png"))


def test_a_logger_whose_package_is_missing_is_one_line(tmp_path, capsys, monkeypatch):
    import harness.loggers as L

    monkeypatch.setattr(L, "_NEEDS", {**L._NEEDS, "wandb": "wandb_not_installed_here"})
    assert main(["run", "--methods", "finetune", *QUICK, "--out", str(tmp_path), "--logger", "wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --logger wandb needs the package 'wandb_not_installed_here': pip install "
                   "wandb_not_installed_here (or pip install cil-harness[loggers])")
    assert not any(tmp_path.iterdir())
