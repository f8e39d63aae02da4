"""Figures from finished runs (the DataFrame of harness.report.collect_runs).

Per protocol, each as PNG and PDF:
  acc_vs_classes_<protocol>           A_t vs number of classes seen, mean ± std band over seeds
  forgetting_<protocol>               Chaudhry forgetting per task, mean ± std bars (T > 1 only)
  performance_drop_<protocol>         PD = A_1 - A_T per row, the few-shot CIL papers' figure (T > 1 only)
  accuracy_matrix_<protocol>_<label>  seed-mean a[t][i] heatmap
Tasks are numbered from 1 in every figure. A label keeps its colour across figures, and every
figure names a row as the tables do (its experiment-file name where it has one). Legends sit below
the axes (never over the data), and a figure is saved cropped to what it draws.
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
from harness.presentation import BAND, ordered_labels, shown_name  # noqa: E402

_DPI = 150
_ANNOTATE_MAX_TASKS = 12
# Cropped to the drawn artists (a legend outside the axes included) with a thin pad: no blank margins
_TIGHT = {"bbox_inches": "tight", "pad_inches": 0.04}


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
            atomic_savefig(fig, p, dpi=_DPI, **_TIGHT)
    finally:
        plt.close(fig)  # pyplot keeps every open figure alive otherwise
    return paths


def png_bytes(fig, dpi: int = _DPI, close: bool = True) -> bytes:
    """The figure as PNG (a legend outside the axes included), then closed unless `close` is False."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, **_TIGHT)
    finally:
        if close:
            plt.close(fig)
    return buf.getvalue()


# Up to 20 rows each get their own colour, marker and line style (a colour-blind reader or a
# grey print still tells them apart); more rows repeat the cycle.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_DASHES = ("", (4, 2), (1, 1.5), (6, 1.5, 1, 1.5))
# Marker sizes from the first row drawn to the last: a later curve on top of an identical earlier
# one leaves the earlier one's markers showing around its own (and its dashes, the line between)
_MARKER_SIZES = (8.0, 4.0)


@dataclass(frozen=True)
class Style:
    colour: tuple
    marker: str
    dashes: object  # "" (solid) or a dash pattern
    name: str = ""  # the row's shown name (an experiment file's, else the label)
    size: float = _MARKER_SIZES[0]  # marker size, smaller for rows drawn later


def styles(labels, names: dict | None = None) -> dict[str, Style]:
    """A label's colour, marker, dash pattern, marker size and shown name (`names`: label -> name),
    the same in every figure of one call."""
    labels, names = list(labels), names or {}
    if len(labels) <= 10:
        colours = sns.color_palette("tab10", max(len(labels), 1))
    else:  # tab20's dark tones first, then its light ones: neighbours in the list differ most
        tab20 = sns.color_palette("tab20", 20)
        colours = tab20[0::2] + tab20[1::2]
    big, small = _MARKER_SIZES
    step = (big - small) / max(len(labels) - 1, 1)
    # Neighbours differ in dashes too; i + i // 20 keeps (colour, marker, dashes) a different triple for
    # every one of the first 40 labels (colours repeat after 20, markers after 10)
    return {lab: Style(colours[i % len(colours)], _MARKERS[i % len(_MARKERS)],
                       _DASHES[(i + i // 20) % len(_DASHES)], names.get(lab, lab), big - step * i)
            for i, lab in enumerate(labels)}


def _legend(fig, ax, style: dict) -> None:
    """Below the axes, in columns, the rows by their shown names: it never covers the data nor
    squeezes the axes sideways."""
    handles, labels = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    if not handles:
        return
    names = [style[lab].name if lab in style else lab for lab in labels]
    fig.legend(handles, names, loc="outside lower center", ncols=_legend_columns(names), frameon=False,
               fontsize="small")


def _legend_columns(names) -> int:
    longest = max(map(len, names))
    return 1 if longest > 60 else 2 if longest > 30 else 3


def _legend_inches(names) -> float:
    """The height the legend below the axes takes, so the axes keep theirs."""
    rows = -(-len(names) // _legend_columns(names)) if names else 0
    return 0.2 * rows + 0.15 * bool(rows)


def _content_span(fig, renderer) -> tuple[float, float]:
    """Left and right of what a figure draws beside its titles: every axes with its y tick labels and label."""
    boxes = [ax.get_window_extent(renderer) for ax in fig.axes]
    boxes += [b for b in (ax.yaxis.get_tightbbox(renderer) for ax in fig.axes) if b is not None]
    return min(b.x0 for b in boxes), max(b.x1 for b in boxes)


def _fit_texts(fig, ax, *texts) -> None:
    """Re-wrap texts centred on `ax` (its title, its x label) that are wider than the rest of the figure:
    constrained layout leaves their width out, so the tight crop would keep blank margins beside the data."""
    fig.draw_without_rendering()  # lays the figure out, to measure
    renderer = fig.canvas.get_renderer()
    left, right = _content_span(fig, renderer)
    box = ax.get_window_extent(renderer)
    centre = (box.x0 + box.x1) / 2
    width = 2 * min(centre - left, right - centre)
    for text in texts:
        lines = text.get_text().split("\n")
        chars = max(map(len, lines))
        while chars > 16 and text.get_window_extent(renderer).width > width:
            chars = int(chars * 0.9)
            text.set_text("\n".join(textwrap.fill(line, chars) for line in lines))


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
    labels = [lab for lab in style if lab in set(g.label)]
    names = [style[lab].name for lab in labels]
    left_out = [style[lab].name if lab in style else lab for lab in left_out or ()]
    note = BAND + ("\n" + textwrap.fill(f"not shown (no Task-IL record): {', '.join(left_out)}", 110)
                   if left_out else "")
    # the axes keep their height; the legend and the note get their own
    height = 4.2 + _legend_inches(names) + 0.2 * note.count("\n")
    fig, ax = plt.subplots(figsize=(7.2, height), layout="constrained")
    for lab in labels:  # in order: later rows on top, with smaller markers
        _curve(ax, g[g.label == lab], field, lab, style[lab])
    _ticks(ax, sorted({c for v in g.classes_seen for c in v}))
    ax.set(xlabel="Number of classes seen", ylabel=ylabel)
    ax.set_title(f"{protocol}\n{note}", fontsize="small", loc="left")
    _legend(fig, ax, style)
    return fig


def _curve(ax, g: pd.DataFrame, field: str, label: str, st: Style) -> None:
    """One row's accuracy against classes seen: the mean over its seeds, a ± sd band where it has two or more."""
    points = pd.DataFrame([(c, a) for r in g.itertuples() for c, a in zip(r.classes_seen, getattr(r, field))],
                          columns=["classes", "acc"])
    acc = pd.to_numeric(points.acc, errors="coerce").groupby(points.classes)
    mean, sd = acc.mean(), acc.std(ddof=1)
    ax.plot(mean.index, mean.to_numpy(), color=st.colour, marker=st.marker, markersize=st.size,
            markeredgecolor="white", markeredgewidth=0.6, linewidth=1.6,
            linestyle=(0, st.dashes) if st.dashes else "-", label=label)
    if sd.notna().any():
        ax.fill_between(mean.index, mean - sd, mean + sd, color=st.colour, alpha=0.2, linewidth=0)


def _label_inches(labels) -> float:
    """About how wide the longest label is as a tick label, in inches."""
    return 0.075 * max(map(len, labels), default=0)


def _forgetting(g: pd.DataFrame, protocol: str, style: dict) -> plt.Figure:
    tidy = pd.DataFrame(
        [{"label": r.label, "seed": r.seed, "task": i + 1, "f": f}
         for r in g.itertuples() for i, f in enumerate(r.per_task_forgetting)])
    labels = [lab for lab in style if lab in set(g.label)]
    names = [style[lab].name for lab in labels]
    if len(labels) > 6:  # bars of many rows per task cannot be read: one heatmap row per label
        table = tidy.groupby(["label", "task"]).f.mean().unstack("task").reindex(labels)
        table.index = names
        width = 0.55 * table.shape[1] + 3 + _label_inches(names)  # the axes keep their width beside long names
        fig, ax = plt.subplots(figsize=(width, 0.35 * len(labels) + 1.6), layout="constrained")
        # numbers rounded first (+ 0.0 turns -0.0 into 0.0): a forgetting of -0.3 reads "0", not "-0"
        annot = (table.round() + 0.0) if table.shape[1] <= 12 else False
        sns.heatmap(table, annot=annot, fmt=".0f", cmap="rocket_r", vmin=0,
                    cbar_kws={"label": "Forgetting (%)"}, ax=ax)
        ax.set(xlabel="Task", ylabel="", title=f"{protocol}: forgetting of each task after the last one "
                                               "(Chaudhry; mean over seeds)")
        _fit_texts(fig, ax, ax.title)
        return fig
    palette = {k: style[k].colour for k in labels}
    T = int(tidy.task.max())
    width = min(max(6.4, 0.2 * T * len(labels) + 3), 14)  # room for every bar, within reason
    fig, ax = plt.subplots(figsize=(width, 4.4 + _legend_inches(names)), layout="constrained")
    sns.barplot(data=tidy, x="task", y="f", hue="label", hue_order=labels, palette=palette,
                errorbar="sd", capsize=0.15, err_kws={"linewidth": 1}, ax=ax)
    ax.set(xlabel="Task", ylabel="Forgetting after the last task (%)",
           title=f"{protocol}: forgetting per task (Chaudhry); bars: mean, whiskers: ± one sd over seeds")
    ax.axhline(0, color="black", linewidth=0.8)
    _legend(fig, ax, style)  # below the axes: bars as tall as the axes stay uncovered
    _fit_texts(fig, ax, ax.title)
    return fig


def _performance_drop(g: pd.DataFrame, protocol: str, style: dict) -> plt.Figure:
    tidy = pd.DataFrame([{"label": r.label, "seed": r.seed, "pd": r.step_accuracy[0] - r.step_accuracy[-1]}
                         for r in g.itertuples()])
    labels = [lab for lab in style if lab in set(g.label)]
    names = [style[lab].name for lab in labels]
    palette = {k: style[k].colour for k in labels}
    fig, ax = plt.subplots(figsize=(5 + _label_inches(names), max(2.5, 0.35 * len(labels) + 1.2)),
                           layout="constrained")
    sns.barplot(data=tidy, y="label", x="pd", hue="label", order=labels, hue_order=labels, palette=palette,
                errorbar="sd", capsize=0.15, err_kws={"linewidth": 1}, legend=False, ax=ax)
    ax.set_yticks(range(len(labels)), names)  # bars keyed by label (names need not be unique), shown by name
    ax.set(ylabel="", xlabel="Performance drop PD = A_1 - A_T (percentage points; lower is better)",
           title=f"{protocol}: accuracy lost from the first task to the last (mean ± sd over seeds)")
    ax.axvline(0, color="black", linewidth=0.8)
    _fit_texts(fig, ax, ax.title, ax.xaxis.label)
    return fig


def matrix_figure(g: pd.DataFrame, protocol: str, label: str, name: str | None = None) -> plt.Figure:
    """The seed-mean accuracy matrix of the runs in `g` (rows with `accuracy_matrix`) as a heatmap,
    titled with the row's shown `name` (default: the label)."""
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
    # "compressed": the square heatmap and its colour bar side by side, as tall as each other, with
    # none of the figure's spare width between them
    fig, ax = plt.subplots(figsize=(size + 1, size), layout="compressed")
    annot = T <= _ANNOTATE_MAX_TASKS
    sns.heatmap(mean, mask=np.triu(np.ones((T, T), bool), k=1), vmin=0, vmax=100,
                cmap="viridis", square=True, annot=annot, fmt=".1f" if T <= 8 else ".0f",
                annot_kws={"fontsize": 10 if T <= 10 else 8}, xticklabels=ticks,
                yticklabels=ticks, cbar_kws={"label": "Accuracy (%)", "pad": 0.02}, ax=ax)
    n = len(mats)
    ax.set(xlabel="Evaluated on task i", ylabel="After training task t",
           title=f"{protocol} · {name or label} (mean of {n} seed{'s' * (n > 1)})")
    ax.tick_params(axis="y", rotation=0)
    ax.grid(False)  # whitegrid's lines would show through the masked upper triangle
    _fit_texts(fig, ax, ax.title)
    return fig


@dataclass
class Figure:
    stem: str  # file name without extension
    kind: str  # "acc_vs_classes", "acc_vs_classes_task_il", "forgetting", "performance_drop" or "accuracy_matrix"
    protocol: str
    label: str | None  # the run label of an accuracy matrix
    fig: plt.Figure
    name: str | None = None  # that row's shown name (an experiment file's, else the label), for captions


def figures(runs: pd.DataFrame) -> Iterator[Figure]:
    """Every figure for each protocol in `runs`, built one at a time (close each after use)."""
    labels = ordered_labels(runs, runs.label.unique())
    style = styles(labels, {lab: shown_name(runs, lab) for lab in labels})
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
                name = style[label].name
                yield Figure(f"accuracy_matrix_{ps}_{label_slug[label]}", "accuracy_matrix", protocol, label,
                             matrix_figure(lg, protocol, label, name), name)


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
    _remove_stale(Path(out_dir), runs, set(paths))
    return paths


_PROTOCOL_FIGURES = ("acc_vs_classes", "acc_vs_classes_task_il", "forgetting", "performance_drop")


def _remove_stale(out_dir: Path, runs: pd.DataFrame, written: set[Path]) -> None:
    """Figures of these protocols drawn earlier but not now (a run no longer in the results, a removed
    experiment row): the folder then holds what the table and the page show. Only this module's figure
    names for these protocols are touched; any other file in the folder stays."""
    slugs = _slugs(runs.protocol.unique()).values()
    exact = {f"{kind}_{ps}" for kind in _PROTOCOL_FIGURES for ps in slugs}
    matrices = tuple(f"accuracy_matrix_{ps}_" for ps in slugs)
    for path in out_dir.glob("*"):
        if path.suffix in (".png", ".pdf") and path not in written \
                and (path.stem in exact or path.stem.startswith(matrices)):
            path.unlink()
