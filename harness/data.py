"""Datasets as the harness sees them, and their preparation for a protocol.

A dataset loader (registered with `@register_dataset`) returns `DatasetSplits`:
train and test torch Datasets that expose `targets`, plus the class names in label
order. `prepare(protocol, ...)` keeps the protocol's classes, relabels them in the
order they arrive (class k of the stream gets label k) and applies few-shot and
`--max-train-per-class` caps. Items are (float image tensor in [0, 1], label).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from harness.errors import HarnessError
from harness.protocol import Protocol
from harness.registry import DATASETS


class ImageTensorDataset(Dataset):
    """Images held in memory as uint8 (N, C, H, W); items are float in [0, 1]."""

    in_memory = True

    def __init__(self, images: torch.Tensor, targets: torch.Tensor | Sequence[int]):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        self.images = images
        self.targets = [int(t) for t in targets]
        if len(self.targets) != len(images):
            raise ValueError("images and targets differ in length")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i].float().div_(255), self.targets[i]

    def subset(self, indices: Sequence[int], targets: Sequence[int]) -> "ImageTensorDataset":
        return ImageTensorDataset(self.images[torch.as_tensor(indices, dtype=torch.long)], targets)


class RelabelledSubset(Dataset):
    """Lazy subset of a file-backed dataset with new labels (ImageFolder and the like)."""

    in_memory = False

    def __init__(self, base: Dataset, indices: Sequence[int], targets: Sequence[int]):
        self.base, self.indices, self.targets = base, list(indices), [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]][0], self.targets[i]


@dataclass
class DatasetSplits:
    train: Dataset
    test: Dataset
    class_names: list[str]  # index = label in `train.targets` / `test.targets`


@dataclass
class PreparedData:
    """A protocol's data, relabelled so that label k is the k-th class to arrive."""

    protocol: Protocol
    train: Dataset
    test: Dataset
    class_names: list[str]  # in arrival order
    source_classes: list[int]  # dataset label of each arrival-order class

    @property
    def in_memory(self) -> bool:
        return bool(getattr(self.train, "in_memory", False))

    def task_classes(self) -> list[list[int]]:
        out, start = [], 0
        for n in self.protocol.classes_per_task():
            out.append(list(range(start, start + n)))
            start += n
        return out


def class_order(protocol: Protocol, class_names: Sequence[str]) -> list[int]:
    """Dataset labels of the protocol's classes, in the order they arrive."""
    n = len(class_names)
    if protocol.class_order is not None:
        index = {name: i for i, name in enumerate(class_names)}
        missing = [c for c in protocol.class_order if c not in index]
        if missing:
            raise HarnessError(f"protocol {protocol.name}: classes not in dataset {protocol.dataset}: {', '.join(missing[:5])}")
        return [index[c] for c in protocol.class_order]
    if protocol.num_classes > n:
        raise HarnessError(f"protocol {protocol.name} needs {protocol.num_classes} classes; dataset {protocol.dataset} has {n}")
    return np.random.RandomState(protocol.class_order_seed).permutation(n)[: protocol.num_classes].tolist()


def _select(dataset: Dataset, order: list[int], cap_per_class: dict[int, int]):
    """Indices (file order) and new labels of the samples of `order`'s classes."""
    new_label = {src: k for k, src in enumerate(order)}
    taken: dict[int, int] = {}
    indices, targets = [], []
    for i, t in enumerate(dataset.targets):
        k = new_label.get(int(t))
        if k is None:
            continue
        cap = cap_per_class.get(k)
        if cap is not None and taken.get(k, 0) >= cap:
            continue
        taken[k] = taken.get(k, 0) + 1
        indices.append(i)
        targets.append(k)
    return indices, targets


def _subset(dataset: Dataset, indices: list[int], targets: list[int]) -> Dataset:
    if isinstance(dataset, ImageTensorDataset):
        return dataset.subset(indices, targets)
    return RelabelledSubset(dataset, indices, targets)


def load_splits(protocol: Protocol, data_root: str | Path | None = None, download: bool = False) -> DatasetSplits:
    loader = DATASETS.get(protocol.dataset)
    root = Path(data_root).expanduser() if data_root else None
    return loader(root=root, download=download, **protocol.dataset_kwargs)


def prepare(
    protocol: Protocol,
    data_root: str | Path | None = None,
    download: bool = False,
    max_train_per_class: int | None = None,
    splits: DatasetSplits | None = None,
) -> PreparedData:
    splits = splits or load_splits(protocol, data_root, download)
    order = class_order(protocol, splits.class_names)
    caps: dict[int, int] = {}
    if protocol.shots:
        caps.update({k: protocol.shots for k in range(protocol.first_task_classes, protocol.num_classes)})
    if max_train_per_class:
        caps = {k: min(caps.get(k, max_train_per_class), max_train_per_class) for k in range(protocol.num_classes)}
    train_idx, train_y = _select(splits.train, order, caps)
    test_idx, test_y = _select(splits.test, order, {})
    for name, ys in (("train", train_y), ("test", test_y)):
        present = set(ys)
        if len(present) != protocol.num_classes:
            absent = [splits.class_names[order[k]] for k in range(protocol.num_classes) if k not in present]
            raise HarnessError(f"protocol {protocol.name}: no {name} samples for classes {', '.join(absent[:5])}")
    return PreparedData(
        protocol=protocol,
        train=_subset(splits.train, train_idx, train_y),
        test=_subset(splits.test, test_idx, test_y),
        class_names=[splits.class_names[i] for i in order],
        source_classes=order,
    )
