"""The shared training recipe of the supervised methods: its backbone, augmentation and schedule."""
import pytest
import torch

from harness.nn.augment import batch_augment
from harness.nn.backbones import create_backbone
from harness.nn.gradcam import last_conv_block
from harness.params import resolve_params
from harness.registry import METHODS, discover


def _pixel_positions(kind: str, padding: int) -> tuple[set[int], set[int]]:
    """Rows and columns where a single lit pixel at (row 3, col 1) of 8x8 images lands."""
    x = torch.zeros(400, 1, 8, 8)
    x[:, 0, 3, 1] = 1.0
    out = batch_augment(x, kind, padding)
    lit = out[:, 0].nonzero()
    return set(lit[:, 1].tolist()), set(lit[:, 2].tolist())


def test_crop_shifts_by_at_most_the_padding_and_flips_only_when_asked():
    torch.manual_seed(0)
    rows, cols = _pixel_positions("crop", 2)
    assert rows == {1, 2, 3, 4, 5}  # 3 +- 2: every shift occurs in 400 draws
    assert cols <= {0, 1, 2, 3}  # 1 +- 2, clipped at the border (shifted out = lost pixel)
    rows, cols = _pixel_positions("crop_flip", 1)
    assert rows == {2, 3, 4}
    assert cols & {0, 1, 2} and cols & {5, 6, 7}  # the mirror of column 1 is column 6
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(batch_augment(x, "none"), x)


def test_convnet_bn_pools_a_7x7_map_that_grad_cam_finds():
    net = create_backbone("convnet_bn", 1, 28)
    assert net.out_dim == 64 and net(torch.rand(5, 1, 28, 28)).shape == (5, 64)
    assert sum(p.numel() for p in net.parameters()) < 80_000
    layer = last_conv_block(net, torch.rand(1, 1, 28, 28))
    maps = []
    handle = layer.register_forward_hook(lambda m, i, o: maps.append(o))
    net(torch.rand(2, 1, 28, 28))
    handle.remove()
    assert maps[0].shape == (2, 64, 7, 7)


@pytest.mark.parametrize("method", ["finetune", "joint", "icarl", "lwm"])
def test_quickdraw_methods_share_the_recipe(method):
    discover(())
    hp, _ = resolve_params(METHODS.get(method), "quickdraw", [])
    assert (hp["backbone"], hp["lr_schedule"], hp["augment"], hp["crop_padding"], hp["epochs"]) == \
        ("convnet_bn", "cosine", "crop_flip", 2, 30)


@pytest.mark.parametrize("setting, expected", [("protocol", "none"), ("none", "none"), ("crop", "crop")])
def test_augment_setting_resolves_against_the_protocol(setting, expected):
    from harness.method import MethodContext
    from harness.protocol import get_protocol

    discover(())
    cls, protocol = METHODS.get("finetune"), get_protocol("quickdraw20_2x10")  # QuickDraw's own: none
    hp, _ = resolve_params(cls, protocol.family, [("finetune", "augment", setting)])
    method = cls(context=MethodContext(protocol, [str(i) for i in range(20)], torch.device("cpu"), 0, quiet=True),
                 hp=hp)
    assert method.augmentation() == expected
