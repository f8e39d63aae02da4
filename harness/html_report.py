"""`report --format html`: one self-contained page to send a colleague.

No network and no script: the figures are PNGs embedded as data URIs, the styles inline.
Sections: the paper table (mean ± std over seeds; every label links to its runs); per
protocol, accuracy against classes seen (Class-IL, and Task-IL where recorded), forgetting
per task and each label's accuracy matrix (figure and numbers); then every run's resolved
configuration and package versions (its config.json), linked back to the table.
"""
from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from harness.plots import BAND, EMBED_DPI, figures, png_bytes
from harness.report import ordered_labels, paper_table

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


def _paper_table_html(runs: pd.DataFrame) -> str:
    """The paper table, one column group per protocol; each label links to its runs."""
    table = paper_table(runs)
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
    from harness.report import session_table

    t = session_table(g)
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


def html_page(runs: pd.DataFrame, title: str = "Class-incremental learning results",
              embedded: list | None = None) -> str:
    """The page; `embedded`: (figure, PNG bytes) already drawn by plots.write_figures, else drawn here."""
    protocols = sorted(runs.protocol.unique())
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
             _paper_table_html(runs)]
    for p in protocols:
        g = runs[runs.protocol == p]
        parts.append(f'<h2 id="{_anchor("protocol", p)}">{html.escape(p)}</h2>')
        parts.append(_sessions_html(g))
        for f, uri in figs[p]:
            if f.kind != "accuracy_matrix":
                parts.append(f'<figure id="{_anchor("fig", f.stem)}"><img src="{uri}" alt="{html.escape(f.stem)}">'
                             f"<figcaption>{html.escape(CAPTIONS.get(f.kind, f.kind.replace('_', ' ')))}"
                             "</figcaption></figure>")
        parts.append("<h3>Accuracy matrices</h3>")
        for f, uri in figs[p]:
            if f.kind == "accuracy_matrix":
                lg = g[g.label == f.label]
                parts.append(f'<figure id="{_anchor("matrix", p, f.label)}"><img src="{uri}" '
                             f'alt="{html.escape(f.stem)}"><figcaption>{html.escape(str(f.label))} '
                             f'(<a href="#{_anchor("runs", p, f.label)}">runs</a>)</figcaption>'
                             f"{_matrix_html(lg)}</figure>")
    parts.append('<h2 id="runs">Runs</h2>')
    for (p, label), g in runs.groupby(["protocol", "label"], sort=True):
        parts.append(f'<h3 id="{_anchor("runs", p, label)}">{html.escape(p)} · {html.escape(str(label))} '
                     f'<a class="muted" href="#table">(table)</a> '
                     f'<a class="muted" href="#{_anchor("matrix", p, label)}">(matrix)</a></h3>')
        for r in g.itertuples():
            cfg = _config(Path(r.path))
            env = cfg.pop("environment", {})
            versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items())
            parts.append(
                f"<details><summary>seed {r.seed}: Avg {r.avg_incremental_accuracy:.1f}, Last "
                f"{r.last_accuracy:.1f}, {r.wall_time_s / 60:.1f} min</summary>"
                f'<p class="muted">{html.escape(str(Path(r.path).parent))}<br>python {html.escape(str(env.get("python", "?")))}, '
                f'{html.escape(versions)}, commit {html.escape(str(env.get("git_commit", "?")))}</p>'
                f"<pre>{html.escape(json.dumps(cfg, indent=1, default=str))}</pre></details>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")
