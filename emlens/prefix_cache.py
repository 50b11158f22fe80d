"""Run only the layers an intervention can change.

Everything below layer L is independent of an intervention at layer L, so the residual
stream entering block L can be computed once (without gradients) and reused: for every
training step's backward pass, for the steered pass of the KL term, and for every point of
an efficiency or stability sweep. :func:`logits_from_layer` runs blocks L… of the wrapped
transformers model on such a residual: block L with its TransformerLens hooks (so the
intervention applies unchanged), the blocks above it as plain transformers layers.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from emlens.data import ChatBatch

# Decoders that multiply inputs_embeds by sqrt(d_model) before block 0.
_SCALED_EMBEDDINGS = ("gemma", "gemma2", "gemma3", "gemma3_text")


def _decoder(hf_model: Any) -> Any:
    decoder = hf_model.get_decoder() if hasattr(hf_model, "get_decoder") else getattr(hf_model, "model", None)
    if decoder is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise NotImplementedError(f"{type(hf_model).__name__}: no decoder layer stack found for the prefix cache")
    return decoder


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
    return clone


def plain_layers(model: Any) -> list[nn.Module]:
    """The decoder layers without TransformerLens' hook points (shared weights), built once per model.

    Running these skips the bridge's per-module Python overhead; no TransformerLens hook fires in them.
    """
    cached = model.__dict__.get("_emlens_plain_layers")
    if cached is None:
        cached = [_unwrap(layer) for layer in _decoder(model.original_model).layers]
        model.__dict__["_emlens_plain_layers"] = cached
    return cached


class _Stop(Exception):
    pass


@torch.no_grad()
def residual_at(model: Any, batch: ChatBatch, layer: int) -> Float[Tensor, "batch seq d_model"]:
    """The residual stream entering block ``layer`` (blocks ``layer``… are not run)."""
    if layer == 0:
        raise ValueError("layer 0 has nothing below it to cache")
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
            _decoder(hf)(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return store["resid"]


@contextmanager
def _layer_stack(hf_model: Any, layers: list[nn.Module]) -> Iterator[None]:
    decoder = _decoder(hf_model)
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
    bridged = list(_decoder(model.original_model).layers)
    end = len(bridged) if hooked_blocks is None else layer + hooked_blocks
    return bridged[layer:end] + plain_layers(model)[end:]


def hidden_from_layer(
    model: Any,
    residual: Float[Tensor, "batch seq d_model"],
    attention_mask: Int[Tensor, "batch seq"],
    layer: int,
    hooked_blocks: int | None = 1,
) -> Float[Tensor, "batch seq d_model"]:
    """Final-normed hidden states from blocks ``layer``… (unembed only the rows you need with :func:`logits_at`)."""
    hf = model.original_model
    with _layer_stack(hf, _stack_from(model, layer, hooked_blocks)):
        return _decoder(hf)(inputs_embeds=_as_inputs_embeds(hf, residual), attention_mask=attention_mask, use_cache=False).last_hidden_state


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


class ExampleResiduals:
    """Residuals entering block ``layer`` for every example of a dataset, computed once.

    Stored unpadded per example (right padding and causal attention make a real token's
    residual independent of the padding), and re-padded for any batch of example indices.
    """

    def __init__(self, model: Any, dataset: Any, layer: int, batch_size: int = 8, device: str | torch.device | None = None, progress: bool = True):
        from tqdm.auto import tqdm

        self.layer = layer
        self.rows: list[Tensor | None] = [None] * len(dataset)
        dev = next(model.parameters()).device
        total = (len(dataset) + batch_size - 1) // batch_size
        for idx, batch in tqdm(dataset.indexed_batches(batch_size), total=total, desc=f"cache residuals @ block {layer}", disable=not progress, leave=False):
            resid = residual_at(model, batch.to(dev), layer)
            lengths = batch.attention_mask.sum(1).tolist()
            for i, n, row in zip(idx, lengths, resid):
                self.rows[i] = row[: int(n)].to(device or dev)

    def batch(self, indices: list[int], width: int) -> Float[Tensor, "batch seq d_model"]:
        first = self.rows[indices[0]]
        out = first.new_zeros((len(indices), width, first.shape[-1]))
        for r, i in enumerate(indices):
            row = self.rows[i]
            out[r, : row.shape[0]] = row
        return out


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
    totals = [0.0] * len(vectors)
    count = 0
    for batch in dataset.batches(batch_size):
        batch = batch.to(device)
        resid = residual_at(model, batch, layer + 1)  # layer + 1 == n_layers: only norm and unembedding remain
        targets = batch.input_ids[:, 1:]
        mask = batch.scored
        count += int(mask.sum())
        per_pass = max(1, max_rows // batch.input_ids.shape[0])
        for start in range(0, len(vectors), per_pass):
            chunk = vectors[start : start + per_pass]
            stacked = torch.cat([resid + v.to(device=resid.device, dtype=resid.dtype) for v in chunk])
            hidden = hidden_from_layer(model, stacked, batch.attention_mask.repeat(len(chunk), 1), layer + 1, hooked_blocks=0)
            hidden = hidden[:, :-1].reshape(len(chunk), *mask.shape, -1)
            for k in range(len(chunk)):
                logits = logits_at(model, hidden[k][mask]).float()
                totals[start + k] += float(torch.nn.functional.cross_entropy(logits, targets[mask], reduction="sum"))
    return [t / max(count, 1) for t in totals]

