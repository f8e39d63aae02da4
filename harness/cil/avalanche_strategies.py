"""Avalanche's strategies as harness methods, one class made per strategy.

`wrap_strategy(spec)` builds `class <Name>(AvalancheStrategy, <Avalanche strategy>)`: the
harness's contract (settings, evaluation by `class_scores`, checkpoints, the shared training
recipe) in front, the strategy's own training loop, criterion and plugins behind it. Its
settings are the shared training settings plus the strategy's own constructor arguments,
with their types and defaults read from its signature (a spec may set a default where
Avalanche's is meant for another scale, or supply one Avalanche leaves required).

The strategy trains on the stream as Avalanche loads it (its own data loaders, replay
loaders and buffers); the protocol's batch augmentation is applied to each training
mini-batch just before the forward pass, so the shared recipe holds for every strategy.
"""
from __future__ import annotations

import inspect
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from harness.cil.recipes import SUPERVISED_RECIPES
from harness.errors import HarnessError
from harness.method import SESSION_PARAMS, TRAINING_PARAMS, CILMethod
from harness.nn.augment import batch_augment
from harness.params import Param

# Constructor arguments the harness itself provides: the template's, from the shared settings.
_TEMPLATE_ARGUMENTS = frozenset({
    "self", "model", "optimizer", "criterion", "train_mb_size", "train_epochs", "eval_mb_size", "device",
    "plugins", "evaluator", "eval_every", "peval_mode", "base_kwargs", "kwargs", "args",
})
_SIMPLE = (bool, int, float, str)
# Strategies of avalanche.training the harness does not offer, with the reason (`list` prints them).
NOT_OFFERED: dict[str, str] = {}


@dataclass(frozen=True)
class StrategySpec:
    """How one Avalanche strategy runs in the harness."""

    name: str  # the harness's name for it (`--methods NAME`)
    strategy: str  # class name in avalanche.training (or a callable building the class, see plugins)
    paper: str  # who proposed it, for `list` and the README
    wraps: str = ""  # what `list` says it wraps, where that is not the strategy alone (a plugin on Naive)
    defaults: dict[str, Any] = field(default_factory=dict)  # its own arguments' defaults, where Avalanche's do not fit
    helps: dict[str, str] = field(default_factory=dict)  # what an argument means, for `list`
    # Arguments built from the run: the model's parts, the protocol's shape (name -> f(method))
    from_run: dict[str, Callable[[Any, nn.Module], Any]] = field(default_factory=dict)
    # The model the strategy trains, from the harness's (default: that one), f(method, model)
    model: Callable[[Any, nn.Module], nn.Module] | None = None
    hidden: tuple[str, ...] = ()  # own arguments not offered as settings (objects, not values)
    transient: tuple[str, ...] = ()  # strategy attributes rebuilt at every task (loaders, iterators)
    # Plugin attributes of that kind, by plugin class name, and what rebuilds them at resume
    plugin_transient: dict[str, tuple[str, ...]] = field(default_factory=dict)
    on_resume: Callable[[Any], None] | None = None
    memory: str | None = None  # the argument that sets its exemplar budget (e.g. mem_size)
    plugins: Callable[[Any], list] | None = None  # extra Avalanche plugins (a plugin-only method on Naive)
    plugin_params: dict[str, Param] = field(default_factory=dict)  # settings of those plugins


def _annotation_type(annotation: Any) -> type | None:
    """int for `int`, `Optional[int]`, `Union[int, None]`; None for anything not a simple value."""
    if annotation in _SIMPLE:
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and args[0] in _SIMPLE:
        return args[0]
    if set(args) == {int, float}:
        return float
    return None


def strategy_params(cls: type, spec: StrategySpec) -> dict[str, Param]:
    """The strategy's own constructor arguments that take a simple value, as declared settings."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not evaluate: fall back to the defaults' types
        hints = {}
    out: dict[str, Param] = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name in _TEMPLATE_ARGUMENTS or name in spec.from_run or name in spec.hidden or p.kind in (
                p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = spec.defaults.get(name, p.default)
        if default is inspect.Parameter.empty:
            raise HarnessError(f"avalanche strategy {cls.__name__}: its argument '{name}' has no default; "
                               f"the spec of '{spec.name}' must give one")
        kind = _annotation_type(hints.get(name)) or (type(default) if isinstance(default, _SIMPLE) else None)
        if kind is None:  # an object (a transform, a model): Avalanche's default stands
            continue
        if default is not None and not isinstance(default, kind):
            default = kind(default)
        help_text = spec.helps.get(name, f"{cls.__name__}'s `{name}`")
        if default is None:
            out[name] = Param(None, help_text, nullable=True, kind=kind)
        else:
            out[name] = Param(default, help_text, kind=kind)
    return out


class AvalancheStrategy(CILMethod):
    """The harness's side of a wrapped Avalanche strategy (see wrap_strategy)."""

    spec: StrategySpec
    strategy_class: type

    def template_arguments(self, model, arguments):
        """The shared arguments the strategy takes (ICaRL takes no `model`, but its parts), then
        its own settings and the arguments made from the run."""
        accepted = inspect.signature(self.strategy_class.__init__).parameters
        out = {k: v for k, v in arguments.items() if k in accepted}  # StreamingLDA passes its own optimizer
        out.update({k: self.hp[k] for k in strategy_params(self.strategy_class, self.spec)})
        out.update({k: make(self, model) for k, make in self.spec.from_run.items()})
        return out

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for plugin in self.plugins:  # harness.state leaves these out of the checkpoint
            names = self.spec.plugin_transient.get(type(plugin).__name__)
            if names:
                plugin.transient = names

    last_batch_classes: list[int] = []  # MIR leaves these classes out of its replay loader

    def _after_training_exp(self, **kwargs):
        self.last_batch_classes = sorted({int(c) for c in self.mb_y.unique().tolist()})
        super()._after_training_exp(**kwargs)

    def on_resume(self, past_experiences):
        if self.spec.on_resume:
            self.spec.on_resume(self)

    def build_model(self) -> nn.Module:
        base = super().build_model()
        return self.spec.model(self, base) if self.spec.model else base

    def build_plugins(self, optimizer):
        extra = self.spec.plugins(self) if self.spec.plugins else []
        return [*super().build_plugins(optimizer), *extra]

    def learn(self, experience) -> None:
        with warnings.catch_warnings():  # Avalanche 0.6's own deprecations, once per experience: not the user's
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
            super().learn(experience)

    def restore_model(self, state, past_experiences):
        # Buffers a module registers as None and fills during training (the NCM classifier's
        # class means): given the saved tensor's shape first, so the saved values load.
        for key, value in state["model"].items():
            owner, _, name = key.rpartition(".")
            module = self.model.get_submodule(owner) if owner else self.model
            if name in module._buffers and module._buffers[name] is None:
                module._buffers[name] = torch.empty_like(value)
        super().restore_model(state, past_experiences)

    def make_train_dataloader(self, **kwargs):
        # The strategy's own loader (or the template's): replay strategies build theirs here.
        return self.strategy_class.make_train_dataloader(self, **kwargs)

    def _before_forward(self, **kwargs):
        kind = self.augmentation()
        if self.is_training and kind != "none":
            self.mbatch[0] = batch_augment(self.mbatch[0], kind, self.hp.get("crop_padding", 4))
        super()._before_forward(**kwargs)

    @torch.no_grad()
    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        """The strategy's evaluation forward: its own `forward` (StreamingLDA's) between its
        plugins' eval-forward hooks (BiC's bias correction), without Avalanche's metrics."""
        self.model.eval()
        was_training, self.is_training = self.is_training, False
        self.mbatch = [x.to(self.device), torch.zeros(len(x), dtype=torch.long, device=self.device),
                       torch.zeros(len(x), dtype=torch.long, device=self.device)]
        hooks = [p for p in self.plugins if p is not self.evaluator and p is not self.clock]
        try:
            for plugin in hooks:
                if hasattr(plugin, "before_eval_forward"):
                    plugin.before_eval_forward(self)
            self.mb_output = self.forward()
            for plugin in hooks:
                if hasattr(plugin, "after_eval_forward"):
                    plugin.after_eval_forward(self)
            return self.mb_output
        finally:
            self.is_training = was_training

    def memory_usage(self) -> tuple[int, int]:
        """Exemplars held in the strategy's and its plugins' buffers, at one byte per pixel
        (what the harness's own methods count for an image kept as uint8)."""
        from avalanche.training.storage_policy import ExemplarsBuffer

        p = self.context.protocol
        pixels = p.channels * p.image_size * p.image_size
        seen, count = set(), 0
        for owner in (self, *self.plugins):
            for value in vars(owner).values():
                if isinstance(value, ExemplarsBuffer) and id(value) not in seen:
                    seen.add(id(value))
                    count += len(value.buffer)
        for name in ("memory_x", "buffers", "x_memory"):  # GEM's, AGEM's and ICaRL's storage by task / class
            for owner in (self, *self.plugins):
                value = getattr(owner, name, None)
                if isinstance(value, dict):
                    count += sum(len(v) for v in value.values() if hasattr(v, "__len__"))
                elif isinstance(value, list):
                    count += sum(len(v) for v in value if hasattr(v, "__len__"))
        return count, count * pixels


def wrap_strategy(spec: StrategySpec) -> type:
    """The harness method class for one Avalanche strategy."""
    import avalanche.training as training

    strategy_class = getattr(training, spec.strategy)
    own = strategy_params(strategy_class, spec)
    clash = sorted(set(own) & set(TRAINING_PARAMS))
    if clash:
        raise HarnessError(f"avalanche strategy {spec.strategy}: its arguments {', '.join(clash)} clash with the "
                           "shared training settings; hide them in its spec")
    shared = {k: v for k, v in {**TRAINING_PARAMS, **SESSION_PARAMS}.items()
              if k not in ("freeze_backbone",)}  # the strategy decides what trains

    class Wrapped(AvalancheStrategy, strategy_class):
        pass

    Wrapped.__name__ = Wrapped.__qualname__ = f"{strategy_class.__name__}Method"
    Wrapped.__module__ = "methods.avalanche"
    Wrapped.spec, Wrapped.strategy_class = spec, strategy_class
    Wrapped.description = f"Avalanche's {spec.wraps or strategy_class.__name__}: {spec.paper}"
    Wrapped.params = {**shared, **own, **spec.plugin_params}
    Wrapped.protocol_defaults = SUPERVISED_RECIPES
    Wrapped.transient = tuple(spec.transient)
    return Wrapped
