"""Tiny random-init models of every architecture emlens claims, plus an unproved one (GPT-2).

Each comes as a pair: the plain transformers model (the independent reference) and a
TransformerLens bridge over a separate deep copy with identical weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from emlens.models import bridge_from_hf, byte_tokenizer

PROVED = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text")


def tiny_config(arch: str, tokenizer: Any, n_layers: int = 4, d_model: int = 64) -> Any:
    from transformers import (
        GPT2Config, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config,
    )

    common = dict(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    # sliding windows shorter than the test sequences, so that layer types matter
    window = dict(head_dim=16, sliding_window=8)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "gemma2":
        return Gemma2Config(**common, **window, final_logit_softcapping=3.0, attn_logit_softcapping=5.0)
    if arch == "gemma3_text":
        cfg = Gemma3TextConfig(**common, **window, final_logit_softcapping=3.0)
        cfg.architectures = ["Gemma3ForCausalLM"]
        return cfg
    if arch == "gpt2":
        return GPT2Config(vocab_size=len(tokenizer), n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=512,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    raise ValueError(arch)


def tiny_pair(
    arch: str, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32, prepare: Any = None, **config: Any
) -> tuple[Any, Any]:
    """``(plain transformers model, bridge)`` with identical weights (float32 on the CPU by default), eval mode;
    ``config`` overrides settings of the architecture's tiny config (e.g. ``sliding_window=8``); ``prepare`` is
    called on the bridged model before the bridge is built (the reference is copied before it)."""
    from transformers import AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_config(arch, tokenizer)
    for name, value in config.items():
        setattr(cfg, name, value)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    for p in hf.parameters():  # random-init norms are all ones; vary them so that norm bugs show
        if p.ndim == 1:
            with torch.no_grad():
                p.add_(0.1 * torch.randn_like(p))
    hf = hf.to(device=device, dtype=dtype)
    reference = copy.deepcopy(hf).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    if prepare is not None:
        prepare(hf)
    bridge = bridge_from_hf(hf, tokenizer, name=f"tiny-{arch}")
    return reference, bridge
