"""Dataset loaders on tiny fixtures written in the real on-disk formats.

CIFAR-100: pickles shaped like the official Python-2 files (keys are Python 2 byte
strings, which torchvision reads back with encoding="latin1"). ImageNet-R and
ImageNet-100: wnid folders of small PNGs. Fashion-MNIST: gzipped idx files.
"""
from __future__ import annotations

import dataclasses
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

import protocols.cifar100 as cifar100
import protocols.fmnist as fmnist
import protocols.imagefolder as imagefolder
from harness.data import ImageTensorDataset, prepare
from harness.errors import DataMissing, HarnessError
from harness.protocol import get_protocol

# ---------------------------------------------------------------- CIFAR-100


class _Py2Pickler(pickle._Pickler):
    """Writes str as Python 2 `str` (SHORT_BINSTRING / BINSTRING), as in the real CIFAR files."""

    def save_str(self, obj: str) -> None:
        raw = obj.encode("latin1")
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, str: save_str}


def _py2_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


FINE = ["apple", "aquarium_fish", "baby", "bear", "beaver", "bed"]
TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 2


def _cifar_batch(name: str, per_class: int, seed: int) -> dict:
    rng = np.random.RandomState(seed)
    labels = [c for _ in range(per_class) for c in range(len(FINE))]  # interleaved, as the real files are
    return {
        "batch_label": f"{name} batch 1 of 1",
        "fine_labels": labels,
        "coarse_labels": [c // 2 for c in labels],
        "data": rng.randint(0, 256, size=(len(labels), 3072), dtype=np.uint8),
        "filenames": [f"img_{i}.png" for i in range(len(labels))],
    }


@pytest.fixture
def cifar_root(tmp_path: Path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    batches = {"train": _cifar_batch("training", TRAIN_PER_CLASS, 0), "test": _cifar_batch("testing", TEST_PER_CLASS, 1)}
    for name, batch in batches.items():
        _py2_pickle(folder / name, batch)
    _py2_pickle(folder / "meta", {"fine_label_names": FINE, "coarse_label_names": ["a", "b", "c"]})
    return tmp_path, batches


def test_cifar_fixture_has_python2_string_keys(cifar_root):
    root, _ = cifar_root
    with open(root / "cifar-100-python" / "meta", "rb") as f:
        assert pickle.load(f, encoding="bytes")[b"fine_label_names"][0] == b"apple"


def test_cifar100_round_trip(cifar_root):
    root, batches = cifar_root
    splits = cifar100.load_cifar100(root=root)
    assert splits.class_names == FINE
    for ds, batch in ((splits.train, batches["train"]), (splits.test, batches["test"])):
        assert isinstance(ds, ImageTensorDataset)
        n = len(batch["fine_labels"])
        assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.uint8
        assert ds.targets == batch["fine_labels"]
        # each row is 1024 red, then green, then blue values, row-major: that is CHW
        assert torch.equal(ds.images, torch.from_numpy(batch["data"].reshape(n, 3, 32, 32)))
    x, y = splits.train[4]
    assert x.dtype == torch.float32 and float(x.max()) <= 1.0 and y == batches["train"]["fine_labels"][4]


def test_cifar100_prepare_relabels_in_arrival_order(cifar_root):
    root, batches = cifar_root
    proto = dataclasses.replace(get_protocol("cifar100_10x10"), num_classes=4, num_tasks=2, increment=2)
    data = prepare(proto, data_root=root)
    order = np.random.RandomState(1993).permutation(len(FINE))[:4].tolist()
    assert data.source_classes == order
    assert data.class_names == [FINE[c] for c in order]
    assert data.task_classes() == [[0, 1], [2, 3]]
    for ds, batch, per_class in ((data.train, batches["train"], TRAIN_PER_CLASS), (data.test, batches["test"], TEST_PER_CLASS)):
        assert sorted(ds.targets) == sorted(list(range(4)) * per_class)
        src = np.asarray(batch["fine_labels"])
        for k, source in enumerate(order):  # label k holds exactly the images of source class order[k]
            expected = torch.from_numpy(batch["data"][src == source].reshape(-1, 3, 32, 32))
            got = ds.images[torch.tensor(ds.targets) == k]
            assert torch.equal(got, expected)


def test_cifar100_few_shot_caps_later_classes(cifar_root):
    root, _ = cifar_root
    proto = dataclasses.replace(get_protocol("cifar100_fscil"), num_classes=5, base_classes=3, increment=1, num_tasks=3, shots=1)
    data = prepare(proto, data_root=root)
    counts = np.bincount(data.train.targets, minlength=5).tolist()
    assert counts == [TRAIN_PER_CLASS] * 3 + [1, 1]
    assert np.bincount(data.test.targets).tolist() == [TEST_PER_CLASS] * 5  # tests are never capped


def test_cifar100_missing_names_folder_and_source(tmp_path):
    with pytest.raises(DataMissing) as err:
        cifar100.load_cifar100(root=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "cifar-100-python") in msg and "cifar-100-python.tar.gz" in msg and "--download" in msg


def test_cifar100_missing_meta_is_named(cifar_root):
    root, _ = cifar_root
    (root / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DataMissing, match="no meta"):
        cifar100.load_cifar100(root=root)


def test_cifar100_failed_download_is_one_line(tmp_path, monkeypatch):
    calls = []

    def offline(url, root, filename, md5):
        calls.append((url, root, md5))
        raise OSError("[Errno 101] Network is unreachable\n(second line)")

    monkeypatch.setattr(cifar100, "download_and_extract_archive", offline)
    with pytest.raises(DataMissing) as err:
        cifar100.load_cifar100(root=tmp_path / "new", download=True)
    assert calls and calls[0][2] == cifar100.CIFAR100.tgz_md5  # the download is md5-verified
    msg = str(err.value)
    assert "\n" not in msg and "download failed" in msg and "Network is unreachable" in msg


def test_cifar100_download_skipped_when_present(cifar_root, monkeypatch):
    root, _ = cifar_root
    monkeypatch.setattr(cifar100, "download_and_extract_archive", lambda *a, **k: pytest.fail("downloaded again"))
    assert len(cifar100.load_cifar100(root=root, download=True).train) == len(FINE) * TRAIN_PER_CLASS


def test_cifar100_protocols():
    shapes = {
        "cifar100_10x10": [10] * 10,
        "cifar100_20x5": [5] * 20,
        "cifar100_b50_5x10": [50] + [10] * 5,
        "cifar100_fscil": [60] + [5] * 8,
    }
    for name, per_task in shapes.items():
        p = get_protocol(name)
        assert p.classes_per_task() == per_task and p.num_classes == 100
        assert (p.dataset, p.family, p.image_size, p.channels, p.augment, p.class_order_seed) == ("cifar100", "cifar100", 32, 3, "crop_flip", 1993)
    assert get_protocol("cifar100_fscil").shots == 5


# ---------------------------------------------------------------- ImageNet-R / ImageNet-100

WNIDS = {"n01443537": "goldfish", "n01484850": "great white shark", "n01494475": "hammerhead"}
UNKNOWN_WNID = "n99999999"  # in no synset list: its name falls back to the wnid


def _color(c: int, j: int) -> tuple[int, int, int]:
    return (40 * c + 10, 20 * j + 5, 123)  # identifies class and file in every pixel


def _write_wnid_folders(folder: Path, wnids: list[str], per_class: int) -> None:
    for c, wnid in enumerate(wnids):
        (folder / wnid).mkdir(parents=True)
        for j in range(per_class):
            Image.new("RGB", (12, 10), _color(c, j)).save(folder / wnid / f"img_{j:02d}.png")


def _pixel(x: torch.Tensor) -> tuple[int, int, int]:
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    flat = (x * 255).round().to(torch.int64).view(3, -1)
    assert bool((flat == flat[:, :1]).all())  # solid colour survives resize and crop
    return tuple(flat[:, 0].tolist())


@pytest.fixture
def imagenet_r_root(tmp_path: Path):
    _write_wnid_folders(tmp_path / "imagenet-r", [*WNIDS, UNKNOWN_WNID], per_class=10)
    return tmp_path


def test_imagenet_r_split_is_fixed_disjoint_and_80_20(imagenet_r_root):
    splits = imagefolder.load_imagenet_r(root=imagenet_r_root, image_size=8)
    assert splits.class_names == [*WNIDS.values(), UNKNOWN_WNID]
    train, test = splits.train, splits.test
    assert isinstance(train.base, ImageFolder) and not getattr(train, "in_memory", False)  # file-backed
    assert set(train.indices).isdisjoint(test.indices) and sorted(train.indices + test.indices) == list(range(40))
    assert np.bincount(train.targets).tolist() == [8] * 4 and np.bincount(test.targets).tolist() == [2] * 4
    # the documented rule: sorted file names, RandomState(1993).permutation, first 80% train
    perm = np.random.RandomState(1993).permutation(10)
    expected_train_files = {f"img_{j:02d}.png" for j in perm[:8]}
    for c in range(4):
        files = {Path(train.base.samples[i][0]).name for i, t in zip(train.indices, train.targets) if t == c}
        assert files == expected_train_files
    again = imagefolder.load_imagenet_r(root=imagenet_r_root, image_size=8)
    assert again.train.indices == train.indices and again.test.indices == test.indices


def test_imagenet_r_items_round_trip(imagenet_r_root):
    splits = imagefolder.load_imagenet_r(root=imagenet_r_root, image_size=8)
    for ds in (splits.train, splits.test):
        for i in range(len(ds)):
            x, y = ds[i]
            j = int(Path(ds.base.samples[ds.indices[i]][0]).stem.split("_")[1])
            assert _pixel(x) == _color(y, j)


def test_imagenet_r_prepare_relabels(imagenet_r_root):
    proto = dataclasses.replace(get_protocol("imagenet_r_10x20"), num_classes=2, num_tasks=2, increment=1, dataset_kwargs={"image_size": 8})
    data = prepare(proto, data_root=imagenet_r_root)
    order = np.random.RandomState(1993).permutation(4)[:2].tolist()
    assert data.source_classes == order
    assert data.class_names == [[*WNIDS.values(), UNKNOWN_WNID][c] for c in order]
    assert sorted(data.train.targets) == [0] * 8 + [1] * 8 and sorted(data.test.targets) == [0] * 2 + [1] * 2
    for k in range(2):
        idx = data.train.targets.index(k)
        x, y = data.train[idx]
        assert y == k and _pixel(x)[0] == _color(order[k], 0)[0]


def test_imagenet_r_missing(tmp_path):
    with pytest.raises(DataMissing) as err:
        imagefolder.load_imagenet_r(root=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "imagenet-r") in msg and imagefolder.IMAGENET_R_URL in msg
    (tmp_path / "imagenet-r").mkdir()  # present but empty: still missing, not a traceback
    with pytest.raises(DataMissing, match="imagenet-r"):
        imagefolder.load_imagenet_r(root=tmp_path)


def test_imagenet100_layout(tmp_path):
    wnids = ["n01443537", "n02012849", "n03126707"]  # the two "crane"s need telling apart
    _write_wnid_folders(tmp_path / "imagenet100" / "train", wnids, per_class=3)
    _write_wnid_folders(tmp_path / "imagenet100" / "val", wnids, per_class=2)
    splits = imagefolder.load_imagenet100(root=tmp_path, image_size=8)
    assert splits.class_names == ["goldfish", "crane (n02012849)", "crane (n03126707)"]
    assert splits.train.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2] and splits.test.targets == [0, 0, 1, 1, 2, 2]
    assert _pixel(splits.test[3][0]) == _color(1, 1)
    proto = dataclasses.replace(get_protocol("imagenet100_10x10"), num_classes=2, num_tasks=2, increment=1, dataset_kwargs={"image_size": 8})
    data = prepare(proto, data_root=tmp_path)
    assert len(data.train) == 6 and len(data.test) == 4 and data.class_names == [splits.class_names[c] for c in data.source_classes]


def test_imagenet100_missing_and_mismatched(tmp_path):
    with pytest.raises(DataMissing) as err:
        imagefolder.load_imagenet100(root=tmp_path)
    assert str(tmp_path / "imagenet100" / "train") in str(err.value) and "ILSVRC-2012" in str(err.value)
    _write_wnid_folders(tmp_path / "imagenet100" / "train", ["n01443537", "n01484850"], per_class=1)
    _write_wnid_folders(tmp_path / "imagenet100" / "val", ["n01443537"], per_class=1)
    with pytest.raises(HarnessError, match="n01484850"):
        imagefolder.load_imagenet100(root=tmp_path)


def test_imagefolder_protocols():
    r, i100 = get_protocol("imagenet_r_10x20"), get_protocol("imagenet100_10x10")
    assert r.classes_per_task() == [20] * 10 and (r.dataset, r.family, r.image_size) == ("imagenet_r", "imagenet_r", 224)
    assert i100.classes_per_task() == [10] * 10 and (i100.dataset, i100.family, i100.image_size) == ("imagenet100", "imagenet100", 224)


# ---------------------------------------------------------------- Fashion-MNIST


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fmnist_root(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(fmnist, "DEBIAN_DIR", tmp_path / "no-debian")  # the real package may be installed
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    rng = np.random.RandomState(0)
    arrays = {}
    for prefix, n in (("train", 30), ("t10k", 20)):
        images = rng.randint(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        arrays[prefix] = (images, labels)
    return tmp_path, arrays


def test_fmnist_round_trip(fmnist_root):
    root, arrays = fmnist_root
    splits = fmnist.load_fmnist(root=root)
    assert splits.class_names[0] == "T-shirt/top" and splits.class_names[9] == "Ankle boot" and len(splits.class_names) == 10
    for ds, prefix in ((splits.train, "train"), (splits.test, "t10k")):
        images, labels = arrays[prefix]
        assert ds.images.shape == (len(labels), 1, 28, 28) and ds.images.dtype == torch.uint8
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images)) and ds.targets == labels.tolist()


def test_fmnist_prepare_full_protocol(fmnist_root):
    root, _ = fmnist_root
    data = prepare(get_protocol("fmnist_5x2"), data_root=root)
    assert data.task_classes() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert data.source_classes == np.random.RandomState(1993).permutation(10).tolist()
    assert np.bincount(data.train.targets).tolist() == [3] * 10 and np.bincount(data.test.targets).tolist() == [2] * 10


def test_fmnist_missing_and_corrupt(fmnist_root):
    root, _ = fmnist_root
    with pytest.raises(DataMissing) as err:
        fmnist.load_fmnist(root=root / "elsewhere")
    msg = str(err.value)
    assert str(root / "elsewhere" / "fashion-mnist") in msg and "apt-get install dataset-fashion-mnist" in msg
    _write_idx(root / "fashion-mnist" / "train-labels-idx1-ubyte.gz", np.zeros((30, 2), np.uint8))  # 2-d: wrong kind
    with pytest.raises(DataMissing, match="idx"):
        fmnist.load_fmnist(root=root)


@pytest.mark.skipif(not fmnist.DEBIAN_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_fmnist_real_debian_files():
    splits = fmnist.load_fmnist()
    assert splits.train.images.shape == (60000, 1, 28, 28) and splits.test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(splits.train.targets).tolist() == [6000] * 10 and np.bincount(splits.test.targets).tolist() == [1000] * 10
