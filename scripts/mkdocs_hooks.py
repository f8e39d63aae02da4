"""MkDocs hooks: pages generated from the code, so the documentation cannot drift from it.

`<!-- harness:cli -->` becomes every command's usage and options (from harness.cli's parsers);
`<!-- harness:settings NAME -->` becomes method NAME's settings table (from its `params`), with the
values each protocol family's recipe resolves them to; `<!-- harness:readme -->` the README (the home page).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_MARKER = re.compile(r"<!-- harness:(cli|settings|readme)(?: ([A-Za-z0-9_]+))? -->")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def cli_reference() -> str:
    from harness.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    out = ["Global option: `--plugins PATH` (before the command, repeatable) imports a method or protocol file "
           "or folder.\n"]
    for name, sub in commands.items():
        out.append(f"## `{name}`\n")
        if sub.description:
            out.append(sub.description + "\n")
        out.append("```\n" + sub.format_usage().strip() + "\n```\n")
        out.append("| option | meaning | default |\n|---|---|---|")
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flags = ", ".join(action.option_strings) or action.metavar or action.dest
            if action.choices and not isinstance(action.choices, dict):
                flags += " {" + ",".join(map(str, action.choices)) + "}"
            default = action.default
            shown = "" if default in (None, False, [], argparse.SUPPRESS) else (
                " ".join(map(str, default)) if isinstance(default, list) else default)
            out.append(f"| `{_cell(flags)}` | {_cell(action.help or '')} | {_cell(shown)} |")
        if sub.epilog:
            out.append("\n" + sub.epilog.replace("example: ", "Example: `").replace("examples: ", "Examples: `")
                       + "`\n")
    return "\n".join(out) + "\n"


def _value(value) -> str:
    """A setting's value as a table cell: code font, as `--set` takes it; an empty string said in words."""
    if value == "":
        return "(empty)"
    return f"`{_cell('none' if value is None else value)}`"


refused: dict[str, str] = {}  # family -> why its recipe does not resolve, from the last _family_columns


def _family_columns(cls) -> list[tuple[str, dict]]:
    """[(column heading, resolved settings)]: one column per protocol family with its own values, for the
    built-in families (the default protocol's first) and any other family the method has a recipe for;
    families that resolve alike share a column, and the declared defaults head the column of the
    families without a recipe."""
    from harness.cli import DEFAULT_PROTOCOL
    from harness.params import resolve_params
    from harness.registry import PROTOCOLS

    first = PROTOCOLS.get(DEFAULT_PROTOCOL).family
    built_in = sorted({PROTOCOLS.get(n).family for n in PROTOCOLS.names()} - {""}, key=lambda f: (f != first, f))
    recipes = getattr(cls, "protocol_defaults", {})
    families = built_in + sorted(set(recipes) - set(built_in))
    from harness.errors import HarnessError

    declared, _ = resolve_params(cls, None)  # no family: the declared defaults (and setting recipes)
    columns: dict[str, tuple[list[str], dict]] = {}
    refused.clear()
    for family in families:
        try:
            values = resolve_params(cls, family)[0] if family in recipes else declared
        except HarnessError as e:  # a recipe the method cannot take (e.g. a backbone it cannot use)
            refused[family] = str(e)
            continue
        columns.setdefault(repr(sorted(values.items())), ([], values))[0].append(family)
    others = columns.setdefault(repr(sorted(declared.items())), ([], declared))[0]
    others.append("other families" if others else "any other family")
    if len(columns) == 1:  # no recipe: every protocol runs with the declared defaults
        return [("every family", declared)]
    return [(", ".join(names), values) for names, values in columns.values()]


def settings_table(name: str) -> str:
    """Method NAME's settings with the value each protocol family runs them at (its recipe over the
    declared defaults), the allowed values and their meaning."""
    from harness.registry import METHODS, discover

    discover()
    cls = METHODS.get(name)
    columns = _family_columns(cls)
    rows = ["`--set " + name + ".KEY=VALUE`; `python -m harness list " + name + " --protocol P` prints the values "
            "a protocol resolves. Each column holds the values the protocols of those families run with (the "
            "family's recipe over the declared defaults); a protocol of any other family runs with the declared "
            "defaults.\n",
            "| setting | type | " + " | ".join(_cell(h) for h, _ in columns) + " | allowed | meaning |",
            "|---|---|" + "---|" * len(columns) + "---|---|"]
    for key, p in sorted(cls.params.items()):
        kind = p.type.__name__ if p.default is not None or p.kind else "str"
        allowed = ("one of " + ", ".join(map(str, p.choices)) if p.choices is not None
                   else " ".join(f"{op} {v}" for op, v in ((">=", p.low), ("<=", p.high)) if v is not None))
        values = " | ".join(_value(v[key]) for _, v in columns)
        rows.append(f"| `{key}` | {kind} | {values} | {_cell(allowed)} | {_cell(p.help)} |")
    for condition, recipe in sorted(getattr(cls, "setting_defaults", {}).items()):
        rows.append(f"\nWith `{condition}`: " + ", ".join(f"`{k}={v}`" for k, v in recipe.items()) + ".")
    for family, why in sorted(refused.items()):
        rows.append(f"\nOn {family} protocols a run is refused: `{_cell(why)}`.")
    return "\n".join(rows) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    def render(match: re.Match) -> str:
        kind = match.group(1)
        if kind == "readme":  # the site's home page is the README, its links made relative to docs/
            return re.sub(r"\]\(docs/", "](", (ROOT / "README.md").read_text())
        return cli_reference() if kind == "cli" else settings_table(match.group(2))

    return _MARKER.sub(render, markdown)
