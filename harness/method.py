"""The base class of every method: an Avalanche SupervisedTemplate with a contract.

A method file subclasses `CILMethod`, registers it with `@register_method("name")`,
declares its hyperparameters (`params`) and per-protocol-family defaults, and may
override the Avalanche hooks it needs (criterion, plugins, dataset adaptation...).
The harness calls exactly three things:

    method.learn(experience)     # train on one experience of the Avalanche stream
    method.class_scores(x)       # (B, >= classes seen) scores; argmax = prediction
    method.memory_usage()        # (exemplars kept, bytes they take)

so evaluation is the same for every method (harness.evaluation).
"""
from __future__ import annotations

import inspect
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from avalanche.benchmarks.utils import _make_taskaware_classification_dataset, concat_datasets
from avalanche.models.utils import avalanche_model_adaptation
from avalanche.training.plugins import LRSchedulerPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.utils.data import DataLoader

from harness.cil.alignment import warmup_cosine
from harness.cil.regularisers import regulariser_plugins
from harness.nn.augment import AUGMENTATIONS
from harness.batches import TensorBatches
from harness.nn.backbones import IncrementalNet, backbone_names, create_backbone
from harness.data import ImageTensorDataset
from harness.errors import HarnessError, RunDiverged
from harness.params import Param
from harness.progress import EpochProgress
from harness.protocol import Protocol
from harness.state import AVALANCHE_ATTRIBUTES, capture_method, restore_method, tensors_in

# Parameters most methods share; a method spreads the ones it uses into its `params`.
TRAINING_PARAMS: dict[str, Param] = {
    "epochs": Param(10, "epochs per task", low=1),
    "batch_size": Param(64, "training mini-batch size", low=1),
    "lr": Param(0.01, "learning rate", low=0.0),
    "momentum": Param(0.9, "SGD momentum", low=0.0, high=1.0),
    "weight_decay": Param(0.0, "weight decay", low=0.0),
    "backbone": Param("convnet", "feature extractor", choices=tuple(backbone_names())),
    "lr_schedule": Param("none", "per-task learning-rate schedule", choices=("none", "cosine")),
    "augment": Param("protocol", "training augmentation; protocol = the protocol's own",
                     choices=("protocol", *AUGMENTATIONS)),
    "crop_padding": Param(4, "crop augmentations: largest random shift in pixels", low=1),
}


# Settings of the tasks after the first (few-shot CIL's sessions: a base task with all its data,
# then a handful of images per class); a method spreads the ones it supports into its `params`.
SESSION_PARAMS: dict[str, Param] = {
    "incremental_epochs": Param(0, "epochs of every task after the first (few-shot sessions); 0 = epochs", low=0),
    "incremental_lr": Param(0.0, "learning rate of every task after the first; 0 = lr", low=0.0),
    "freeze_backbone": Param(False, "after the first task train the classifier head only: the backbone's weights "
                             "and batch-norm statistics stay as the first task left them"),
}


@dataclass
class MethodContext:
    """What the harness tells a method about the run it is part of."""

    protocol: Protocol
    class_names: list[str]  # label k = k-th class to arrive
    device: torch.device
    seed: int
    in_memory: bool = True  # training data fits in memory: use the fast tensor loader
    quiet: bool = False
    images: int = 0  # training + test images of the whole stream (0: unknown), e.g. to size a feature cache
    data_root: str | None = None  # where datasets live (--data-root), for methods that read more of the dataset
    evaluator: Any = None  # Avalanche's EvaluationPlugin with the run's --logger loggers (None: Avalanche's default)


def materialise(dataset, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """All (x, y) of a dataset as two tensors, read once through its own loader."""
    xs, ys = [], []
    # Its own generator: a DataLoader draws a seed when iterated, and reading data must not
    # move the global RNG (a resumed run reads test sets at other moments than a straight one).
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator().manual_seed(0))
    for batch in loader:
        xs.append(batch[0])
        ys.append(torch.as_tensor(batch[1]))
    return torch.cat(xs), torch.cat(ys).long()


def with_replay(dataset, images: torch.Tensor, labels: torch.Tensor):
    """The experience's training dataset followed by replayed uint8 images: the same item
    type as the stream's (float image in [0, 1], label), task label 0."""
    replay = _make_taskaware_classification_dataset(ImageTensorDataset(images, labels), task_labels=0)
    return concat_datasets([dataset, replay])


class Settings(dict):
    """A method's resolved hyperparameters; reading one it does not declare says what to add."""

    def __init__(self, method: str, values: dict[str, Any]):
        super().__init__(values)
        self.method = method

    def __missing__(self, key: str):
        where = _where_read(sys._getframe(1))
        raise HarnessError(f"method '{self.method}' reads the setting '{key}' but does not declare it{where}: add it "
                           f"to its params (e.g. params = {{**TRAINING_PARAMS, ...}} for the shared training settings)")


_HARNESS_DIR = os.path.dirname(os.path.abspath(__file__))


def _shown_path(filename: str) -> str:
    """A source file as the user would type it: relative to the working directory when under it."""
    path = os.path.abspath(filename)
    relative = os.path.relpath(path, os.getcwd())
    return path if relative.startswith(os.pardir) else relative


def _where_read(frame) -> str:
    """' (read at methods/x.py:42)': the line that read a missing setting, so the message points
    at the method's code rather than at this file, where the traceback ends."""
    here = os.path.abspath(__file__)
    method = None
    # Skip this file's frames (the base class's own reads), noting the method instance they ran for.
    while frame is not None and os.path.abspath(frame.f_code.co_filename) == here:
        method = _method_of(frame, method)
        frame = frame.f_back
    if frame is None:
        return ""
    filename = os.path.abspath(frame.f_code.co_filename)
    if method is None and not filename.startswith(_HARNESS_DIR + os.sep):
        return f" (read at {_shown_path(filename)}:{frame.f_lineno})"
    # The harness's shared code read it (e.g. CILMethod.build_model reads backbone): the place to
    # act on is the method's class, whose params lack the setting.
    method = _method_of(frame, method)
    if method is None:
        return f" (read at {_shown_path(filename)}:{frame.f_lineno})"
    cls = type(method)
    try:
        source, line = inspect.getsourcefile(cls), inspect.getsourcelines(cls)[1]
    except (OSError, TypeError):
        return f" (read by the harness's shared code for {cls.__name__})"
    return f" (read by the harness's shared code for {cls.__name__}, defined at {_shown_path(source)}:{line})"


def _method_of(frame, found):
    """The CILMethod a frame runs for (its `self`), unless one was found already."""
    if found is not None:
        return found
    candidate = frame.f_locals.get("self")
    return candidate if isinstance(candidate, CILMethod) else None


class CILMethod(SupervisedTemplate):
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = TRAINING_PARAMS
    protocol_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    setting_defaults: ClassVar[dict[str, dict[str, Any]]] = {}  # {"key=value": recipe}, see harness.params
    # Attributes not to checkpoint: caches and what is rebuilt from the settings or in on_resume
    # (every other attribute is saved after each task, see harness.state)
    transient: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, context: MethodContext, hp: dict[str, Any], plugins=()):
        self.context, self.hp = context, Settings(type(self).name, hp)
        model = self.build_model()
        optimizer = self.build_optimizer(model)
        # A regulariser the settings ask for (harness.cil.regularisers) comes whatever build_plugins returns.
        plugins = [*plugins, *self.build_plugins(optimizer), *regulariser_plugins(self.hp)]
        with warnings.catch_warnings():  # Avalanche warns that we log no metrics: the harness does
            warnings.simplefilter("ignore")
            super().__init__(**self.template_arguments(model, dict(
                model=model,
                optimizer=optimizer,
                criterion=nn.CrossEntropyLoss(),
                train_mb_size=hp["batch_size"],
                train_epochs=hp["epochs"],
                eval_mb_size=max(256, hp["batch_size"]),
                device=context.device,
                plugins=[*plugins, EpochProgress(disable=context.quiet)],
                evaluator=context.evaluator,
            )))

    def template_arguments(self, model: nn.Module, arguments: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of the Avalanche template's constructor (a wrapped strategy adds its own)."""
        return arguments

    # ---- building blocks a method may override -------------------------------------
    def build_model(self) -> nn.Module:
        p = self.context.protocol
        return IncrementalNet(create_backbone(self.hp["backbone"], p.channels, p.image_size))

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            model.parameters(), lr=self.hp["lr"], momentum=self.hp["momentum"], weight_decay=self.hp["weight_decay"]
        )

    def build_plugins(self, optimizer: torch.optim.Optimizer) -> list:
        """Avalanche plugins this method trains with (by default the lr schedule)."""
        if self.hp.get("lr_schedule", "none") == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hp["epochs"])
            return [LRSchedulerPlugin(scheduler, reset_scheduler=True, reset_lr=True)]
        return []

    # ---- the tasks after the first (SESSION_PARAMS) -------------------------------------
    _task_in_training: int | None = None  # the experience whose training loop runs (for failure records)

    def _before_training_exp(self, **kwargs):
        super()._before_training_exp(**kwargs)
        self._task_in_training = self.experience.current_experience
        if self.experience.current_experience > 0:
            self._later_task_settings()

    def _later_task_settings(self) -> None:
        hp = self.hp
        if hp.get("incremental_epochs"):
            self.train_epochs = hp["incremental_epochs"]
            # A per-task cosine ends with the task: its period follows the epochs.
            schedulers = [getattr(p, "scheduler", None) for p in self.plugins] + [getattr(self, "scheduler", None)]
            for scheduler in schedulers:
                if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                    scheduler.T_max = self.train_epochs
        if hp.get("incremental_lr"):
            for group in self.optimizer.param_groups:
                group["lr"] = hp["incremental_lr"]  # the schedulers here scale the current lr
        if hp.get("freeze_backbone"):
            self.model.backbone.requires_grad_(False)  # no gradient: SGD leaves them (and their decay) alone

    def _before_training_epoch(self, **kwargs):
        super()._before_training_epoch(**kwargs)
        if self.hp.get("freeze_backbone") and self.experience.current_experience > 0:
            self.model.backbone.eval()  # batch-norm statistics stay too

    def make_train_dataloader(self, **kwargs):
        if not self.context.in_memory:
            return super().make_train_dataloader(**kwargs)
        x, y = materialise(self.adapted_dataset)
        self.dataloader = TensorBatches(x, y, self.train_mb_size, shuffle=True, augment=self.augmentation(),
                                        crop_padding=self.hp.get("crop_padding", 4))

    def augmentation(self) -> str:
        """The training augmentation: the method's `augment` setting, else the protocol's."""
        kind = self.hp.get("augment", "protocol")
        return self.context.protocol.augment if kind == "protocol" else kind

    # ---- a learning-rate schedule stepped every iteration, started anew every task -------
    _iteration_schedule = None  # this task's, built at its first iteration

    def warmup_cosine_per_task(self, warmup_steps: int, min_lr: float) -> None:
        """Call before every training iteration (MiniGPT-4's and MAE-CIL's schedule): at the
        task's first, the lr starts a linear warm-up over `warmup_steps` iterations, then a
        cosine down to `min_lr` at the task's last iteration, stepped after each one.
        `restart_optimizer` ends it, so the next task starts it over."""
        if self._iteration_schedule is None:
            total = self.train_epochs * len(self.dataloader)  # known once the task's loader exists
            self._iteration_schedule = warmup_cosine(self.optimizer, total, warmup_steps, min_lr)

    def _after_training_iteration(self, **kwargs):
        super()._after_training_iteration(**kwargs)
        if self._iteration_schedule is not None:
            self._iteration_schedule.step()

    # ---- run health: a diverged run stops before the optimizer applies its step ----------
    def _after_backward(self, **kwargs):
        super()._after_backward(**kwargs)  # plugins (EWC, SI, ...) have added their penalties by now
        if not bool(torch.isfinite(self.loss.detach()).all()):
            raise RunDiverged(f"{self.name} diverged: the training loss is {self.loss.detach().item()} at "
                              f"{self.position()} (lower the learning rate or a penalty weight)")

    def position(self) -> str:
        """Where training stands, 1-based, for messages: task, epoch, step of the epoch."""
        c = self.clock
        return (f"task {c.train_exp_counter + 1}/{self.context.protocol.num_tasks}, epoch {c.train_exp_epochs + 1}, "
                f"step {c.train_epoch_iterations + 1}")

    def restart_optimizer(self, weight_decay: float | None = None) -> None:
        """A fresh optimizer for a new task: no state (momentum, moments) from the last one, the
        settings' lr (and `weight_decay` where given), and no bookkeeping of an old scheduler, so
        a new one starts from this lr."""
        self._iteration_schedule = None
        self.optimizer.state.clear()
        for group in self.optimizer.param_groups:
            group["lr"] = self.hp["lr"]
            if weight_decay is not None:
                group["weight_decay"] = weight_decay
            group.pop("initial_lr", None)

    # ---- the harness-facing contract ------------------------------------------------
    def learn(self, experience) -> None:
        self.train(experience)

    def _after_training_exp(self, **kwargs):
        super()._after_training_exp(**kwargs)
        self._task_in_training = None

    @torch.no_grad()
    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model(x.to(self.device))

    def classifiers(self) -> tuple[str, ...]:
        """Names of the method's classifiers where it has several (("cnn", "nme"): its trained head and
        the nearest mean of exemplars, both recorded after every task); () = one, class_scores."""
        return ()

    def headline_classifier(self) -> str:
        """Which of classifiers() class_scores is: the one the method's paper reports."""
        return ""

    def scores_by_classifier(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{classifier: scores} for every name in classifiers(), from one pass over `x`."""
        raise NotImplementedError(f"{type(self).__name__} names classifiers() but has no scores_by_classifier")

    def zero_shot_scores(self, x: torch.Tensor, n_classes: int) -> torch.Tensor | None:
        """Scores over the first n_classes, some of which the method has not trained on yet;
        None where it cannot score an untrained class (a classifier that grows per task).
        The runner records, before each task, the accuracy on that task's test data."""
        return None

    def memory_usage(self) -> tuple[int, int]:
        return 0, 0

    def stored_bytes(self) -> int:
        """Everything the method keeps between tasks, in bytes: the model's weights and buffers, the
        exemplars and every other attribute it checkpoints (a teacher network, class means,
        covariances); the optimizer's state is left out. Tensors shared by several holders count once."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for t in tensors_in([self.model.state_dict(), capture_method(self, self._not_state()), self.extra_state()]):
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    # ---- a frozen teacher, for methods that distil from their previous model ------------
    old_model: nn.Module | None = None

    def precompute_teacher_logits(self) -> None:
        """Attach the teacher's logits to the training batches, computed once for the task.

        Unaugmented in-memory inputs are the same every epoch: the teacher then runs once
        per task, not once per batch of every epoch (~18% of iCaRL's training time on a ConvNet).
        """
        loader = self.dataloader
        if (self.old_model is None or not isinstance(loader, TensorBatches) or loader.augment != "none"
                or loader.extras):
            return
        with torch.no_grad():
            logits = torch.cat([self.old_model(xb.to(self.device)).cpu() for xb in loader.x.split(self.eval_mb_size)])
        self.dataloader = TensorBatches(loader.x, loader.y, loader.batch_size, loader.shuffle,
                                        extras=(logits,))

    def teacher_logits(self) -> torch.Tensor | None:
        """The teacher's logits for the current mini-batch: precomputed, or computed now."""
        if self.old_model is None:
            return None
        if len(self.mbatch) == 4:  # [x, y, teacher logits, task label]
            return self.mbatch[2].to(self.device)
        with torch.no_grad():
            return self.old_model(self.mb_x)

    # ---- checkpoints ------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {"model": self.model_state(), "optimizer": self.optimizer.state_dict(),
                "state": capture_method(self, self._not_state()), "extra": self.extra_state()}

    def model_state(self) -> dict[str, torch.Tensor]:
        """The model's weights to checkpoint (GMM keeps only what trains)."""
        return self.model.state_dict()

    def _not_state(self) -> set[str]:
        """Attribute names the automatic checkpoint leaves out."""
        return {*AVALANCHE_ATTRIBUTES, "context", "hp", "_iteration_schedule", "_task_in_training", *self.transient}

    def restore(self, state: dict[str, Any], past_experiences: list) -> None:
        """Return to the state saved after training `past_experiences` (a resumed run): the
        model and optimizer, then every other attribute (harness.state), then what the method
        rebuilds itself (on_resume) or saved itself (extra_state)."""
        if "state" not in state:
            raise HarnessError("this checkpoint was written before the harness saved method attributes; "
                               "--restart starts this run over")
        self.restore_model(state, past_experiences)
        restore_method(self, state["state"])
        self.on_resume(past_experiences)
        self.load_extra_state(state["extra"])

    def restore_model(self, state: dict[str, Any], past_experiences: list) -> None:
        """Model growth and Avalanche's optimizer bookkeeping are replayed the way
        training did them (one optimizer update before any adaptation, one after),
        so parameters sit in the same optimizer slots; then the saved values load.
        """
        self.make_optimizer(reset_optimizer_state=True)
        self.model.train()
        for experience in past_experiences:
            avalanche_model_adaptation(self.model, experience)
        self.model.to(self.device)
        self.make_optimizer(reset_optimizer_state=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def on_resume(self, past_experiences: list) -> None:
        """Rebuild state that is derived from past data rather than saved (see methods/joint.py)."""

    def extra_state(self) -> dict[str, Any]:
        """State the automatic checkpoint cannot take (harness.state saves the method's and its
        plugins' attributes by itself): list those attributes in `transient`, return them here.

        Tensors, numbers, strings and lists/dicts of them only: checkpoints are read
        back with torch.load(weights_only=True).
        """
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Inverse of extra_state()."""

    def run_info(self) -> dict[str, Any]:
        """Settings resolved at run time (e.g. a precision chosen for this hardware), for config.json."""
        return {}

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)
