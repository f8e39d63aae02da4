"""Avalanche streams from prepared data: class-incremental, no task labels at test time."""
from __future__ import annotations

from avalanche.benchmarks import nc_benchmark

from harness.data import PreparedData


def build_benchmark(data: PreparedData):
    """An Avalanche benchmark whose experience t holds exactly the protocol's task t.

    Labels are already in arrival order (see harness.data.prepare), so the class
    order handed to Avalanche is the identity and experience t's classes are
    data.task_classes()[t].
    """
    p = data.protocol
    per_exp = {0: p.first_task_classes} if p.base_classes else None
    return nc_benchmark(
        train_dataset=data.train,
        test_dataset=data.test,
        n_experiences=p.num_tasks,
        task_labels=False,
        fixed_class_order=list(range(p.num_classes)),
        per_exp_classes=per_exp,
        class_ids_from_zero_from_first_exp=False,
    )
