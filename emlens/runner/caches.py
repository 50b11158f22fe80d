"""Residual caches: the work below an intervention, done once per example and reused.

Everything below block ``cut`` is independent of an intervention whose first site is at
block ``cut``, so the residual entering that block is computed once (without gradients) and
reused by every training step, the steered pass of a KL term, and every point of a sweep.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from emlens.data import collate
from emlens.runner.core import Runner, runner_for

# Residual caches are built without gradients, so one forward can take many examples. At 14B on an
# H100, forwards of 8 rows (~1,600 tokens) took 7% longer than forwards of up to this many tokens
# (benchmarks/raw/h100_profile_after.json; 4,096: 4% longer, 16,384: no faster).
CACHE_TOKENS_PER_FORWARD = 8192
# On a CPU a larger forward is no faster, and 8,192 tokens of a large model take minutes: smaller
# forwards keep the progress bar moving (it counts tokens).
CPU_TOKENS_PER_FORWARD = 1024


def _groups(examples: list[Any], indices: list[int], batch_size: int, tokens_per_forward: int | None) -> list[list[int]]:
    """``indices`` per forward: ``batch_size`` at a time, or up to ``tokens_per_forward`` padded tokens."""
    if tokens_per_forward is None:
        return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    groups: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in indices:
        longest = max(width, len(examples[i].input_ids))
        if current and longest * (len(current) + 1) > tokens_per_forward:
            groups.append(current)
            current, longest = [], len(examples[i].input_ids)
        current.append(i)
        width = longest
    if current:
        groups.append(current)
    return groups


class ResidualStore:
    """Residuals (and base final hidden states) of one model by block and example token ids, shared by caches.

    A token's residual entering a block depends only on the token ids up to it, so caches of
    different datasets that hold the same example (a mixing set holds every row of the target
    set; a KL set may hold rows of the aligned pool) compute it once. Every
    :class:`ExampleResiduals` uses one; pass the same store to caches built from the same
    model to share their work. It holds references: the tensors stay alive while any cache
    or the store does.
    """

    def __init__(self) -> None:
        self._model: weakref.ref[Any] | None = None
        self.rows: dict[int, dict[tuple[int, ...], Tensor]] = {}
        self.base: dict[int, dict[tuple[int, ...], Tensor]] = {}

    def bind(self, model: Any) -> None:
        """Tie the store to ``model`` (the first caller's); another model's residuals would be wrong."""
        if self._model is None or self._model() is None:
            if self._model is not None:  # its model is gone: what it holds was computed by that one, not this one
                self.rows.clear()
                self.base.clear()
            self._model = weakref.ref(model)
        elif self._model() is not model:
            raise ValueError("this ResidualStore holds another model's residuals; use one store per model")

    def __len__(self) -> int:
        return sum(len(rows) for rows in self.rows.values())


def dataset_fingerprint(dataset: Any) -> str:
    """A hash of a dataset's token ids and loss masks (to check that a cache belongs to it)."""
    digest = hashlib.sha256()
    for example in dataset.examples:
        digest.update(repr((example.input_ids, example.loss_mask)).encode())
    return digest.hexdigest()


class ExampleResiduals:
    """Residuals entering block ``cut`` for every example of a dataset, computed once.

    Stored unpadded per example (right padding and causal attention make a real token's
    residual independent of the padding) and served, concatenated, for any list of example
    indices. Examples are run ``batch_size`` at a time, or, with ``tokens_per_forward``, as
    many as fit in that many (padded) tokens. With ``base_hidden=True`` the base model's
    final-normed hidden states are kept too, so ``p_base`` for a KL term costs only the
    unembedding. An example whose token ids occur earlier in the dataset, or in ``store``
    (:class:`ResidualStore`, filled by earlier caches of the same model), is not run again:
    its tensors are the stored ones.
    """

    def __init__(
        self,
        model: Any,
        dataset: Any,
        cut: int,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        progress: bool = True,
        base_hidden: bool = False,
        tokens_per_forward: int | None = None,
        store: ResidualStore | None = None,
    ):
        runner: Runner = runner_for(model)
        self._model = weakref.ref(model)
        self.cut = cut
        self.fingerprint = dataset_fingerprint(dataset)
        store = store if store is not None else ResidualStore()
        store.bind(model)
        rows = store.rows.setdefault(cut, {})
        bases = store.base.setdefault(cut, {})
        dev = runner.device
        if tokens_per_forward is not None and dev.type == "cpu":
            tokens_per_forward = min(tokens_per_forward, CPU_TOKENS_PER_FORWARD)
        examples = dataset.examples
        keys = [tuple(e.input_ids) for e in examples]
        todo: list[int] = []  # the first example of each token sequence the store lacks (or lacks a base for)
        queued: set[tuple[int, ...]] = set()
        for i, key in enumerate(keys):
            if key not in queued and (key not in rows or (base_hidden and key not in bases)):
                queued.add(key)
                todo.append(i)
        what = "residuals + base hidden" if base_hidden else "residuals"
        total = sum(len(examples[i].input_ids) for i in todo)
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"cache {what} @ block {cut}", disable=not progress, leave=False)
        for idx in _groups(examples, todo, batch_size, tokens_per_forward):
            batch = collate([examples[i] for i in idx], dataset.pad_token_id)  # stays on the host: no sync
            lengths = [len(examples[i].input_ids) for i in idx]
            with torch.no_grad():
                resid = runner.residual(batch.input_ids, batch.attention_mask, cut)
                final = runner.hidden(resid, lengths, cut) if base_hidden else None
            for i, r in zip(idx, resid.split(lengths)):
                rows.setdefault(keys[i], r.to(device or dev))  # a residual already stored stays the one every cache serves
            if final is not None:
                for i, h in zip(idx, final.split(lengths)):
                    bases[keys[i]] = h.to(device or dev)
            bar.update(sum(lengths))
        bar.close()
        # a stored tensor another cache put elsewhere is moved (copied) to this cache's device; else it is shared
        place = (lambda t: t) if device is None else (lambda t: t.to(device))
        self.rows: list[Tensor] = [place(rows[key]) for key in keys]
        self.base_rows: list[Tensor] | None = [place(bases[key]) for key in keys] if base_hidden else None
        self.computed = len(todo)  # examples run through the model for this cache (the rest came from the store)

    def __len__(self) -> int:
        return len(self.rows)

    def check(self, dataset: Any, cut: int, base_hidden: bool = False, model: Any | None = None) -> None:
        """Raise if this cache was not built for ``dataset`` at block ``cut`` (with base hidden states if needed),
        or, given ``model``, by another model (its residuals and base distribution would be that model's)."""
        if model is not None and self._model() is not model:
            raise ValueError("residual cache was built by another model; build the caches with the model you train")
        if self.cut != cut:
            raise ValueError(f"residual cache holds block {self.cut} inputs, but block {cut} inputs are needed")
        if len(self) != len(dataset) or self.fingerprint != dataset_fingerprint(dataset):
            raise ValueError("residual cache was built for a different dataset")
        if base_hidden and self.base_rows is None:
            raise ValueError("residual cache has no base hidden states (build it with base_hidden=True for a KL term)")

    def packed(self, indices: list[int], device: str | torch.device | None = None) -> Float[Tensor, "total d_model"]:
        """The residuals of examples ``indices`` concatenated (moved to ``device``)."""
        return torch.cat([self.rows[i] for i in indices]).to(device or self.rows[indices[0]].device)

    def base(self, indices: list[int]) -> Float[Tensor, "total d_model"]:
        """The base model's final-normed hidden states at the real tokens of ``indices``, concatenated."""
        if self.base_rows is None:
            raise ValueError("this cache holds no base hidden states (base_hidden=False)")
        return torch.cat([self.base_rows[i] for i in indices])
