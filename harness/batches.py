"""Mini-batches of in-memory tensors: no Avalanche import, so benchmarks can use it where
Avalanche is not installed (a bare GPU machine)."""
from __future__ import annotations

import torch

from harness.nn.augment import batch_augment


class TensorBatches:
    """Mini-batches of in-memory tensors, as [x, y, task] lists like Avalanche's loaders.

    Avalanche's DataLoader fetches and collates one sample at a time through its
    dataset layers (~13% of a small CNN's training time on 2 CPU cores, measured);
    slicing the materialised experience tensors removes that cost.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, augment: str = "none",
                 extras: tuple[torch.Tensor, ...] = (), lengths: torch.Tensor | None = None, crop_padding: int = 4):
        # extras: more per-sample tensors (e.g. precomputed teacher logits), served between y and the task label
        # lengths: per-sample sequence lengths; shuffled batches then group similar lengths (less padding)
        self.x, self.y, self.batch_size, self.shuffle, self.augment = x, y, batch_size, shuffle, augment
        self.extras, self.lengths, self.crop_padding = extras, lengths, crop_padding

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def _batches(self) -> list[torch.Tensor]:
        n = len(self.y)
        order = torch.randperm(n) if self.shuffle else torch.arange(n)
        if self.lengths is None or not self.shuffle:
            return list(order.split(self.batch_size))
        # The shuffled order cut into pools of 8 batches, each pool sorted by length, then
        # the batches shuffled: random batches whose members have nearly the same length.
        batches = []
        for pool in order.split(8 * self.batch_size):
            batches += pool[torch.sort(self.lengths[pool], stable=True).indices].split(self.batch_size)
        return [batches[i] for i in torch.randperm(len(batches))]

    def __iter__(self):
        for idx in self._batches():
            x = self.x[idx]
            if self.augment != "none":
                x = batch_augment(x, self.augment, self.crop_padding)
            yield [x, self.y[idx], *(e[idx] for e in self.extras), torch.zeros(len(idx), dtype=torch.long)]
