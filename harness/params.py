"""Declared hyperparameters of methods, their defaults and `--set` overrides.

A method declares `params = {"lr": Param(0.01, low=0.0), ...}` and, per protocol
family, `protocol_defaults = {"cifar100": {"lr": 0.1}}`. The resolved value of each
parameter is: declared default < protocol-family default < a setting's own recipe
(`setting_defaults = {"model=hf_llava": {"lr": 3e-6}}`: applies when the resolved value of
`model` is `hf_llava`, to every key the user did not set) < CLI flags (--epochs)
< `--set method.key=value` (or `--set key=value` for every method declaring `key`).
"""
from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from harness.errors import HarnessError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Param:
    default: Any
    help: str = ""
    choices: Sequence[Any] | None = None
    low: float | None = None  # inclusive bounds for numbers
    high: float | None = None
    nullable: bool = False  # accepts "none"
    affects_results: bool = True  # False for pure plumbing (caches, batch sizes of inference)
    kind: type | None = None  # the value's type where the default does not say (a default of None)

    @property
    def type(self) -> type:
        return self.kind or type(self.default)

    def coerce(self, key: str, value: Any) -> Any:
        """Turn a CLI string (or a Python value) into this parameter's type, or explain."""
        is_choice = self.choices is not None and value in self.choices  # e.g. lr_schedule=none
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and not is_choice):
            if self.nullable or self.default is None:
                return None
            raise HarnessError(f"{key} cannot be none")
        kind = self.kind or (self.type if self.default is not None else str)
        try:
            if kind is bool:
                if isinstance(value, bool):
                    out = value
                elif str(value).lower() in _TRUE:
                    out = True
                elif str(value).lower() in _FALSE:
                    out = False
                else:
                    raise ValueError
            elif kind is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                out = int(str(value), 0) if isinstance(value, str) else int(value)
            elif kind is float:
                out = float(value)
            else:
                out = kind(value)
        except (TypeError, ValueError):
            raise HarnessError(f"{key}={value!r}: expected {kind.__name__}") from None
        if self.choices is not None and out not in self.choices:
            raise HarnessError(f"{key}={out!r}: must be one of {', '.join(map(str, self.choices))}")
        if self.low is not None and out < self.low:
            raise HarnessError(f"{key}={out!r}: must be >= {self.low}")
        if self.high is not None and out > self.high:
            raise HarnessError(f"{key}={out!r}: must be <= {self.high}")
        return out


def parse_set_options(items: Iterable[str]) -> list[tuple[str | None, str, str]]:
    """'icarl.memory=1000' -> ('icarl', 'memory', '1000'); 'lr=0.1' -> (None, 'lr', '0.1')."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise HarnessError(f"--set {item!r}: expected KEY=VALUE, e.g. icarl.memory=1000")
        method, dot, name = key.strip().rpartition(".")
        if not name:
            raise HarnessError(f"--set {item!r}: empty parameter name")
        out.append((method if dot else None, name, value.strip()))
    return out


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def validate_set_options(overrides: Sequence[tuple[str | None, str, str]], methods: Mapping[str, type]) -> None:
    """Refuse overrides that no selected method declares (before anything runs)."""
    for method, name, value in overrides:
        if method is not None:
            if method not in methods:
                raise HarnessError(f"--set {method}.{name}: method {method} is not in --methods ({', '.join(methods)})"
                                   + _suggest(method, methods))
            targets = [methods[method]]
        else:
            targets = [cls for cls in methods.values() if name in cls.params]
            if not targets:
                known = {k for cls in methods.values() for k in cls.params}
                raise HarnessError(f"--set {name}: no selected method declares '{name}'{_suggest(name, known)}")
        for cls in targets:
            if name not in cls.params:
                known = ", ".join(sorted(cls.params))
                raise HarnessError(f"--set {method}.{name}: {method} has no parameter '{name}'"
                                   f"{_suggest(name, cls.params)}; it has: {known}")
            cls.params[name].coerce(f"{cls.name}.{name}", value)


def _sweepable(param: Param) -> bool:
    """Values of this setting never hold a comma: "a,b" lists several (a number, a flag, a choice)."""
    return param.type in (int, float, bool) or (param.choices is not None and
                                                 not any("," in str(c) for c in param.choices))


def expand_grid(overrides: Sequence[tuple[str | None, str, str]],
                methods: Mapping[str, type]) -> list[list[tuple[str | None, str, str]]]:
    """The overrides of every combination of a grid, in order (the last key varies fastest).

    A setting swept takes several values: `icarl.lr=0.05,0.1` where its values cannot hold a
    comma (numbers, flags, choices), or the same key given more than once (any setting, e.g.
    `icarl.milestones=80,120 icarl.milestones=60,120`). Without either, one combination."""
    groups: dict[tuple[str | None, str], list[str]] = {}
    for method, name, value in overrides:
        targets = [methods[method]] if method in methods else [c for c in methods.values() if name in c.params]
        split = bool(targets) and all(name in c.params and _sweepable(c.params[name]) for c in targets)
        values = [v.strip() for v in value.split(",")] if split else [value]
        if split and any(not v for v in values):
            raise HarnessError(f"--set {method + '.' if method else ''}{name}={value}: an empty value in the list")
        groups.setdefault((method, name), []).extend(values)
    keys = list(groups)
    return [[(m, k, v) for (m, k), v in zip(keys, combo)]
            for combo in itertools.product(*(dict.fromkeys(groups[key]) for key in keys))]


def resolve_params(
    cls: type,
    family: str,
    overrides: Sequence[tuple[str | None, str, str]] = (),
    cli: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(all resolved values, only the values the user changed) for one method."""
    declared: Mapping[str, Param] = cls.params
    values = {k: p.default for k, p in declared.items()}
    for k, v in getattr(cls, "protocol_defaults", {}).get(family, {}).items():
        values[k] = declared[k].coerce(f"{cls.name}.{k}", v)
    changed: dict[str, Any] = {}
    for k, v in (cli or {}).items():
        if v is not None and k in declared:
            values[k] = changed[k] = declared[k].coerce(f"{cls.name}.{k}", v)
    for method, k, v in overrides:
        if method in (None, cls.name) and k in declared:
            values[k] = changed[k] = declared[k].coerce(f"{cls.name}.{k}", v)
    for condition, recipe in getattr(cls, "setting_defaults", {}).items():
        key, _, value = condition.partition("=")
        if str(values[key]) == value:
            for k, v in recipe.items():
                if k not in changed:
                    values[k] = declared[k].coerce(f"{cls.name}.{k}", v)
    return values, changed
