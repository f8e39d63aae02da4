"""Evaluation, identical for every method: argmax of its class scores over seen classes."""
from __future__ import annotations

import torch
from avalanche.evaluation.metrics import Accuracy
from torch.utils.data import DataLoader

from harness.errors import HarnessError
from harness.method import materialise


class Evaluator:
    """Scores a method on the test data of every task seen so far.

    Test tensors of in-memory datasets are read once and reused at every step.
    """

    def __init__(self, test_stream, in_memory: bool, batch_size: int = 512):
        self.test_stream, self.in_memory, self.batch_size = test_stream, in_memory, batch_size
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _batches(self, task: int):
        dataset = self.test_stream[task].dataset.eval()
        if self.in_memory:
            if task not in self._cache:
                self._cache[task] = materialise(dataset)
            x, y = self._cache[task]
            yield from zip(x.split(self.batch_size), y.split(self.batch_size))
        else:
            for batch in DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=2,
                                    generator=torch.Generator().manual_seed(0)):
                yield batch[0], torch.as_tensor(batch[1])

    def task_accuracy(self, scores_of, task: int, classes_seen: int, who: str,
                      pooled: Accuracy | None = None) -> tuple[float, int]:
        """(accuracy in percent, test samples) of the argmax of scores_of(x)[:, :classes_seen]
        on `task`'s test data; `who` names the scorer in errors; `pooled` accumulates the same
        predictions."""
        acc = Accuracy()
        n = 0
        for x, y in self._batches(task):
            scores = scores_of(x)
            if scores.dim() != 2 or scores.shape[0] != len(y) or scores.shape[1] < classes_seen:
                raise HarnessError(
                    f"{who} returned scores of shape {tuple(scores.shape)}; expected ({len(y)}, >= {classes_seen})"
                )
            pred = scores[:, :classes_seen].argmax(1).cpu()
            acc.update(pred, y)
            if pooled is not None:
                pooled.update(pred, y)
            n += len(y)
        return 100.0 * acc.result(), n

    def evaluate(self, method, step: int, classes_seen: int) -> tuple[list[float], float, list[int]]:
        """(a[step][i] for i <= step, A_step, test samples per task); accuracies in percent."""
        pooled = Accuracy()
        row, sizes = [], []
        for task in range(step + 1):
            acc, n = self.task_accuracy(method.class_scores, task, classes_seen, f"method {method.name}", pooled)
            row.append(acc)
            sizes.append(n)
        return row, 100.0 * pooled.result(), sizes
