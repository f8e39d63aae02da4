"""Summary metrics of an accuracy matrix, exactly as defined in docs/methods.md.

a[t][i]: accuracy (percent) on task i's test data after training task t (i <= t).
A_t: accuracy on all classes seen after task t (all seen test samples pooled).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from avalanche.evaluation.metrics import Forgetting as AvalancheForgetting


def _square(matrix: Sequence[Sequence[float]]) -> np.ndarray:
    """Lower-triangular list of lists -> (T, T) array with NaN above the diagonal."""
    T = len(matrix)
    a = np.full((T, T), np.nan)
    for t, row in enumerate(matrix):
        if len(row) != t + 1:
            raise ValueError(f"row {t} of the accuracy matrix has {len(row)} entries, expected {t + 1}")
        a[t, : t + 1] = row
    return a


def average_incremental_accuracy(step_accuracy: Sequence[float]) -> float:
    """Mean over t of A_t (PyCIL's "average accuracy", GMM's "avg")."""
    return float(np.mean(step_accuracy))


def last_accuracy(step_accuracy: Sequence[float]) -> float:
    return float(step_accuracy[-1])


def per_task_forgetting(matrix: Sequence[Sequence[float]]) -> list[float]:
    """Chaudhry et al. (2018): for each i < T, max_{t<T} a[t][i] - a[T][i]."""
    a = _square(matrix)
    T = len(a)
    return [float(np.nanmax(a[: T - 1, i]) - a[T - 1, i]) for i in range(T - 1)]


def average_forgetting(matrix: Sequence[Sequence[float]]) -> float | None:
    f = per_task_forgetting(matrix)
    return float(np.mean(f)) if f else None


def backward_transfer(matrix: Sequence[Sequence[float]]) -> float | None:
    """Lopez-Paz & Ranzato (2017): mean over i < T of a[T][i] - a[i][i]."""
    a = _square(matrix)
    T = len(a)
    if T < 2:
        return None
    return float(np.mean([a[T - 1, i] - a[i, i] for i in range(T - 1)]))


def avalanche_forgetting(matrix: Sequence[Sequence[float]]) -> float | None:
    """Avalanche's own forgetting, a[i][i] - a[T][i] averaged over i < T (not Chaudhry's).

    It is exactly -BWT; kept, computed with Avalanche's standalone Forgetting metric, so a
    figure from an Avalanche paper can be compared under its own name.
    """
    a = _square(matrix)
    T = len(a)
    if T < 2:
        return None
    metric = AvalancheForgetting()
    for i in range(T - 1):
        metric.update(i, float(a[i, i]), initial=True)
        metric.update(i, float(a[T - 1, i]))
    return float(np.mean(list(metric.result().values())))


def summarise(matrix: Sequence[Sequence[float]], step_accuracy: Sequence[float]) -> dict:
    return {
        "avg_incremental_accuracy": average_incremental_accuracy(step_accuracy),
        "last_accuracy": last_accuracy(step_accuracy),
        "average_forgetting": average_forgetting(matrix),
        "bwt": backward_transfer(matrix),
        "avalanche_forgetting": avalanche_forgetting(matrix),
        "per_task_forgetting": per_task_forgetting(matrix),
        "accuracy_matrix": [list(map(float, row)) for row in matrix],
        "step_accuracy": list(map(float, step_accuracy)),
    }


def summarise_task_il(matrix: Sequence[Sequence[float]], step_accuracy: Sequence[float]) -> dict:
    """The Task-IL counterparts (task identity given at test time), prefixed so that no one
    reads them as the Class-IL figures."""
    return {
        "task_il_avg_incremental_accuracy": average_incremental_accuracy(step_accuracy),
        "task_il_last_accuracy": last_accuracy(step_accuracy),
        "task_il_average_forgetting": average_forgetting(matrix),
        "task_il_accuracy_matrix": [list(map(float, row)) for row in matrix],
        "task_il_step_accuracy": list(map(float, step_accuracy)),
    }


def summarise_old_new_top5(old: Sequence[float | None], new: Sequence[float], top5: Sequence[float]) -> dict:
    """PyCIL's per-task split of the Class-IL accuracy into the classes of earlier tasks ("old",
    none after the first task) and of the task just learnt ("new"), and Class-IL top-5 accuracy."""
    return {
        "old_accuracy": [None if v is None else float(v) for v in old],
        "new_accuracy": list(map(float, new)),
        "top5_accuracy": list(map(float, top5)),
        "last_old_accuracy": None if old[-1] is None else float(old[-1]),
        "last_new_accuracy": float(new[-1]),
        "avg_top5_accuracy": float(np.mean(top5)),
        "last_top5_accuracy": float(top5[-1]),
    }


def summarise_classifiers(by_classifier: dict[str, Sequence[float]], headline: str) -> dict:
    """Class-IL accuracy after each task by each of a method's classifiers (PyCIL's "cnn", the
    trained head, and "nme", the nearest mean of exemplars), their Avg and Last; `headline`
    names the one the run's Avg and Last are."""
    out: dict = {"headline_classifier": headline,
                 "classifier_step_accuracy": {k: list(map(float, v)) for k, v in by_classifier.items()}}
    for name, accs in by_classifier.items():
        out[f"avg_{name}_accuracy"] = average_incremental_accuracy(accs)
        out[f"last_{name}_accuracy"] = last_accuracy(accs)
    return out
