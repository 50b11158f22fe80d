"""Run only the layers an intervention can change.

Everything below layer L is independent of an intervention at layer L, so the residual
stream entering block L can be computed once (without gradients) and reused: for every
training step's backward pass, for the steered pass of the KL term, and for every point of
an efficiency or stability sweep. :func:`logits_from_layer` runs blocks L… of the wrapped
transformers model on such a residual: block L with its TransformerLens hooks (so the
intervention applies unchanged), the blocks above it as plain transformers layers. Where the
architecture allows, caches and sweeps run padding-free through :mod:`emlens.packed`.
"""

from __future__ import annotations

import copy
import functools
import types
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from emlens.data import ChatBatch
from emlens.packed import Packing, compiled_function, decoder_stack, fast_layers, pack, run_packed, supports_packing

# Decoders that multiply inputs_embeds by sqrt(d_model) before block 0.
_SCALED_EMBEDDINGS = ("gemma", "gemma2", "gemma3", "gemma3_text")


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def _contains_bridge(module: nn.Module) -> bool:
    return any("_original_component" in m._modules for m in module.modules())


def _unwrap(module: nn.Module) -> nn.Module:
    """The transformers module under TransformerLens' bridge wrappers, sharing its weights (no copy)."""
    original = module._modules.get("_original_component")
    if original is not None:
        return _unwrap(original)
    if not _contains_bridge(module):
        return module
    clone = copy.copy(module)
    clone._modules = OrderedDict((k, _unwrap(v) if v is not None else None) for k, v in module._modules.items())
    for name in _HOOK_DICTS:
        if hasattr(module, name):
            setattr(clone, name, OrderedDict())
    _rebind_dispatch_hook(module, clone)
    return clone


def _rebind_dispatch_hook(module: nn.Module, clone: nn.Module) -> None:
    """Point a device-map (accelerate) forward wrapper at the clone: as copied, it would run the original module."""
    wrapper = module.__dict__.get("forward")
    if isinstance(wrapper, functools.partial) and wrapper.args and wrapper.args[0] is module:
        clone.forward = functools.partial(wrapper.func, clone, *wrapper.args[1:], **(wrapper.keywords or {}))
    if "_old_forward" in module.__dict__:
        clone._old_forward = types.MethodType(type(module).forward, clone)


def plain_layers(model: Any) -> list[nn.Module]:
    """The decoder layers without TransformerLens' hook points (shared weights), built once per model.

    Running these skips the bridge's per-module Python overhead; no TransformerLens hook fires in them.
    """
    cached = model.__dict__.get("_emlens_plain_layers")
    if cached is None:
        cached = [_unwrap(layer) for layer in decoder_stack(model.original_model).layers]
        model.__dict__["_emlens_plain_layers"] = cached
    return cached


class _Stop(Exception):
    pass


@torch.no_grad()
def residual_at(model: Any, batch: ChatBatch, layer: int) -> Float[Tensor, "batch seq d_model"]:
    """The residual stream entering block ``layer`` (blocks ``layer``… are not run)."""
    if layer == 0:
        raise ValueError("layer 0 has nothing below it to cache")
    if supports_packing(model.original_model):
        rows, _ = packed_residual_at(model, batch.input_ids, batch.attention_mask, layer)
        out = rows.new_zeros((*batch.input_ids.shape, rows.shape[-1]))
        out[batch.attention_mask.bool().to(out.device)] = rows
        return out
    return padded_residual_at(model, batch, layer)


@torch.no_grad()
def padded_residual_at(model: Any, batch: ChatBatch, layer: int) -> Float[Tensor, "batch seq d_model"]:
    """:func:`residual_at` through the transformers decoder on the padded batch (any architecture)."""
    # Blocks 0..layer-1 run as plain transformers layers; their output is caught and the pass stopped.
    hf = model.original_model
    layers = plain_layers(model)[:layer]
    store: dict[str, Tensor] = {}

    def grab(module: nn.Module, args: Any, output: Any) -> None:
        store["resid"] = (output[0] if isinstance(output, tuple) else output).detach()
        raise _Stop

    handle = layers[-1].register_forward_hook(grab)
    try:
        with _layer_stack(hf, layers):
            decoder_stack(hf)(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return store["resid"]


@torch.no_grad()
def packed_residual_at(
    model: Any, input_ids: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"], layer: int
) -> tuple[Float[Tensor, "total d_model"], Packing]:
    """The residual entering block ``layer`` at the real tokens of a right-padded batch, packed (no padding)."""
    hf = model.original_model
    packing = Packing.from_mask(attention_mask)
    embedded = hf.get_input_embeddings()(pack(input_ids, attention_mask))
    return run_packed(hf, fast_layers(model, plain_layers(model)[:layer]), embedded, packing, final_norm=False), packing


@contextmanager
def _layer_stack(hf_model: Any, layers: list[nn.Module]) -> Iterator[None]:
    decoder = decoder_stack(hf_model)
    full = decoder.layers
    decoder.__dict__["_modules"]["layers"] = nn.ModuleList(layers)
    try:
        yield
    finally:
        decoder.__dict__["_modules"]["layers"] = full


def _as_inputs_embeds(hf: Any, residual: Tensor) -> Tensor:
    """Undo the sqrt(d_model) input scaling of decoders that apply it to inputs_embeds."""
    if getattr(hf.config, "model_type", "") in _SCALED_EMBEDDINGS:
        return residual / torch.tensor(hf.config.hidden_size**0.5, dtype=residual.dtype)
    return residual


def _stack_from(model: Any, layer: int, hooked_blocks: int | None) -> list[nn.Module]:
    bridged = list(decoder_stack(model.original_model).layers)
    end = len(bridged) if hooked_blocks is None else layer + hooked_blocks
    return bridged[layer:end] + fast_layers(model, plain_layers(model)[end:])


def hidden_from_layer(
    model: Any,
    residual: Float[Tensor, "batch seq d_model"],
    attention_mask: Int[Tensor, "batch seq"],
    layer: int,
    hooked_blocks: int | None = 1,
) -> Float[Tensor, "batch seq d_model"]:
    """Final-normed hidden states from blocks ``layer``… (unembed only the rows you need with :func:`logits_at`).

    ``attention_mask`` must be right padding (as :class:`~emlens.data.ChatBatch` makes): real tokens
    then never see padding under causal attention, so no mask is built and the fused causal
    attention kernels apply; padding rows come out as garbage and must not be read.
    """
    hf = model.original_model
    if not bool((attention_mask[:, :-1] >= attention_mask[:, 1:]).all()):
        raise ValueError("hidden_from_layer needs right-padded batches (real tokens first in every row)")
    with _layer_stack(hf, _stack_from(model, layer, hooked_blocks)):
        return decoder_stack(hf)(inputs_embeds=_as_inputs_embeds(hf, residual), use_cache=False).last_hidden_state


def logits_from_layer(
    model: Any,
    residual: Float[Tensor, "batch seq d_model"],
    attention_mask: Int[Tensor, "batch seq"],
    layer: int,
    hooked_blocks: int | None = 1,
) -> Float[Tensor, "batch seq vocab"]:
    """Logits from running blocks ``layer``… (and the final norm and unembedding) on ``residual``.

    The first ``hooked_blocks`` blocks run with their TransformerLens hooks (where the
    intervention lives); the rest run as plain transformers layers. ``None`` hooks them all.
    """
    return logits_at(model, hidden_from_layer(model, residual, attention_mask, layer, hooked_blocks))


def logits_at(model: Any, hidden: Float[Tensor, "n d_model"]) -> Float[Tensor, "n vocab"]:
    """Unembed selected hidden states (with the model's final logit soft-cap, if it has one)."""
    hf = model.original_model
    logits = hf.get_output_embeddings()(hidden)
    cap = getattr(hf.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def dataset_fingerprint(dataset: Any) -> int:
    """A hash of a dataset's token ids and loss masks (to check that a cache belongs to it)."""
    return hash(tuple((tuple(e.input_ids), tuple(e.loss_mask)) for e in dataset.examples))


def _nll_sum(head: nn.Module, hidden: Tensor, targets: Tensor, cap: float | None) -> Tensor:
    logits = head(hidden)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


def nll_sum(model: Any, hidden: Float[Tensor, "n d_model"], targets: Int[Tensor, " n"]) -> Float[Tensor, ""]:
    """Summed next-token cross-entropy of unembedded ``hidden`` against ``targets``.

    Compiled along with the blocks (the float32 log-softmax then reads the logits once
    instead of materialising a float32 copy of them).
    """
    hf = model.original_model
    fn = compiled_function(model, _nll_sum, hidden.device)
    return fn(hf.get_output_embeddings(), hidden, targets.to(hidden.device), getattr(hf.config, "final_logit_softcapping", None))


class ExampleResiduals:
    """Residuals entering block ``layer`` for every example of a dataset, computed once.

    Stored unpadded per example (right padding and causal attention make a real token's
    residual independent of the padding), and served padded (:meth:`batch`) or packed
    (:meth:`packed`) for any list of example indices. With ``base_hidden=True`` the base
    model's final-normed hidden states are kept too, so ``p_base`` for a KL term costs only
    the unembedding. Build it with no intervention applied (the blocks run unhooked anyway).
    Keep one and pass it to several training runs on the same data (``TrainingCaches``).
    """

    def __init__(
        self,
        model: Any,
        dataset: Any,
        layer: int,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        progress: bool = True,
        base_hidden: bool = False,
    ):
        from tqdm.auto import tqdm

        self.layer = layer
        self.fingerprint = dataset_fingerprint(dataset)
        self.rows: list[Tensor] = []
        self.base_rows: list[Tensor] | None = [] if base_hidden else None
        dev = next(model.parameters()).device
        hf = model.original_model
        packable = supports_packing(hf)
        total = (len(dataset) + batch_size - 1) // batch_size
        what = "residuals + base hidden" if base_hidden else "residuals"
        for batch in tqdm(dataset.batches(batch_size), total=total, desc=f"cache {what} @ block {layer}", disable=not progress, leave=False):
            batch = batch.to(dev)
            lengths = [int(n) for n in batch.attention_mask.sum(1).tolist()]
            with torch.no_grad():
                if packable:
                    resid, packing = packed_residual_at(model, batch.input_ids, batch.attention_mask, layer)
                    final = run_packed(hf, fast_layers(model, plain_layers(model)[layer:]), resid, packing) if base_hidden else None
                else:
                    padded = padded_residual_at(model, batch, layer)
                    resid = pack(padded, batch.attention_mask)
                    final = pack(hidden_from_layer(model, padded, batch.attention_mask, layer, hooked_blocks=0), batch.attention_mask) if base_hidden else None
            self.rows += [r.to(device or dev) for r in resid.split(lengths)]
            if self.base_rows is not None:
                self.base_rows += [r.to(device or dev) for r in final.split(lengths)]

    def __len__(self) -> int:
        return len(self.rows)

    def check(self, dataset: Any, layer: int, base_hidden: bool = False) -> None:
        """Raise if this cache was not built for ``dataset`` at block ``layer`` (with base hidden states if needed)."""
        if self.layer != layer:
            raise ValueError(f"residual cache holds block {self.layer} inputs, but block {layer} inputs are needed")
        if len(self) != len(dataset) or self.fingerprint != dataset_fingerprint(dataset):
            raise ValueError("residual cache was built for a different dataset")
        if base_hidden and self.base_rows is None:
            raise ValueError("residual cache has no base hidden states (build it with base_hidden=True for a KL term)")

    def batch(self, indices: list[int], width: int) -> Float[Tensor, "batch seq d_model"]:
        first = self.rows[indices[0]]
        out = first.new_zeros((len(indices), width, first.shape[-1]))
        for r, i in enumerate(indices):
            row = self.rows[i]
            out[r, : row.shape[0]] = row
        return out

    def packed(self, indices: list[int], device: str | torch.device | None = None) -> tuple[Float[Tensor, "total d_model"], Packing]:
        """The residuals of examples ``indices`` concatenated (moved to ``device``), and their packing."""
        rows = [self.rows[i] for i in indices]
        joined = torch.cat(rows).to(device or rows[0].device)
        return joined, Packing.from_lengths([r.shape[0] for r in rows], joined.device)

    def base(self, indices: list[int]) -> Float[Tensor, "total d_model"]:
        """The base model's final-normed hidden states at the real tokens of ``indices``, concatenated."""
        if self.base_rows is None:
            raise ValueError("this cache holds no base hidden states (base_hidden=False)")
        return torch.cat([self.base_rows[i] for i in indices])


class PrefixCache:
    """Residuals entering block ``layer`` for batches, computed once and kept (on ``device``).

    Batches are keyed by their token ids, so any batch seen before is served from the cache.
    """

    def __init__(self, model: Any, layer: int, device: str | torch.device | None = None, max_batches: int | None = None):
        self.model = model
        self.layer = layer
        self.device = device
        self.max_batches = max_batches
        self._store: dict[tuple, Tensor] = {}

    def _key(self, batch: ChatBatch) -> tuple:
        return (tuple(batch.input_ids.shape), hash(batch.input_ids.cpu().numpy().tobytes()), hash(batch.attention_mask.cpu().numpy().tobytes()))

    def residual(self, batch: ChatBatch) -> Tensor:
        key = self._key(batch)
        hit = self._store.get(key)
        if hit is not None:
            return hit.to(batch.input_ids.device)
        resid = residual_at(self.model, batch, self.layer)
        if self.max_batches is None or len(self._store) < self.max_batches:
            self._store[key] = resid.to(self.device) if self.device is not None else resid
        return resid

    def logits(self, batch: ChatBatch) -> Tensor:
        """Logits for ``batch`` from the cached residual (interventions at layers ≥ ``layer`` apply)."""
        return logits_from_layer(self.model, self.residual(batch), batch.attention_mask, self.layer)

    def __len__(self) -> int:
        return len(self._store)


@torch.no_grad()
def steering_sweep_losses(
    model: Any,
    vectors: list[Tensor],
    layer: int,
    dataset: Any,
    batch_size: int = 8,
    max_rows: int = 64,
) -> list[float]:
    """Assistant-token loss for each vector added to the residual stream after block ``layer``.

    The fast path for sweeps over steering vectors: blocks 0…``layer`` run once per batch,
    several sweep points share one pass through the remaining (unhooked) blocks, and logits
    are computed only at scored positions. Equals ``evaluate_loss`` with a ``SteeringVector``
    on ``blocks.{layer}.hook_resid_post`` (up to float rounding).
    """
    device = next(model.parameters()).device
    hf = model.original_model
    packable = supports_packing(hf)
    upper = fast_layers(model, plain_layers(model)[layer + 1 :]) if packable else None
    totals = [0.0] * len(vectors)
    count = 0
    for batch in dataset.batches(batch_size):
        batch = batch.to(device)
        mask = batch.scored
        targets = batch.scored_targets
        count += int(mask.sum())
        per_pass = max(1, max_rows // batch.input_ids.shape[0])
        if packable:
            # packed: no padding anywhere; position t of a sequence predicts its token t+1
            resid, packing = packed_residual_at(model, batch.input_ids, batch.attention_mask, layer + 1)
            rows = batch.scored_positions[batch.attention_mask.bool()]
        else:
            resid = residual_at(model, batch, layer + 1)  # layer + 1 == n_layers: only norm and unembedding remain
        for start in range(0, len(vectors), per_pass):
            chunk = vectors[start : start + per_pass]
            stacked = torch.cat([resid + v.to(device=resid.device, dtype=resid.dtype) for v in chunk])
            if packable:
                hidden = run_packed(hf, upper, stacked, packing.repeated(len(chunk))).view(len(chunk), packing.total, -1)
                picked = [hidden[k][rows.to(hidden.device)] for k in range(len(chunk))]
            else:
                hidden = hidden_from_layer(model, stacked, batch.attention_mask.repeat(len(chunk), 1), layer + 1, hooked_blocks=0)
                hidden = hidden[:, :-1].reshape(len(chunk), *mask.shape, -1)
                picked = [hidden[k][mask.to(hidden.device)] for k in range(len(chunk))]
            for k, h in enumerate(picked):
                totals[start + k] += nll_sum(model, h, targets)
    return [float(t) / max(count, 1) for t in totals]
