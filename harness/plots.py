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


def _legend(ax, n: int) -> None:
    # Many lines would cover the data: put a long legend outside, to the right.
    if n > 6:
        ax.legend(title=None, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    else:
        ax.legend(title=None)


def _acc_vs_classes(g: pd.DataFrame, protocol: str, palette: dict, field: str = "step_accuracy",
                    ylabel: str = "Accuracy on all seen classes (%)") -> plt.Figure:
    tidy = pd.DataFrame(
        [{"label": r.label, "seed": r.seed, "classes": c, "acc": a}
         for r in g.itertuples() for c, a in zip(r.classes_seen, getattr(r, field))])
    labels = sorted(g.label.unique())
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    sns.lineplot(data=tidy, x="classes", y="acc", hue="label", hue_order=labels,
                 style="label", style_order=labels, palette=palette, markers=True,
                 dashes=False, errorbar="sd", ax=ax)
    xs = sorted(tidy.classes.unique())
    if len(xs) <= 20:
        ax.set_xticks(xs)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="Number of classes seen", ylabel=ylabel, title=protocol)
    _legend(ax, len(labels))
    return fig


def _forgetting(g: pd.DataFrame, protocol: str, palette: dict) -> plt.Figure:
    tidy = pd.DataFrame(
        [{"label": r.label, "seed": r.seed, "task": i + 1, "f": f}
         for r in g.itertuples() for i, f in enumerate(r.per_task_forgetting)])
    labels = sorted(g.label.unique())
    T = int(tidy.task.max())
    width = min(max(6.4, 0.2 * T * len(labels) + 3), 14)  # room for every bar, within reason
    fig, ax = plt.subplots(figsize=(width, 4.4), layout="constrained")
    sns.barplot(data=tidy, x="task", y="f", hue="label", hue_order=labels, palette=palette,
                errorbar="sd", capsize=0.15, err_kws={"linewidth": 1}, ax=ax)
    ax.set(xlabel="Task", ylabel="Forgetting after the last task (%)",
           title=f"{protocol}: forgetting per task (Chaudhry)")
    ax.axhline(0, color="black", linewidth=0.8)
    _legend(ax, len(labels))
    return fig


def _performance_drop(g: pd.DataFrame, protocol: str, palette: dict) -> plt.Figure:
    tidy = pd.DataFrame([{"label": r.label, "seed": r.seed, "pd": r.step_accuracy[0] - r.step_accuracy[-1]}
                         for r in g.itertuples()])
    labels = sorted(g.label.unique())
    fig, ax = plt.subplots(figsize=(6.4, max(2.5, 0.35 * len(labels) + 1.2)), layout="constrained")
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
    all_labels = sorted(runs.label.unique())
    colours = sns.color_palette("tab10" if len(all_labels) <= 10 else "husl", len(all_labels))
    palette = dict(zip(all_labels, colours))
    proto_slug = _slugs(runs.protocol.unique())
    with sns.axes_style("whitegrid"):  # a local style: global rcParams stay untouched
        for protocol, g in runs.groupby("protocol", sort=True):
            ps = proto_slug[protocol]
            yield Figure(f"acc_vs_classes_{ps}", "acc_vs_classes", protocol, None,
                         _acc_vs_classes(g, protocol, palette))
            til = g[g.task_il_step_accuracy.map(lambda v: isinstance(v, list))] if "task_il_step_accuracy" in g else g[:0]
            if len(til):  # runs that recorded Task-IL (the task identity given at test time)
                yield Figure(f"acc_vs_classes_task_il_{ps}", "acc_vs_classes_task_il", protocol, None,
                             _acc_vs_classes(til, protocol, palette, "task_il_step_accuracy",
                                             "Task-IL accuracy, task identity given (%)"))
            if g.per_task_forgetting.map(len).max() > 0:  # one-task runs forget nothing
                yield Figure(f"forgetting_{ps}", "forgetting", protocol, None, _forgetting(g, protocol, palette))
                yield Figure(f"performance_drop_{ps}", "performance_drop", protocol, None,
                             _performance_drop(g, protocol, palette))
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
