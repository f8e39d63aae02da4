"""A per-image cache of a frozen encoder's outputs (GMM's tokens, the frozen-feature methods' vectors), in memory, optionally on disk."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor


def image_keys(x: Tensor) -> list[bytes]:
    """Content keys of images in [0, 1]: the 8-bit pixels hashed, so any source of the same image hits."""
    q = (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).flatten(1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in q]


class FeatureCache:
    """Encoder tokens per image, kept as float16, keyed by image content (per encoder).

    One instance per encoder id lives for the whole process (`feature_cache(...)`), so
    every epoch, task, method and seed of a sweep reuses the same features; with a path
    it is also read from and written to disk (atomically) across processes.
    """

    def __init__(self, path: Path | None = None):
        self.path, self.items, self.dirty = path, {}, False
        if path is not None and path.exists():
            blob = torch.load(path, map_location="cpu", weights_only=True)
            self.items = dict(zip((bytes(k) for k in blob["keys"].numpy()), blob["feats"].unbind(0)))

    def __len__(self) -> int:
        return len(self.items)

    def get(self, x: Tensor, encode: Callable[[Tensor], Tensor], batch_size: int = 128) -> Tensor:
        keys = image_keys(x)
        todo, pending = [], set()
        for i, k in enumerate(keys):  # each new image once, even if the batch repeats it
            if k not in self.items and k not in pending:
                pending.add(k)
                todo.append(i)
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            feats = encode(x[idx]).detach().to("cpu", torch.float16)
            for i, f in zip(idx, feats):
                self.items[keys[i]] = f.clone()
            self.dirty = True
        return torch.stack([self.items[k] for k in keys])

    def save(self) -> None:
        if self.path is None or not self.dirty or not self.items:
            return
        import numpy as np

        keys = torch.from_numpy(np.frombuffer(b"".join(self.items), dtype=np.uint8).reshape(len(self.items), -1).copy())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".feat-", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:  # a file object: torch's zip writer refuses some temp names
                torch.save({"keys": keys, "feats": torch.stack(list(self.items.values()))}, fh)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.dirty = False


_CACHES: dict[tuple[str, bool], FeatureCache] = {}


def feature_cache(encoder_id: str, on_disk: bool) -> FeatureCache:
    key = (encoder_id, on_disk)
    if key not in _CACHES:
        from harness.nn.vlm.paths import cache_dir  # lazily: the vlm package imports this module

        _CACHES[key] = FeatureCache(cache_dir() / "features" / f"{encoder_id}.pt" if on_disk else None)
    return _CACHES[key]
