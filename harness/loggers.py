"""`--logger tensorboard|wandb|csv`: a run's curves in the tools researchers already read.

Avalanche's own loggers, fed two ways:
- its evaluation plugin, during training: the loss of every mini-batch and of every epoch
  (Avalanche's loss metrics; accuracy metrics are left out because a method's outputs need
  not be logits: GMM's forward returns its loss);
- the harness, after each task: the accuracy on every seen task and on all seen classes
  (Class-IL and Task-IL), the zero-shot accuracy where measured, and at the end the
  accuracy matrix as a figure.
Files go into the run's folder: `tensorboard/`, `wandb/` (offline mode unless WANDB_MODE
says otherwise: there may be no network; `wandb sync` uploads it later), `csvlogs/` (Avalanche's CSVLogger truncates its
files when it starts, so a resumed run writes `csvlogs/from_task_<k>/`).
Logging never changes results: the loggers are not part of a run's identity or checkpoint.
"""
from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

from harness.errors import HarnessError

LOGGERS = ("tensorboard", "wandb", "csv")
_NEEDS = {"tensorboard": "tensorboard", "wandb": "wandb"}
# The evaluation plugin's attributes that only log: not checkpointed (harness.state)
_LOGGING_ONLY = ("metrics", "loggers", "all_metric_results", "last_metric_results", "_metric_values")


def check_available(names: Sequence[str]) -> None:
    """One line, before any work, for a logger whose package is missing."""
    for name in names:
        if name not in LOGGERS:
            raise HarnessError(f"unknown logger '{name}'; choose from {', '.join(LOGGERS)}")
        package = _NEEDS.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise HarnessError(f"--logger {name} needs the package '{package}': pip install {package} "
                               f"(or pip install cil-harness[loggers])")


def build(names: Sequence[str], run_dir: Path, label: str, seed: int, first_step: int,
          config: dict[str, Any]) -> list:
    check_available(names)
    loggers = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            from avalanche.logging import TensorboardLogger

            loggers.append(TensorboardLogger(tb_log_dir=run_dir / "tensorboard"))
        elif name == "csv":
            from avalanche.logging import CSVLogger

            folder = run_dir / "csvlogs" if first_step == 0 else run_dir / "csvlogs" / f"from_task_{first_step + 1}"
            loggers.append(CSVLogger(log_folder=str(folder)))
        elif name == "wandb":
            from avalanche.logging import WandBLogger

            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            loggers.append(_WandBLogger(WandBLogger)(project_name="cil-harness", run_name=f"{label}-seed{seed}",
                                                     save_code=False, dir=str(run_dir), config=config,
                                                     path=str(run_dir / "wandb")))  # runs in <run>/wandb/
    return loggers


def _WandBLogger(base: type) -> type:
    """Avalanche 0.6's WandBLogger, given the two names it reads that current wandb releases
    (0.31) no longer have: wandb.util.generate_id and wandb.viz.CustomChart."""
    class _Compat:
        def __init__(self, wandb):
            from wandb.sdk.lib import runid

            self._wandb = wandb
            self.util = SimpleNamespace(generate_id=runid.generate_id)
            self.viz = SimpleNamespace(CustomChart=getattr(getattr(wandb, "viz", None), "CustomChart", _NoChart))

        def __getattr__(self, name):
            return getattr(self._wandb, name)

    class WandBLogger(base):
        def import_wandb(self):
            super().import_wandb()
            if not hasattr(self.wandb.util, "generate_id") or not hasattr(self.wandb, "viz"):
                self.wandb = _Compat(self.wandb)

    return WandBLogger


class _NoChart:
    """Stands for a chart type the installed wandb lacks: nothing is an instance of it."""


def evaluation_plugin(loggers: list):
    """Avalanche's evaluation plugin with loss curves for these loggers (None: Avalanche's default)."""
    if not loggers:
        return None
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.evaluation.metrics import loss_metrics

    plugin = EvaluationPlugin(loss_metrics(minibatch=True, epoch=True), loggers=loggers)
    plugin.transient = _LOGGING_ONLY
    return plugin


def log_task(loggers: list, step: int, classes_seen: int, scores, zero_shot: float | None, iterations: int) -> None:
    """The harness's evaluation after task `step` (0-based): x = tasks trained, except for W&B,
    whose one step axis only moves forward and already counts training iterations (the loss
    curves): there x = iterations so far, and `task` and `classes_seen` are logged beside."""
    for lg in loggers:
        x = iterations if hasattr(lg, "wandb") else step + 1
        lg.log_single_metric("task", step + 1, x)
        lg.log_single_metric("accuracy_seen_classes/class_il", float(scores.seen), x)
        lg.log_single_metric("accuracy_seen_classes/task_il", float(scores.task_il_seen), x)
        for i, (acc, til) in enumerate(zip(scores.row, scores.task_il_row)):
            lg.log_single_metric(f"accuracy_task_{i + 1}/class_il", float(acc), x)
            lg.log_single_metric(f"accuracy_task_{i + 1}/task_il", float(til), x)
        lg.log_single_metric("classes_seen", int(classes_seen), x)
        if zero_shot is not None:
            lg.log_single_metric("zero_shot_accuracy", float(zero_shot), x)


def log_final(loggers: list, matrix: list[list[float]], protocol: str, label: str, iterations: int) -> None:
    """The accuracy matrix as a figure, at the last task."""
    if not loggers:
        return
    import pandas as pd
    from PIL import Image

    from harness.plots import matrix_figure, png_bytes

    fig = matrix_figure(pd.DataFrame({"accuracy_matrix": [matrix]}), protocol, label)
    # an image, which every logger takes (W&B would need plotly for a matplotlib figure)
    image = Image.open(io.BytesIO(png_bytes(fig, dpi=100))).convert("RGB")
    for lg in loggers:
        lg.log_single_metric("accuracy_matrix", image, iterations if hasattr(lg, "wandb") else len(matrix))


def close(loggers: list) -> None:
    for lg in loggers:
        if hasattr(lg, "writer"):  # TensorBoard: flush the event file now, not at exit
            lg.writer.close()
        elif hasattr(lg, "training_file"):
            lg.training_file.close()
            lg.eval_file.close()
        elif hasattr(lg, "wandb") and getattr(lg.wandb, "run", None) is not None:
            lg.wandb.finish()
