"""CIFAR-100: the standard class-incremental benchmarks (PyCIL / FACT definitions).

Data: the python version of CIFAR-100 (Krizhevsky, 2009), untarred as
<root>/cifar-100-python/{train,test,meta}: 50,000 train and 10,000 test images of
32x32 RGB, 100 classes. Labels are the fine labels; class names are the meta file's
`fine_label_names`, in label order. The official train/test split is used.
Class order: numpy.random.RandomState(1993).permutation(100), as in PyCIL.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torchvision.datasets import CIFAR100
from torchvision.datasets.utils import download_and_extract_archive

from harness.data import DatasetSplits, ImageTensorDataset
from harness.errors import DataMissing
from harness.protocol import Protocol, register_protocol
from harness.registry import register_dataset
from protocols._paths import one_line, resolve_root

FILES = ("train", "test", "meta")


class _CIFAR100(CIFAR100):
    """torchvision's reader without its md5 check of every file on every load.

    That check costs seconds on the real files and rejects the tests' small fixtures;
    the files' presence is checked instead, and downloads are still md5-verified
    (`download_and_extract_archive` checks the archive before untarring it).
    """

    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


@register_dataset("cifar100")
def load_cifar100(root: Path | None = None, download: bool = False) -> DatasetSplits:
    root = resolve_root(root)
    folder = root / CIFAR100.base_folder
    how = f"download {CIFAR100.url} and untar it in {root}, or add --download"
    if download and not all((folder / f).is_file() for f in FILES):
        try:
            root.mkdir(parents=True, exist_ok=True)
            download_and_extract_archive(CIFAR100.url, str(root), filename=CIFAR100.filename, md5=CIFAR100.tgz_md5)
        except Exception as exc:  # no network, a bad archive: the CLI prints one line
            raise DataMissing(f"CIFAR-100 not found in {folder} and its download failed ({one_line(exc)}): {how}") from exc
    absent = [f for f in FILES if not (folder / f).is_file()]
    if absent:
        raise DataMissing(f"CIFAR-100 not found in {folder} (no {', '.join(absent)}): {how}")
    try:
        train, test = _CIFAR100(str(root), train=True), _CIFAR100(str(root), train=False)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as exc:
        raise DataMissing(f"CIFAR-100 files in {folder} are unreadable ({one_line(exc)}): delete them and {how}") from exc

    def to_dataset(ds: CIFAR100) -> ImageTensorDataset:  # torchvision keeps HWC numpy; the harness wants NCHW
        return ImageTensorDataset(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), ds.targets)

    return DatasetSplits(train=to_dataset(train), test=to_dataset(test), class_names=list(train.classes))


def _cifar(name: str, tasks: int, increment: int, base: int = 0, shots: int | None = None, description: str = ""):
    return register_protocol(
        Protocol(
            name=name, dataset="cifar100", num_classes=100, num_tasks=tasks, increment=increment,
            base_classes=base, shots=shots, class_order_seed=1993, image_size=32, channels=3,
            noun="photo", augment="crop_flip", family="cifar100", description=description,
        )
    )


CIFAR100_10X10 = _cifar("cifar100_10x10", 10, 10, description="CIFAR-100, 10 tasks of 10 classes (B0 Inc10)")
CIFAR100_20X5 = _cifar("cifar100_20x5", 20, 5, description="CIFAR-100, 20 tasks of 5 classes (B0 Inc5)")
CIFAR100_B50_5X10 = _cifar("cifar100_b50_5x10", 6, 10, base=50, description="CIFAR-100, 50 base classes then 5 tasks of 10 (B50 Inc10)")
CIFAR100_FSCIL = _cifar(
    "cifar100_fscil", 9, 5, base=60, shots=5,
    description="CIFAR-100 few-shot CIL: 60 base classes, then 8 sessions of 5-way 5-shot",
)
