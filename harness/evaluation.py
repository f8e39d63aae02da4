"""Evaluation, identical for every method: argmax of its class scores over seen classes."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from avalanche.evaluation.metrics import Accuracy, TopkAccuracy
from torch.utils.data import DataLoader

from harness.errors import HarnessError, RunDiverged
from harness.method import materialise


@dataclass
class StepScores:
    """One evaluation after task `step`, in percent. Class-IL: argmax over every seen class
    (the harness's headline figures). Task-IL: the task identity is given, so each sample's
    argmax is over its own task's classes only (Avalanche's and Mammoth's "Task-IL")."""

    row: list[float]  # a[step][i], Class-IL
    seen: float  # A_step, Class-IL
    sizes: list[int]  # test samples per task
    task_il_row: list[float]
    task_il_seen: float
    top5_seen: float = 0.0  # Class-IL top-5 (top-k with k = min(5, classes seen)) on every seen class
    # Class-IL accuracy on every seen class by each of the method's classifiers (PyCIL's "CNN", the
    # trained head, and "NME", the nearest mean of exemplars), where it has more than one.
    by_classifier: dict[str, float] = field(default_factory=dict)

    @property
    def new(self) -> float:
        """Accuracy on the classes of the task just learnt (PyCIL's "new")."""
        return self.row[-1]

    @property
    def old(self) -> float | None:
        """Accuracy on the classes of the earlier tasks, their test samples pooled (PyCIL's "old")."""
        n = sum(self.sizes[:-1])
        return sum(a * k for a, k in zip(self.row[:-1], self.sizes[:-1])) / n if n else None


class Evaluator:
    """Scores a method on the test data of every task seen so far.

    Test tensors of in-memory datasets are read once and reused at every step. Labels are
    in arrival order, so task i's classes are one contiguous range (`task_classes`).
    """

    def __init__(self, test_stream, in_memory: bool, task_classes: list[list[int]], batch_size: int = 512):
        self.test_stream, self.in_memory, self.batch_size = test_stream, in_memory, batch_size
        self.task_classes = task_classes
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
                      pooled: tuple[Accuracy, Accuracy, TopkAccuracy] | None = None,
                      classifiers: tuple[str, dict[str, Accuracy]] | None = None) -> tuple[float, int, float]:
        """(Class-IL accuracy, test samples, Task-IL accuracy) of scores_of(x) on `task`'s test
        data, Class-IL over the first classes_seen classes; `who` names the scorer in errors;
        `pooled` (Class-IL, Task-IL, Class-IL top-k) accumulates the same predictions.
        `classifiers` = (headline, {name: pooled Class-IL accuracy}): scores_of(x) then returns a
        dict of scores by classifier; the headline's are the figures, every one's is pooled."""
        acc, til = Accuracy(), Accuracy()
        lo, hi = self.task_classes[task][0], self.task_classes[task][-1] + 1
        n = 0
        for x, y in self._batches(task):
            scores = scores_of(x)
            if classifiers is not None:
                headline, by_name = classifiers
                for name, s in scores.items():
                    by_name[name].update(s[:, :classes_seen].argmax(1).cpu(), y)
                scores = scores[headline]
            if scores.dim() != 2 or scores.shape[0] != len(y) or scores.shape[1] < classes_seen:
                raise HarnessError(
                    f"{who} returned scores of shape {tuple(scores.shape)}; expected ({len(y)}, >= {classes_seen})"
                )
            if not bool(torch.isfinite(scores[:, :classes_seen]).all()):
                # argmax of NaN scores is a constant class: a chance-level "accuracy" that is no measurement
                raise RunDiverged(f"{who} returned non-finite class scores (NaN or inf) on the test data of task "
                                  f"{task + 1} after training on {classes_seen} classes")
            pred = scores[:, :classes_seen].argmax(1).cpu()
            pred_til = scores[:, lo:hi].argmax(1).cpu() + lo
            acc.update(pred, y)
            til.update(pred_til, y)
            if pooled is not None:
                pooled[0].update(pred, y)
                pooled[1].update(pred_til, y)
                pooled[2].update(scores[:, :classes_seen].float().cpu(), y, 0)
            n += len(y)
        return 100.0 * acc.result(), n, 100.0 * til.result()

    def evaluate(self, method, step: int, classes_seen: int) -> StepScores:
        """Every seen task's test data scored by method.class_scores, or, for a method with several
        classifiers (method.classifiers()), by method.scores_by_classifier: one forward pass for all."""
        pooled = (Accuracy(), Accuracy(), TopkAccuracy(top_k=min(5, classes_seen)))
        out = StepScores([], 0.0, [], [], 0.0)
        names = method.classifiers() if hasattr(method, "classifiers") else ()  # a benchmark's peer may lack it
        classifiers = (method.headline_classifier(), {name: Accuracy() for name in names}) if names else None
        scores_of = method.scores_by_classifier if names else method.class_scores
        for task in range(step + 1):
            acc, n, til = self.task_accuracy(scores_of, task, classes_seen, f"method {method.name}", pooled,
                                             classifiers)
            out.row.append(acc)
            out.sizes.append(n)
            out.task_il_row.append(til)
        out.seen, out.task_il_seen = 100.0 * pooled[0].result(), 100.0 * pooled[1].result()
        out.top5_seen = 100.0 * pooled[2].result()[0]
        if classifiers is not None:
            out.by_classifier = {name: 100.0 * a.result() for name, a in classifiers[1].items()}
        return out
