"""Fashion-MNIST (Xiao et al., 2017): 10 classes of 28x28 grey clothing photos.

Data: the four idx files of the official release, gzipped, as Debian's
`dataset-fashion-mnist` installs them in /usr/share/datasets/fashion-mnist/
(<root>/fashion-mnist/ is used instead when it holds them). Official split: 60,000
train, 10,000 test. Class names: torchvision's FashionMNIST.classes (label order).
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import FashionMNIST

from harness.data import DatasetSplits, ImageTensorDataset
from harness.errors import DataMissing
from harness.protocol import Protocol, register_protocol
from harness.registry import register_dataset

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    split: (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
    for split, prefix in (("train", "train"), ("test", "t10k"))
}


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """An unsigned-byte idx file (gzipped or not) as a uint8 tensor.

    torchvision's read_image_file / read_label_file open the path as plain bytes and
    cannot read the .gz files Debian ships, hence this small reader.
    """
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or data[3] != ndim:  # magic: 0, 0, type 0x08 = ubyte, ndim
        raise DataMissing(f"{path} is not a {ndim}-d unsigned-byte idx file: reinstall it (apt-get install --reinstall dataset-fashion-mnist)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    pixels = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if pixels.size != int(np.prod(shape)):
        raise DataMissing(f"{path} is truncated ({pixels.size} bytes for shape {shape}): reinstall it")
    return torch.from_numpy(pixels.reshape(shape).copy())


def _find(root: Path | None) -> Path | None:
    candidates = ([root.expanduser() / "fashion-mnist"] if root else []) + [DEBIAN_DIR]
    names = [n for pair in FILES.values() for n in pair]
    for folder in candidates:
        if all((folder / n).is_file() for n in names):
            return folder
    return None


@register_dataset("fmnist")
def load_fmnist(root: Path | None = None, download: bool = False) -> DatasetSplits:
    folder = _find(root)
    if folder is None:
        where = f"{root.expanduser() / 'fashion-mnist'} or {DEBIAN_DIR}" if root else str(DEBIAN_DIR)
        raise DataMissing(f"Fashion-MNIST not found in {where}: apt-get install dataset-fashion-mnist")

    def split(name: str) -> ImageTensorDataset:
        images, labels = FILES[name]
        x = read_idx(folder / images, 3)
        return ImageTensorDataset(x.unsqueeze(1).contiguous(), read_idx(folder / labels, 1).tolist())

    return DatasetSplits(train=split("train"), test=split("test"), class_names=list(FashionMNIST.classes))


FMNIST_5X2 = register_protocol(
    Protocol(
        name="fmnist_5x2", dataset="fmnist", num_classes=10, num_tasks=5, increment=2, class_order_seed=1993,
        image_size=28, channels=1, noun="photo", augment="none", family="fmnist",
        description="Fashion-MNIST, 10 classes, 5 tasks of 2 (split Fashion-MNIST)",
    )
)
