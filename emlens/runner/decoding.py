"""Cached decoding of the plain model's blocks with a preallocated KV cache (and CUDA graphs on CUDA).

transformers' ``generate`` grows its KV cache by concatenation, so every step copies the whole
cache of every layer, and it reads a finished-flag back from the GPU every step, so the host's
launch time adds to the GPU's: at 14B on an H200, batch 400, a step took 81 ms; here 43 ms
(``benchmarks/RESULTS.md``). This decoder keeps the same computation:

* the prompt batch is left-padded exactly as for ``generate``: slot ``j`` of row ``r`` holds the
  same token at the same rotary position (the row's count of real tokens before it), and pad slots
  are masked out of every real token's attention;
* keys and values are written in place into one buffer per layer (``width + max_new_tokens``
  slots), and each step attends over the written slots only (rounded up to :data:`SLOT_BLOCK`);
* grouped-query attention for a single query runs on the key/value heads (each KV head's query
  heads as its queries), as transformers does, without repeating keys and values;
* the next token is drawn as ``generate`` draws it: logits in float32, divided by the temperature,
  nucleus-filtered, softmax, ``torch.multinomial`` (greedy: argmax); finished rows take the pad token;
* on CUDA each step's forward, for each :data:`SLOT_BLOCK` of cache length, is captured once as a
  CUDA graph and replayed; the finished-flag is read every :data:`CHECK_EVERY` steps. The extra steps
  after the last row finishes emit only pad tokens and are trimmed, so the output equals
  ``generate``'s.

Runs only where the plain blocks run padding-free (:attr:`Architecture.packable`: full causal
attention with the Llama calling convention) and all weights sit on one device
(:func:`emlens.runner.sampling.slot_decodable`). ``tests/test_parity.py`` checks tokens, seeded
samples and logits against plain transformers' ``generate`` on every such architecture,
``tests/test_integration_smollm2.py`` on the real default model, and ``gpu_tests`` the graphs.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from emlens.runner.plain import decoder_stack

# Cache slots are attended in blocks of this many: one CUDA graph per block of cache length.
SLOT_BLOCK = 64
# Steps between reads of the finished-flag from the GPU (each read waits for the GPU to catch up).
CHECK_EVERY = 16
ATTENTION_NAME = "emlens_slots"

# Every SDPA kernel but cuDNN's, which PyTorch prefers on recent GPUs. cuDNN plans each new shape afresh on the host,
# and a KV cache grows by one position per decoding step, so every layer re-plans at every step: at 14B on an H200
# (batch 400) that took 3.9 ms of host time per attention call, about 190 ms per step against 35 ms of GPU work
# (benchmarks/raw/h200_probe_decode_paths.json). The other kernels compute the same attention (the GPU tests compare
# greedy decoding with plain transformers'); on the CPU, cuDNN is never used, so nothing changes there.
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Under CUDA graphs the planning would cost only the captures' time, about 0.2 s per captured block at 14B.


class SlotCache:
    """Keys and values of every layer in preallocated slots; each call writes ``write`` and attends ``[0, attend)``."""

    def __init__(self, n_layers: int, batch: int, kv_heads: int, head_dim: int, slots: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, kv_heads, slots, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.write: Int[Tensor, " q"] = torch.zeros(1, dtype=torch.long, device=device)
        self.attend = 0

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """transformers' cache protocol: store this call's keys and values, return every attended slot's."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.write, key.to(keys.dtype))
        values.index_copy_(2, self.write, value.to(values.dtype))
        return keys[:, :, : self.attend], values[:, :, : self.attend]


def slot_attention(
    module: Any,
    query: Float[Tensor, "batch heads q dim"],
    key: Float[Tensor, "batch kv_heads kv dim"],
    value: Float[Tensor, "batch kv_heads kv dim"],
    attention_mask: Bool[Tensor, "batch 1 q kv"] | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Float[Tensor, "batch q heads dim"], None]:
    """SDPA over the attended slots under a boolean mask (a transformers attention function).

    One query: each KV head's query heads attend as that head's queries (no repeated keys),
    as transformers' SDPA attention does; a prompt: keys and values repeated per query head.
    """
    batch, heads, q_len, dim = query.shape
    groups = heads // key.shape[1]
    if q_len == 1 and groups > 1:
        out = F.scaled_dot_product_attention(
            query.reshape(batch, key.shape[1], groups, dim), key, value, attn_mask=attention_mask, scale=scaling
        )
        return out.reshape(batch, heads, 1, dim).transpose(1, 2), None
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def _slot_attention(config: Any) -> Iterator[None]:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, slot_attention)
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous


def _cache_keyword(layer: Any) -> str:
    """The keyword a decoder layer takes its KV cache under (``cache`` from transformers 5.2x, ``past_key_values`` before).

    Read from the layer's class: a dispatched layer's own ``forward`` is accelerate's ``(*args, **kwargs)`` wrapper.
    """
    return "cache" if "cache" in inspect.signature(type(layer).forward).parameters else "past_key_values"


def next_tokens(logits: Float[Tensor, "batch vocab"], temperature: float, top_p: float) -> Int[Tensor, " batch"]:
    """The next token as ``generate`` picks it from float32 logits (its temperature and top-p warpers, then one multinomial draw)."""
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits / temperature if temperature != 1.0 else logits
    if top_p < 1.0:  # transformers' TopPLogitsWarper: drop the lowest tokens whose total probability is ≤ 1 - top_p
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)


class SlotDecoder:
    """One left-padded batch decoded through the plain model's blocks into a :class:`SlotCache`."""

    def __init__(
        self,
        plain: Any,
        input_ids: Int[Tensor, "batch width"],
        attention_mask: Int[Tensor, "batch width"],
        max_new_tokens: int,
        graphs: bool = True,
    ):
        self.plain = plain
        self.decoder = decoder_stack(plain)
        self.layers = list(self.decoder.layers)
        self.cache_keyword = _cache_keyword(self.layers[0])
        config = plain.config.get_text_config() if hasattr(plain.config, "get_text_config") else plain.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        batch, width = input_ids.shape
        device = input_ids.device
        dtype = self.decoder.embed_tokens.weight.dtype
        self.width, self.slots = width, width + max_new_tokens
        self.cache = SlotCache(len(self.layers), batch, kv_heads, head_dim, self.slots, dtype, device)
        # which slots hold a real token (prompt padding never does; every generated slot does, as in generate)
        self.filled = torch.zeros(batch, self.slots, dtype=torch.bool, device=device)
        self.filled[:, :width] = attention_mask.bool()
        self.prompt_ids, self.prompt_mask = input_ids, attention_mask
        # the step's inputs, in fixed buffers (a CUDA graph reads them where it was captured)
        self.step_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.step_positions = attention_mask.sum(-1, keepdim=True).long() - 1  # position of the last prompt token
        self.write_slot = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[Any, Tensor]] = {}
        self.pool: Any = None
        self.use_graphs = graphs and device.type == "cuda"

    def _forward(self, ids: Tensor, positions: Tensor, mask: Tensor) -> Float[Tensor, "batch vocab"]:
        hidden = self.decoder.embed_tokens(ids)
        rotary = self.decoder.rotary_emb(hidden, positions)
        for layer in self.layers:
            out = layer(
                hidden,
                attention_mask=mask,
                position_ids=positions,
                position_embeddings=rotary,
                use_cache=True,
                **{self.cache_keyword: self.cache},
            )
            hidden = out[0] if isinstance(out, tuple) else out
        # normed at every position, then the last taken, as transformers does (a norm's reduction can round
        # differently for another number of rows)
        hidden = self.decoder.norm(hidden)[:, -1]
        return self.plain.get_output_embeddings()(hidden).float()

    def prefill(self) -> Float[Tensor, "batch vocab"]:
        """Next-token logits after the prompt (the cache now holds its keys and values)."""
        width = self.width
        self.cache.write = torch.arange(width, device=self.filled.device)
        self.cache.attend = width
        real = self.filled[:, :width]
        causal = torch.ones(width, width, dtype=torch.bool, device=real.device).tril()
        # a real token sees the real tokens up to itself; a pad slot sees itself only (its output is never read,
        # but a pad slot attending nothing would turn its keys and values into NaN, and 0 · NaN is NaN)
        mask = (causal & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=real.device)
        positions = (self.prompt_mask.long().cumsum(-1) - 1).masked_fill(self.prompt_mask == 0, 1)
        return self._forward(self.prompt_ids, positions, mask[:, None])

    def _attend(self, slot: int) -> int:
        return min(self.slots, (slot // SLOT_BLOCK + 1) * SLOT_BLOCK)

    def _step_eager(self, attend: int) -> Tensor:
        self.cache.attend = attend
        mask = self.filled[:, None, None, :attend]
        return self._forward(self.step_ids, self.step_positions, mask)

    def step(self, tokens: Int[Tensor, " batch"], slot: int) -> Float[Tensor, "batch vocab"]:
        """Logits after feeding ``tokens`` into cache slot ``slot``."""
        self.step_ids.copy_(tokens[:, None])
        self.step_positions.add_(1)
        self.filled[:, slot] = True
        self.write_slot.fill_(slot)
        self.cache.write = self.write_slot
        attend = self._attend(slot)
        if self.use_graphs and attend not in self.graphs:
            try:
                self.graphs[attend] = self._capture(attend)
            except RuntimeError as err:  # something in the step cannot be captured (a host sync in a hook): run eagerly
                cause = f"; raised inside the step: {err.__context__}" if err.__context__ is not None else ""
                warnings.warn(f"decoding without CUDA graphs: capturing a step failed ({err}{cause})", RuntimeWarning, stacklevel=2)
                self.use_graphs = False
        if not self.use_graphs:
            return self._step_eager(attend)
        graph, logits = self.graphs[attend]
        graph.replay()
        return logits

    def _capture(self, attend: int) -> tuple[Any, Tensor]:
        """A CUDA graph of one step attending ``attend`` slots (a warm-up step first, on a side stream, as CUDA asks).

        Everything happens on the model's GPU, whichever GPU is current: the capture stream is made there (the
        default capture stream lives on the GPU current when first used, where a model on another GPU would launch
        nothing into the graph), and so is the generator the capture marks."""
        device = self.filled.device
        with torch.cuda.device(device):
            stream = torch.cuda.Stream(device=device)
            previous = torch.cuda.current_stream(device)
            stream.wait_stream(previous)
            with torch.cuda.stream(stream):
                self._step_eager(attend)  # writes the same keys and values to the same slot as the replay below
            previous.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            generator = torch.cuda.default_generators[device.index]
            seed, offset = generator.initial_seed(), generator.get_offset()
            try:
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    logits = self._step_eager(attend)
            except BaseException:
                _recover_from_failed_capture(device, previous, self.pool, generator, seed, offset)
                self.graphs.clear()  # never replayed again (decoding goes on eagerly): their memory can go
                raise
        return graph, logits


def _recover_from_failed_capture(device: torch.device, stream: Any, pool: Any, generator: torch.Generator, seed: int, offset: int) -> None:
    """Put back what a capture that failed part-way leaves behind (``benchmarks/probe_failed_capture_rng.py``).

    ``torch.cuda.graph`` ends the capture before it restores the stream, so when ending fails the capture stream
    stays current; the caching allocator still routes the capture stream's allocations to the graph's pool and counts
    a capture under way; and the device's default generator stays marked as capturing, so every random op on that
    device afterwards (sampling at a temperature, any user code) raises "Offset increment outside graph capture
    encountered unexpectedly": neither resetting the graph nor reseeding clears that mark, a new state does. The
    generator gets a fresh state at ``seed`` and ``offset``, where it stood before the capture.
    """
    torch.cuda.set_stream(stream)
    end_pool = getattr(torch._C, "_cuda_endAllocateToPool", None)
    if end_pool is not None:
        try:
            end_pool(device.index, pool)
        except RuntimeError:
            pass  # the capture ended the pool's routing itself before it failed
    fresh = torch.Generator(device=device)
    fresh.manual_seed(seed)
    fresh.set_offset(offset)
    generator.graphsafe_set_state(fresh.graphsafe_get_state())


@torch.no_grad()
def decode(
    plain: Any,
    input_ids: Int[Tensor, "batch width"],
    attention_mask: Int[Tensor, "batch width"],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos: list[int],
    pad: int,
    keep_logits: bool = False,
    graphs: bool = True,
) -> tuple[Int[Tensor, "batch new"], Float[Tensor, "new batch vocab"] | None]:
    """New tokens for a left-padded batch (pad after a row's EOS), as ``generate`` returns them; optionally every step's
    logits. ``graphs=False`` runs every step eagerly on CUDA too (the same kernels, launched one by one)."""
    decoder = SlotDecoder(plain, input_ids, attention_mask, max_new_tokens, graphs)
    eos_ids = torch.tensor(eos, device=input_ids.device)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens: list[Tensor] = []
    kept: list[Tensor] = []
    with _slot_attention(plain.config), sdpa_kernel(DECODE_SDPA_BACKENDS):
        logits = decoder.prefill()
        for step in range(max_new_tokens):
            if keep_logits:
                kept.append(logits.clone())
            new = next_tokens(logits, temperature, top_p)
            new = torch.where(unfinished, new, torch.full_like(new, pad))
            tokens.append(new)
            unfinished &= ~torch.isin(new, eos_ids)
            last = step == max_new_tokens - 1
            if last or ((step + 1) % CHECK_EVERY == 0 and not bool(unfinished.any())):
                break
            logits = decoder.step(new, decoder.width + step)
    out = torch.stack(tokens, dim=1)
    out = out[:, : _steps_run(out, eos_ids)]
    logits_out = torch.stack(kept)[: out.shape[1]] if keep_logits else None
    return out, logits_out


def _steps_run(tokens: Int[Tensor, "batch new"], eos_ids: Tensor) -> int:
    """How many steps ``generate`` runs: up to the step where the last row emits its EOS (or all of them)."""
    ended = torch.isin(tokens, eos_ids).long().cummax(dim=1).values.bool()  # a row is finished from its EOS on
    done = ended.all(dim=0)
    return int(done.nonzero()[0, 0]) + 1 if bool(done.any()) else tokens.shape[1]
