"""A method's state, checkpointed without its author writing code for it.

After every task the harness saves, beside the model and the optimizer, every attribute the
method holds (except Avalanche's own bookkeeping and the names it lists in `transient`) and
every attribute of each of its Avalanche plugins. A resumed run builds the method anew and
puts the saved values back. What can be saved:

- tensors (back on the device they were on), numbers, strings, None, numpy arrays, devices, dtypes;
- lists, tuples, sets and dicts of these (a defaultdict stays one);
- `nn.Module`s, as weights: loaded into the module the new instance has, or, for one made
  during training (a teacher), into a copy of the method's model;
- objects with `state_dict()` / `load_state_dict()` (an ExemplarMemory, a scheduler);
- plain objects (Avalanche's LwF helper), attribute by attribute, in place; one of Avalanche's
  own types made during training (EWC's `ParamData`, a storage policy) is built anew by type;
- Avalanche datasets (the buffers of replay strategies), as their rows: the tensors and labels
  of each item and every data attribute (targets, task labels, DER's stored logits);
- the method itself, its model and its optimizer, by reference.

Functions and classes are configuration, rebuilt with the method, and skipped (a
torch or Avalanche function held by an object made during training is found again by name).
Anything else (a torch dataset, a data loader, a generator) cannot go through
`torch.load(weights_only=True)`: the harness refuses to checkpoint it, in one line that says
to list it in `transient` (it is rebuilt or not needed to continue) or to save it yourself
in `extra_state` / `load_extra_state`.
"""
from __future__ import annotations

import copy
import importlib
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
                  type(Ellipsis))
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


# Modules whose types and functions a checkpoint may name, to build them anew at resume.
_REBUILDABLE = ("avalanche.", "torch.", "harness.", "methods.")


def capture(value: Any, where: str, refs: _Refs, seen: set[int] | None = None) -> Any:
    """`value` as tensors, numbers, strings and containers (what weights_only can read back)."""
    seen = set() if seen is None else seen
    if id(value) in refs.by_id:
        return {"__kind__": "ref", "name": refs.by_id[id(value)]}
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, torch.Size):
        return {"__kind__": "size", "items": list(value)}
    if isinstance(value, (torch.device, torch.dtype)):
        return {"__kind__": type(value).__name__, "name": str(value)}
    if isinstance(value, torch.Tensor):
        return {"__kind__": "tensor", "data": value.detach().cpu().clone(), "device": str(value.device),
                "grad": bool(value.requires_grad)}
    if isinstance(value, np.ndarray) and value.dtype != object:
        return {"__kind__": "ndarray", "data": torch.from_numpy(value.copy())}
    if isinstance(value, _CONFIGURATION) or (callable(value) and not hasattr(value, "__dict__")):
        return {"__kind__": "skip", "name": _function_name(value)}
    if _is_avalanche_dataset(value):
        return _capture_dataset(value, where)
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
        return current if current is not None or not saved.get("name") else _import(saved["name"])
    if kind == "size":
        return torch.Size(saved["items"])
    if kind == "device":
        return _device(saved["name"])
    if kind == "dtype":
        return getattr(torch, saved["name"].removeprefix("torch."))
    if kind == "dataset":
        return _rebuild_dataset(saved)
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
    if kind == "object" and current is None and saved["type"].startswith("avalanche."):
        cls = _import(saved["type"])  # made during training (EWC's ParamData): built anew, attribute by attribute
        current = cls.__new__(cls)
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


def tensors_in(value: Any):
    """Every tensor in a nest of dicts, lists, tuples and sets (what capture_method returns)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from tensors_in(v)


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


def _function_name(value: Any) -> str | None:
    """'torch.zeros' for a function that can be imported again by that name, else None."""
    module = getattr(value, "__module__", None)
    if not isinstance(value, (types.FunctionType, types.BuiltinFunctionType)) or not module:
        return None
    # torch.zeros's qualname is _VariableFunctionsClass.zeros: the name it is imported by comes first
    for name in (getattr(value, "__name__", ""), getattr(value, "__qualname__", "")):
        full = f"{module}.{name}"
        if name and "<" not in name and full.startswith(_REBUILDABLE):
            try:
                if _import(full) is value:
                    return full
            except (AttributeError, ImportError, UnsaveableState):
                continue
    return None


def _import(name: str) -> Any:
    """A type or function of an allowed module, by its dotted name."""
    if not name.startswith(_REBUILDABLE):
        raise UnsaveableState(f"the checkpoint names {name}, which the harness does not import")
    module, _, attr = name.rpartition(".")
    while module:
        try:
            value = importlib.import_module(module)
            break
        except ImportError:  # a nested qualname (Class.method): step up one name
            module, _, outer = module.rpartition(".")
            attr = f"{outer}.{attr}"
    for part in attr.split("."):
        value = getattr(value, part)
    return value


def _is_avalanche_dataset(value: Any) -> bool:
    from avalanche.benchmarks.utils import AvalancheDataset
    return isinstance(value, AvalancheDataset)


def _column(values: list, where: str) -> dict[str, Any]:
    """One field of a dataset's items: ints stay ints, tensors stack (uint8 where that is exact)."""
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return {"ints": torch.tensor([int(v) for v in values], dtype=torch.long)}
    if values and all(isinstance(v, torch.Tensor) for v in values):
        stacked = torch.stack([v.detach().cpu() for v in values])
        if stacked.is_floating_point():
            as_bytes = (stacked * 255).round().clamp(0, 255).to(torch.uint8)
            if torch.equal(as_bytes.float().div(255).to(stacked.dtype), stacked):  # images read as k/255
                return {"uint8": as_bytes, "dtype": str(stacked.dtype).removeprefix("torch.")}
        return {"tensors": stacked}
    if not values:
        return {"ints": torch.zeros(0, dtype=torch.long)}
    raise UnsaveableState(f"{where} holds items of type {_type_name(values[0])}, which the harness cannot "
                          f"checkpoint as rows: {_advice(where)}")


def _values(column: dict[str, Any]) -> list:
    if "ints" in column:
        return column["ints"].tolist()
    if "uint8" in column:
        return list(column["uint8"].float().div(255).to(getattr(torch, column["dtype"])).unbind(0))
    return list(column["tensors"].unbind(0))


def _capture_dataset(dataset: Any, where: str) -> dict[str, Any]:
    """An Avalanche dataset as rows: each item's own fields, then its data attributes by name."""
    attributes = list(dataset._data_attributes.values())
    in_item = sum(a.use_in_getitem for a in attributes)
    items = [dataset[i] for i in range(len(dataset))]
    fields = len(items[0]) - in_item if items else 2
    return {"__kind__": "dataset", "type": _type_name(dataset),
            "fields": [_column([item[f] for item in items], f"{where} (item field {f})") for f in range(fields)],
            "attributes": [{"name": a.name, "in_item": bool(a.use_in_getitem),
                            "values": _column([a[i] for i in range(len(dataset))], f"{where}.{a.name}")}
                           for a in attributes]}


class _Rows(torch.utils.data.Dataset):
    """The saved fields of a dataset's items, served as the items were."""

    def __init__(self, fields: list[list]):
        self.fields = fields

    def __len__(self) -> int:
        return len(self.fields[0]) if self.fields else 0

    def __getitem__(self, i: int):
        return tuple(f[i] for f in self.fields)


def _rebuild_dataset(saved: dict[str, Any]) -> Any:
    from avalanche.benchmarks.utils import AvalancheDataset, _make_taskaware_classification_dataset
    from avalanche.benchmarks.utils.data_attribute import DataAttribute, TensorDataAttribute
    from avalanche.benchmarks.utils.flat_data import FlatData

    attrs = {a["name"]: a for a in saved["attributes"]}
    rows = _Rows([_values(f) for f in saved["fields"]])
    if "targets" in attrs:  # a classification dataset: Avalanche's own targets and task labels
        tasks = _values(attrs["targets_task_labels"]["values"]) if "targets_task_labels" in attrs else [0]
        tasks = tasks[0] if len(set(tasks)) == 1 else tasks  # one label: a constant, as the stream's own
        dataset = _make_taskaware_classification_dataset(rows, targets=_values(attrs["targets"]["values"]),
                                                         task_labels=tasks)
    elif len(rows) == 0 and not attrs:
        return AvalancheDataset([])  # an empty buffer, as a storage policy starts
    else:
        dataset = AvalancheDataset([rows])
    for a in saved["attributes"]:
        if a["name"] in ("targets", "targets_task_labels") and "targets" in attrs:
            continue
        values = _values(a["values"])
        if "tensors" in a["values"] or "uint8" in a["values"]:
            attribute = TensorDataAttribute(FlatData([torch.stack(values)], discard_elements_not_in_indices=True),
                                            name=a["name"], use_in_getitem=a["in_item"])
        else:
            attribute = DataAttribute(values, name=a["name"], use_in_getitem=a["in_item"])
        dataset = dataset.update_data_attribute(a["name"], attribute)
    return dataset


def _looks_like_data(value: Any) -> bool:
    return (isinstance(value, (torch.utils.data.Dataset, torch.utils.data.DataLoader)) or hasattr(value, "__next__")
            or type(value).__module__.startswith("avalanche.benchmarks"))  # streams, experiences, datasets


def _type_name(value: Any) -> str:
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _device(name: str) -> torch.device:
    device = torch.device(name)
    return device if device.type != "cuda" or torch.cuda.is_available() else torch.device("cpu")
