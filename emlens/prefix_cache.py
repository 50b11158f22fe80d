"""Run only the layers an intervention can change.

Everything below layer L is independent of an intervention at layer L, so the residual
stream entering block L can be computed once (without gradients) and reused: for every
training step's backward pass, for the steered pass of the KL term, and for every point of
an efficiency or stability sweep. :func:`logits_from_layer` runs blocks L… of the wrapped
transformers model on such a residual, with every TransformerLens hook in those blocks
firing as usual, so interventions apply unchanged.
"""

from __future__ import annotations

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


@torch.no_grad()
def residual_at(model: Any, batch: ChatBatch, layer: int) -> Float[Tensor, "batch seq d_model"]:
    """The residual stream entering block ``layer`` (blocks ``layer``… are not run)."""
    if layer == 0:
        raise ValueError("layer 0 has nothing below it to cache")
    # Read block layer-1's output (not block layer's input hook), so hooks an intervention
    # places on block ``layer`` itself only ever fire in the suffix run.
    store: dict[str, Tensor] = {}

    def grab(act: Tensor, hook: Any) -> None:
        store["resid"] = act.detach()

    model.run_with_hooks(
        batch.input_ids, attention_mask=batch.attention_mask, stop_at_layer=layer,
        fwd_hooks=[(f"blocks.{layer - 1}.hook_resid_post", grab)],
    )
    return store["resid"]


@contextmanager
def _layers_from(hf_model: Any, start: int) -> Iterator[None]:
    decoder = _decoder(hf_model)
    full = decoder.layers
    decoder.layers = nn.ModuleList(list(full)[start:])
    try:
        yield
    finally:
        decoder.layers = full


def logits_from_layer(
    model: Any, residual: Float[Tensor, "batch seq d_model"], attention_mask: Int[Tensor, "batch seq"], layer: int
) -> Float[Tensor, "batch seq vocab"]:
    """Logits from running blocks ``layer``… (and the final norm and unembedding) on ``residual``."""
    hf = model.original_model
    inputs = residual
    if getattr(hf.config, "model_type", "") in _SCALED_EMBEDDINGS:
        inputs = residual / torch.tensor(hf.config.hidden_size**0.5, dtype=residual.dtype)
    with _layers_from(hf, layer):
        return hf(inputs_embeds=inputs, attention_mask=attention_mask, use_cache=False).logits


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
