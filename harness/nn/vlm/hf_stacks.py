"""transformers VLM families as GMM stacks (gmm.model=hf, the family read from the checkpoint's config).

GMM trains MiniGPT-4's one linear projection between a frozen vision path and a frozen LM. Each
family maps onto that shape with its own pretrained parts:

  llava               CLIP/SigLIP tower's chosen layer -> multi_modal_projector -> the LM
  blip-2, instructblip ViT -> Q-Former's 32 query outputs (InstructBLIP's Q-Former also reads the
                      question) -> language_projection -> the LM (OPT, Vicuna/LLaMA, ...); this is
                      MiniGPT-4's own architecture: EVA-CLIP ViT-g + BLIP-2's Q-Former -> a linear
                      layer -> Vicuna (Salesforce/instructblip-vicuna-7b pairs the same parts)
  idefics3, smolvlm   SigLIP -> pixel shuffle -> the connector's modality_projection -> the LM
  paligemma           SigLIP -> multi_modal_projector -> Gemma, a prefix LM: image and prompt
                      attend both ways, the answer causally (VisionLanguageModel.prefix_lm)
  qwen2_vl,           the ViT's patch states -> the merger (2x2 patches -> one token) -> Qwen2,
  qwen2_5_vl          with the model's own M-RoPE positions (VisionLanguageModel.positions);
                      Qwen2.5-VL's ViT leaves its states in attention-window order, put back in
                      the image's order before the merger (which maps each 2x2 group alone)
  llava_next          the processor's any-resolution tiles (a base view and the tiles of the
                      best grid) -> CLIP's chosen layer -> multi_modal_projector -> the model's
                      own packing (tiles unpadded, its learned newline after each row) -> the LM

Families that do not fit are refused with the reason (UNSUPPORTED).
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from harness.errors import HarnessError
from harness.nn.vlm.image_encoders import HFVisionTokens, tower_pixels, tower_resize
from harness.nn.vlm.model import LLAVA, ChatFormat, ProcessorChat, VisionLanguageModel, processor_chat
from harness.nn.vlm.text_encoders import minilm_text_encoder
from harness.nn.vlm.tokenizers import ByteTokenizer, HFTokenizer

UNSUPPORTED = {
    "mllama": "its image enters through cross-attention layers, not as tokens of the LM's sequence",
}
FAMILIES = ("llava", "llava_next", "blip-2", "instructblip", "idefics3", "smolvlm", "paligemma", "qwen2_vl",
            "qwen2_5_vl")


def hf_vlm_stack(name_or_model, processor=None, tokenizer=None, text_encoder: Callable | None = None,
                 image_size: int | None = None) -> VisionLanguageModel:
    """A transformers vision-language model (hub name, local folder or instance) as a GMM stack:
    its own vision path frozen, its own projection trained (in float32), its LM frozen."""
    if isinstance(name_or_model, str):
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        kind = AutoConfig.from_pretrained(name_or_model, trust_remote_code=False).model_type
        _check_family(kind, name_or_model)
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        model = AutoModelForImageTextToText.from_pretrained(name_or_model, dtype=dtype, trust_remote_code=False)
        processor = processor or AutoProcessor.from_pretrained(name_or_model, trust_remote_code=False)
        name = name_or_model
    else:
        model, name = name_or_model, f"custom-{name_or_model.config.model_type}"
    kind = model.config.model_type
    _check_family(kind, name)
    text_encoder = text_encoder or minilm_text_encoder()
    if kind == "llava":
        return hf_llava_stack(model, tokenizer=tokenizer, text_encoder=text_encoder, image_size=image_size,
                              processor=processor)
    build = {"blip-2": _qformer_stack, "instructblip": _qformer_stack, "paligemma": _paligemma_stack,
             "qwen2_vl": _qwen2_vl_stack, "qwen2_5_vl": _qwen2_vl_stack,
             "llava_next": _llava_next_stack}.get(kind, _idefics3_stack)
    vlm = build(model, processor, tokenizer, text_encoder, image_size, name)
    vlm.proj.requires_grad_(True)
    return vlm


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


def _check_family(kind: str, name: str) -> None:
    if kind in UNSUPPORTED:
        raise HarnessError(f"{name} is a {kind} model, which GMM's stack cannot hold: {UNSUPPORTED[kind]}")
    if kind not in FAMILIES:
        raise HarnessError(f"{name} is a {kind} model; GMM's stack holds {', '.join(FAMILIES)}")


def _statistics(processor, cfg_size: int, image_size: int | None):
    ip = getattr(processor, "image_processor", None)
    mean = getattr(ip, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)  # CLIP's, BLIP-2's default
    std = getattr(ip, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
    return image_size or cfg_size, mean, std


def _tokenizer(processor, tokenizer):
    if tokenizer is None and processor is None:
        raise HarnessError("a model instance needs its processor or tokenizer")
    return tokenizer or HFTokenizer(processor.tokenizer)


# ---- BLIP-2 and InstructBLIP ---------------------------------------------------------------
class _Tower(nn.Module):
    """A frozen vision path fed images in [0, 1] at `image_size`, normalised by its processor's statistics."""

    def __init__(self, image_size: int, mean, std):
        super().__init__()
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def pixels(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        return tower_pixels(x, self.image_size, self.mean, self.std).to(dtype)


def _bos_eos(tokenizer, default_end: str) -> tuple[tuple[int, ...], str]:
    """The tokenizer's BOS id (none where it has none) and its end-of-sequence text."""
    raw = getattr(tokenizer, "tok", None)
    bos = (raw.bos_token_id,) if raw is not None and raw.bos_token_id is not None else ()
    return bos, raw.eos_token if raw is not None else default_end


class QFormerTokens(_Tower):
    """The frozen vision path of BLIP-2 / InstructBLIP: ViT -> the Q-Former's query outputs (B, Q, D),
    as the model computes them before its language_projection. InstructBLIP's Q-Former also
    reads the question (set_question), so the tokens and the id depend on it."""

    def __init__(self, model: nn.Module, image_size: int, mean, std, name: str, qformer_tokenizer=None):
        super().__init__(image_size, mean, std)
        self.vision_model, self.qformer, self.query_tokens = model.vision_model, model.qformer, model.query_tokens
        self.qformer_tokenizer = qformer_tokenizer
        self.register_buffer("question_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        self.out_dim = model.config.qformer_config.hidden_size
        self._name = f"hf-{name.replace('/', '--')}-qformer-{image_size}px"
        self.reads_question = model.config.model_type == "instructblip"

    @property
    def id(self) -> str:
        if not self.reads_question:
            return self._name
        digest = hashlib.sha1(str(self.question_ids.tolist()).encode()).hexdigest()[:8]
        return f"{self._name}-q{digest}"

    def set_question(self, question: str) -> None:
        if self.reads_question:
            if self.qformer_tokenizer is None:
                raise HarnessError("InstructBLIP needs its processor's qformer_tokenizer")
            ids = self.qformer_tokenizer(question)["input_ids"]
            self.question_ids = torch.tensor(ids, dtype=torch.long, device=self.query_tokens.device)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pixels(x, self.query_tokens.dtype)
        image = self.vision_model(pixel_values=x).last_hidden_state
        b, q = len(image), self.query_tokens.shape[1]
        queries = self.query_tokens.expand(b, -1, -1)
        seen = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        extra: dict[str, Any] = {}
        if self.reads_question:
            ids = self.question_ids.to(image.device).expand(b, -1)
            extra = {"input_ids": ids, "attention_mask": torch.ones(b, q + ids.shape[1], dtype=torch.long,
                                                                     device=image.device)}
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=seen, **extra)
        return out.last_hidden_state[:, :q]


@dataclass
class AfterQueriesChat(ChatFormat):
    """The image's tokens first, then the tokenizer's BOS and the text (BLIP-2's "Question: ...
    Answer:"; InstructBLIP's instruction alone; PaliGemma's prompt and a newline)."""

    bos: tuple[int, ...] = ()

    def prompt_ids(self, tokenizer, question: str, before_image: bool) -> tuple[list[int], list[int]]:
        if before_image:
            raise HarnessError("BLIP-2, InstructBLIP and PaliGemma read the image's tokens before any text "
                               "(gmm.question=after_image)")
        return [], list(self.bos) + tokenizer.encode(self.template.format(content=question))


def _qformer_stack(model, processor, tokenizer, text_encoder, image_size, name) -> VisionLanguageModel:
    lm = model.language_model
    if getattr(lm.config, "is_encoder_decoder", False):
        raise HarnessError(f"{name}'s language model ({lm.config.model_type}) is an encoder-decoder; GMM's stack "
                           "needs a causal LM (the OPT, Vicuna or LLaMA checkpoints)")
    tokenizer = _tokenizer(processor, tokenizer)
    size, mean, std = _statistics(processor, model.config.vision_config.image_size, image_size)
    encoder = QFormerTokens(model, size, mean, std, name, getattr(processor, "qformer_tokenizer", None))
    bos, end = _bos_eos(tokenizer, "</s>")
    template = "{content}" if model.config.model_type == "instructblip" else "Question: {content} Answer:"
    chat = AfterQueriesChat(template, end, " ", bos=bos)
    return VisionLanguageModel(encoder, model.language_projection.float(), lm, tokenizer, text_encoder, chat,
                               model.config.model_type)


# ---- Idefics3 and SmolVLM ------------------------------------------------------------------
class PixelShuffleTokens(_Tower):
    """Idefics3's / SmolVLM's frozen vision path: SigLIP's last hidden state, pixel-shuffled by the
    connector's own function (scale s: s*s neighbouring patches -> one token of s*s*D)."""

    def __init__(self, model: nn.Module, image_size: int, mean, std, name: str):
        super().__init__(image_size, mean, std)
        inner = model.model
        self.vision_model = inner.vision_model
        connector = inner.connector
        # the connector's function, not the connector (its modality_projection is the trained part)
        self._shuffle = functools.partial(type(connector).pixel_shuffle, connector, scale_factor=connector.scale_factor)
        self.out_dim = model.config.vision_config.hidden_size * connector.scale_factor ** 2
        self.id = f"hf-{name.replace('/', '--')}-shuffle{connector.scale_factor}-{image_size}px"

    def forward(self, x: Tensor) -> Tensor:
        x = self.pixels(x, next(self.vision_model.parameters()).dtype)
        return self._shuffle(self.vision_model(pixel_values=x).last_hidden_state)


@dataclass
class Idefics3Chat(ProcessorChat):
    """The processor's chat template, with the image's tokens wrapped as its processor wraps a
    single unsplit image: <fake_token_around_image><global-img> [tokens] <fake_token_around_image>."""

    def prompt_ids(self, tokenizer, question: str, before_image: bool) -> tuple[list[int], list[int]]:
        before, after = super().prompt_ids(tokenizer, question, before_image)
        tok = self.processor.tokenizer
        fake = tok.convert_tokens_to_ids(getattr(self.processor, "fake_image_token", "<fake_token_around_image>"))
        glob = tok.convert_tokens_to_ids(getattr(self.processor, "global_image_tag", None)  # Idefics3's name
                                         or getattr(self.processor, "global_image_token", "<global-img>"))  # SmolVLM's
        return before + [fake, glob], [fake] + after


def _idefics3_stack(model, processor, tokenizer, text_encoder, image_size, name) -> VisionLanguageModel:
    from transformers import AutoModelForCausalLM

    if processor is None:
        raise HarnessError(f"{name}: an Idefics3/SmolVLM model needs its processor (its chat template and image tokens)")
    tokenizer = _tokenizer(processor, tokenizer)
    size, mean, std = _statistics(processor, model.config.vision_config.image_size, image_size)
    encoder = PixelShuffleTokens(model, size, mean, std, name)
    # A causal LM over the model's own text decoder and head (shared, not copied), as GMM's loss
    # and decoding take one; built on the meta device, so no second set of weights is made.
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(model.config.text_config)
    lm.model, lm.lm_head = model.model.text_model, model.lm_head
    end = getattr(processor, "end_of_utterance_token", None) or processor.tokenizer.eos_token
    chat = processor_chat(processor, end, Idefics3Chat)
    proj = model.model.connector.modality_projection.float()
    return VisionLanguageModel(encoder, proj, lm, tokenizer, text_encoder, chat, model.config.model_type)


# ---- PaliGemma -----------------------------------------------------------------------------
class SiglipTokens(_Tower):
    """PaliGemma's frozen vision path: SigLIP's last hidden state, one token per patch."""

    def __init__(self, tower: nn.Module, image_size: int, mean, std, name: str):
        super().__init__(image_size, mean, std)
        self.tower = tower
        self.out_dim = tower.config.hidden_size
        self.id = f"hf-{name.replace('/', '--')}-siglip-{image_size}px"

    def forward(self, x: Tensor) -> Tensor:
        return self.tower(pixel_values=self.pixels(x, next(self.tower.parameters()).dtype)).last_hidden_state


def _paligemma_stack(model, processor, tokenizer, text_encoder, image_size, name) -> VisionLanguageModel:
    tokenizer = _tokenizer(processor, tokenizer)
    size, mean, std = _statistics(processor, model.config.vision_config.image_size, image_size)
    encoder = SiglipTokens(model.model.vision_tower, size, mean, std, name)
    bos, end = _bos_eos(tokenizer, "<eos>")
    # the processor's string: image tokens, BOS, the prompt, a newline; the answer, then EOS
    chat = AfterQueriesChat("{content}\n", end, "", bos=bos)
    vlm = VisionLanguageModel(encoder, model.model.multi_modal_projector.float(), model, tokenizer, text_encoder,
                              chat, "paligemma")
    vlm.prefix_lm = True
    return vlm


# ---- Qwen2-VL and Qwen2.5-VL ---------------------------------------------------------------
def _window_index(visual: nn.Module, grid: Tensor) -> Tensor:
    """Qwen2.5-VL's order of 2x2 patch groups in its attention windows (the ViT's own function)."""
    cfg = visual.config
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError:  # transformers releases that keep it a method of the ViT
        return visual.get_window_index(grid)[0]
    return get_vision_window_index(grid, spatial_merge_size=cfg.spatial_merge_size, window_size=cfg.window_size,
                                   patch_size=cfg.patch_size)[0]


class QwenPatchTokens(nn.Module):
    """Qwen2-VL's / Qwen2.5-VL's frozen vision path: the image processor's patches (2 frames of
    14x14, in the merger's 2x2 order) through the ViT, its states before the merger: (B, h*w, D).
    Qwen2.5-VL's ViT returns them in its attention windows' order; they are put back in the
    image's order here, so the merger (the trained part, one 2x2 group at a time) sees what the
    model's own forward gives it and its tokens come out in the order the LM reads them."""

    def __init__(self, visual: nn.Module, image_processor, image_size: int, name: str):
        super().__init__()
        self.visual, self.image_processor = visual, image_processor
        step = visual.config.patch_size * visual.config.spatial_merge_size
        if image_size % step:
            raise HarnessError(f"Qwen2-VL and Qwen2.5-VL need an image size that is a multiple of {step}, not {image_size}")
        self.image_size = image_size
        self.windowed = hasattr(visual.config, "window_size")  # Qwen2.5-VL
        # Qwen2-VL's vision config names the ViT's width embed_dim (hidden_size is the LM's); Qwen2.5-VL's hidden_size
        self.out_dim = visual.config.embed_dim if hasattr(visual.config, "embed_dim") else visual.config.hidden_size
        self.id = f"hf-{name.replace('/', '--')}-vit-{image_size}px"

    def grid(self, batch: int) -> Tensor:
        side = self.image_size // self.visual.config.patch_size
        return torch.tensor([[1, side, side]] * batch)

    def forward(self, x: Tensor) -> Tensor:
        x = tower_resize(x, self.image_size)  # the processor normalises
        patches = self.image_processor(images=list(x.float()), do_resize=False, do_rescale=False,
                                       return_tensors="pt")["pixel_values"]
        dtype = next(self.visual.parameters()).dtype
        grid = self.grid(len(x)).to(x.device)
        states = self.visual(patches.to(x.device, dtype), grid_thw=grid).last_hidden_state
        if self.windowed:
            unit = self.visual.config.spatial_merge_size ** 2
            groups = states.view(-1, unit, states.shape[-1])
            states = groups[torch.argsort(_window_index(self.visual, grid).to(x.device))]
        return states.reshape(len(x), -1, states.shape[-1])


class BatchedMerger(nn.Module):
    """Qwen2-VL's / Qwen2.5-VL's merger (the trained projection) over a batch: (B, N, D) -> (B, N / 4, H)."""

    def __init__(self, merger: nn.Module, merge: int):
        super().__init__()
        self.merger, self.merge = merger, merge

    def tokens_out(self, n: int) -> int:
        return n // self.merge ** 2

    def forward(self, feats: Tensor) -> Tensor:
        out = self.merger(feats.reshape(-1, feats.shape[-1]))
        return out.view(len(feats), -1, out.shape[-1])


def _qwen2_vl_stack(model, processor, tokenizer, text_encoder, image_size, name) -> VisionLanguageModel:
    if processor is None:
        raise HarnessError(f"{name}: a Qwen2-VL / Qwen2.5-VL model needs its processor (patches, chat template, "
                           "image token)")
    tokenizer = _tokenizer(processor, tokenizer)
    cfg, visual = model.config, model.model.visual
    side = image_size or 448  # 16x16 merged tokens; the processor's own size depends on each image
    encoder = QwenPatchTokens(visual, processor.image_processor, side, name)
    chat = ProcessorChat("", processor.tokenizer.eos_token, "", processor=processor)
    vlm = VisionLanguageModel(encoder, BatchedMerger(visual.merger, visual.config.spatial_merge_size).float(), model,
                              tokenizer, text_encoder, chat, cfg.model_type)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    grid = encoder.grid(1)
    n_image = int(grid.prod()) // visual.config.spatial_merge_size ** 2

    @functools.lru_cache(maxsize=8)
    def prompt_positions(before: int, after: int) -> Tensor:
        # the model's own M-RoPE index over [before][image tokens][after]; the token ids but the
        # image's do not matter, only the layout
        ids = torch.full((1, before + n_image + after), 0, dtype=torch.long)
        ids[0, before:before + n_image] = image_token
        kinds = (ids == image_token).int()
        positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=kinds, image_grid_thw=grid,
                                                  attention_mask=torch.ones_like(ids))
        return positions

    def positions(prompt_len: int, total_len: int) -> Tensor:
        before = len(vlm.prompt_ids[0])
        head = prompt_positions(before, prompt_len - before - n_image)
        tail = head[..., -1:].max() + 1 + torch.arange(total_len - prompt_len)  # text after it counts on by one
        return torch.cat([head, tail.view(1, 1, -1).expand(3, 1, -1)], dim=-1)

    vlm.positions = positions
    return vlm


# ---- LLaVA-NeXT ----------------------------------------------------------------------------
class AnyResTiles(nn.Module):
    """LLaVA-NeXT's frozen vision path: each image (resized to `image_size`, square) cut by the
    image processor into its base view and the tiles of its best grid, each through the vision
    tower's chosen layer: (B, tiles, patches, D). Every image has the same size, so the same tiles."""

    def __init__(self, model: nn.Module, image_processor, image_size: int, name: str):
        super().__init__()
        cfg = model.config
        self.tower, self.image_processor, self.image_size = model.model.vision_tower, image_processor, image_size
        layer = cfg.vision_feature_layer
        self.layers = layer if isinstance(layer, list) else [layer]
        self.strategy = cfg.vision_feature_select_strategy
        self.out_dim = cfg.vision_config.hidden_size * len(self.layers)
        layers = "_".join(map(str, self.layers))
        self.id = f"hf-{name.replace('/', '--')}-anyres-L{layers}-{self.strategy}-{image_size}px"

    def forward(self, x: Tensor) -> Tensor:
        x = tower_resize(x, self.image_size)  # the processor tiles and normalises
        tiles = self.image_processor(images=list(x.float()), do_rescale=False, return_tensors="pt")["pixel_values"]
        b, n = tiles.shape[:2]
        hidden = self.tower(tiles.flatten(0, 1).to(x.device, next(self.tower.parameters()).dtype),
                            output_hidden_states=True).hidden_states
        h = torch.cat([hidden[layer] for layer in self.layers], dim=-1)
        h = h[:, 1:] if self.strategy == "default" else h
        return h.view(b, n, *h.shape[1:])


class AnyResProjection(nn.Module):
    """LLaVA-NeXT's projector (the trained part) over every tile, then the model's own
    pack_image_features: the tiles' tokens unpadded to the image's shape, its learned (frozen)
    newline after each row, after the base view's tokens: (B, tiles, patches, D) -> (B, T, H)."""

    def __init__(self, model: nn.Module, image_size: int):
        super().__init__()
        self.projector = model.model.multi_modal_projector
        self._model = (model.model,)  # a reference, not a submodule: the newline stays the LM's, frozen
        self.image_size = image_size

    def forward(self, feats: Tensor) -> Tensor:
        inner = self._model[0]
        out = self.projector(feats.flatten(0, 1)).unflatten(0, feats.shape[:2])
        sizes = torch.tensor([[self.image_size, self.image_size]] * len(feats), device=feats.device)
        packed, _ = inner.pack_image_features(list(out), sizes, vision_feature_select_strategy=inner.config.
                                              vision_feature_select_strategy, image_newline=inner.image_newline)
        return torch.stack(packed)


def _llava_next_stack(model, processor, tokenizer, text_encoder, image_size, name) -> VisionLanguageModel:
    if processor is None:
        raise HarnessError(f"{name}: a LLaVA-NeXT model needs its processor (its tiling, chat template, image token)")
    tokenizer = _tokenizer(processor, tokenizer)
    side = image_size or model.config.vision_config.image_size
    encoder = AnyResTiles(model, processor.image_processor, side, name)
    return VisionLanguageModel(encoder, AnyResProjection(model, side).float(), model, tokenizer, text_encoder,
                               processor_chat(processor), "llava_next")
