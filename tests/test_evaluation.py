"""The evaluator: Class-IL over every seen class, Task-IL over each sample's own task's classes."""
import pytest
import torch

from harness import data as data_mod
from harness.evaluation import Evaluator
from harness.method import materialise
from harness.protocol import get_protocol
from harness.registry import discover
from harness.streams import build_benchmark


class NewestClassBias:
    """Scores 1 for the true class and 2 for the newest class seen: Class-IL always answers the
    newest class, Task-IL answers right wherever the newest class is not among the choices."""

    name = "newest-bias"

    def __init__(self, labels: dict[bytes, int], newest: int):
        self.labels, self.newest = labels, newest

    def class_scores(self, x):
        scores = torch.zeros(len(x), 20)
        for i, image in enumerate(x):
            scores[i, self.labels[image.numpy().tobytes()]] += 1.0
        scores[:, self.newest] += 2.0
        return scores


def test_task_il_gives_each_sample_its_own_tasks_classes_only():
    discover()
    data = data_mod.prepare(get_protocol("quickdraw20_2x10"), max_train_per_class=2)
    bench = build_benchmark(data)
    labels = {}
    for exp in bench.test_stream:
        x, y = materialise(exp.dataset.eval())
        labels.update({img.numpy().tobytes(): int(t) for img, t in zip(x, y)})
    evaluator = Evaluator(bench.test_stream, True, data.task_classes())
    scores = evaluator.evaluate(NewestClassBias(labels, newest=19), step=1, classes_seen=20)
    assert scores.row == [0.0, 10.0]  # Class-IL: everything is called class 19
    assert scores.task_il_row == [100.0, 10.0]  # Task-IL: task 1 cannot answer 19; task 2 still does
    assert scores.sizes == [200, 200]
    assert scores.seen == pytest.approx(5.0) and scores.task_il_seen == pytest.approx(55.0)
