"""A method's state, checkpointed without its author writing code for it.

After every task the harness saves, beside the model and the optimizer, every attribute the
method holds (except Avalanche's own bookkeeping and the names it lists in `transient`) and
every attribute of each of its Avalanche plugins. A resumed run builds the method anew and
puts the saved values back. What can be saved:

- tensors (back on the device they were on), numbers, strings, None, numpy arrays;
- lists, tuples, sets and dicts of these (a defaultdict stays one);
- `nn.Module`s, as weights: loaded into the module the new instance has, or, for one made
  during training (a teacher), into a copy of the method's model;
- objects with `state_dict()` / `load_state_dict()` (an ExemplarMemory, a scheduler);
- plain objects (Avalanche's LwF helper), attribute by attribute, in place;
- the method itself, its model and its optimizer, by reference.

Functions, classes and devices are configuration, rebuilt with the method, and skipped.
Anything else (a dataset, a data loader, a generator) cannot go through
`torch.load(weights_only=True)`: the harness refuses to checkpoint it, in one line that says
to list it in `transient` (it is rebuilt or not needed to continue) or to save it yourself
in `extra_state` / `load_extra_state`.
"""
from __future__ import annotations

import copy
import types
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from harness.errors import HarnessError

# What Avalanche's training templates keep on the strategy (0.6): bookkeeping of the loop,
# rebuilt by the next task, or saved on its own (model, optimizer).
AVALANCHE_ATTRIBUTES = frozenset({
    "_criterion", "_distributed_check", "_eval_streams", "_is_eval_updated", "_make_empty_loss",
    "_stop_training", "adapted_dataset", "clock", "criterion", "current_eval_stream", "dataloader", "device",
    "do_final", "do_initial", "eval_every", "eval_mb_size", "evaluator", "experience", "forward",
    "is_training", "loss", "mb_output", "mbatch", "model", "model_adaptation", "optimized_param_id",
    "optimizer", "peval_mode", "plugins", "retain_graph", "train_epochs", "train_mb_size",
})

_CONFIGURATION = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type, types.ModuleType,
                  torch.device, torch.dtype, type(Ellipsis))
_PRIMITIVES = (bool, int, float, str, bytes, type(None))


class UnsaveableState(HarnessError):
    """An attribute the harness cannot checkpoint (the message names it and says what to do)."""


class _Refs:
    """What a saved value may point at by name rather than by content."""

    def __init__(self, owner: Any):
        self.by_id = {id(owner): "self"}
        self.by_name = {"self": owner}
        for name in ("model", "optimizer"):
            value = getattr(owner, name, None)
            if value is not None:
                self.by_id[id(value)], self.by_name[name] = name, value
        model = getattr(owner, "model", None)
        if isinstance(model, nn.Module):  # an attribute that aliases a part of the model stays an alias
            for kind, parts in (("module", model.named_modules()), ("parameter", model.named_parameters())):
                for part_name, part in parts:
                    if part_name and id(part) not in self.by_id:
                        self.by_id[id(part)] = f"model {kind} {part_name}"
                        self.by_name[f"model {kind} {part_name}"] = part
        self.module_template: Callable[[], nn.Module] = lambda: copy.deepcopy(owner.model)


def capture(value: Any, where: str, refs: _Refs, seen: set[int] | None = None) -> Any:
    """`value` as tensors, numbers, strings and containers (what weights_only can read back)."""
    seen = set() if seen is None else seen
    if id(value) in refs.by_id:
        return {"__kind__": "ref", "name": refs.by_id[id(value)]}
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, torch.Tensor):
        return {"__kind__": "tensor", "data": value.detach().cpu().clone(), "device": str(value.device),
                "grad": bool(value.requires_grad)}
    if isinstance(value, np.ndarray) and value.dtype != object:
        return {"__kind__": "ndarray", "data": torch.from_numpy(value.copy())}
    if isinstance(value, _CONFIGURATION) or (callable(value) and not hasattr(value, "__dict__")):
        return {"__kind__": "skip"}
    if id(value) in seen:
        raise UnsaveableState(f"{where} refers back to itself; the harness cannot checkpoint cycles: "
                              f"{_advice(where)}")
    seen = seen | {id(value)}
    if isinstance(value, nn.Module):
        params = [p.requires_grad for p in value.parameters()]
        device = next((p.device for p in value.parameters()), torch.device("cpu"))
        return {"__kind__": "module", "state": {k: v.detach().cpu().clone() for k, v in value.state_dict().items()},
                "training": value.training, "grad": params, "device": str(device)}
    if isinstance(value, (list, tuple, set, frozenset)):
        kind = type(value).__name__ if type(value) in (list, tuple, set, frozenset) else "list"
        return {"__kind__": kind, "items": [capture(v, f"{where}[{i}]", refs, seen) for i, v in enumerate(value)]}
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, (bool, int, float, str)):
                raise UnsaveableState(f"{where} has a key of type {type(k).__name__}; keys must be numbers or strings: "
                                      f"{_advice(where)}")
        return {"__kind__": "dict", "keys": list(value),
                "values": [capture(v, f"{where}[{k!r}]", refs, seen) for k, v in value.items()]}
    if callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None)):
        return {"__kind__": "stateful", "type": _type_name(value),
                "state": capture(value.state_dict(), f"{where}.state_dict()", refs, seen)}
    if hasattr(value, "__dict__") and type(value).__module__ not in ("builtins", "torch.utils.data.dataloader"):
        if _looks_like_data(value):
            raise UnsaveableState(f"{where} is a {_type_name(value)} (data, not state): {_advice(where)}")
        return {"__kind__": "object", "type": _type_name(value),
                "attrs": {k: capture(v, f"{where}.{k}", refs, seen) for k, v in vars(value).items()}}
    raise UnsaveableState(f"{where} is a {_type_name(value)}, which a checkpoint cannot hold: {_advice(where)}")


def rebuild(saved: Any, current: Any, where: str, refs: _Refs) -> Any:
    """The value to put back: from `saved`, into `current` (the fresh instance's) where it can."""
    if not isinstance(saved, dict) or "__kind__" not in saved:
        return saved
    kind = saved["__kind__"]
    if kind == "ref":
        return refs.by_name[saved["name"]]
    if kind == "skip":
        return current
    if kind == "tensor":
        t = saved["data"].to(_device(saved["device"]))
        return t.requires_grad_(saved["grad"]) if t.is_floating_point() or t.is_complex() else t
    if kind == "ndarray":
        return saved["data"].numpy()
    if kind == "module":
        module = current if isinstance(current, nn.Module) else refs.module_template()
        try:
            module.load_state_dict(saved["state"])
        except RuntimeError as exc:
            raise UnsaveableState(f"{where}: its saved weights do not fit "
                                  f"{'the new instance' if module is current else 'a copy of the model'} "
                                  f"({str(exc).splitlines()[0]}): {_advice(where)}") from exc
        module.train(saved["training"])
        for p, grad in zip(module.parameters(), saved["grad"]):
            p.requires_grad_(grad)
        return module.to(_device(saved["device"]))
    if kind in ("list", "tuple", "set", "frozenset"):
        olds = list(current) if isinstance(current, (list, tuple)) else []
        items = [rebuild(v, olds[i] if i < len(olds) else None, f"{where}[{i}]", refs)
                 for i, v in enumerate(saved["items"])]
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[kind](items)
    if kind == "dict":
        out = current if isinstance(current, dict) else {}  # in place: a defaultdict keeps its factory
        olds = dict(out)
        out.clear()
        for k, v in zip(saved["keys"], saved["values"]):
            out[k] = rebuild(v, olds.get(k), f"{where}[{k!r}]", refs)
        return out
    if kind in ("stateful", "object"):
        if current is None or _type_name(current) != saved["type"]:
            raise UnsaveableState(f"{where} ({saved['type']}) was made during training and the new instance has "
                                  f"{_type_name(current)} there: create it in __init__, or {_advice(where)}")
        if kind == "stateful":
            current.load_state_dict(rebuild(saved["state"], None, f"{where}.state_dict()", refs))
        else:
            for k, v in saved["attrs"].items():
                setattr(current, k, rebuild(v, getattr(current, k, None), f"{where}.{k}", refs))
        return current
    raise UnsaveableState(f"{where}: unknown saved kind {kind!r}")


def method_attributes(method: Any, skip: set[str]) -> dict[str, Any]:
    return {k: v for k, v in vars(method).items() if k not in skip}


def capture_method(method: Any, skip: set[str]) -> dict[str, Any]:
    """The method's own attributes and its plugins' attributes, ready for torch.save."""
    refs = _Refs(method)
    name = type(method).name or type(method).__name__
    attrs = {k: capture(v, f"{name}.{k}", refs) for k, v in method_attributes(method, skip).items()}
    plugins = []
    for i, plugin in enumerate(method.plugins):
        transient = set(getattr(plugin, "transient", ()))
        pname = f"{name}'s plugin {type(plugin).__name__}"
        plugins.append({"type": _type_name(plugin), "attrs": {
            k: capture(v, f"{pname}.{k}", refs) for k, v in vars(plugin).items() if k not in transient}})
    return {"attributes": attrs, "plugins": plugins}


def restore_method(method: Any, saved: dict[str, Any]) -> None:
    refs = _Refs(method)
    name = type(method).name or type(method).__name__
    for k, v in saved["attributes"].items():
        setattr(method, k, rebuild(v, getattr(method, k, None), f"{name}.{k}", refs))
    if len(saved["plugins"]) != len(method.plugins):
        raise HarnessError(f"{name}: the checkpoint has {len(saved['plugins'])} plugins, the method now "
                           f"{len(method.plugins)}; --restart starts this run over")
    for plugin, state in zip(method.plugins, saved["plugins"]):
        pname = f"{name}'s plugin {type(plugin).__name__}"
        if _type_name(plugin) != state["type"]:
            raise HarnessError(f"{pname}: the checkpoint holds a {state['type']} there; --restart starts this run over")
        for k, v in state["attrs"].items():
            setattr(plugin, k, rebuild(v, getattr(plugin, k, None), f"{pname}.{k}", refs))


def _advice(where: str) -> str:
    attr = where.split(".")[1].split("[")[0]  # the method's (or plugin's) own attribute, not a part of it
    return (f"list '{attr}' in the class's `transient` if it is rebuilt or not needed to continue, or save "
            f"it yourself in extra_state / load_extra_state")


def _looks_like_data(value: Any) -> bool:
    return (isinstance(value, (torch.utils.data.Dataset, torch.utils.data.DataLoader)) or hasattr(value, "__next__")
            or type(value).__module__.startswith("avalanche.benchmarks"))  # streams, experiences, datasets


def _type_name(value: Any) -> str:
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _device(name: str) -> torch.device:
    device = torch.device(name)
    return device if device.type != "cuda" or torch.cuda.is_available() else torch.device("cpu")
