"""Figures from finished runs (the DataFrame of harness.report.collect_runs).

Per protocol, each as PNG and PDF:
  acc_vs_classes_<protocol>           A_t vs number of classes seen, mean ± std band over seeds
  forgetting_<protocol>               Chaudhry forgetting per task, mean ± std bars (T > 1 only)
  performance_drop_<protocol>         PD = A_1 - A_T per row, the few-shot CIL papers' figure (T > 1 only)
  accuracy_matrix_<protocol>_<label>  seed-mean a[t][i] heatmap
Tasks are numbered from 1 in every figure. A label keeps its colour across figures.
"""
from __future__ import annotations

import hashlib
import io
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display, also on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from harness.errors import HarnessError  # noqa: E402
from harness.atomic import atomic_savefig  # noqa: E402

_DPI = 150
_ANNOTATE_MAX_TASKS = 12


def _slugs(names) -> dict[str, str]:
    """File-name-safe names; a hash suffix keeps two names that sanitise alike apart."""
    slug = {n: re.sub(r"[^A-Za-z0-9._-]+", "_", n).strip("._") or "x" for n in names}
    counts = pd.Series(list(slug.values())).value_counts()
    return {n: s if counts[s] == 1 else f"{s}-{hashlib.sha1(n.encode()).hexdigest()[:6]}"
            for n, s in slug.items()}


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    try:
        for p in paths:
            atomic_savefig(fig, p, dpi=_DPI, bbox_inches="tight")  # a legend outside the axes stays in
    finally:
        plt.close(fig)  # pyplot keeps every open figure alive otherwise
    return paths


def png_bytes(fig, dpi: int = _DPI, close: bool = True) -> bytes:
    """The figure as PNG (a legend outside the axes included), then closed unless `close` is False."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        if close:
            plt.close(fig)
    return buf.getvalue()


# Up to 20 rows each get their own colour, marker and line style (a colour-blind reader or a
# grey print still tells them apart); more rows repeat the cycle.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_DASHES = ("", (4, 2), (1, 1.5), (6, 1.5, 1, 1.5))
BAND = "line: mean over seeds; band: ± one standard deviation over seeds (rows with two or more)"


@dataclass(frozen=True)
class Style:
    colour: tuple
    marker: str
    dashes: object


def styles(labels) -> dict[str, Style]:
    """A label's colour, marker and dash pattern, the same in every figure of one call."""
    labels = list(labels)
    if len(labels) <= 10:
        colours = sns.color_palette("tab10", max(len(labels), 1))
    else:  # tab20's dark tones first, then its light ones: neighbours in the list differ most
        tab20 = sns.color_palette("tab20", 20)
        colours = tab20[0::2] + tab20[1::2]
    # (colour, marker, dashes) is a different triple for every one of the first 40 labels
    return {lab: Style(colours[i % len(colours)], _MARKERS[i % len(_MARKERS)], _DASHES[(i // 10) % len(_DASHES)])
            for i, lab in enumerate(labels)}


def _legend(fig, ax, n: int) -> None:
    """Few rows: inside the axes. Many: below the plot, in columns, so it never covers the data
    nor squeezes the axes sideways."""
    handles, names = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    if not handles:
        return
    if n <= 6:
        ax.legend(handles, names, title=None)
        return
    fig.legend(handles, names, loc="outside lower center", ncols=_legend_columns(names), frameon=False,
               fontsize="small")


def _legend_columns(names) -> int:
    longest = max(map(len, names))
    return 1 if longest > 60 else 2 if longest > 30 else 3


def _ticks(ax, xs) -> None:
    """Integer ticks that never run together: every x where few, else a locator."""
    if len(xs) <= 12:
        ax.set_xticks(xs)
        if len(xs) > 8 and max(len(str(x)) for x in xs) >= 3:
            ax.tick_params(axis="x", labelrotation=45)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))


def _acc_vs_classes(g: pd.DataFrame, protocol: str, style: dict, field: str = "step_accuracy",
                    ylabel: str = "Accuracy on all seen classes (%)", left_out: list | None = None) -> plt.Figure:
    tidy = pd.DataFrame(
        [{"label": r.label, "seed": r.seed, "classes": c, "acc": a}
         for r in g.itertuples() for c, a in zip(r.classes_seen, getattr(r, field))])
    labels = [lab for lab in style if lab in set(g.label)]
    note = BAND + ("\n" + textwrap.fill(f"not shown (no Task-IL record): {', '.join(left_out)}", 110)
                   if left_out else "")
    rows = (-(-len(labels) // _legend_columns(labels)) if len(labels) > 6 else 0) + note.count("\n")
    height = 4.2 + 0.2 * rows  # the axes keep their height; the legend and the note get their own
    fig, ax = plt.subplots(figsize=(7.2, height), layout="constrained")
    sns.lineplot(data=tidy, x="classes", y="acc", hue="label", hue_order=labels,
                 style="label", style_order=labels, palette={k: style[k].colour for k in labels},
                 markers={k: style[k].marker for k in labels}, dashes={k: style[k].dashes for k in labels},
                 errorbar="sd", ax=ax)
    _ticks(ax, sorted(tidy.classes.unique()))
    ax.set(xlabel="Number of classes seen", ylabel=ylabel)
    ax.set_title(f"{protocol}\n{note}", fontsize="small", loc="left")
    _legend(fig, ax, len(labels))
    return fig


def _label_inches(labels) -> float:
    """About how wide the longest label is as a tick label, in inches."""
    return 0.075 * max(map(len, labels), default=0)


def _forgetting(g: pd.DataFrame, protocol: str, style: dict) -> plt.Figure:
    tidy = pd.DataFrame(
        [{"label": r.label, "seed": r.seed, "task": i + 1, "f": f}
         for r in g.itertuples() for i, f in enumerate(r.per_task_forgetting)])
    labels = [lab for lab in style if lab in set(g.label)]
    if len(labels) > 6:  # bars of many rows per task cannot be read: one heatmap row per label
        table = tidy.groupby(["label", "task"]).f.mean().unstack("task").reindex(labels)
        width = 0.55 * table.shape[1] + 3 + _label_inches(labels)  # the axes keep their width beside long labels
        fig, ax = plt.subplots(figsize=(width, 0.35 * len(labels) + 1.6), layout="constrained")
        # numbers rounded first (+ 0.0 turns -0.0 into 0.0): a forgetting of -0.3 reads "0", not "-0"
        annot = (table.round() + 0.0) if table.shape[1] <= 12 else False
        sns.heatmap(table, annot=annot, fmt=".0f", cmap="rocket_r", vmin=0,
                    cbar_kws={"label": "Forgetting (%)"}, ax=ax)
        ax.set(xlabel="Task", ylabel="", title=f"{protocol}: forgetting of each task after the last one "
                                               "(Chaudhry; mean over seeds)")
        return fig
    palette = {k: style[k].colour for k in labels}
    T = int(tidy.task.max())
    width = min(max(6.4, 0.2 * T * len(labels) + 3), 14)  # room for every bar, within reason
    fig, ax = plt.subplots(figsize=(width, 4.4), layout="constrained")
    sns.barplot(data=tidy, x="task", y="f", hue="label", hue_order=labels, palette=palette,
                errorbar="sd", capsize=0.15, err_kws={"linewidth": 1}, ax=ax)
    ax.set(xlabel="Task", ylabel="Forgetting after the last task (%)",
           title=f"{protocol}: forgetting per task (Chaudhry); bars: mean, whiskers: ± one sd over seeds")
    ax.axhline(0, color="black", linewidth=0.8)
    _legend(fig, ax, len(labels))
    return fig


def _performance_drop(g: pd.DataFrame, protocol: str, style: dict) -> plt.Figure:
    tidy = pd.DataFrame([{"label": r.label, "seed": r.seed, "pd": r.step_accuracy[0] - r.step_accuracy[-1]}
                         for r in g.itertuples()])
    labels = [lab for lab in style if lab in set(g.label)]
    palette = {k: style[k].colour for k in labels}
    fig, ax = plt.subplots(figsize=(5 + _label_inches(labels), max(2.5, 0.35 * len(labels) + 1.2)),
                           layout="constrained")
    sns.barplot(data=tidy, y="label", x="pd", hue="label", order=labels, hue_order=labels, palette=palette,
                errorbar="sd", capsize=0.15, err_kws={"linewidth": 1}, legend=False, ax=ax)
    ax.set(ylabel="", xlabel="Performance drop PD = A_1 - A_T (percentage points; lower is better)",
           title=f"{protocol}: accuracy lost from the first task to the last (mean ± sd over seeds)")
    ax.axvline(0, color="black", linewidth=0.8)
    return fig


def matrix_figure(g: pd.DataFrame, protocol: str, label: str) -> plt.Figure:
    """The seed-mean accuracy matrix of the runs in `g` (rows with `accuracy_matrix`) as a heatmap."""
    mats = []
    for r in g.itertuples():
        T = len(r.accuracy_matrix)
        a = np.full((T, T), np.nan)
        for t, row in enumerate(r.accuracy_matrix):
            a[t, : len(row)] = row
        mats.append(a)
    if len({m.shape for m in mats}) > 1:
        raise HarnessError(f"{protocol}/{label}: seeds have different numbers of tasks")
    mean = np.mean(mats, axis=0)
    T = len(mean)
    ticks = list(range(1, T + 1))
    size = min(max(4.5, 0.6 * T + 2), 14)
    fig, ax = plt.subplots(figsize=(size + 1, size), layout="constrained")
    annot = T <= _ANNOTATE_MAX_TASKS
    sns.heatmap(mean, mask=np.triu(np.ones((T, T), bool), k=1), vmin=0, vmax=100,
                cmap="viridis", square=True, annot=annot, fmt=".1f" if T <= 8 else ".0f",
                annot_kws={"fontsize": 10 if T <= 10 else 8}, xticklabels=ticks,
                yticklabels=ticks, cbar_kws={"label": "Accuracy (%)"}, ax=ax)
    n = len(mats)
    ax.set(xlabel="Evaluated on task i", ylabel="After training task t",
           title=f"{protocol} · {label} (mean of {n} seed{'s' * (n > 1)})")
    ax.tick_params(axis="y", rotation=0)
    ax.grid(False)  # whitegrid's lines would show through the masked upper triangle
    return fig


@dataclass
class Figure:
    stem: str  # file name without extension
    kind: str  # "acc_vs_classes", "acc_vs_classes_task_il", "forgetting", "performance_drop" or "accuracy_matrix"
    protocol: str
    label: str | None  # the run label of an accuracy matrix
    fig: plt.Figure


def figures(runs: pd.DataFrame) -> Iterator[Figure]:
    """Every figure for each protocol in `runs`, built one at a time (close each after use)."""
    from harness.report import ordered_labels

    style = styles(ordered_labels(runs, runs.label.unique()))
    proto_slug = _slugs(runs.protocol.unique())
    with sns.axes_style("whitegrid"):  # a local style: global rcParams stay untouched
        for protocol, g in runs.groupby("protocol", sort=True):
            ps = proto_slug[protocol]
            yield Figure(f"acc_vs_classes_{ps}", "acc_vs_classes", protocol, None,
                         _acc_vs_classes(g, protocol, style))
            til = g[g.task_il_step_accuracy.map(lambda v: isinstance(v, list))] if "task_il_step_accuracy" in g else g[:0]
            if len(til):  # runs that recorded Task-IL (the task identity given at test time)
                left_out = [lab for lab in style if lab in set(g.label) and lab not in set(til.label)]
                yield Figure(f"acc_vs_classes_task_il_{ps}", "acc_vs_classes_task_il", protocol, None,
                             _acc_vs_classes(til, protocol, style, "task_il_step_accuracy",
                                             "Task-IL accuracy, task identity given (%)", left_out))
            if g.per_task_forgetting.map(len).max() > 0:  # one-task runs forget nothing
                yield Figure(f"forgetting_{ps}", "forgetting", protocol, None, _forgetting(g, protocol, style))
                yield Figure(f"performance_drop_{ps}", "performance_drop", protocol, None,
                             _performance_drop(g, protocol, style))
            label_slug = _slugs(g.label.unique())
            for label, lg in g.groupby("label", sort=True):
                yield Figure(f"accuracy_matrix_{ps}_{label_slug[label]}", "accuracy_matrix", protocol, label,
                             matrix_figure(lg, protocol, label))


# The HTML page's resolution: figures on screen, a page that stays small
EMBED_DPI = 110


def write_figures(runs: pd.DataFrame, out_dir: str | Path, embedded: list | None = None) -> list[Path]:
    """Write every figure (PNG and PDF) for each protocol in `runs`; returns the paths. With
    `embedded`, also appends (figure, PNG bytes at EMBED_DPI) for the HTML page, so a run draws
    each figure once."""
    paths: list[Path] = []
    for f in figures(runs):
        if embedded is not None:
            embedded.append((f, png_bytes(f.fig, EMBED_DPI, close=False)))
        paths += _save(f.fig, Path(out_dir), f.stem)
    return paths
