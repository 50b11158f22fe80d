"""Padding-free execution of decoder blocks: packed sequences, variable-length attention, compiled blocks.

A right-padded batch wastes work on its padding in every block. Here the real tokens of a
batch are concatenated into one row (:class:`Packing` records where each sequence starts),
rotary positions restart at 0 for each sequence, and attention runs per sequence: one
flash-attention kernel over all packed sequences (ATen's variable-length flash operator) on
CUDA in fp16/bf16, or one causal SDPA call per sequence elsewhere. Every real token sees exactly the keys it sees in the
padded batch, so results equal the padded run up to float rounding.

Blocks run as the plain transformers layers under TransformerLens' wrappers (shared weights,
no hooks). On CUDA, for models of at least ``COMPILE_MIN_PARAMS`` block parameters, they are
compiled with ``torch.compile`` (fusing norms, rotary and activation kernels; attention is
traced too, so each block is one graph: fewer launches from the host, which otherwise falls
behind the GPU at 14B; a one-off compilation of about a minute per process).
Set ``EMLENS_COMPILE=0`` to switch that off, ``1`` to compile whatever the size or device.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, no_type_check

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int, Shaped
from torch import Tensor, nn

from emlens.runner.plain import decoder_stack
from emlens.runner.transfer import to_device

# Below this many parameters in the decoder blocks, compiling costs more time than it saves in a typical run.
COMPILE_MIN_PARAMS = 1_000_000_000


@dataclass
class Packing:
    """Where each sequence of a packed row starts: ``cu_seqlens[i]:cu_seqlens[i+1]`` is sequence ``i``."""

    lengths: list[int]
    cu_seqlens: Int[Tensor, " n_plus_1"]
    position_ids: Int[Tensor, "1 total"]
    # The longest sequence's length as a tensor *shape* (no storage, on the CPU): compiled blocks read it
    # as a symbolic size, so a new batch's longest length costs no recompilation and no device sync.
    longest: Shaped[Tensor, "max_len 0"]

    @classmethod
    def from_lengths(cls, lengths: list[int], device: str | torch.device) -> Packing:
        if not lengths or min(lengths) < 1:
            raise ValueError(f"every packed sequence needs at least one token, got lengths {lengths}")
        # built on the CPU and moved once (a handful of tiny kernels per batch would dominate small models)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        return cls(list(lengths), to_device(cu, device), to_device(positions, device), torch.empty((max(lengths), 0)))

    @classmethod
    def from_mask(cls, attention_mask: Int[Tensor, "batch seq"], device: str | torch.device | None = None) -> Packing:
        """The packing of a right-padded batch's real tokens (on ``device``, default the mask's)."""
        return cls.from_lengths(mask_lengths(attention_mask), device or attention_mask.device)

    @property
    def total(self) -> int:
        return int(sum(self.lengths))

    @property
    def max_len(self) -> int:
        return int(max(self.lengths))

    def repeated(self, times: int) -> Packing:
        """The packing of ``times`` copies of these sequences, one after another."""
        return Packing.from_lengths(self.lengths * times, self.cu_seqlens.device)


def mask_lengths(attention_mask: Int[Tensor, "batch seq"]) -> list[int]:
    """Real tokens per row of a right-padded batch's attention mask (read from the host when the mask is there)."""
    return [int(n) for n in attention_mask.sum(1).tolist()]


def pack(padded: Shaped[Tensor, "batch seq *rest"], attention_mask: Int[Tensor, "batch seq"]) -> Shaped[Tensor, "total *rest"]:  # noqa: F821 (jaxtyping shape string)
    """The real (unpadded) rows of a right-padded batch, concatenated in batch order."""
    return padded[attention_mask.bool()]


def _compile_mode() -> str:
    mode = os.environ.get("EMLENS_COMPILE", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"EMLENS_COMPILE must be auto, 0 or 1, not {mode!r}")
    return mode


def compiles_blocks(device: torch.device, block_params: int) -> bool:
    """Whether plain blocks run compiled (``EMLENS_COMPILE``; auto: on CUDA for ≥ ``COMPILE_MIN_PARAMS`` block parameters)."""
    mode = _compile_mode()
    return mode == "1" or (mode == "auto" and device.type == "cuda" and block_params >= COMPILE_MIN_PARAMS)


class CompiledBlocks:
    """Compiled copies of plain blocks (and compiled helper functions), kept by the runner that owns a model."""

    def __init__(self, block_params: int):
        self.block_params = block_params
        self._layers: dict[int, nn.Module] = {}
        self._functions: dict[Any, Any] = {}

    def layers(self, layers: list[nn.Module]) -> list[nn.Module]:
        """``layers`` as compiled modules (shallow copies sharing weights) when compilation is on, else unchanged.

        A layer carrying a PyTorch hook anywhere inside (an intervention's site hook) runs
        uncompiled: torch.compile does not guard on module hooks, so a compiled layer traced
        without a hook would keep skipping one registered later (an adapter after a steering
        vector, or an adapter's evaluation after the hook-free cache build), without a word.
        """
        if not layers:
            return layers
        device = next(layers[0].parameters()).device
        if not compiles_blocks(device, self.block_params):
            return layers
        out = []
        for layer in layers:
            if _carries_hooks(layer):
                out.append(layer)
                continue
            compiled = self._layers.get(id(layer))
            if compiled is None:
                compiled = copy.copy(layer)
                compiled.compile(dynamic=True)
                self._layers[id(layer)] = compiled
            out.append(compiled)
        return out

    def function(self, fn: Any, device: torch.device) -> Any:
        """``fn`` compiled (once) when blocks are compiled on ``device``, else ``fn`` itself."""
        if not compiles_blocks(device, self.block_params):
            return fn
        if fn not in self._functions:
            self._functions[fn] = torch.compile(fn, dynamic=True)
        return self._functions[fn]


def _carries_hooks(module: nn.Module) -> bool:
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(sub, name, None) for sub in module.modules() for name in hooks)


def flash_usable(hidden: Tensor) -> bool:
    """Whether packed attention on ``hidden`` runs as one flash-attention kernel (CUDA, fp16/bf16, sm80+)."""
    if not hidden.is_cuda or hidden.dtype not in (torch.float16, torch.bfloat16):
        return False
    return torch.backends.cuda.is_flash_attention_available() and _capability(hidden.device.index or 0) >= (8, 0)


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@no_type_check  # traced by torch.compile, which cannot trace jaxtyping's run-time shape checks (see emlens.scoring)
def flash_packed_attention(
    module: nn.Module,
    query: Float[Tensor, "1 heads total dim"],
    key: Float[Tensor, "1 kv_heads total dim"],
    value: Float[Tensor, "1 kv_heads total dim"],
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    emlens_packing: Packing | None = None,
    **kwargs: Any,
) -> tuple[Float[Tensor, "1 total heads dim"], None]:
    """Causal attention within each packed sequence, one flash kernel for all (a transformers attention function).

    Calls ATen's flash-attention operator directly (differentiable, grouped-query aware): compiled
    blocks trace it without a graph break, and its only host-side input, the longest sequence's
    length, is a tensor's size, so a new batch needs neither a recompilation nor a device sync.
    """
    packing = _packing_or_raise(emlens_packing, attention_mask)
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    cu, longest = packing.cu_seqlens, packing.longest.shape[0]

    def run() -> Tensor:
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, longest, longest, 0.0, True, False, scale=scaling)[0]

    if torch.compiler.is_compiling():  # compiled code launches under its own device guard
        out = run()
    else:
        with torch.cuda.device(query.device):  # the kernel launches on the current device, not the tensors'
            out = run()
    return out[None], None


@torch.compiler.disable
def sdpa_packed_attention(
    module: nn.Module,
    query: Float[Tensor, "1 heads total dim"],
    key: Float[Tensor, "1 kv_heads total dim"],
    value: Float[Tensor, "1 kv_heads total dim"],
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    emlens_packing: Packing | None = None,
    **kwargs: Any,
) -> tuple[Float[Tensor, "1 total heads dim"], None]:
    """Causal attention within each packed sequence, one SDPA call per sequence (CPU, float32, older GPUs)."""
    packing = _packing_or_raise(emlens_packing, attention_mask)
    groups = query.shape[1] // key.shape[1]
    outs = []
    bounds = [int(b) for b in packing.cu_seqlens.tolist()]
    for start, end in zip(bounds[:-1], bounds[1:]):
        k = key[:, :, start:end]
        v = value[:, :, start:end]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        outs.append(F.scaled_dot_product_attention(query[:, :, start:end], k, v, is_causal=True, scale=scaling))
    return torch.cat(outs, dim=2).transpose(1, 2), None


def _packing_or_raise(packing: Packing | None, attention_mask: Tensor | None) -> Packing:
    if packing is None:
        raise RuntimeError("emlens packed attention called without a Packing (run blocks through emlens.runner.packed.run_packed)")
    if attention_mask is not None:
        raise RuntimeError("packed attention takes no attention mask: the packing defines the sequences")
    return packing


_ATTENTION = {"emlens_packed_flash": flash_packed_attention, "emlens_packed_sdpa": sdpa_packed_attention}


@contextmanager
def _packed_attention(config: Any, name: str) -> Iterator[None]:
    from transformers import AttentionInterface

    AttentionInterface.register(name, _ATTENTION[name])
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def sliding_window(config: Any) -> int | None:
    """The window of a model whose every layer attends only its last ``window`` tokens (Mistral's ``sliding_window``;
    Qwen2 and Qwen3 declare one but use it only with ``use_sliding_window``), else None.

    A sequence no longer than the window attends exactly as with full causal attention, so the packed
    blocks (full causal attention) are exact for it; a longer one is refused (:func:`check_window`).
    """
    layer_types = getattr(config, "layer_types", None)
    if layer_types:  # per-layer types (Gemma): such architectures are not packable at all
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window is not None and getattr(config, "use_sliding_window", True) else None


def check_window(config: Any, longest: int) -> None:
    """Raise when a sequence of ``longest`` tokens exceeds the model's sliding window (full attention would differ)."""
    window = sliding_window(config)
    if window is not None and longest > window:
        raise ValueError(
            f"a sequence of {longest} tokens is longer than the model's sliding attention window ({window}): emlens' packed "
            "blocks attend the whole sequence, which differs there; pass cache_prefix=False (the hooked model applies "
            "the window), or cut the data to the window"
        )


def run_packed(
    hf_model: Any,
    layers: list[nn.Module],
    hidden: Float[Tensor, "total d_model"],
    packing: Packing,
    final_norm: bool = True,
) -> Float[Tensor, "total d_model"]:
    """Run ``layers`` (decoder blocks of ``hf_model``, in order) on packed sequences; optionally the final norm."""
    if hidden.shape[0] != packing.total:
        raise ValueError(f"packed hidden states have {hidden.shape[0]} rows but the packing holds {packing.total} tokens")
    decoder = decoder_stack(hf_model)
    x = hidden[None]
    if layers:
        check_window(hf_model.config, packing.longest.shape[0])
        position_embeddings = decoder.rotary_emb(x, packing.position_ids)
        with _packed_attention(hf_model.config, "emlens_packed_flash" if flash_usable(x) else "emlens_packed_sdpa"):
            for layer in layers:
                out = layer(
                    x,
                    attention_mask=None,
                    position_ids=packing.position_ids,
                    position_embeddings=position_embeddings,
                    use_cache=False,
                    emlens_packing=packing,
                )
                x = out[0] if isinstance(out, tuple) else out
    if final_norm:
        x = decoder.norm(x)
    return x[0]
