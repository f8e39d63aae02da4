"""Choosing settings: each method's best row of a sweep by a named metric, ready to paste.

    python -m harness run --methods icarl --protocol quickdraw40_4x10 --set icarl.lr=0.05,0.1 icarl.memory=500,2000
    python -m harness report results/quickdraw40_4x10 --best last

prints, per method, its rows ranked by the metric's mean over seeds and the chosen row's
settings as an experiment-file row. Settings are chosen on a development protocol: choosing
them on the protocol a table reports is tuning on its test data, so that is said in a warning.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import HarnessError
from harness.results import _fmt

if TYPE_CHECKING:  # the runs come as collect_runs's DataFrame; the CLI reads METRICS without pandas
    import pandas as pd

# name -> (summary field, True where higher is better)
METRICS = {
    "avg": ("avg_incremental_accuracy", True),
    "last": ("last_accuracy", True),
    "forgetting": ("average_forgetting", False),
    "task_il_avg": ("task_il_avg_incremental_accuracy", True),
    "task_il_last": ("task_il_last_accuracy", True),
    "top5_last": ("last_top5_accuracy", True),
}
# The built-in protocols whose tables the project reports (docs/results.md).
REPORTED = ("quickdraw100_10x10", "quickdraw_fscil")


def _changed(summary_path: str) -> dict:
    """The settings a run changed from their defaults (its config.json), {} where unreadable."""
    try:
        return json.loads((Path(summary_path).parent / "config.json").read_text()).get("changed_params") or {}
    except (OSError, ValueError):
        return {}


def ranking(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (protocol, method, label): the metric's mean over seeds, the seeds, the rank
    within its method (1 = chosen; ties go to the label first in alphabetical order)."""
    if metric not in METRICS:
        raise HarnessError(f"--best {metric}: expected one of {', '.join(METRICS)}")
    field, higher = METRICS[metric]
    if field not in runs or runs[field].isna().all():
        raise HarnessError(f"--best {metric}: no run here recorded {field}")
    table = (runs.groupby(["protocol", "method", "label"], sort=True)
             .agg(mean=(field, "mean"), seeds=("seed", "nunique"), path=("path", "first")).reset_index())
    table = table.dropna(subset=["mean"])
    table = table.sort_values(["protocol", "method", "mean", "label"], ascending=[True, True, not higher, True],
                              kind="stable")
    table["rank"] = table.groupby(["protocol", "method"]).cumcount() + 1
    return table.reset_index(drop=True)


def render_best(runs: pd.DataFrame, metric: str) -> str:
    """The ranking as text, then each chosen row as an experiment-file [[row]]."""
    table = ranking(runs, metric)
    lines, rows = [], []
    reported = sorted(set(table.protocol) & set(REPORTED))
    if reported:
        lines.append(f"warning: {', '.join(reported)} is a reported protocol: choose settings on a development "
                     "protocol (quickdraw20_2x10, quickdraw40_4x10, quickdraw_fscil_dev) and report here")
    for (protocol, method), group in table.groupby(["protocol", "method"], sort=False):
        lines.append(f"{protocol}, {method}: {len(group)} row(s) by {metric} (mean over seeds)")
        for r in group.itertuples():
            mark = "*" if r.rank == 1 else " "
            lines.append(f"  {mark} {r.mean:6.2f}  {r.seeds} seed(s)  {r.label}")
        chosen = group.iloc[0]
        settings = [f'"{method}.{k}={_fmt(v)}"' for k, v in sorted(_changed(chosen.path).items())]
        name, _, cap = protocol.partition("+maxtrain=")
        rows.append(f'[[row]]\nprotocol = "{name}"\nmethods = ["{method}"]\nset = [{", ".join(settings)}]'
                    + (f"\nmax_train_per_class = {cap}" if cap else ""))
    lines.append("\nthe chosen rows, for an experiment file:\n")
    return "\n".join(lines) + "\n" + "\n\n".join(rows) + "\n"
