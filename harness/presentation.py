"""What the tables (harness.report), the figures (harness.plots) and the page (harness.html_report)
share: the rows' order and shown names, and a caption. It imports none of them, so they depend on it
one way: report <- html_report -> plots, each -> presentation.

A run's label (a method plus its non-default settings, "lwf+epochs=1") names its folder; an
experiment file may give its row a name to show instead (runs.attrs["names"], label -> name) and an
order (runs.attrs["order"], labels).
"""
from __future__ import annotations

import pandas as pd

BAND = "line: mean over seeds; band: ± one standard deviation over seeds (rows with two or more)"


def ordered_labels(runs: pd.DataFrame, labels) -> list[str]:
    """Labels in an experiment file's order (runs.attrs["order"]), the rest alphabetically after them."""
    order = list(runs.attrs.get("order") or [])
    rank = {label: i for i, label in enumerate(order)}
    return sorted(labels, key=lambda label: (rank.get(label, len(order)), label))


def shown_name(runs: pd.DataFrame, label: str) -> str:
    """The row's name in an experiment file, else its label."""
    return (runs.attrs.get("names") or {}).get(label, label)
