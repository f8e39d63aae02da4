"""Stage-1 alignment of GMM's offline stack: the offline counterpart of MiniGPT-4's pretraining.

The paper fine-tunes a projection that already maps images to words (docs/methods.md, GMM);
the offline stack's projection starts random. Before any task, it learns to answer the
method's own prompt ("This is a <noun> of a <class>.") on images of the dataset's classes
that neither the run's protocol nor any *built-in* protocol of that dataset uses: no class a
protocol evaluates on is ever seen, and one alignment serves every built-in protocol, seed
and method variant of the dataset (quickdraw20/40/100 and quickdraw_fscil share the 245
QuickDraw classes outside the first 100 of their order). A protocol a user registers leaves
the built-in protocols' alignment alone; its own runs align without its classes.

The result is cached: one checksummed file per key (stack, encoder, LM, prompt, the
alignment classes and settings), written atomically, verified when read and rebuilt when
damaged. Building it never touches the run's random state. The offline stack's QuickDraw
alignment ships in methods/data/ (built here by the same code: 245 classes x 40 doodles, one
epoch, ~13 min on 2 CPU cores), so the default run does not pay for it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from harness import checkpoint
from harness.data import class_order, load_splits
from harness.errors import HarnessError
from harness.protocol import Protocol
from harness.registry import BUILTIN_PROTOCOLS, PROTOCOLS


@dataclass(frozen=True)
class AlignmentSettings:
    per_class: int = 40  # training images per alignment class (of QuickDraw's 80)
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 16
    warmup_steps: int = 100  # then a per-iteration cosine to lr / 100, as MiniGPT-4's stage 1
    seed: int = 0  # fixed: the same starting point for every seed of every run


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  min_lr: float) -> torch.optim.lr_scheduler.LRScheduler:
    """MiniGPT-4's schedule, stepped per iteration: a linear warm-up, then cosine to min_lr."""
    warmup = min(warmup_steps, total_steps)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total_steps - warmup), eta_min=min_lr)
    if not warmup:
        return cosine
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def reserved_classes(protocol: Protocol, class_names: list[str]) -> set[int]:
    """Dataset labels the alignment must not see: the run's own protocol's and those of the
    project's built-in protocols of that dataset. Protocols a user registers (plugins, entry
    points) never change another protocol's alignment, so a built-in protocol's GMM run is the
    same whatever else is registered."""
    used = set(class_order(protocol, class_names))
    for name in sorted(BUILTIN_PROTOCOLS):
        other = PROTOCOLS.get(name)
        if other.dataset == protocol.dataset and other.dataset_kwargs == protocol.dataset_kwargs:
            try:
                used |= set(class_order(other, class_names))
            except HarnessError:  # a protocol that does not fit this copy of the dataset
                continue
    return used


def alignment_classes(protocol: Protocol, data_root=None):
    """(the dataset's splits, labels of the alignment classes): those neither the run's protocol
    nor any built-in protocol uses."""
    splits = load_splits(protocol, data_root)
    reserved = reserved_classes(protocol, list(splits.class_names))
    pool = [c for c in range(len(splits.class_names)) if c not in reserved]
    if not pool:
        raise HarnessError(f"gmm.align=disjoint: every class of dataset {protocol.dataset} belongs to a registered "
                           "protocol, so none is left to align on; use gmm.align=none")
    return splits, pool


def alignment_data(protocol: Protocol, per_class: int, data_root=None) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(training images, names of the alignment classes, label index into those names)."""
    splits, pool = alignment_classes(protocol, data_root)
    names = list(splits.class_names)
    index = {c: k for k, c in enumerate(pool)}
    taken: dict[int, int] = {}
    picked, labels = [], []
    for i, t in enumerate(splits.train.targets):  # file order: the first per_class of each class
        k = index.get(int(t))
        if k is None or taken.get(k, 0) >= per_class:
            continue
        taken[k] = taken.get(k, 0) + 1
        picked.append(i)
        labels.append(k)
    images = torch.stack([splits.train[i][0] for i in picked])
    return images, [names[c] for c in pool], torch.tensor(labels)


def alignment_key(vlm, noun: str, class_names: list[str], settings: AlignmentSettings) -> str:
    lm = {k: v for k, v in vlm.lm.config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
    ident = {"stack": vlm.stack_name, "encoder": vlm.encoder_id, "lm": lm,
             "prompt": [p.tolist() for p in vlm.prompt_ids], "noun": noun, "classes": class_names,
             "proj": str(vlm.proj), "settings": asdict(settings)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def train_alignment(vlm, encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, answers: torch.Tensor,
                    settings: AlignmentSettings, quiet: bool = False, amp=contextlib.nullcontext) -> dict:
    """Train vlm.proj from a fresh initialisation on (image, answer) pairs; returns a record."""
    s = settings
    device = next(vlm.proj.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(s.seed)
        for m in vlm.proj.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        # float16, as GMM's feature cache keeps them for the tasks
        feats = torch.cat([encode(c).to(torch.float16).cpu() for c in tqdm(
            images.split(256), desc="alignment: encoder features", leave=False, disable=quiet)])
        g = torch.Generator().manual_seed(s.seed)
        steps = s.epochs * math.ceil(len(images) / s.batch_size)
        opt = torch.optim.AdamW(vlm.proj.parameters(), lr=s.lr, weight_decay=0.05)
        sched = warmup_cosine(opt, steps, s.warmup_steps, s.lr / 100)
        vlm.train()
        start, losses = time.perf_counter(), []
        bar = tqdm(total=steps, desc="alignment (stage 1, once per stack)", disable=quiet)
        for _ in range(s.epochs):
            for batch in torch.randperm(len(images), generator=g).split(s.batch_size):
                a = answers[batch]
                a = a[:, : int((a >= 0).sum(1).max())].to(device)
                with amp():
                    loss = vlm.loss(feats[batch].to(device), a)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
        bar.close()
    tail = losses[-max(1, len(losses) // 10):]
    return {"samples": len(images), "steps": steps, "first_loss": losses[0], "final_loss": sum(tail) / len(tail),
            "seconds": round(time.perf_counter() - start, 1)}


def aligned_projection(vlm, protocol: Protocol, encode: Callable[[torch.Tensor], torch.Tensor], cache: Path,
                       settings: AlignmentSettings = AlignmentSettings(), data_root=None, quiet: bool = False,
                       amp=contextlib.nullcontext, bundled: Path | None = None) -> dict:
    """Load vlm.proj's aligned weights, from `bundled` (read-only, shipped with the project) or
    `cache`, building them into `cache` first when neither holds a sound file for this key;
    returns what was done (the record written to the run's config)."""
    from harness.nn.vlm import answer_sentence  # lazy: vlm imports transformers

    splits, pool = alignment_classes(protocol, data_root)  # the key needs only the names
    names = [splits.class_names[c] for c in pool]
    key = alignment_key(vlm, protocol.noun, names, settings)
    filename = f"align-{key[:20]}.pt"
    for folder in (bundled, cache):
        path = folder / filename if folder is not None else None
        if path is None or not path.exists():
            continue
        try:
            state = checkpoint.load(path)
        except HarnessError as exc:
            tqdm.write(f"alignment file unusable ({exc})")
            continue
        if state.get("key") == key:
            vlm.proj.load_state_dict(state["proj"])
            return {**state["record"], "file": str(path), "built": False}
    images, names, labels = alignment_data(protocol, settings.per_class, data_root)  # building: now the images
    answers = vlm.answer_ids([answer_sentence(protocol.noun, n) for n in names])[labels]
    record = {"classes": len(names), "first_classes": names[:5], **asdict(settings),
              **train_alignment(vlm, encode, images, answers, settings, quiet, amp)}
    path = cache / filename
    checkpoint.save(path, {"key": key, "proj": {k: v.detach().cpu() for k, v in vlm.proj.state_dict().items()},
                           "record": record})
    return {**record, "file": str(path), "built": True}
