"""`report --format html`: one self-contained page to send a colleague.

No network and no script: the figures are PNGs embedded as data URIs, the styles inline.
Sections: the paper table (mean ± std over seeds; every label links to its runs); per
protocol, accuracy against classes seen (Class-IL, and Task-IL where recorded), forgetting
per task and each label's accuracy matrix (figure and numbers); then every run's resolved
configuration and package versions (its config.json), linked back to the table. Rows go by
their shown names (an experiment file's); every path is relative to the page's folder.

The top of the report modules: it imports harness.report and harness.plots, neither imports it.
Its render and write_report are harness.report's with the page added (format "html", report.html).
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from harness import failures, report
from harness.presentation import BAND, ordered_labels, shown_name

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1340px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; font-size: .9em; margin: .5em 0 1em; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; white-space: normal; } td:first-child, th:first-child { text-align: left; }
#paper-table td:first-child { white-space: normal; overflow-wrap: normal; min-width: 10em; max-width: 18em; }
#paper-table th, #paper-table td { padding: .25em .4em; }
.sessions td:first-child { white-space: normal; min-width: 10em; max-width: 18em; }
.scroll { overflow-x: auto; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; }
details { margin: .3em 0; } summary { cursor: pointer; }
pre { background: #f8f8f8; padding: .6em; overflow-x: auto; font-size: .8em; }
.muted { color: #777; font-size: .9em; }
"""


def _anchor(*parts: object) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", "-".join(map(str, parts))).strip("-").lower()


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


CAPTIONS = {
    "acc_vs_classes": "Accuracy on all classes seen so far after each task (Class-IL). " + BAND + ".",
    "acc_vs_classes_task_il": "Accuracy after each task with the task identity given at test time (Task-IL). "
                              + BAND + "; rows without a Task-IL record are named in the figure.",
    "forgetting": "Forgetting of each task after the last one (Chaudhry et al.: its best accuracy minus its last), "
                  "mean over seeds.",
    "performance_drop": "Performance drop PD = A_1 − A_T: the accuracy lost from the first task to the last "
                        "(lower is better), mean ± one standard deviation over seeds.",
}


def _wrappable(label: str) -> str:
    """A run label that may break after each '+' (never inside a setting's name)."""
    return "+<wbr>".join(html.escape(part) for part in label.split("+"))


def _paper_table_html(runs: pd.DataFrame, columns: Sequence[str] = ()) -> str:
    """The paper table, one column group per protocol; each label links to its runs."""
    table = report.paper_table(runs, columns)
    protocols = list(dict.fromkeys(table.columns.get_level_values(0)))
    k = len(table.columns) // len(protocols)
    groups = "".join(f'<th colspan="{k}" class="protocol">{html.escape(p)}</th>' for p in protocols)
    names = "".join(f"<th>{html.escape(c)}</th>" for _, c in table.columns)
    rows = []
    for label, (shown, row) in zip(ordered_labels(runs, runs.label.unique()), table.iterrows()):
        first = sorted(runs[runs.label == label].protocol.unique())[0]
        link = f'<a href="#{_anchor("runs", first, label)}">{_wrappable(str(shown))}</a>'
        rows.append(f"<tr><td>{link}</td>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>")
    return (f'<div class="scroll"><table id="paper-table"><thead><tr><th rowspan="2">Method</th>{groups}</tr><tr>{names}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _matrix_html(g: pd.DataFrame) -> str:
    mats = []
    for m in g.accuracy_matrix:
        a = np.full((len(m), len(m)), np.nan)
        for t, row in enumerate(m):
            a[t, : len(row)] = row
        mats.append(a)
    mean = np.mean(mats, axis=0)
    head = "".join(f"<th>task {i + 1}</th>" for i in range(len(mean)))
    body = "".join(f"<tr><th>after task {t + 1}</th>" + "".join(
        f"<td>{'' if np.isnan(v) else f'{v:.1f}'}</td>" for v in row) + "</tr>" for t, row in enumerate(mean))
    return f'<table class="matrix"><thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>'


def _sessions_html(g: pd.DataFrame) -> str:
    """Accuracy on all seen classes after each task (session), its mean and PD = A_1 - A_T."""
    t = report.session_table(g)
    head = "".join(f"<th>{html.escape(c)}</th>" for _, c in t.columns)
    body = "".join(f"<tr><td>{_wrappable(str(i))}</td>" + "".join(f"<td>{html.escape(v)}</td>" for v in row)
                   + "</tr>" for i, row in zip(t.index, t.to_numpy()))
    return ('<p class="muted">Accuracy on all seen classes after each task, headed by the task and the classes '
            'seen (few-shot papers\' sessions), their mean, and the performance drop PD = A_1 - A_T.</p>'
            f'<div class="scroll"><table class="sessions"><thead><tr><th>Method</th>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _config(path: Path) -> dict:
    try:
        return json.loads((path.parent / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _page_folder(runs: pd.DataFrame, folder: str | Path | None) -> Path:
    """The folder the page's paths start from: its own where known, else the one folder the runs were
    read from (so `report DIR --format html` prints the page `report --write DIR` writes), else the
    current one."""
    dirs = runs.attrs.get("dirs") or []
    if folder is None:
        folder = dirs[0] if len(dirs) == 1 else "."
    return Path(folder).resolve()


def _relative(path: str | Path, folder: Path) -> str:
    """`path` as seen from the page's folder: a page sent along or committed names no machine's paths."""
    return Path(os.path.relpath(Path(path).resolve(), folder)).as_posix()


# An absolute path inside a recorded string (a command line's arguments, a file's location)
_ABSOLUTE = re.compile(r"(?<![^\s=])/[^\s\"']*")


def _relative_paths(value, folder: Path):
    """A config.json's values with every absolute path in their strings made relative to `folder`."""
    if isinstance(value, str):
        return _ABSOLUTE.sub(lambda m: _relative(m.group(), folder), value)
    if isinstance(value, dict):
        return {k: _relative_paths(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative_paths(v, folder) for v in value]
    return value


def _figures_html(p: str, g: pd.DataFrame, figs: list) -> list[str]:
    """A protocol's figures, then its accuracy matrices (figure and numbers), captioned by the rows' shown names."""
    parts = [f'<figure id="{_anchor("fig", f.stem)}"><img src="{uri}" alt="{html.escape(f.stem)}">'
             f"<figcaption>{html.escape(CAPTIONS.get(f.kind, f.kind.replace('_', ' ')))}</figcaption></figure>"
             for f, uri in figs if f.kind != "accuracy_matrix"]
    parts.append("<h3>Accuracy matrices</h3>")
    for f, uri in figs:
        if f.kind == "accuracy_matrix":
            name = html.escape(f.name or shown_name(g, f.label))
            parts.append(f'<figure id="{_anchor("matrix", p, f.label)}"><img src="{uri}" '
                         f'alt="accuracy matrix of {name}"><figcaption>{name} '
                         f'(<a href="#{_anchor("runs", p, f.label)}">runs</a>)</figcaption>'
                         f"{_matrix_html(g[g.label == f.label])}</figure>")
    return parts


def _run_html(r, folder: Path) -> str:
    """One run: its numbers, folder, environment and resolved configuration."""
    cfg = _relative_paths(_config(Path(r.path)), folder)
    env = cfg.pop("environment", {})
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items())
    return (f"<details><summary>seed {r.seed}: Avg {r.avg_incremental_accuracy:.1f}, Last "
            f"{r.last_accuracy:.1f}, {report.duration(r.wall_time_s)}</summary>"
            f'<p class="muted">{html.escape(_relative(Path(r.path).parent, folder))}<br>'
            f'python {html.escape(str(env.get("python", "?")))}, '
            f'{html.escape(versions)}, commit {html.escape(str(env.get("git_commit", "?")))}</p>'
            f"<pre>{html.escape(json.dumps(cfg, indent=1, default=str))}</pre></details>")


def _runs_html(runs: pd.DataFrame, folder: Path) -> list[str]:
    """Every run by row (its shown name, then its label where that differs), linked back to the table."""
    parts = ['<h2 id="runs">Runs</h2>']
    for (p, label), g in runs.groupby(["protocol", "label"], sort=True):
        name = shown_name(runs, label)
        also = f' <span class="muted">({html.escape(label)})</span>' if name != label else ""
        parts.append(f'<h3 id="{_anchor("runs", p, label)}">{html.escape(p)} · {html.escape(name)}{also} '
                     f'<a class="muted" href="#table">(table)</a> '
                     f'<a class="muted" href="#{_anchor("matrix", p, label)}">(matrix)</a></h3>')
        parts += [_run_html(r, folder) for r in g.itertuples()]
    return parts


def _failed_html(runs: pd.DataFrame, folder: Path) -> str:
    """The runs that failed under these folders, which the table leaves out, as the markdown table notes them."""
    failed = runs.attrs.get("failed") or []
    if not failed:
        return ""
    items = "".join(f"<li>{html.escape(str(r.get('label', '?')))} seed {html.escape(str(r.get('seed', '?')))}: "
                    f"{html.escape(str(r.get('message', 'failed')))} "
                    f"({html.escape(_relative(Path(r['path']) / failures.FILENAME, folder))})</li>" for r in failed)
    return f'<p class="muted">Failed runs, not in the table (the same command resumes them):</p><ul>{items}</ul>'


def html_page(runs: pd.DataFrame, title: str = "Class-incremental learning results",
              embedded: list | None = None, columns: Sequence[str] = (), folder: str | Path | None = None) -> str:
    """The page; `embedded`: (figure, PNG bytes) already drawn by plots.write_figures, else drawn here;
    `columns`: the paper table's optional column groups (report.EXTRA_COLUMNS); `folder`: the page's
    folder, where its paths start (default: the folder the runs were read from)."""
    from harness.plots import EMBED_DPI, figures, png_bytes  # matplotlib: only once a page is asked for

    protocols = sorted(runs.protocol.unique())
    folder = _page_folder(runs, folder)
    if embedded is None:
        embedded = [(f, png_bytes(f.fig, EMBED_DPI)) for f in figures(runs)]
    figs: dict[str, list] = {p: [] for p in protocols}
    for f, png in embedded:
        figs[f.protocol].append((f, _uri(png)))
    nav = " ".join(f'<a href="#{_anchor("protocol", p)}">{html.escape(p)}</a>' for p in protocols)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<nav><a href="#table">Table</a> {nav} <a href="#runs">Runs</a></nav>',
             '<h2 id="table">Paper table</h2>',
             '<p class="muted">Accuracies in percent, mean ± std over seeds (one seed: the mean). Avg = average '
             'incremental accuracy, Last = accuracy after the last task (Class-IL); Task-IL columns give the task '
             'identity at test time.</p>',
             _paper_table_html(runs, columns) + _failed_html(runs, folder)]
    for p in protocols:
        g = runs[runs.protocol == p]
        parts.append(f'<h2 id="{_anchor("protocol", p)}">{html.escape(p)}</h2>')
        parts.append(_sessions_html(g))
        parts += _figures_html(p, g, figs[p])
    parts += _runs_html(runs, folder)
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")


def render(runs: pd.DataFrame, fmt: str, embedded: list | None = None, sessions: bool = False,
           columns: Sequence[str] = ()) -> str:
    """harness.report.render with the page: every format, "html" included."""
    return report.render(runs, fmt, embedded, sessions, columns, page=html_page)


def write_report(runs: pd.DataFrame, out_dir: str | Path, formats: Sequence[str] = report.FORMATS,
                 embedded: list | None = None, columns: Sequence[str] = ()) -> list[Path]:
    """harness.report.write_report with the page: report.html too (its paths relative to out_dir)."""
    return report.write_report(runs, out_dir, formats, embedded, columns, page=html_page)
