"""The stack itself: encoder -> trainable projection -> frozen causal LM, its loss and its batched greedy decoding."""
from __future__ import annotations

import inspect
import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.errors import HarnessError
from harness.nn.vlm.attention import lm_attention


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


def processor_chat(processor, end: str | None = None, kind: type = ProcessorChat) -> ProcessorChat:
    """A `kind` of ProcessorChat for `processor`, its answers ended by `end` (default: its
    tokenizer's EOS)."""
    # "...ASSISTANT:" (llava-1.5, Idefics3) wants a space before the answer; a template whose
    # turn ends with a newline does not.
    lead = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "?"}]}],
                                         add_generation_prompt=True, tokenize=False)
    return kind("", end or processor.tokenizer.eos_token, " " if lead.rstrip(" ").endswith(":") else "",
                processor=processor)


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
        # bf16 on a CPU: attention in float32 products (harness.nn.vlm.attention); False keeps
        # the LM's own (SDPA) everywhere. _pick_attention applies it.
        self.cpu_bf16_attention = True
        # A prefix LM (PaliGemma) attends both ways over the image and prompt (token type 0) and
        # causally over the answer (1); its full model, not the bare decoder, builds that mask.
        self.prefix_lm = False
        # Qwen2-VL's M-RoPE: positions(prompt_len, total_len) -> (3, 1, total_len) position ids
        # of [prompt with image][tail], as the model computes them from its image grid.
        self.positions: Callable[[int, int], Tensor] | None = None
        self._prefix_kv: dict[tuple, list[tuple[Tensor, Tensor]]] = {}
        self.decode = "dynamic"  # set_decode
        self._fixed_caches: dict[tuple, Any] = {}  # shape -> StaticCache of static decoding
        self._compiled_steps: dict[str, Callable] = {}  # device type -> compiled decode step
        self._attn_default = getattr(self.lm.get_decoder().config, "_attn_implementation", None)
        self.set_question("What is this photo of?")

    def _apply(self, fn, recurse: bool = True):
        # f_text is not a submodule (it is shared, and never trained), but it should run
        # where the LM runs: on a GPU, MiniLM on the CPU cost a large part of evaluation.
        # .to(), .cuda() and .cpu() all end here.
        super()._apply(fn, recurse)
        self._prefix_kv.clear()  # computed on the old device or dtype
        self._fixed_caches.clear()
        self._pick_attention()
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
        hear = getattr(self.encoder, "set_question", None)
        if callable(hear):  # InstructBLIP's Q-Former reads the question too (its features, and id, depend on it)
            hear(question)
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
        pays where bf16 products are faster, see language_models.precision_choice); the trainable projection
        stays float32."""
        for p in self._lm_own_parameters():  # buffers (rotary frequencies) stay float32
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        self._prefix_kv.clear()
        self._fixed_caches.clear()
        self._pick_attention()

    def _pick_attention(self) -> None:
        """The LM decoder's attention for where it now runs (harness.nn.vlm.attention: bf16 on a CPU
        computes GMM's short attentions in float32 products, SDPA's flash kernel being slow there)."""
        if self._attn_default is None:  # an LM without transformers' attention interface
            return
        decoder = self.lm.get_decoder()
        want = lm_attention(next(self.proj.parameters()).device, self.lm_dtype, self._attn_default) \
            if self.cpu_bf16_attention else self._attn_default
        if decoder.config._attn_implementation != want:
            decoder.set_attn_implementation(want)

    @property
    def lm_dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    def compile_pointwise(self) -> int:
        """torch.compile each decoder layer's MLP and RMSNorms (and the final norm): the
        elementwise work between the matrix products (float32 upcasts, SiLU, products) fused,
        instead of a pass over the activations for each operation. Attention stays eager: its
        KV cache is one object across layers, and guards on it would recompile per layer.
        Returns the number of modules compiled (0 where the LM has no such layers)."""
        base = _base_lm(self.lm)
        layers = getattr(getattr(base, "model", None), "layers", [])
        parts = [m for layer in layers for m in (getattr(layer, "mlp", None), getattr(layer, "input_layernorm", None),
                                                   getattr(layer, "post_attention_layernorm", None)) if m is not None]
        final = getattr(getattr(base, "model", None), "norm", None)
        for m in parts + ([final] if final is not None else []):
            m.compile(dynamic=True, options=_eager_numerics())
        return len(parts) + (final is not None)

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token takes across the LM's layers, in the LM's dtype."""
        cfg = _base_lm(self.lm).config.get_text_config()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return cfg.num_hidden_layers * 2 * kv_heads * head_dim * self.lm_dtype.itemsize

    def generation_batch(self, free_bytes: int, visual_tokens: int, max_new_tokens: int, most: int = 32768) -> int:
        """Rows per generation batch whose KV cache takes at most a quarter of `free_bytes`
        (the rest for the prefill's activations and logits), capped at `most`. On a GPU a
        decode step's fixed cost bounds small batches: on an H200 SmolLM2-135M answers 0.8k
        images/s at 256 rows and 15.0k at 32,768 (benchmarks/gmm_speed.py, README); a 7B
        LLaVA's ~600 tokens per row get a few hundred rows."""
        tokens = sum(len(p) for p in self.prompt_ids) + visual_tokens + max_new_tokens
        rows = int(max(1, min(most, free_bytes // 4 // (tokens * self.kv_bytes_per_token()))))
        # graphs pads a batch to a power of two and keeps a cache per such size: a power of two
        # here bounds them all (each smaller one at most half the next) by twice this batch's
        return 1 << (rows.bit_length() - 1) if self.decode == "graphs" else rows

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

    def proj_tokens(self, feats: Tensor) -> int:
        """How many LM positions the projection makes of one image's encoder tokens (Qwen2-VL's
        merger joins 2x2 of them)."""
        return int(getattr(self.proj, "tokens_out", lambda n: n)(feats.shape[1]))

    def _embed(self, ids: Tensor) -> Tensor:
        return self.lm.get_input_embeddings()(ids)

    def prompt_embeds(self, feats: Tensor, with_prefix: bool = True) -> Tensor:
        """[prompt before image][projected visual tokens][question and assistant turn]."""
        vis = self.proj(feats.to(next(self.proj.parameters()).dtype))
        b, dev = len(feats), vis.device
        ids = self.prompt_ids if with_prefix else self.prompt_ids[1:]
        *before, after = (self._embed(p.to(dev)).unsqueeze(0).expand(b, -1, -1) for p in ids)
        return torch.cat([*before, vis.to(after.dtype), after], dim=1)

    def _prefix_states(self, device: torch.device) -> list[tuple[Tensor, Tensor]] | None:
        """Each layer's keys and values (one row) of the prompt before the image, computed once per
        device and dtype; None when they cannot be reused (the LM trains, e.g. LoRA, or there is no
        such prompt)."""
        ids = self.prompt_ids[0]
        if not self.reuse_prefix or len(ids) == 0 or self._lm_trains() or self.prefix_lm or self.positions:
            return None
        amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        key = (str(device), amp, self.lm_dtype)
        if key not in self._prefix_kv:
            with torch.no_grad():
                out = self.lm(inputs_embeds=self._embed(ids.to(device)).unsqueeze(0), use_cache=True, logits_to_keep=1)
            self._prefix_kv[key] = [(layer.keys, layer.values) for layer in _returned_cache(out).layers]
        return self._prefix_kv[key]

    def _prefix_cache(self, batch: int, device: torch.device):
        """A KV cache already holding the prompt before the image, for `batch` rows; None when
        it cannot be reused (see _prefix_states)."""
        states = self._prefix_states(device)
        if states is None:
            return None
        from transformers import DynamicCache

        # expand() shares the one computed row; the cache's first update concatenates new rows onto it
        return DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in states])

    def _forward_prompt(self, feats: Tensor, tail: Tensor | None = None, decoder_only: bool = False, **kwargs):
        """The LM (or only its decoder, for hidden states) over [prompt with image][tail], the
        constant prefix taken from its cache when it can be."""
        cache = self._prefix_cache(len(feats), next(self.proj.parameters()).device)
        emb = self.prompt_embeds(feats, with_prefix=cache is None)
        prompt_len = emb.shape[1]
        if tail is not None:
            emb = torch.cat([emb, tail.to(emb.dtype)], dim=1)
        if cache is not None:
            kwargs.update({self._decoder_cache_kw if decoder_only else self._cache_kw: cache, "use_cache": True})
        kwargs.setdefault("use_cache", False)  # training needs no returned cache
        module = self.lm.get_decoder() if decoder_only else self.lm
        if self.prefix_lm:
            types = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
            types[:, :prompt_len] = 0
            kwargs["token_type_ids"] = types
            module = _base_lm(self.lm).model if decoder_only else self.lm
        if self.positions is not None:
            kwargs["position_ids"] = self.positions(prompt_len, emb.shape[1]).to(emb.device).expand(-1, len(emb), -1)
            module = _base_lm(self.lm).model if decoder_only else self.lm
        return module(inputs_embeds=emb, **kwargs)

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
    def set_decode(self, kind: str) -> str:
        """How generate() decodes; returns the kind it will use.

        dynamic  rows leave the batch as they finish; the KV cache grows a step at a time
        static   one KV cache of fixed size (prompt + max_new_tokens) for every row until all have
                 finished: the fixed shapes and addresses that CUDA graphs need
        graphs   static, its one-token step through torch.compile (mode reduce-overhead: captured
                 once and replayed as a CUDA graph on a GPU; fused by inductor on a CPU)

        Stacks whose decode step needs more than the cache (a prefix LM's token types,
        Qwen2-VL's M-RoPE positions) keep dynamic."""
        if kind not in ("dynamic", "static", "graphs"):
            raise HarnessError(f"decode must be dynamic, static or graphs, not {kind!r}")
        self.decode = "dynamic" if self.prefix_lm or self.positions is not None else kind
        self._fixed_caches.clear()
        return self.decode

    @torch.no_grad()
    def generate(self, feats: Tensor, max_new_tokens: int = 16, early_stop: bool = True) -> list[str]:
        """Greedy answers, each cut at its first stop token (sentence end or end of turn). With
        early_stop, generation ends once every row has stopped; dynamic decoding also drops
        finished rows (and their cache rows) at once, so the rest decode cheaper."""
        decode = self._decode_dynamic if self.decode == "dynamic" else self._decode_static
        tokens = decode(feats, max_new_tokens, early_stop)
        return self._texts(tokens)

    def _decode_dynamic(self, feats: Tensor, max_new_tokens: int, early_stop: bool) -> Tensor:
        out = self._forward_prompt(feats, use_cache=True, logits_to_keep=1)
        dev = out.logits.device
        stop = self.stop_ids.to(dev)
        tokens = torch.full((len(feats), max_new_tokens), int(stop[0]), dtype=torch.long, device=dev)
        rows = torch.arange(len(feats), device=dev)  # the rows still writing
        prompt_len = sum(len(p) for p in self.prompt_ids) + self.proj_tokens(feats)
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
            extra = {}
            if self.positions is not None:  # the fed token sits at prompt_len + step
                extra["position_ids"] = self.positions(prompt_len, prompt_len + step + 1)[..., -1:].to(dev).expand(
                    -1, len(tok), -1)
            out = self.lm(input_ids=tok[:, None], use_cache=True, logits_to_keep=1, **{self._cache_kw: cache}, **extra)
        return tokens

    def _decode_static(self, feats: Tensor, max_new_tokens: int, early_stop: bool) -> Tensor:
        n = len(feats)
        if self.decode == "graphs" and n:
            # A compiled step is specialised to its cache's tensors: rows padded to a power of two
            # (copies of the first, which stop with it) let a run's growing test sets share a few
            # caches and graphs instead of compiling once per size.
            feats = torch.cat([feats, feats[:1].expand((1 << (n - 1).bit_length()) - n, *feats.shape[1:])])
        dev, b = next(self.proj.parameters()).device, len(feats)
        prefix = self._prefix_states(dev)
        emb = self.prompt_embeds(feats, with_prefix=prefix is None)
        # The prompt as embedded (LLaVA-NeXT's packing decides its image's length), then the answer
        length = (prefix[0][0].shape[-2] if prefix is not None else 0) + emb.shape[1] + max_new_tokens
        cache = self._fixed_cache(b, length, dev)
        if prefix is not None:  # the constant prompt's keys/values copied into every row
            for layer, (k, v) in enumerate(prefix):
                cache.update(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), layer)
        # The prefill (its length differs by stack and question) stays eager; only the step repeats.
        out = self.lm(inputs_embeds=emb, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        tok = out.logits[:, -1].argmax(-1)
        step = self._step_function(dev)
        stop = self.stop_ids.to(dev)
        tokens = torch.empty((b, max_new_tokens), dtype=torch.long, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        for i in range(max_new_tokens):
            if i:
                tok = step(tok.clone(), cache)  # a copy: a replayed graph overwrites its last output
            tokens[:, i] = tok
            done |= torch.isin(tok, stop)
            if early_stop and bool(done.all()):
                break
        return tokens[:n]

    def _fixed_cache(self, batch: int, length: int, device: torch.device):
        """A StaticCache for `batch` rows of `length` positions, emptied for this call. graphs keeps
        one per shape (a compiled step is specialised to its cache's tensors; the power-of-two
        shapes together take at most twice the largest), static only the last."""
        from transformers import StaticCache

        key = (batch, length, str(device), self.lm_dtype)
        if key not in self._fixed_caches:
            if self.decode != "graphs":
                self._fixed_caches.clear()
            self._fixed_caches[key] = StaticCache(config=_base_lm(self.lm).config, max_cache_len=length)
        cache = self._fixed_caches[key]
        cache.reset()
        return cache

    def _greedy_step(self, tok: Tensor, cache) -> Tensor:
        """One greedy step of the LM over a fixed cache: the next token of each row."""
        out = self.lm(input_ids=tok[:, None], use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1].argmax(-1)

    def _step_function(self, device: torch.device) -> Callable[[Tensor, Any], Tensor]:
        """_greedy_step as `decode` runs it: eager for static, compiled (once per device type) for graphs."""
        if self.decode != "graphs":
            return self._greedy_step
        if device.type not in self._compiled_steps:
            mode = "reduce-overhead" if device.type == "cuda" else "default"
            self._compiled_steps[device.type] = torch.compile(self._greedy_step, dynamic=False,
                                                              options=_eager_numerics(mode))
        compiled = self._compiled_steps[device.type]
        if device.type != "cuda":
            return compiled

        def replay(tok: Tensor, cache) -> Tensor:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's output is consumed
            return compiled(tok, cache)

        return replay

    def _texts(self, tokens: Tensor) -> list[str]:
        """Each row's tokens up to its first stop (a sentence end kept, an end of turn not), as text."""
        stops, kept = set(self.stop_ids.tolist()), set(self.sentence_end_ids.tolist())
        decoded: dict[tuple[int, ...], str] = {}  # few distinct answers: each is decoded once
        texts = []
        for seq in tokens.tolist():
            cut = next((i + (t in kept) for i, t in enumerate(seq) if t in stops), len(seq))
            key = tuple(seq[:cut])
            if key not in decoded:
                decoded[key] = self.tokenizer.decode(key).strip()
            texts.append(decoded[key])
        return texts


def _eager_numerics(mode: str = "default") -> dict[str, Any]:
    """torch.compile options of `mode` whose bf16 results round as eager's do. Inductor otherwise
    keeps a fused chain's bf16 intermediates in float32: on the tiny stack in bf16 that changed
    8 (compiled MLPs and norms) and 11 (compiled decode step) of 64 greedy answers; with eager
    rounding none."""
    from torch._inductor import config, list_mode_options

    exact = {"emulate_precision_casts": True} if hasattr(config, "emulate_precision_casts") else {}  # torch >= 2.5
    return {**list_mode_options(mode), **exact}


def _cache_kwarg(forward) -> str:
    """transformers 5 names a forward's KV-cache argument `cache`, earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _returned_cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def _base_lm(lm: nn.Module) -> nn.Module:
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm
