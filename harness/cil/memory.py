"""Exemplar memory and herding selection, shared by rehearsal methods (iCaRL, MAE-CIL, replay...).

- `ExemplarMemory`: a class-balanced store under a fixed budget, either a total count
  or a byte budget (so methods that store differently sized items, e.g. MAE-CIL's
  patches, compare at equal storage). Each class keeps its items best first; when new
  classes arrive every class is cut to `budget // classes seen`, so old classes shrink
  and the total never exceeds the budget.
- `herding`: iCaRL's greedy selection on L2-normalised features.
- `class_means` / `nme_scores`: nearest-mean-of-exemplars classification.

Why not Avalanche's storage policies (avalanche.training.storage_policy, 0.6):
- `ClassBalancedBuffer` selects by reservoir sampling, not herding.
- `ParametricBuffer` + `HerdingSelectionStrategy` herds on *unnormalised* features
  (iCaRL normalises), and at every resize re-ranks each class's whole buffer with the
  current model through a per-item DataLoader, where iCaRL keeps the first m of its
  original ranking.
- Neither has a byte budget; both hold float AvalancheDatasets, where we keep uint8
  images (what the byte budget counts, 4x smaller than float32).
Avalanche's ICaRL plugin has its own herding inline (not reusable) and sizes classes
with ceil(memory / classes), which overshoots the budget (30 classes: 67 x 30 = 2010).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.errors import HarnessError


def to_uint8(images: Tensor) -> Tensor:
    """Float images in [0, 1] -> uint8 (exact for data that came from uint8)."""
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def to_float(images: Tensor) -> Tensor:
    return images.float().div_(255)


def herding(features: Tensor, m: int) -> Tensor:
    """Indices of `m` samples chosen greedily, best first (iCaRL, Rebuffi et al. 2017, Alg. 4).

    Features are L2-normalised; step k takes the unchosen sample whose inclusion brings
    the mean of the chosen features closest to the mean of all of them. Ties go to
    the lower index, so the result is deterministic. m > n gives all n samples.
    """
    f = F.normalize(features.detach().float(), dim=1)
    n = f.shape[0]
    m = min(m, n)
    target = f.mean(0)
    chosen = torch.empty(m, dtype=torch.long)
    taken = torch.zeros(n, dtype=torch.bool, device=f.device)
    running = torch.zeros_like(target)  # sum of the chosen features
    for k in range(m):
        dist = ((running + f) / (k + 1) - target).pow(2).sum(1)
        dist[taken] = float("inf")
        i = int(dist.argmin())
        chosen[k] = i
        taken[i] = True
        running += f[i]
    return chosen


def class_means(features: Tensor, labels: Tensor, classes: Iterable[int]) -> Tensor:
    """(len(classes), d): per class, the normalised mean of its normalised features."""
    f = F.normalize(features.float(), dim=1)
    return torch.stack([F.normalize(f[labels == c].mean(0), dim=0) for c in classes])


def nme_scores(features: Tensor, means: Tensor) -> Tensor:
    """Cosine similarity of normalised features to normalised class means, (B, classes).

    With unit vectors, argmax of the cosine = argmin of the Euclidean distance (NME).
    """
    return F.normalize(features.float(), dim=1) @ means.T


class ExemplarMemory:
    """Class-balanced exemplars under a count budget (`max_items`), a byte budget (`max_bytes`)
    or a fixed number per class (`per_class`: the total grows with the classes, PyCIL's
    `fixed_memory`).

    Usage after training on new classes (herding where features are given, else random):

        memory.update(images, labels, new_classes, seed, features=features)
    """

    def __init__(self, max_items: int | None = None, max_bytes: int | None = None, per_class: int | None = None):
        if sum(b is not None for b in (max_items, max_bytes, per_class)) != 1:
            raise ValueError("give exactly one of max_items, max_bytes and per_class")
        self.max_items, self.max_bytes, self.per_class = max_items, max_bytes, per_class
        self.items: dict[int, Tensor] = {}  # label -> (k, ...) tensor, best first

    # ---- budget -------------------------------------------------------------------
    def quota(self, n_classes: int, item_bytes: int) -> int:
        """Items per class when `n_classes` share the budget."""
        if self.per_class is not None:
            return self.per_class
        if self.max_items is not None:
            return self.max_items // n_classes
        return self.max_bytes // n_classes // item_bytes

    def make_room(self, n_new_classes: int, item_bytes: int) -> int:
        """Cut every stored class to the quota of (stored + new) classes; return that quota."""
        q = self.quota(len(self.items) + n_new_classes, item_bytes)
        for c in self.items:
            self.items[c] = self.items[c][:q]
        return q

    def update(self, images: Tensor, labels: Tensor, classes: Iterable[int], seed: int, *,
               features: Tensor | None = None, encode: Callable[[Tensor, torch.Generator], Tensor] | None = None,
               item_bytes: int | None = None) -> None:
        """After a task: cut the stored classes to the new share, then keep each new class's
        share of `images`, best first: by herding on `features` where given, else in a random
        order drawn from `class_generator(seed, class)`. `encode(chosen, generator)` turns the
        chosen images into what is stored (MAE-CIL's patches); `item_bytes` is then the size
        of one stored item (by default one image's)."""
        classes = sorted(int(c) for c in classes)
        quota = self.make_room(len(classes), item_bytes or _nbytes(images[0]))
        for c in classes:
            idx = (labels == c).nonzero().squeeze(1)
            g = class_generator(seed, c)
            order = herding(features[idx], quota) if features is not None else \
                torch.randperm(len(idx), generator=g)[:quota]
            chosen = images[idx[order]]
            self.add(c, encode(chosen, g) if encode is not None else chosen)

    def add(self, label: int, items: Tensor) -> None:
        if label in self.items:
            raise ValueError(f"class {label} is already in the memory")
        if self.per_class is not None:
            if len(items) > self.per_class:
                raise ValueError(f"{len(items)} items of class {label} exceed the {self.per_class} per class")
            self.items[label] = items.detach().cpu().clone()
            return
        extra = _nbytes(items) if self.max_bytes is not None else len(items)
        used = self.nbytes if self.max_bytes is not None else len(self)
        budget = self.max_bytes if self.max_bytes is not None else self.max_items
        if used + extra > budget:
            raise ValueError(f"adding {len(items)} items of class {label} would exceed the memory budget")
        self.items[label] = items.detach().cpu().clone()

    # ---- contents -----------------------------------------------------------------
    @property
    def classes(self) -> list[int]:
        return sorted(self.items)

    def __len__(self) -> int:
        return sum(len(t) for t in self.items.values())

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in self.items.values())

    def tensors(self) -> tuple[Tensor, Tensor]:
        """(all items, their labels), classes in ascending order."""
        cs = self.classes
        x = torch.cat([self.items[c] for c in cs])
        y = torch.cat([torch.full((len(self.items[c]),), c, dtype=torch.long) for c in cs])
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return {"items": {int(c): t for c, t in self.items.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.items = {int(c): t for c, t in state["items"].items()}


def class_generator(seed: int, label: int) -> torch.Generator:
    """The random source of one class's exemplars: the run's seed and the class, nothing else
    (not the global RNG, which training moves differently in a resumed run)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + label)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def check_budget(memory: ExemplarMemory, n_classes: int, item_bytes: int, who: str) -> None:
    """Refuse (before training) a budget that cannot keep one item of each class."""
    if memory.quota(n_classes, item_bytes) < 1:
        have = f"{memory.max_items} exemplars" if memory.max_items is not None else f"{memory.max_bytes} bytes"
        raise HarnessError(f"{who}: a memory of {have} cannot keep one exemplar ({item_bytes} bytes) "
                           f"of each of {n_classes} classes")
