"""ImageNet-R and ImageNet-100: file-backed datasets in wnid folders.

Both are read with torchvision's ImageFolder (class k = k-th wnid in sorted order)
and stay on disk; items are Resize(image_size) + CenterCrop(image_size) as float
tensors in [0, 1]. Class names are the first WordNet lemma of each wnid from the
synset list timm ships (timm/data/_info/imagenet_synset_to_lemma.txt), e.g.
n01443537 -> "goldfish"; the wnid itself when unknown, "lemma (wnid)" when two
classes share a lemma (ImageNet has two "crane"s and two "maillot"s).

ImageNet-R (Hendrycks et al., 2021): 200 wnid folders of renditions, no official
split. Ours, fixed: per class, the file names in sorted order are permuted by
numpy.random.RandomState(1993).permutation (a fresh generator for every class, so a
class's split never depends on the others); the first 80% (floor) train, the rest
test.
ImageNet-100: <root>/imagenet100/{train,val}/<wnid>/, a 100-class subset of
ILSVRC-2012 (as in PODNet / DER); the val folder is the test split.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
from torchvision import transforms
from torchvision.datasets import ImageFolder

from harness.data import DatasetSplits, RelabelledSubset
from harness.errors import DataMissing, HarnessError
from harness.protocol import Protocol, register_protocol
from harness.registry import register_dataset
from protocols._paths import one_line, resolve_root

IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
SPLIT_SEED = 1993
TRAIN_FRACTION = (4, 5)  # 80% as an exact fraction, so the cut has no float rounding


@lru_cache(maxsize=1)
def _lemmas() -> dict[str, str]:
    """wnid -> first lemma, from timm's shipped file; {} without timm (names fall back to wnids)."""
    spec = importlib.util.find_spec("timm")  # locate the file without importing timm (slow)
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "_info" / "imagenet_synset_to_lemma.txt"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        wnid, _, lemmas = line.partition("\t")
        if lemmas:
            out[wnid.strip()] = lemmas.split(",")[0].strip()
    return out


def class_names(wnids: list[str]) -> list[str]:
    """Readable, unique names for wnids (the harness looks classes up by name)."""
    lemmas = _lemmas()
    names = [lemmas.get(w, w) for w in wnids]
    return [f"{n} ({w})" if names.count(n) > 1 else n for n, w in zip(names, wnids)]


def _image_folder(folder: Path, image_size: int, what: str, how: str) -> ImageFolder:
    tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()])
    if not folder.is_dir():
        raise DataMissing(f"{what} not found in {folder}: {how}")
    try:
        return ImageFolder(str(folder), transform=tf)
    except FileNotFoundError as exc:  # no class folders, or a class folder without images
        raise DataMissing(f"{what} not found in {folder} ({one_line(exc)}): {how}") from exc


def _with_targets(ds: ImageFolder, indices: list[int]) -> RelabelledSubset:
    """A lazy view of `ds` that keeps the dataset's labels and exposes `.targets`."""
    return RelabelledSubset(ds, indices, [ds.targets[i] for i in indices])


def split_per_class(targets: list[int], paths: list[str]) -> tuple[list[int], list[int]]:
    """The fixed 80/20 split: indices (ascending) of the train and test samples."""
    by_class: dict[int, list[int]] = {}
    for i in sorted(range(len(targets)), key=lambda i: paths[i]):
        by_class.setdefault(targets[i], []).append(i)
    train, test = [], []
    for idx in by_class.values():
        perm = np.random.RandomState(SPLIT_SEED).permutation(len(idx))
        cut = len(idx) * TRAIN_FRACTION[0] // TRAIN_FRACTION[1]
        train += [idx[j] for j in perm[:cut]]
        test += [idx[j] for j in perm[cut:]]
    return sorted(train), sorted(test)


@register_dataset("imagenet_r")
def load_imagenet_r(root: Path | None = None, download: bool = False, image_size: int = 224) -> DatasetSplits:
    root = resolve_root(root)
    folder = root / "imagenet-r"
    # --download is not offered: the tar (2 GB) has no published checksum to verify it against
    ds = _image_folder(folder, image_size, "ImageNet-R", f"download {IMAGENET_R_URL} and untar it in {root}")
    train, test = split_per_class(ds.targets, [p for p, _ in ds.samples])
    return DatasetSplits(train=_with_targets(ds, train), test=_with_targets(ds, test), class_names=class_names(ds.classes))


@register_dataset("imagenet100")
def load_imagenet100(root: Path | None = None, download: bool = False, image_size: int = 224) -> DatasetSplits:
    folder = resolve_root(root) / "imagenet100"
    how = f"put a 100-class subset of ImageNet ILSVRC-2012 there as {folder}/train/<wnid>/ and {folder}/val/<wnid>/"
    train = _image_folder(folder / "train", image_size, "ImageNet-100 train split", how)
    test = _image_folder(folder / "val", image_size, "ImageNet-100 val split", how)
    if train.classes != test.classes:
        diff = sorted(set(train.classes) ^ set(test.classes))
        raise HarnessError(f"ImageNet-100 in {folder}: train and val hold different wnids ({', '.join(diff[:5])})")
    return DatasetSplits(train=train, test=test, class_names=class_names(train.classes))  # ImageFolder has .targets


def _imagefolder(name: str, dataset: str, classes: int, tasks: int, increment: int, description: str):
    return register_protocol(
        Protocol(
            name=name, dataset=dataset, num_classes=classes, num_tasks=tasks, increment=increment,
            class_order_seed=1993, image_size=224, channels=3, noun="photo", augment="crop_flip",
            family=dataset, description=description, dataset_kwargs={"image_size": 224},
        )
    )


IMAGENET_R_10X20 = _imagefolder("imagenet_r_10x20", "imagenet_r", 200, 10, 20, "ImageNet-R, 200 classes, 10 tasks of 20")
IMAGENET100_10X10 = _imagefolder("imagenet100_10x10", "imagenet100", 100, 10, 10, "ImageNet-100, 10 tasks of 10 classes (B0 Inc10)")
