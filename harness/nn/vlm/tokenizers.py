"""Tokenizers of the stack: it needs only encode (no special tokens added) and decode."""
from __future__ import annotations

import re
from typing import Sequence


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
