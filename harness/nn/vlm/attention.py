"""Attention for a bf16 LM on a CPU: GMM's short sequences in float32 products instead of SDPA.

GMM's sequences are short (the offline stack: ~27 tokens a training sample, ~30 at the end
of a generation). On a CPU, torch's SDPA picks its flash kernel, whose bf16 backward took a
fifth of a training step on 2 AMD EPYC cores (21 ms a layer for a 16 x 27-token batch;
benchmarks/gmm_speed.py). Scores and probabilities of that size are cheap to hold, so this
computes them with two plain products in float32 (as the flash kernel accumulates: no
coarser than SDPA) and returns the LM's dtype. Longer sequences (a 7B LLaVA's 600 tokens),
and calls with arguments it does not model (sliding windows, soft-capping, attention sinks),
go to SDPA as before.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NAME = "harness_fp32_scores"
# Above this many scores per head (query x key positions) SDPA keeps memory bounded.
MAX_SCORES = 128 * 128
_UNMODELLED = ("sliding_window", "softcap", "s_aux", "position_bias")


def fp32_scores_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs) -> tuple[Tensor, None]:
    """transformers' attention signature: (B, H, q, d) queries, (B, H_kv, k, d) keys/values, an
    additive mask (B, 1, q, k) or None; returns (B, q, H, d)."""
    if query.shape[-2] * key.shape[-2] > MAX_SCORES or any(kwargs.get(k) is not None for k in _UNMODELLED):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    scale = dim ** -0.5 if scaling is None else scaling
    # Grouped-query attention without repeating keys: each key head serves `heads // kv_heads`
    # query heads, folded into its query rows.
    q = query.float().reshape(b, kv_heads, heads // kv_heads * q_len, dim)
    scores = torch.matmul(q, key.float().transpose(-1, -2)).mul_(scale)
    if attention_mask is not None:
        scores = scores.view(b, kv_heads, heads // kv_heads, q_len, -1).add_(
            attention_mask[:, :, None, :, : key.shape[-2]]).view(b, kv_heads, heads // kv_heads * q_len, -1)
    probs = scores.softmax(-1)
    if dropout and module.training:
        probs = F.dropout(probs, p=dropout)
    out = torch.matmul(probs, value.float()).view(b, heads, q_len, dim)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


@functools.cache
def register() -> str:
    """Make NAME known to transformers (its attention function and the mask it expects: an
    additive one always built, as for 'eager'); returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, fp32_scores_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    return NAME


def lm_attention(device: torch.device, dtype: torch.dtype, default: str) -> str:
    """The attention implementation a frozen LM should run with: NAME for bf16 on a CPU where
    it would use SDPA, else its own (`default`)."""
    if device.type == "cpu" and dtype == torch.bfloat16 and default == "sdpa":
        return register()
    return default
