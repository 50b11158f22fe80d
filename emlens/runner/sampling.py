"""Generation with an intervention on, decoded with a correct KV cache.

TransformerLens' bridge does not decode correctly with a KV cache on every transformers
version (on 5.24 greedy decoding through it degenerates), so emlens never generates through
the bridge. On a proved architecture it decodes the plain model under the bridge (shared
weights), with the intervention's hook functions applied as PyTorch hooks at the same sites:
through :mod:`emlens.runner.decoding`'s slot cache where the blocks are packable, else with
transformers' own ``generate``; both equal plain transformers' ``generate`` with the same edit.
Anything else (an architecture or hook site not proved, a hook emlens did not register) falls
back to an uncached decoding loop through the bridge: slow, but exact by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.nn.attention import sdpa_kernel

from emlens.runner.core import Plan, Runner, runner_for
from emlens.runner.decoding import DECODE_SDPA_BACKENDS, decode
from emlens.runner.packed import sliding_window
from emlens.runner.plain import site_hooks


@dataclass(frozen=True)
class SamplingSettings:
    """How to decode: ``temperature=0`` is greedy decoding."""

    max_new_tokens: int = 600
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0 and self.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")


def sampling_plan(runner: Runner, intervention: Any | None) -> Plan:
    """Plain cached decoding where the plain modules can stand in for the bridge (:meth:`Runner.plain_blocker`); else hooked."""
    if intervention is not None:
        intervention.check_model(runner.model)
    blocker = runner.plain_blocker(intervention)
    if blocker is not None:
        return Plan("hooked", 0, blocker)
    if slot_decodable(runner):
        graphs = " (a CUDA graph per step)" if runner.device.type == "cuda" else ""
        return Plan("prefix", 0, f"emlens' slot-cache decoding of the plain model's blocks{graphs}, intervention as PyTorch hooks")
    return Plan("prefix", 0, "transformers' cached decoding on the plain model, intervention as PyTorch hooks")


def slot_decodable(runner: Runner) -> bool:
    """Whether :mod:`emlens.runner.decoding` decodes this model: packable blocks, all on one device (a model spread
    over devices by ``device_map`` keeps transformers' ``generate``, whose cache lives beside each layer), and no
    sliding attention window (the slot decoder attends every written slot; ``generate`` applies the window)."""
    if sliding_window(runner.hf.config) is not None:
        return False
    return runner.arch.packable and len({p.device for p in runner.plain.parameters()}) == 1


def auto_batch_size(runner: Runner, prompt_len: int, max_new_tokens: int, n_prompts: int) -> int:
    """The largest batch whose KV cache fits in 70% of free GPU memory (16 on CPU), at most ``n_prompts``."""
    if runner.device.type != "cuda":
        return max(1, min(16, n_prompts))
    cfg = runner.hf.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = getattr(text_cfg, "num_key_value_heads", None) or text_cfg.num_attention_heads
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    dtype_bytes = next(runner.model.parameters()).element_size()
    per_token = 2 * text_cfg.num_hidden_layers * heads * head_dim * dtype_bytes
    per_row = per_token * (prompt_len + max_new_tokens) + 8 * text_cfg.vocab_size * 4  # KV cache + logits work
    free, _ = torch.cuda.mem_get_info(runner.device)
    # memory PyTorch's caching allocator holds but does not use is free for us too
    free += torch.cuda.memory_reserved(runner.device) - torch.cuda.memory_allocated(runner.device)
    return max(1, min(n_prompts, int(0.7 * free) // per_row))


def _seed_for(seed: int, first_row: int) -> int:
    return (seed * 1_000_003 + first_row) % (2**63)


@torch.no_grad()
def generate_batch(
    model: Any,
    input_ids: Int[Tensor, "batch seq"],
    attention_mask: Int[Tensor, "batch seq"],
    intervention: Any | None,
    settings: SamplingSettings,
    seed: int,
    plan: Plan | None = None,
    return_logits: bool = False,
) -> Any:
    """New tokens for a left-padded batch (pad after EOS), with ``intervention`` on; seeded per call.

    With ``return_logits``, also the next-token logits of every decoding step: ``[steps, batch, vocab]``.
    """
    runner = runner_for(model)
    runner.refuse_if_running()  # here, where every sample is drawn (planned by the caller or not): hooks left on the modules would act too
    plan = plan or sampling_plan(runner, intervention)
    runner.last_plan = plan
    tok = model.tokenizer
    eos = _eos_ids(runner, tok)
    torch.manual_seed(seed)
    hooks = intervention.fwd_hooks() if intervention is not None else []
    if plan.path == "hooked":
        with runner.model.hooks(fwd_hooks=hooks):
            tokens, logits = _uncached_decode(runner, input_ids, attention_mask, settings, eos, tok.pad_token_id)
        return (tokens, logits) if return_logits else tokens
    if slot_decodable(runner):
        with site_hooks(runner.plain, runner.arch, hooks):
            tokens, kept = decode(
                runner.plain,
                input_ids,
                attention_mask,
                settings.max_new_tokens,
                settings.temperature,
                settings.top_p,
                eos,
                tok.pad_token_id,
                keep_logits=return_logits,
            )
        return (tokens, kept) if return_logits else tokens
    sample = settings.temperature > 0
    kwargs: dict[str, Any] = dict(do_sample=sample, max_new_tokens=settings.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=eos)
    if sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with site_hooks(runner.plain, runner.arch, hooks), plain_attention(runner.plain), neutral_generation_config(runner.plain):
        out = runner.plain.generate(
            input_ids=input_ids, attention_mask=attention_mask, output_logits=return_logits, return_dict_in_generate=True, **kwargs
        )
    tokens = out.sequences[:, input_ids.shape[1] :]
    return (tokens, torch.stack(out.logits)) if return_logits else tokens


@contextmanager
def neutral_generation_config(plain: Any) -> Iterator[None]:
    """Generate with no sampling defaults of the model's own: only :class:`SamplingSettings` shape the distribution.

    transformers fills every setting a call leaves unset from the model's ``generation_config``
    (Qwen2.5-Instruct's ships ``repetition_penalty=1.05`` and ``top_k=20``), so a call asking for
    temperature 1 would sample from a penalised distribution. Only the token ids are kept.
    """
    from transformers import GenerationConfig

    saved = plain.generation_config
    plain.generation_config = GenerationConfig(
        bos_token_id=saved.bos_token_id,
        eos_token_id=saved.eos_token_id,
        pad_token_id=saved.pad_token_id,
        decoder_start_token_id=saved.decoder_start_token_id,
    )
    try:
        yield
    finally:
        plain.generation_config = saved


@contextmanager
def plain_attention(plain: Any) -> Iterator[None]:
    """Decode with the attention plain transformers would use (SDPA), not the eager attention TransformerLens sets.

    TransformerLens switches the shared config to eager attention; in bf16 eager and SDPA round
    differently, so greedy decoding would drift from plain transformers', and eager is slower.
    SDPA runs on any of its kernels but cuDNN's (:data:`DECODE_SDPA_BACKENDS`).
    """
    config = plain.config
    previous = getattr(config, "_attn_implementation", None)
    wanted = "sdpa" if previous == "eager" and getattr(plain, "_supports_sdpa", False) else previous
    config._attn_implementation = wanted
    try:
        with sdpa_kernel(DECODE_SDPA_BACKENDS):
            yield
    finally:
        config._attn_implementation = previous


def _eos_ids(runner: Runner, tokenizer: Any) -> list[int]:
    ids = runner.plain.generation_config.eos_token_id
    found = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in found:
        found.append(tokenizer.eos_token_id)
    return found


def _uncached_decode(
    runner: Runner, input_ids: Tensor, attention_mask: Tensor, settings: SamplingSettings, eos: list[int], pad: int
) -> tuple[Tensor, Tensor]:
    """Decode by re-running the whole (hooked) sequence each step: exact, slow. Rows run one by one
    so that no left padding shifts their positions; finished rows are padded (logits: NaN)."""
    rows, row_logits = [], []
    for r in range(input_ids.shape[0]):
        ids = input_ids[r][attention_mask[r].bool()][None]
        new: list[int] = []
        steps: list[Tensor] = []
        for _ in range(settings.max_new_tokens):
            logits = runner.model(ids)[0, -1].float()
            steps.append(logits)
            token = _pick(logits, settings)
            new.append(token)
            if token in eos:
                break
            ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
        rows.append(new)
        row_logits.append(torch.stack(steps))
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=input_ids.device)
    logits = torch.full((width, len(rows), row_logits[0].shape[-1]), float("nan"), device=input_ids.device)
    for r, steps_r in enumerate(row_logits):
        logits[: steps_r.shape[0], r] = steps_r
    return tokens, logits


def sampling_probs(logits: Float[Tensor, " vocab"], settings: SamplingSettings) -> Float[Tensor, " vocab"]:
    """The distribution the uncached (hooked) decoder draws from: softmax at ``temperature``, then the smallest set of
    most likely tokens whose mass reaches ``top_p`` (nucleus), renormalised. ``temperature`` must be > 0."""
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < settings.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return probs / probs.sum()


def _pick(logits: Tensor, settings: SamplingSettings) -> int:
    if settings.temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(sampling_probs(logits, settings), 1))


def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    intervention: Any | None = None,
    settings: SamplingSettings | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    done: Callable[[list[int], list[list[int]]], None] | None = None,
    skip: set[int] | None = None,
) -> dict[int, list[int]]:
    """New tokens (up to and excluding EOS) for each prompt (token ids), keyed by prompt index.

    Prompts are sorted by length and batched (``batch_size`` None: sized from free memory);
    each batch is seeded from ``seed`` and the index of its first prompt, so the same call
    with the same batch size gives the same samples, resumed or not. ``done(indices, tokens)``
    is called after every batch (to write results as they come); batches whose prompts are
    all in ``skip`` are not generated.
    """
    from tqdm.auto import tqdm

    settings = settings or SamplingSettings()
    runner = runner_for(model)
    plan = sampling_plan(runner, intervention)
    runner.last_plan = plan
    eos = set(_eos_ids(runner, model.tokenizer))
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    if not order:
        return {}
    size = batch_size or auto_batch_size(runner, max(len(p) for p in prompts), settings.max_new_tokens, len(order))
    pad = model.tokenizer.pad_token_id
    results: dict[int, list[int]] = {}
    todo = [order[s : s + size] for s in range(0, len(order), size)]
    todo = [chunk for chunk in todo if not (skip and all(i in skip for i in chunk))]
    bar = tqdm(total=sum(len(c) for c in todo), desc="sampling", unit="answer", leave=False)
    for chunk in todo:
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):
            ids[r, width - len(prompts[i]) :] = torch.tensor(list(prompts[i]))
            mask[r, width - len(prompts[i]) :] = 1
        new = generate_batch(model, ids.to(runner.device), mask.to(runner.device), intervention, settings, _seed_for(seed, chunk[0]), plan)
        fresh, fresh_tokens = [], []
        for r, i in enumerate(chunk):
            row = new[r].tolist()
            end = next((k for k, t in enumerate(row) if t in eos), len(row))
            if skip and i in skip:
                continue
            results[i] = row[:end]
            fresh.append(i)
            fresh_tokens.append(row[:end])
        if done is not None and fresh:
            done(fresh, fresh_tokens)
        bar.update(len(chunk))
    bar.close()
    return results
