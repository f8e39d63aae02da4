"""Checkpoints after each task: what a run needs to resume exactly where it stopped.

One file, written atomically: a header line with the SHA-256 of the payload, then
the payload saved by torch.save. Loading verifies the digest and uses
torch.load(weights_only=True), so a checkpoint can hold tensors, numbers, strings
and containers of them, never code.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from harness.errors import HarnessError
from harness.atomic import atomic_write_bytes

FILENAME = "checkpoint.pt"
MAGIC = b"CILHARNESS-CKPT-1 sha256="
FORMAT_VERSION = 1


def fingerprint(config: Mapping[str, Any]) -> str:
    """A digest of everything that decides a run's results: a checkpoint resumes only its own run."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def rng_state() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out = {
        "python": [version, list(state), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, state: Mapping[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **state}, buf)
    payload = buf.getvalue()
    atomic_write_bytes(path, MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def load(path: Path) -> dict[str, Any]:
    """The checkpoint's state, or HarnessError if it is damaged or not ours."""
    raw = Path(path).read_bytes()
    header, _, payload = raw.partition(b"\n")
    if not header.startswith(MAGIC):
        raise HarnessError(f"checkpoint {path} is not a harness checkpoint; --restart starts this run over")
    if hashlib.sha256(payload).hexdigest().encode() != header[len(MAGIC):]:
        raise HarnessError(f"checkpoint {path} is corrupt (checksum mismatch); --restart starts this run over")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors of many kinds: all mean "unusable"
        raise HarnessError(f"checkpoint {path} cannot be read ({type(exc).__name__}); --restart starts this run over") from exc
    if state.get("format") != FORMAT_VERSION:
        raise HarnessError(f"checkpoint {path} has format {state.get('format')}, expected {FORMAT_VERSION}; --restart starts this run over")
    return state
