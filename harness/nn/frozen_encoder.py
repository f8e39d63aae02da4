"""Frozen pretrained image encoders for methods that classify on fixed features.

`build_encoder(spec, protocol)` returns an `nn.Module` mapping images (B, C, H, W) in [0, 1]
to vectors (B, out_dim), with an `id` naming the encoder, its weights and its input
resolution (feature caches and config.json use it). Specs:

- `gmm`: exactly the image encoder of GMM's stack on this protocol (offline stack:
  EfficientNet-Lite0 at GMM's resolution, its feature map pooled to GMM's visual tokens),
  the tokens mean-pooled to one vector. Its `token_encoder` is GMM's own module, so both
  read one feature cache: in a sweep each image is encoded once for GMM and these methods.
- `timm:NAME`: any timm model, its pooled pre-logits features, at its own input size and
  normalisation; weights from `weights` (a .safetensors or torch file) or, with a network,
  timm's pretrained download (`weights="hub"`).
- `hf:NAME_OR_FOLDER`: the vision tower of a transformers CLIP or SigLIP checkpoint (a full
  model or a vision-only one), its pooled output; a hub name needs a network, a folder does not.
- `backbone`: a harness backbone (`harness.nn.backbones`, random weights): only meaningful
  after first-session training (harness.cil.frozen).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.errors import HarnessError

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class _Preprocess(nn.Module):
    """[0, 1] images of any size and 1 or 3 channels -> the encoder's size and normalisation."""

    def __init__(self, size: int, mean, std):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        return (x - self.mean) / self.std


class PooledTokens(nn.Module):
    """A token encoder (B, N, D) mean-pooled over its N tokens."""

    def __init__(self, token_encoder: nn.Module):
        super().__init__()
        self.token_encoder = token_encoder
        self.out_dim = token_encoder.out_dim
        self.id = f"{token_encoder.id}-mean"

    @staticmethod
    def pool(tokens: Tensor) -> Tensor:
        return tokens.float().mean(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.token_encoder(x))


class TimmFeatures(nn.Module):
    def __init__(self, name: str, weights: str = ""):
        super().__init__()
        import timm

        hub = weights == "hub"
        try:
            self.net = timm.create_model(name, pretrained=hub, num_classes=0)
        except RuntimeError as exc:  # timm: unknown model
            raise HarnessError(f"encoder timm:{name}: {exc}") from None
        if weights and not hub:
            self.net.load_state_dict(_read_weights(weights), strict=False)
        elif not hub:
            raise HarnessError(f"encoder timm:{name} needs weights: a local file (encoder_weights=PATH) or, with a "
                               "network, encoder_weights=hub")
        cfg = self.net.pretrained_cfg
        self.pre = _Preprocess(cfg.get("input_size", (3, 224, 224))[-1], cfg.get("mean", CLIP_MEAN),
                               cfg.get("std", CLIP_STD))
        self.out_dim = self.net.num_features
        self.id = f"timm-{name}-{_weights_tag(weights)}-{self.pre.size}px"

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.pre(x))


class HFVisionFeatures(nn.Module):
    """The pooled output of a CLIP / SigLIP vision tower (never trust_remote_code)."""

    def __init__(self, name: str):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=False)
            model = AutoModel.from_pretrained(name, trust_remote_code=False, dtype=torch.float32)
        except OSError as exc:
            raise HarnessError(f"encoder hf:{name}: cannot load it ({exc.__class__.__name__}: "
                               f"{str(exc).splitlines()[0]}); give a local folder where there is no network") from None
        vision = getattr(model, "vision_model", model)
        vcfg = getattr(config, "vision_config", config)
        if not hasattr(vcfg, "image_size"):
            raise HarnessError(f"encoder hf:{name}: {type(model).__name__} has no vision tower (CLIP or SigLIP expected)")
        mean, std = CLIP_MEAN, CLIP_STD
        if "siglip" in config.model_type:
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        self.vision, self.pre = vision, _Preprocess(vcfg.image_size, mean, std)
        self.out_dim = vcfg.hidden_size
        self.id = f"hf-{Path(name).name if Path(name).exists() else name.replace('/', '--')}-{vcfg.image_size}px"

    def forward(self, x: Tensor) -> Tensor:
        return self.vision(pixel_values=self.pre(x)).pooler_output


def _read_weights(path: str) -> dict[str, Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise HarnessError(f"encoder weights {p} do not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    state = torch.load(p, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _weights_tag(weights: str) -> str:
    if weights in ("", "hub"):
        return weights or "random"
    digest = hashlib.sha256(Path(weights).expanduser().read_bytes()).hexdigest()[:12]
    return f"w{digest}"


def gmm_token_encoder(protocol) -> nn.Module:
    """The image encoder GMM's default settings build on this protocol (shared feature cache)."""
    from harness.params import resolve_params
    from harness.registry import METHODS
    from harness.nn.vlm.image_encoders import EfficientNetTokens

    hp, _ = resolve_params(METHODS.get("gmm"), protocol.family)
    if hp["model"] != "offline":
        raise HarnessError(f"encoder=gmm follows GMM's offline stack; GMM's default here is {hp['model']}: "
                           "use encoder=hf:<its vision tower>")
    return EfficientNetTokens(protocol.channels, hp["visual_tokens"], hp["image_size"])


def build_encoder(spec: str, protocol, weights: str = "", backbone: str = "convnet_bn") -> nn.Module:
    """The encoder a spec names (see the module docstring); it has `out_dim` and `id`."""
    kind, _, name = spec.partition(":")
    if kind == "gmm" and not name:
        return PooledTokens(gmm_token_encoder(protocol))
    if kind == "timm" and name:
        return TimmFeatures(name, weights)
    if kind == "hf" and name:
        return HFVisionFeatures(name)
    if kind == "backbone" and not name:
        from harness.nn.backbones import create_backbone

        net = create_backbone(backbone, protocol.channels, protocol.image_size)
        net.id = f"backbone-{backbone}"
        return net
    raise HarnessError(f"encoder={spec!r}: expected gmm, backbone, timm:<model name> or hf:<hub name or folder>")
