"""Residual caches: the work below an intervention, done once per example and reused.

Everything below block ``cut`` is independent of an intervention whose first site is at
block ``cut``, so the residual entering that block is computed once (without gradients) and
reused by every training step, the steered pass of a KL term, and every point of a sweep.
"""

from __future__ import annotations

import hashlib
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


def _groups(dataset: Any, batch_size: int, tokens_per_forward: int | None) -> list[list[int]]:
    """Example indices per forward: ``batch_size`` at a time, or up to ``tokens_per_forward`` padded tokens."""
    n = len(dataset.examples)
    if tokens_per_forward is None:
        return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    groups: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i, example in enumerate(dataset.examples):
        longest = max(width, len(example.input_ids))
        if current and longest * (len(current) + 1) > tokens_per_forward:
            groups.append(current)
            current, longest = [], len(example.input_ids)
        current.append(i)
        width = longest
    groups.append(current)
    return groups


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
    unembedding.
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
    ):
        runner: Runner = runner_for(model)
        self.cut = cut
        self.fingerprint = dataset_fingerprint(dataset)
        self.rows: list[Tensor] = []
        self.base_rows: list[Tensor] | None = [] if base_hidden else None
        dev = runner.device
        if tokens_per_forward is not None and dev.type == "cpu":
            tokens_per_forward = min(tokens_per_forward, CPU_TOKENS_PER_FORWARD)
        groups = _groups(dataset, batch_size, tokens_per_forward)
        what = "residuals + base hidden" if base_hidden else "residuals"
        total = sum(len(e.input_ids) for e in dataset.examples)
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"cache {what} @ block {cut}", disable=not progress, leave=False)
        for idx in groups:
            batch = collate([dataset.examples[i] for i in idx], dataset.pad_token_id)  # stays on the host: no sync
            lengths = [len(dataset.examples[i].input_ids) for i in idx]
            with torch.no_grad():
                resid = runner.residual(batch.input_ids, batch.attention_mask, cut)
                final = runner.hidden(resid, lengths, cut) if base_hidden else None
            self.rows += [r.to(device or dev) for r in resid.split(lengths)]
            if self.base_rows is not None and final is not None:
                self.base_rows += [r.to(device or dev) for r in final.split(lengths)]
            bar.update(sum(lengths))
        bar.close()

    def __len__(self) -> int:
        return len(self.rows)

    def check(self, dataset: Any, cut: int, base_hidden: bool = False) -> None:
        """Raise if this cache was not built for ``dataset`` at block ``cut`` (with base hidden states if needed)."""
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
