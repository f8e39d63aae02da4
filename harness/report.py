"""Paper-style tables from finished runs (`<out>/<protocol>/<label>/seed<k>/summary.json`).

Rows are labels (a method plus its non-default settings), sorted alphabetically so a
base method comes right before its variants ("gmm", "gmm+memory=2000") and the order
does not depend on the file system. Protocols are column groups, also sorted.
Accuracies are percent; a cell is "mean ± std" over seeds (sample std, ddof=1; a
single seed shows just the mean); "–" means undefined (forgetting of a one-task run);
an empty cell means that label was not run on that protocol.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from harness import failures
from harness.errors import HarnessError
from harness.atomic import atomic_write_text
from harness.presentation import ordered_labels, shown_name

log = logging.getLogger(__name__)

FORMATS = ("md", "latex", "csv", "html")
_FILES = {"md": "table.md", "latex": "table.tex", "csv": "table.csv", "html": "report.html"}
_SESSION_FILES = {"md": "sessions.md", "csv": "sessions.csv"}  # written beside the table
_REQUIRED = ("protocol", "seed", "accuracy_matrix", "step_accuracy", "classes_seen",
             "avg_incremental_accuracy", "last_accuracy")
# Numeric summary fields aggregated over seeds (mean and std) in the CSV table.
NUMERIC = ("avg_incremental_accuracy", "last_accuracy", "average_forgetting", "bwt",
           "avalanche_forgetting", "wall_time_s", "train_time_s", "eval_time_s",
           "trainable_params", "memory_exemplars", "memory_bytes", "zero_shot_mean",
           "task_il_avg_incremental_accuracy", "task_il_last_accuracy", "avg_cnn_accuracy", "last_cnn_accuracy",
           "avg_nme_accuracy", "last_nme_accuracy", "total_memory_bytes")
# Display columns of the paper table, per protocol; "Zero-shot (%)" (the mean over tasks of
# each task's accuracy before it was trained) only where some run recorded it.
COLUMNS = ("Avg (%)", "Last (%)", "Forgetting (%)", "Seeds", "Wall time", "Params", "Exemplars")
ZERO_SHOT = "Zero-shot (%)"
# Task-IL (the task identity given at test time): only where some run recorded it; the
# unprefixed Avg and Last are always Class-IL.
TASK_IL = ("Task-IL Avg (%)", "Task-IL Last (%)")
# Both classifiers of a rehearsal method with a trained head (PyCIL's "CNN" and "NME"), where some
# run recorded them; the unprefixed Avg and Last are the method's headline classifier.
CLASSIFIERS = (("CNN Avg (%)", "avg_cnn_accuracy"), ("CNN Last (%)", "last_cnn_accuracy"),
               ("NME Avg (%)", "avg_nme_accuracy"), ("NME Last (%)", "last_nme_accuracy"))
# Everything a method keeps at the end (model, exemplars, teachers, statistics), where recorded.
TOTAL_MEMORY = "Memory (MB)"
# Optional column groups (`columns`), off by default so a table stays as it was; from newer
# summaries only ("–" for older runs): group -> (heading, summary field) pairs, shown in this order.
EXTRA_COLUMNS = {"old_new": (("Old (%)", "last_old_accuracy"), ("New (%)", "last_new_accuracy")),
                 "top5": (("Top-5 Avg (%)", "avg_top5_accuracy"), ("Top-5 Last (%)", "last_top5_accuracy"))}
_EXTRA_FIELDS = tuple(field for pairs in EXTRA_COLUMNS.values() for _, field in pairs)
_SEED_DIR = re.compile(r"seed\d+$")


# ---------------------------------------------------------------- collecting runs

def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HarnessError(f"cannot read run summary {path}: {exc}") from None
    if not isinstance(data, dict):
        raise HarnessError(f"run summary {path} is not a JSON object")
    missing = [k for k in _REQUIRED if data.get(k) is None]
    if not (data.get("label") or data.get("method")):
        missing.append("label")
    if missing:
        raise HarnessError(f"run summary {path} lacks {', '.join(missing)}")
    data["label"] = str(data.get("label") or data.get("method"))
    data["method"] = str(data.get("method") or data["label"])
    if data.get("per_task_forgetting") is None:  # older summaries: derive it
        from harness.metrics import per_task_forgetting  # lazy: imports Avalanche (slow)
        try:
            data["per_task_forgetting"] = per_task_forgetting(data["accuracy_matrix"])
        except (ValueError, TypeError) as exc:
            raise HarnessError(f"run summary {path}: bad accuracy_matrix ({exc})") from None
    zero_shot = data.get("zero_shot_accuracy")
    if zero_shot:
        data["zero_shot_mean"] = float(np.mean(zero_shot))
    data["path"] = str(path)
    return data


def _is_unfinished(d: Path) -> bool:
    # A run folder the runner started (seed<k>/, or one holding its other files)
    # but has not finished: summary.json is written last.
    return (not (d / "summary.json").exists()
            and (bool(_SEED_DIR.match(d.name)) or (d / "config.json").exists()
                 or (d / "metrics.csv").exists()))


def collect_runs(dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One row per finished run (a summary.json) found recursively under `dirs`.

    Columns are the summary's keys plus "path"; newer summaries' optional keys (old_accuracy,
    new_accuracy, top5_accuracy per task; the scalars of EXTRA_COLUMNS) where present, the
    scalars NaN for runs without them. Unfinished runs are skipped; their folders are listed in
    `runs.attrs["skipped"]` (and logged); `runs.attrs["dirs"]`: the folders read.
    """
    if not dirs:
        raise HarnessError("no results folder given")
    paths: dict[Path, None] = {}  # ordered set: the same run reached twice counts once
    skipped: set[Path] = set()
    failed: dict[Path, dict] = {}  # unfinished runs with a failure record (harness.failures)
    for d in map(Path, dirs):
        if not d.is_dir():
            raise HarnessError(f"results folder {d} does not exist")
        found = sorted(d.rglob("summary.json"))
        unfinished = {p for p in [d, *d.rglob("*")] if p.is_dir() and _is_unfinished(p)}
        if not found:
            extra = f" ({len(unfinished)} unfinished skipped)" if unfinished else ""
            raise HarnessError(f"no finished run (summary.json) under {d}{extra}")
        paths.update(dict.fromkeys(p.resolve() for p in found))
        skipped |= {p.resolve() for p in unfinished}
        for record in d.rglob(failures.FILENAME):
            if not (record.parent / "summary.json").exists():
                # shown relative to the folder read, so a committed table names no machine's paths
                failed[record.parent.resolve()] = {**(failures.read_record(record.parent) or {}),
                                                   "shown": str(record.parent.relative_to(d))}
    rows = [_load(p) for p in paths]
    runs = pd.DataFrame(rows)
    dup = runs[runs.duplicated(["protocol", "label", "seed"], keep=False)]
    if not dup.empty:
        r = dup.iloc[0]
        others = ", ".join(dup[(dup.protocol == r.protocol) & (dup.label == r.label)
                               & (dup.seed == r.seed)].path)
        raise HarnessError(f"run {r.protocol}/{r.label}/seed{r.seed} found twice: {others}")
    runs = runs.sort_values(["protocol", "label", "seed"], kind="stable").reset_index(drop=True)
    for k in NUMERIC + _EXTRA_FIELDS:  # None (undefined, or absent from an older summary) -> NaN
        runs[k] = pd.to_numeric(runs[k], errors="coerce") if k in runs else np.nan
    runs.attrs["dirs"] = [str(Path(d).resolve()) for d in dirs]  # the folders read (the page's paths start there)
    runs.attrs["skipped"] = sorted(map(str, skipped))
    runs.attrs["failed"] = [{"path": str(p), **failed[p]} for p in sorted(failed)]
    if skipped:
        log.warning("skipped %d unfinished run(s) without summary.json", len(skipped))
    return runs


# ---------------------------------------------------------------- tables

def column_groups(columns: Sequence[str]) -> list[str]:
    """The optional column groups asked for (EXTRA_COLUMNS' keys), in the table's order."""
    if isinstance(columns, str):  # a bare string would be read letter by letter
        raise HarnessError(f"column groups come as a list, not the string {columns!r}")
    unknown = [c for c in columns if c not in EXTRA_COLUMNS]
    if unknown:
        raise HarnessError(f"unknown column group {unknown[0]!r}; choose from {', '.join(EXTRA_COLUMNS)}")
    return [g for g in EXTRA_COLUMNS if g in columns]


def _extra_fields(columns: Sequence[str]) -> tuple[str, ...]:
    return tuple(field for g in column_groups(columns) for _, field in EXTRA_COLUMNS[g])


def summary_table(runs: pd.DataFrame, columns: Sequence[str] = ()) -> pd.DataFrame:
    """Machine-readable table: one row per (protocol, label), `<field>_mean` and
    `<field>_std` (ddof=1; NaN with one seed) for every numeric summary field (and the fields of
    the optional `columns` groups); `name` is the row's name in an experiment file (the label
    where it has none), as the paper table shows it."""
    out = []
    for (protocol, label), g in runs.groupby(["protocol", "label"], sort=True):
        row = {"protocol": protocol, "label": label, "name": shown_name(runs, label),
               "method": g["method"].iloc[0],
               "n_seeds": len(g), "seeds": " ".join(map(str, sorted(g["seed"])))}
        for k in NUMERIC + _extra_fields(columns):
            row[f"{k}_mean"] = g[k].mean()
            row[f"{k}_std"] = g[k].std(ddof=1)
        out.append(row)
    return pd.DataFrame(out)


def _pm(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.1f}" if n < 2 or math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def duration(s: float) -> str:
    """A wall time as the tables show it: seconds under a minute, minutes under an hour, else hours."""
    if math.isnan(s):
        return "–"
    if s < 60:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.1f} h"


def _count(n: float) -> str:
    if math.isnan(n):
        return "–"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def _memory(exemplars: float, nbytes: float) -> str:
    if math.isnan(exemplars):
        return "–"
    if math.isnan(nbytes) or nbytes == 0:
        return f"{exemplars:,.0f}"  # (an exemplar-free method may still keep statistics: bytes shown)
    return f"{exemplars:,.0f} ({nbytes / 1e6:.1f} MB)"  # MB = 10^6 bytes


def _megabytes(nbytes: float) -> str:
    return "–" if math.isnan(nbytes) else f"{nbytes / 1e6:.1f}"  # MB = 10^6 bytes


def _mean_std_columns(s: pd.DataFrame, columns: Sequence[str]) -> list[tuple[str, str]]:
    """(heading, summary field) of the paper table's "mean ± std" columns, in order: the Class-IL
    ones, Zero-shot and Task-IL where some run recorded them, then the optional groups asked for."""
    pairs = list(zip(COLUMNS[:3], ("avg_incremental_accuracy", "last_accuracy", "average_forgetting")))
    if s.zero_shot_mean_mean.notna().any():
        pairs.append((ZERO_SHOT, "zero_shot_mean"))
    if s.task_il_avg_incremental_accuracy_mean.notna().any():
        pairs += zip(TASK_IL, ("task_il_avg_incremental_accuracy", "task_il_last_accuracy"))
    if s.avg_cnn_accuracy_mean.notna().any():
        pairs += CLASSIFIERS
    return pairs + [pair for g in column_groups(columns) for pair in EXTRA_COLUMNS[g]]


def paper_table(runs: pd.DataFrame, columns: Sequence[str] = ()) -> pd.DataFrame:
    """Display table: index = the rows' shown names, columns = (protocol, heading), strings; the
    headings are COLUMNS, with Zero-shot, Task-IL and CNN/NME where recorded and the optional
    `columns` groups (EXTRA_COLUMNS' keys: "old_new", "top5") before Seeds, and the total memory
    (TOTAL_MEMORY) last where recorded."""
    s = summary_table(runs, columns)
    pairs = _mean_std_columns(s, columns)
    total_memory = bool(s.total_memory_bytes_mean.notna().any())
    names = [heading for heading, _ in pairs] + list(COLUMNS[3:]) + [TOTAL_MEMORY] * total_memory
    cells = {}
    for r in s.itertuples(index=False):
        n = r.n_seeds
        row = [_pm(getattr(r, f"{field}_mean"), getattr(r, f"{field}_std"), n) for _, field in pairs]
        cells[(r.protocol, r.label)] = row + [
            str(n), duration(r.wall_time_s_mean), _count(r.trainable_params_mean),
            _memory(r.memory_exemplars_mean, r.memory_bytes_mean)] + [_megabytes(r.total_memory_bytes_mean)] * total_memory
    protocols = sorted(s.protocol.unique())
    labels = ordered_labels(runs, s.label.unique())
    header = pd.MultiIndex.from_product([protocols, names], names=["protocol", ""])
    data = [[v for p in protocols for v in cells.get((p, lab), ("",) * len(names))]
            for lab in labels]
    return pd.DataFrame(data, index=pd.Index([shown_name(runs, lab) for lab in labels], name="Method"),
                        columns=header)


def session_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Few-shot CIL papers' view: index = label, columns = (protocol, session), strings. A
    session's cell is A_t, the accuracy on every class seen after session t (mean ± std over
    seeds), headed by its number and the classes seen; then Avg (their mean) and PD =
    A_1 - A_T, the performance drop from the base session to the last one."""
    cells, heads = {}, {}
    for (protocol, label), g in runs.groupby(["protocol", "label"], sort=True):
        if len({len(v) for v in g.step_accuracy}) > 1:
            raise HarnessError(f"{protocol}/{label}: seeds have different numbers of sessions")
        steps = np.array([list(v) for v in g.step_accuracy], dtype=float)
        n = len(steps)
        std = lambda a: a.std(axis=0, ddof=1) if n > 1 else np.full(a.shape[1:], np.nan)  # noqa: E731
        drop = steps[:, :1] - steps[:, -1:]
        values = np.concatenate([steps, steps.mean(1, keepdims=True), drop], axis=1)
        cells[(protocol, label)] = [_pm(m, s, n) for m, s in zip(values.mean(0), std(values))]
        heads[protocol] = [f"{t + 1} ({c})" for t, c in enumerate(g.classes_seen.iloc[0])] + ["Avg", "PD"]
    protocols = sorted(heads)
    columns = pd.MultiIndex.from_tuples([(p, h) for p in protocols for h in heads[p]], names=["protocol", ""])
    labels = ordered_labels(runs, {lab for _, lab in cells})
    data = [[v for p in protocols for v in cells.get((p, lab), ("",) * len(heads[p]))] for lab in labels]
    return pd.DataFrame(data, index=pd.Index([shown_name(runs, lab) for lab in labels], name="Method"),
                        columns=columns)


def _markdown(t: pd.DataFrame) -> str:
    # Hand-written (no tabulate dependency); with several protocols each header
    # cell names its protocol, as Markdown has no multi-row headers.
    several = t.columns.get_level_values(0).nunique() > 1
    head = ["Method"] + [f"{p} {c}" if several else c for p, c in t.columns]
    rows = [[str(i)] + list(r) for i, r in zip(t.index, t.to_numpy())]
    esc = lambda x: x.replace("|", r"\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, head)) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
        "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
        "±": r"$\pm$", "–": "--"}


def _tex(x: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in x)


def _latex(t: pd.DataFrame) -> str:
    # booktabs table with one column group per protocol, ready for \input{table.tex}.
    protocols = list(dict.fromkeys(t.columns.get_level_values(0)))
    k = len(t.columns) // len(protocols)
    lines = [r"\begin{tabular}{l" + ("r" * k) * len(protocols) + "}", r"\toprule"]
    groups = [rf"\multicolumn{{{k}}}{{c}}{{{_tex(p)}}}" for p in protocols]
    lines.append(" & ".join(["", *groups]) + r" \\")
    lines.append(" ".join(rf"\cmidrule(lr){{{2 + j * k}-{1 + (j + 1) * k}}}"
                          for j in range(len(protocols))))
    lines.append(" & ".join(["Method"] + [_tex(c) for _, c in t.columns]) + r" \\")
    lines.append(r"\midrule")
    lines += [" & ".join(map(_tex, [str(i), *r])) + r" \\" for i, r in zip(t.index, t.to_numpy())]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _failed_note(runs: pd.DataFrame) -> str:
    """The runs that failed under these folders, which the table leaves out (markdown)."""
    failed = runs.attrs.get("failed") or []
    if not failed:
        return ""
    lines = [f"- {r.get('label', '?')} seed {r.get('seed', '?')}: {r.get('message', 'failed')} "
             f"({Path(r.get('shown') or r['path']) / failures.FILENAME})" for r in failed]
    return "\nFailed runs, not in the table (the same command resumes them):\n\n" + "\n".join(lines) + "\n"


def render(runs: pd.DataFrame, fmt: str, embedded: list | None = None, sessions: bool = False,
           columns: Sequence[str] = (), page: Callable[..., str] | None = None) -> str:
    """The report as text: "md" / "latex" (paper table), "csv" (summary_table) or "html" (one
    self-contained page with the figures: `page`, harness.html_report.html_page, which this module
    does not import, as that one imports it; harness.html_report.render passes it); with `sessions`,
    the accuracy after each session and PD (session_table) as md, latex or csv. `columns`: the
    paper table's optional column groups (EXTRA_COLUMNS)."""
    if sessions:
        if fmt not in ("md", "latex", "csv"):
            raise HarnessError("the session table comes as md, latex or csv")
        table = session_table(runs)
        if fmt == "csv":
            return table.to_csv()
        return _markdown(table) if fmt == "md" else _latex(table)
    if fmt == "md":
        return _markdown(paper_table(runs, columns)) + _failed_note(runs)
    if fmt == "latex":
        return _latex(paper_table(runs, columns))
    if fmt == "csv":
        return summary_table(runs, columns).to_csv(index=False)
    if fmt == "html":
        if page is None:
            raise HarnessError("the html page needs page=harness.html_report.html_page "
                               "(harness.html_report.render and write_report pass it)")
        return page(runs, embedded=embedded, columns=columns)
    raise HarnessError(f"unknown report format '{fmt}'; choose from {', '.join(FORMATS)}")


def write_report(runs: pd.DataFrame, out_dir: str | Path, formats: Sequence[str] = FORMATS,
                 embedded: list | None = None, columns: Sequence[str] = (),
                 page: Callable[..., str] | None = None) -> list[Path]:
    """Write table.md / table.tex / table.csv / report.html and sessions.md / sessions.csv (atomically)
    to out_dir; returns the paths.
    `embedded`: the figures plots.write_figures drew, for the page (else it draws them); `columns`
    and `page` as for render (the page is told its folder: the paths it shows are relative to it)."""
    if page is not None:
        page = functools.partial(page, folder=out_dir)
    # render all first: fail before writing
    texts = {_FILES[f]: render(runs, f, embedded, columns=columns, page=page) for f in formats}
    texts.update({name: render(runs, f, sessions=True) for f, name in _SESSION_FILES.items() if f in formats})
    paths = []
    for name, text in texts.items():
        path = Path(out_dir) / name
        atomic_write_text(path, text)
        paths.append(path)
    return paths
