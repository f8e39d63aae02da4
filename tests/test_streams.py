"""Protocol data preparation and Avalanche stream construction."""
import dataclasses

import numpy as np
import pytest
import torch

import protocols.quickdraw as qd
from harness import data as data_mod
from harness.errors import HarnessError
from harness.protocol import Protocol
from harness.streams import build_benchmark


@pytest.fixture(scope="module")
def splits():
    return qd.load_quickdraw()


def test_quickdraw_bundle_split(splits):
    assert len(splits.class_names) == 345 and splits.class_names[0] == "The Eiffel Tower"
    # sorted() of the file names: "baseball bat.ndjson.gz" sorts before "baseball.ndjson.gz"
    files = sorted(n + ".ndjson.gz" for n in splits.class_names)
    assert [f[: -len(".ndjson.gz")] for f in files] == splits.class_names
    assert len(splits.train) == 345 * 80 and len(splits.test) == 345 * 20
    x, y = splits.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    # class c's training doodles are its first 80 (file order), the test ones its last 20
    assert splits.train.targets[:80] == [0] * 80 and splits.test.targets[20:40] == [1] * 20


def test_class_order_is_the_seeded_permutation(splits):
    data = data_mod.prepare(qd.QUICKDRAW100_10X10, splits=splits)
    expected = np.random.RandomState(1993).permutation(345)[:100].tolist()
    assert data.source_classes == expected
    assert data.class_names[:3] == [splits.class_names[i] for i in expected[:3]]
    assert data.class_names[0] == "parachute"
    # relabelled: the k-th class to arrive has label k; the images are that class's images
    first = [i for i, t in enumerate(data.train.targets) if t == 0]
    assert len(first) == 80
    assert torch.equal(data.train.images[first[0]], splits.train.images[expected[0] * 80])


def test_benchmark_experiences_hold_their_task_classes(splits):
    data = data_mod.prepare(qd.QUICKDRAW40_4X10, splits=splits)
    bm = build_benchmark(data)
    assert len(bm.train_stream) == 4 and len(bm.test_stream) == 4
    for t, (tr, te) in enumerate(zip(bm.train_stream, bm.test_stream)):
        classes = list(range(10 * t, 10 * t + 10))
        assert sorted(tr.classes_in_this_experience) == classes
        assert sorted(set(tr.dataset.targets)) == classes and len(tr.dataset) == 800
        assert sorted(set(te.dataset.targets)) == classes and len(te.dataset) == 200


def test_base_task_and_few_shot(splits):
    p = Protocol(name="t_fscil", dataset="quickdraw", num_classes=20, num_tasks=3, base_classes=10,
                 increment=5, shots=3, image_size=28, channels=1)
    p.validate()
    data = data_mod.prepare(p, splits=splits)
    bm = build_benchmark(data)
    sizes = [len(e.dataset) for e in bm.train_stream]
    assert sizes == [10 * 80, 5 * 3, 5 * 3]
    assert [len(e.dataset) for e in bm.test_stream] == [200, 100, 100]


def test_max_train_per_class_caps_every_class(splits):
    data = data_mod.prepare(qd.QUICKDRAW20_2X10, splits=splits, max_train_per_class=7)
    assert np.bincount(data.train.targets).tolist() == [7] * 20
    assert len(data.test) == 20 * 20


def test_protocol_numbers_must_add_up():
    bad = Protocol(name="bad", dataset="quickdraw", num_classes=50, num_tasks=4, increment=10)
    with pytest.raises(HarnessError, match="10 \\+ 3 x 10 = 40 classes, but num_classes is 50"):
        bad.validate()


def test_explicit_class_order_by_name(splits):
    p = dataclasses.replace(qd.QUICKDRAW20_2X10, name="named", num_classes=4, num_tasks=2, increment=2,
                            class_order=["cat", "dog", "apple", "zebra"])
    data = data_mod.prepare(p, splits=splits)
    assert data.class_names == ["cat", "dog", "apple", "zebra"]
    with pytest.raises(HarnessError, match="not in dataset"):
        data_mod.prepare(dataclasses.replace(p, class_order=["cat", "dog", "apple", "unicorn!"]), splits=splits)
