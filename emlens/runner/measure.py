"""Losses and KLs over a dataset for one or many interventions, on the path the runner plans.

Sweeps (efficiency, stability, pre-training KL) evaluate many variants of one intervention on
the same data: each batch's residual below the intervention is computed once and shared by
every point, and residual offsets share passes through the upper blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from emlens.runner.core import Plan, Runner, batch_lengths, runner_for
from emlens.runner.transfer import to_device
from emlens.scoring import kl_per_token, nll_per_token, nll_sum


def acts_alike(intervention: Any | None) -> tuple[Any, ...]:
    """What decides whether interventions can share one sweep: kind, sites, and whether they offset the residual.

    Interventions with equal keys run on one plan (the base model, ``None``, has its own key); callers group
    their points by it, and :func:`sweep_plan` falls back to the hooked path for points whose keys differ.
    """
    if intervention is None:
        return ()
    return (intervention.kind, tuple(intervention.hook_names()), intervention.residual_offset() is None)


def sweep_plan(runner: Runner, interventions: Sequence[Any | None], cache_prefix: bool) -> Plan:
    """One plan for every point of a sweep: planned once (the foreign-hook scan walks the whole model);
    every other point is checked against the model and must act the same way (:func:`acts_alike`)."""
    real = [i for i in interventions if i is not None]
    if not real:
        return runner.plan(None, cache_prefix)
    first = real[0]
    plan = runner.plan(first, cache_prefix)
    for other in real[1:]:
        other.check_model(runner.model)
        if acts_alike(other) != acts_alike(first):
            plan = Plan("hooked", 0, "the sweep's points act at different sites")
    runner.last_plan = plan
    return plan


@torch.no_grad()
def loss_sweep(
    model: Any,
    dataset: Any,
    interventions: Sequence[Any | None],
    batch_size: int = 8,
    cache_prefix: bool = True,
    progress: bool = False,
    max_rows: int = 64,
    desc: str = "loss",
) -> list[float]:
    """Token-weighted mean assistant-token NLL of ``dataset`` under each intervention (None = base model)."""
    runner = runner_for(model)
    plan = sweep_plan(runner, interventions, cache_prefix)
    totals = _Totals(len(interventions), runner.device)
    count = 0
    for batch in _batches(dataset, batch_size, desc, progress):
        targets = to_device(batch.scored_targets, runner.device)
        count += int(targets.numel())
        if plan.path == "hooked":
            for k, intervention in enumerate(interventions):
                with runner.applied(intervention, plan):
                    totals.add(k, nll_sum(runner.logits(batch, batch.scored_positions, intervention, plan), targets))
            continue
        resid = runner.residual(batch.input_ids, batch.attention_mask, plan.cut)
        lengths = batch_lengths(batch)
        rows = runner.packed_rows(batch, batch.scored_positions, resid.device)
        if plan.path == "offset":
            per_pass = max(1, max_rows // len(lengths))
            for start in range(0, len(interventions), per_pass):
                chunk = interventions[start : start + per_pass]
                offsets = [runner.offset_vector(i, plan) for i in chunk]
                stacked = torch.cat([resid if v is None else resid + v.to(device=resid.device, dtype=resid.dtype) for v in offsets])
                hidden = runner.hidden(stacked, lengths * len(chunk), plan.cut).view(len(chunk), resid.shape[0], -1)
                for k in range(len(chunk)):
                    totals.add(start + k, runner.nll_sum(hidden[k].index_select(0, rows.to(hidden.device)), targets))
            continue
        for k, intervention in enumerate(interventions):
            with runner.applied(intervention, plan):
                hidden = runner.hidden(resid, lengths, plan.cut)
            totals.add(k, runner.nll_sum(hidden.index_select(0, rows.to(hidden.device)), targets))
    if count == 0:
        raise ValueError("the dataset has no scored (assistant) token to compute a loss on")
    return [t / count for t in totals.read()]


@torch.no_grad()
def example_nll_sweep(
    model: Any,
    dataset: Any,
    interventions: Sequence[Any | None],
    batch_size: int = 8,
    cache_prefix: bool = True,
    progress: bool = False,
    desc: str = "example NLLs",
) -> torch.Tensor:
    """Mean assistant-token NLL of every example under each intervention: ``[n_interventions, n_examples]`` (float64, CPU).

    Like :func:`loss_sweep`, each batch's residual below the interventions is computed once and shared by
    every point on a fast plan; the numbers are those of a plain forward with each intervention on.
    """
    runner = runner_for(model)
    plan = sweep_plan(runner, interventions, cache_prefix)
    out = torch.full((len(interventions), len(dataset)), float("nan"), dtype=torch.float64)
    for idx, batch in _batches(dataset, batch_size, desc, progress, indexed=True):
        targets = to_device(batch.scored_targets, runner.device)
        rows = batch.scored_positions.nonzero(as_tuple=True)[0]  # the example (row) of each scored position, row-major
        counts = batch.scored.sum(1).clamp(min=1).double()
        index = torch.tensor(idx)
        resid = None if plan.path == "hooked" else runner.residual(batch.input_ids, batch.attention_mask, plan.cut)
        for k, intervention in enumerate(interventions):
            with runner.applied(intervention, plan):
                logits = runner.logits(batch, batch.scored_positions, intervention, plan, resid)
            token_nll = nll_per_token(logits, targets).double().cpu()
            out[k, index] = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, rows, token_nll) / counts
    return out


class _Totals:
    """Per-point sums kept on the device and read once at the end (a read per batch would stall the GPU)."""

    def __init__(self, n: int, device: torch.device):
        self.sums = torch.zeros(n, dtype=torch.float64, device=device)

    def add(self, k: int, value: torch.Tensor) -> None:
        self.sums[k] += value.detach().to(self.sums.device, torch.float64)

    def read(self) -> list[float]:
        return [float(x) for x in self.sums.tolist()]


def _batches(dataset: Any, batch_size: int, desc: str, progress: bool, indexed: bool = False) -> Any:
    """The dataset's batches on the host (the runner moves what it needs), with a progress bar; ``indexed``: with their example indices."""
    n_batches = math.ceil(len(dataset) / batch_size)
    batches = dataset.indexed_batches(batch_size) if indexed else dataset.batches(batch_size)
    return tqdm(batches, total=n_batches, desc=desc, disable=not progress, leave=False)


@torch.no_grad()
def kl_sweep(
    model: Any,
    dataset: Any,
    interventions: Sequence[Any | None],
    batch_size: int = 8,
    cache_prefix: bool = True,
    progress: bool = False,
    desc: str = "KL",
) -> list[float]:
    """Mean per-token ``KL(p_base ‖ p_steered)`` over the real tokens of ``dataset``, for each intervention."""
    runner = runner_for(model)
    plan = sweep_plan(runner, interventions, cache_prefix)
    totals = _Totals(len(interventions), runner.device)
    count = 0
    for batch in _batches(dataset, batch_size, desc, progress):
        real = batch.attention_mask.bool()
        count += int(real.sum())
        if plan.path == "hooked":
            base = runner.logits(batch, real, None, plan)
            for k, intervention in enumerate(interventions):
                if intervention is None:
                    continue
                with runner.applied(intervention, plan):
                    totals.add(k, kl_per_token(base, runner.logits(batch, real, intervention, plan)).sum())
            continue
        resid = runner.residual(batch.input_ids, batch.attention_mask, plan.cut)
        lengths = batch_lengths(batch)
        base = runner.unembed(runner.hidden(resid, lengths, plan.cut))
        for k, intervention in enumerate(interventions):
            if intervention is None:
                continue
            with runner.applied(intervention, plan):
                steered = runner.unembed(runner.hidden(resid, lengths, plan.cut, runner.offset_vector(intervention, plan)))
            totals.add(k, kl_per_token(base, steered).sum())
    return [t / max(count, 1) for t in totals.read()]
