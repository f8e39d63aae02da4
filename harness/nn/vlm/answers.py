"""Text -> class: the sentence GMM trains on, the class part of a written answer, f_text scores."""
from __future__ import annotations

import re
from typing import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor


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
    # A trained model writes few distinct answers (about one per class): each distinct class
    # text is embedded once, which on a GPU batch of thousands is most of f_text's cost.
    texts = [class_text(a) for a in answers]
    distinct = list(dict.fromkeys(texts))
    where = {t: i for i, t in enumerate(distinct)}
    emb = F.normalize(text_encoder(distinct).float(), dim=1)[[where[t] for t in texts]]
    return emb @ F.normalize(class_embeddings.float(), dim=1).T
