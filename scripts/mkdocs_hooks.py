"""MkDocs hooks: pages generated from the code, so the documentation cannot drift from it.

`<!-- harness:cli -->` becomes every command's usage and options (from harness.cli's parsers);
`<!-- harness:settings NAME -->` becomes method NAME's settings table (from its `params`) and
its per-protocol recipes; `<!-- harness:readme -->` the README (the home page).
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


def settings_table(name: str) -> str:
    from harness.registry import METHODS, discover

    discover()
    cls = METHODS.get(name)
    rows = ["`--set " + name + ".KEY=VALUE`; `python -m harness list " + name + " --protocol P` prints the values "
            "a protocol resolves.\n", "| setting | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for key, p in sorted(cls.params.items()):
        kind = p.type.__name__ if p.default is not None or p.kind else "str"
        allowed = ("one of " + ", ".join(map(str, p.choices)) if p.choices is not None
                   else " ".join(f"{op} {v}" for op, v in ((">=", p.low), ("<=", p.high)) if v is not None))
        rows.append(f"| `{key}` | {kind} | `{_cell(p.default)}` | {_cell(allowed)} | {_cell(p.help)} |")
    for family, recipe in sorted(getattr(cls, "protocol_defaults", {}).items()):
        rows.append(f"\nOn {family} protocols: " + ", ".join(f"`{k}={v}`" for k, v in recipe.items()) + ".")
    for condition, recipe in sorted(getattr(cls, "setting_defaults", {}).items()):
        rows.append(f"\nWith `{condition}`: " + ", ".join(f"`{k}={v}`" for k, v in recipe.items()) + ".")
    return "\n".join(rows) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    def render(match: re.Match) -> str:
        kind = match.group(1)
        if kind == "readme":  # the site's home page is the README, its links made relative to docs/
            return re.sub(r"\]\(docs/", "](", (ROOT / "README.md").read_text())
        return cli_reference() if kind == "cli" else settings_table(match.group(2))

    return _MARKER.sub(render, markdown)
