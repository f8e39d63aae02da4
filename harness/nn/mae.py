"""A Vision Transformer that classifies and reconstructs masked images (MAE), with the
bilateral branch of MAE-CIL (Zhai et al., ICCV 2023). Used by methods/mae_cil.py.

Everything works on patch sequences: an image (B, C, H, W) becomes (B, N, P*P*C) with
`patchify`, so stored exemplars (a subset of patches and their positions) go through
the same encoder as whole images.

- encode(patches, positions): linear patch embedding + learned position embedding,
  a class token, pre-norm Transformer blocks (torch's TransformerEncoderLayer).
  Returns the deep tokens (last block) and the shallow tokens (block `shallow_block`).
- features(x): the deep class token; with the bilateral part, plus an MLP of the deep and
  shallow class tokens (the embedding-level fusion; its last layer starts at zero, so it
  starts as the identity; the reference code replaces the token by the MLP, see the README).
- reconstruct(patches, positions): the decoder (one block of the encoder's width, as the
  reference code) fills the missing patches from the deep tokens; with the bilateral part,
  the shallow tokens go through the same decoder and their image, high-pass filtered with
  an FFT, is added (image level). With `refine_layers` (ours), a few convolutions over that
  image with the known patches pasted in add a correction (PixelRefiner).

The shallow tokens follow the reference code (docs/methods.md): the first fifth of the
channels after block `shallow_block`, detached, widened back by a linear layer; so the
shallow branch trains its own layers and the decoder, never the encoder.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from avalanche.models import IncrementalClassifier
from torch import Tensor, nn

from harness.nn.backbones import resize_incremental_head


def patchify(x: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, N, P*P*C), patches in row-major order."""
    b, c, h, w = x.shape
    g, k = h // patch, w // patch
    x = x.reshape(b, c, g, patch, k, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, g * k, patch * patch * c)


def unpatchify(p: Tensor, patch: int, channels: int) -> Tensor:
    """Inverse of patchify for square images."""
    b, n, _ = p.shape
    g = math.isqrt(n)
    x = p.reshape(b, g, g, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, g * patch, g * patch)


def high_pass(x: Tensor, radius: float) -> Tensor:
    """Remove spatial frequencies within `radius` (in frequency bins) of zero, via the 2-D FFT.

    A constant image is pure zero frequency, so it maps to zeros.
    """
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h, device=x.device) * h
    fx = torch.fft.fftfreq(w, device=x.device) * w
    keep = (fy[:, None] ** 2 + fx[None, :] ** 2) > radius ** 2
    return torch.fft.ifft2(torch.fft.fft2(x.float()) * keep).real.to(x.dtype)


def soft_threshold(x: Tensor, threshold: float) -> Tensor:
    """max(0, x - t) / (1 - t): values under `t` become 0, the rest keep their order and reach 1 at 1.

    An MSE decoder paints the expected value where it is unsure, a faint haze; on images of ink
    on an empty background this takes the haze out and keeps the strokes it is sure of.
    """
    if threshold <= 0:
        return x
    return (x - threshold).clamp_min(0) / (1 - threshold)


def random_keep(batch: int, n: int, keep: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """(batch, keep) positions of the patches each sample keeps (MAE's random masking), sorted."""
    noise = torch.rand(batch, n, generator=generator, device=device)
    return noise.argsort(1)[:, :keep].sort(1).values


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    return nn.ModuleList(
        nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=0.0, activation="gelu",
                                   batch_first=True, norm_first=True)
        for _ in range(depth)
    )


class GPSABlock(nn.Module):
    """A pre-norm Transformer block whose attention is ConViT's gated positional self-attention
    (d'Ascoli et al., 2021; the encoder of MAE-CIL's reference code): each head mixes content
    attention with a positional attention softmax(w_h . (dx, dy, dx^2 + dy^2)), by a learned
    gate sigmoid(g_h). Initialised local, each head attends around its own offset of a
    sqrt(heads) x sqrt(heads) grid, like a convolution, and may learn to look further: the
    inductive bias a ViT lacks on a few hundred images.

    Our adaptation to a class token present from the first block (ConViT adds it after its
    local blocks; MAE-CIL's shallow branch reads it at block 2): the class token attends by
    content only, and patch tokens' positional attention covers patches, not the class token.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, locality_strength: float = 1.0):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qk = nn.Linear(dim, 2 * dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(3, heads)
        self.gate = nn.Parameter(torch.ones(heads))  # sigmoid(1) = 0.73 positional at the start
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))
        kernel = max(1, math.isqrt(heads))
        center = (kernel - 1) / 2
        with torch.no_grad():  # score -|(dx, dy) - o_h|^2 + const: head h attends around o_h = (h % k - c, h // k - c)
            self.pos_proj.weight.zero_()
            self.pos_proj.bias.zero_()
            for h in range(min(heads, kernel * kernel)):
                self.pos_proj.weight[h] = torch.tensor([2 * (h % kernel - center), 2 * (h // kernel - center), -1.0])
            self.pos_proj.weight.mul_(locality_strength)

    def forward(self, t: Tensor, rel: Tensor) -> Tensor:
        """t: (B, 1 + n, D), class token first; rel: (B, n, n, 3) relative positions of the patches."""
        b, length, d = t.shape
        h = self.norm1(t)
        q, k = self.qk(h).reshape(b, length, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        v = self.v(h).reshape(b, length, self.heads, d // self.heads).transpose(1, 2)
        content = (q @ k.transpose(-2, -1) * self.scale).softmax(-1)  # (B, H, L, L)
        positional = F.pad(self.pos_proj(rel).permute(0, 3, 1, 2).softmax(-1), (1, 0))  # (B, H, n, L), class key 0
        gate = torch.sigmoid(self.gate).view(1, -1, 1, 1)
        attn = torch.cat([content[:, :, :1], (1 - gate) * content[:, :, 1:] + gate * positional], 2)
        t = t + self.proj((attn @ v).transpose(1, 2).reshape(b, length, d))
        return t + self.mlp(self.norm2(t))


class PixelRefiner(nn.Module):
    """Our addition (`mae_cil.refine_layers`): dilated 3x3 convolutions over the decoded image with
    the known patches pasted in, plus the keep mask, adding a correction to the decoded image.

    The decoder paints each patch by a linear layer from its token, blind to the exact pixels
    where a visible stroke meets the patch's border; these layers see across patch borders
    (2 x layers px each side) and can continue a stroke. The last layer
    starts at zero: the refiner starts as the identity.
    """

    def __init__(self, channels: int, width: int, layers: int):
        super().__init__()
        body = [nn.Conv2d(channels * 2 + 1, width, 3, padding=1), nn.GELU()]
        for _ in range(layers - 1):
            body += [nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.GELU()]
        self.net = nn.Sequential(*body, nn.Conv2d(width, channels, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, pasted: Tensor, kept: Tensor) -> Tensor:
        """pasted: the decoded image with the known patches put back; kept: 1 on known pixels."""
        return self.net(torch.cat([pasted, pasted * kept, kept[:, :1]], 1))


def relative_positions(grid: int) -> Tensor:
    """(n, n, 3) float: (dx, dy, dx^2 + dy^2) from patch i to patch j of a grid x grid image."""
    idx = torch.arange(grid * grid)
    x, y = (idx % grid).float(), (idx // grid).float()
    dx, dy = x[None, :] - x[:, None], y[None, :] - y[:, None]
    return torch.stack([dx, dy, dx ** 2 + dy ** 2], -1)


class MaskedViT(nn.Module):
    def __init__(self, *, channels: int, image_size: int, patch: int, dim: int, depth: int, heads: int,
                 decoder_dim: int = 0, decoder_depth: int = 1, shallow_block: int = 2, bilateral: bool = True,
                 mlp_ratio: float = 2.0, high_pass_radius: float = 2.0, shallow_share: float = 0.2,
                 attention: str = "plain", refine_layers: int = 0, refine_width: int = 32):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"patch size {patch} does not divide the image size {image_size}")
        if not 1 <= shallow_block < depth:
            raise ValueError(f"shallow_block must lie in [1, {depth - 1}]")
        decoder_dim = decoder_dim or dim  # 0: the encoder's width, as the reference code
        self.channels, self.patch, self.bilateral = channels, patch, bilateral
        self.num_patches = (image_size // patch) ** 2
        self.patch_dim = patch * patch * channels
        self.shallow_block, self.high_pass_radius = shallow_block, high_pass_radius

        self.embed = nn.Linear(self.patch_dim, dim)
        self.pos = nn.Parameter(torch.randn(1, self.num_patches, dim) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        if attention not in ("plain", "gpsa"):
            raise ValueError(f"attention must be plain or gpsa, not {attention!r}")
        self.gpsa = attention == "gpsa"
        self.blocks = nn.ModuleList(GPSABlock(dim, heads, mlp_ratio) for _ in range(depth)) if self.gpsa else \
            _blocks(dim, depth, heads, mlp_ratio)
        if self.gpsa:  # the patches' relative positions, which GPSA's positional attention reads
            self.register_buffer("rel", relative_positions(image_size // patch), persistent=False)
        self.norm = nn.LayerNorm(dim)
        if bilateral:
            self.shallow_width = max(1, round(dim * shallow_share))
            self.shallow_expand = nn.Linear(self.shallow_width, dim)
            self.fuse = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU(),
                                      nn.Linear(dim, dim))
            nn.init.zeros_(self.fuse[-1].weight)  # the fusion starts as the identity: deep token + 0
            nn.init.zeros_(self.fuse[-1].bias)
        self.head = IncrementalClassifier(dim, initial_out_features=1)

        self.dec_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.dec_pos = nn.Parameter(torch.randn(1, self.num_patches + 1, decoder_dim) * 0.02)
        dec_heads = heads if decoder_dim % heads == 0 else 1
        self.dec_blocks = _blocks(decoder_dim, decoder_depth, dec_heads, mlp_ratio)
        self.dec_norm = nn.LayerNorm(decoder_dim)
        self.dec_pred = nn.Linear(decoder_dim, self.patch_dim)
        self.refine = PixelRefiner(channels, refine_width, refine_layers) if refine_layers else None

    # ---- encoder -----------------------------------------------------------------------
    def encode(self, patches: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Deep and shallow tokens (class token first) of the given patches at their positions."""
        pos = self.pos.expand(len(patches), -1, -1)
        if positions is not None:
            pos = pos.gather(1, positions.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))
        t = torch.cat([self.cls.expand(len(patches), -1, -1), self.embed(patches) + pos], 1)
        rel = None
        if self.gpsa:
            rel = self.rel.expand(len(patches), -1, -1, -1)
            if positions is not None:  # the relative positions among the given patches only
                kept = positions.shape[1]
                rows = self.rel[positions]  # (B, kept, n, 3)
                rel = rows.gather(2, positions[:, None, :, None].expand(-1, kept, -1, 3))
        shallow = None
        for i, block in enumerate(self.blocks, 1):
            t = block(t, rel) if self.gpsa else block(t)
            if i == self.shallow_block and self.bilateral:
                shallow = self.shallow_expand(t[..., : self.shallow_width].detach())
        return self.norm(t), shallow

    def _features(self, deep: Tensor, shallow: Tensor | None) -> Tensor:
        f = deep[:, 0]
        if self.bilateral:
            f = f + self.fuse(torch.cat([f, shallow[:, 0]], 1))
        return f

    def features(self, x: Tensor) -> Tensor:
        return self._features(*self.encode(patchify(x, self.patch)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    # ---- decoder -----------------------------------------------------------------------
    def _decode(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Patches (B, N, P*P*C) predicted from the visible tokens (class token first)."""
        t = self.dec_embed(tokens)
        b, d = len(t), t.shape[-1]
        full = self.mask_token.expand(b, self.num_patches, d).clone()
        full.scatter_(1, positions.unsqueeze(-1).expand(-1, -1, d), t[:, 1:])
        full = torch.cat([t[:, :1], full], 1) + self.dec_pos
        for block in self.dec_blocks:
            full = block(full)
        return self.dec_pred(self.dec_norm(full[:, 1:]))

    def reconstruct(self, patches: Tensor, positions: Tensor, detail: bool = True) -> dict[str, Tensor]:
        """Full images from the visible `patches` at `positions`.

        Returns "image" (the reconstruction), "deep" (the deep decoder's image) and, with
        the bilateral part and `detail`, "detail" (the high-passed shallow image added to it).
        """
        deep, shallow = self.encode(patches, positions)
        image = unpatchify(self._decode(deep, positions), self.patch, self.channels)
        out = {"deep": image}
        if self.bilateral and detail:
            shallow_image = unpatchify(self._decode(shallow, positions), self.patch, self.channels)
            out["detail"] = high_pass(shallow_image, self.high_pass_radius)
            image = image + out["detail"]
        if self.refine is not None:
            kept = self.paste(torch.zeros_like(image), torch.ones_like(patches), positions)
            image = image + self.refine(self.paste(image, patches, positions), kept)
        out["image"] = image
        return out

    def paste(self, image: Tensor, patches: Tensor, positions: Tensor) -> Tensor:
        """The reconstruction with the known patches put back where they were."""
        p = patchify(image, self.patch).clone()
        p.scatter_(1, positions.unsqueeze(-1).expand(-1, -1, p.shape[-1]), patches.to(p.dtype))
        return unpatchify(p, self.patch, self.channels)

    def as_exemplar(self, image: Tensor, patches: Tensor, positions: Tensor, threshold: float = 0.0) -> Tensor:
        """A reconstruction as a replayed exemplar looks: in [0, 1], decoder-filled pixels
        soft-thresholded at `threshold`, the known patches put back."""
        return self.paste(soft_threshold(image.clamp(0, 1), threshold), patches, positions)

    def resize_head(self, n: int) -> None:
        resize_incremental_head(self.head, n)


def mae_losses(model: MaskedViT, images: Tensor, keep: int, generator: torch.Generator | None = None,
               view: bool = True, recon_loss: str = "mse", targets: Tensor | None = None,
               threshold: float = 0.0) -> dict[str, Tensor]:
    """The losses of a batch: "recon", pixel MSE (or L1) on the masked patches (0 when none is masked);
    with the bilateral part "detail", L1 between the detail image and its target; and "view",
    the batch as replayed exemplars would look (no gradient; decoder-filled pixels soft-thresholded
    at `threshold`, as `rebuild` does). `targets` (a boolean row mask)
    limits the reconstruction and detail losses to those rows (e.g. real images, not rebuilt ones).

    The detail target, as in the reference code: the high-passed difference between the deep
    decoder's images from 9/16 and from `keep` of the patches, i.e. the detail that more
    visible patches would add (here a fixed target, without gradient).
    """
    target = patchify(images, model.patch)
    n = model.num_patches

    def visible_at(positions):
        return target.gather(1, positions.unsqueeze(-1).expand(-1, -1, target.shape[-1]))

    positions = random_keep(len(images), n, keep, generator, images.device)
    visible = visible_at(positions)
    out = model.reconstruct(visible, positions)
    masked = torch.ones(target.shape[:2], dtype=torch.bool, device=images.device)
    masked.scatter_(1, positions, False)
    rows = torch.ones(len(images), dtype=torch.bool, device=images.device) if targets is None else targets
    masked &= rows[:, None]
    pred = patchify(out["image"], model.patch)
    distance = F.l1_loss if recon_loss == "l1" else F.mse_loss
    losses = {"recon": distance(pred[masked], target[masked]) if masked.any() else pred.sum() * 0}
    if model.bilateral:
        with torch.no_grad():
            more = random_keep(len(images), n, max(keep, round(n * 9 / 16)), generator, images.device)
            richer = model.reconstruct(visible_at(more), more, detail=False)["deep"]
            detail_target = high_pass(richer - out["deep"], model.high_pass_radius)
        losses["detail"] = F.l1_loss(out["detail"][rows], detail_target[rows]) if rows.any() else pred.sum() * 0
    # What an exemplar of this image would replay as: the reconstruction, kept patches put back.
    if view:
        losses["view"] = model.as_exemplar(out["image"].detach(), visible, positions, threshold)
    return losses
