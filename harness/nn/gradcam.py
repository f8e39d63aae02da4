"""Grad-CAM (Selvaraju et al. 2017) as a building block for attention-based methods.

A class's Grad-CAM map at a convolutional layer with output A (B, C, h, w) is
ReLU(sum_c w_c A_c), with w_c the spatial mean of d(score)/d(A_c). The feature map is
captured with a forward hook, so any backbone works without a `feature_map()` method:
`last_conv_block` finds the layer by running the model once.

    layer = last_conv_block(model, x[:1])
    cams, logits = grad_cam(model, x, class_idx, layer, create_graph=True)
    loss = attention_distance(cams, old_cams)   # trains `model` through its map
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError


class FeatureMapHook:
    """Context manager keeping the output of `layer` from the forward passes run inside it.

    For a frozen model (no parameter needs a gradient) the output is replaced by a leaf
    that requires grad, so its Grad-CAM can still be computed; values are unchanged.
    """

    def __init__(self, layer: nn.Module):
        self.layer, self.output, self._handle = layer, None, None

    def _hook(self, module, inputs, output):
        if torch.is_grad_enabled() and not output.requires_grad:
            output = output.detach().requires_grad_(True)
        self.output = output
        return output

    def __enter__(self) -> "FeatureMapHook":
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


@torch.no_grad()
def last_conv_block(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The last module, in execution order, whose output is a spatial map (B, C, h, w), h*w > 1.

    For the harness backbones: ConvNet's last max-pool (7x7 on 28 px), CifarResNet's
    last residual stage, torchvision ResNet's layer4, EfficientNet-Lite0's last BN+act.
    """
    found: list[nn.Module] = []
    handles = [
        m.register_forward_hook(
            lambda mod, i, o: found.append(mod) if torch.is_tensor(o) and o.dim() == 4 and o.shape[2] * o.shape[3] > 1 else None
        )
        for m in model.modules()
    ]
    was_training = model.training
    model.eval()  # no batch-norm statistics updated by the probe
    try:
        model(example[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if not found:
        raise HarnessError(f"{type(model).__name__} has no convolutional feature map for Grad-CAM")
    return found[-1]


def cam_from(feature_map: torch.Tensor, scores: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Grad-CAM maps (B, h, w) from a feature map and the per-sample class scores (B,) it produced.

    Samples are independent after the feature map (no batch-norm follows it in our
    backbones), so one gradient of the summed scores gives every sample's weights.
    With create_graph=True the maps stay differentiable in the model's parameters.
    """
    (grads,) = torch.autograd.grad(scores.sum(), feature_map, create_graph=create_graph, retain_graph=create_graph)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * feature_map).sum(dim=1))


def grad_cam(model: nn.Module, x: torch.Tensor, class_idx: torch.Tensor | None = None, layer: nn.Module | None = None,
             create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(Grad-CAM maps (B, h, w) of class class_idx[i] for sample i at `layer`, the model's logits).

    class_idx=None takes each sample's top class; layer=None the last convolutional block.
    """
    layer = layer if layer is not None else last_conv_block(model, x)
    with torch.enable_grad(), FeatureMapHook(layer) as hook:
        logits = model(x)
        idx = logits.argmax(1) if class_idx is None else class_idx.to(logits.device)
        scores = logits.gather(1, idx.view(-1, 1)).squeeze(1)
        cams = cam_from(hook.output, scores, create_graph)
    return cams, logits


def attention_distance(cams_a: torch.Tensor, cams_b: torch.Tensor) -> torch.Tensor:
    """LwM's L_AD: L1 distance of the vectorised, L2-normalised maps; batch mean."""
    a = F.normalize(cams_a.flatten(1), p=2, dim=1)
    b = F.normalize(cams_b.flatten(1), p=2, dim=1)
    return (a - b).abs().sum(dim=1).mean()


def attention_figure(old_model: nn.Module, new_model: nn.Module, x: torch.Tensor, path: str | Path | None = None,
                     n_old_classes: int | None = None, titles: tuple[str, str] = ("previous model", "current model")):
    """A figure of images (row 1) and the two models' Grad-CAM maps (rows 2-3) for the old model's top class.

    The class is the old model's argmax (over its first n_old_classes outputs if given),
    as in LwM. Returns the matplotlib Figure; saved to `path` when given.
    """
    import matplotlib.pyplot as plt

    old_model.eval()
    new_model.eval()
    with torch.no_grad():
        logits = old_model(x)
    cls = logits[:, : n_old_classes or logits.shape[1]].argmax(1)
    maps = [grad_cam(m, x, cls)[0].detach().cpu() for m in (old_model, new_model)]
    n = len(x)
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5), squeeze=False)
    size = x.shape[-2:]
    for j in range(n):
        img = x[j].detach().cpu()
        axes[0][j].imshow(img.permute(1, 2, 0).squeeze(-1), cmap="gray")
        axes[0][j].set_title(f"class {int(cls[j])}", fontsize=8)
        for row, m in enumerate(maps, start=1):
            up = F.interpolate(m[j][None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            axes[row][j].imshow(img.mean(0), cmap="gray")
            axes[row][j].imshow(up, cmap="jet", alpha=0.5)
    for row, title in enumerate(titles, start=1):
        axes[row][0].set_ylabel(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
