"""Activation collection: read a hook point over a dataset, on the hooked path (exact by definition)."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from emlens.runner.core import runner_for


@torch.no_grad()
def collect_activations(
    model: Any, dataset: Any, hook_name: str, batch_size: int = 8, assistant_only: bool = True, intervention: Any | None = None
) -> Float[Tensor, "n_tokens d"]:
    """Activations at ``hook_name`` for every assistant token (or every real token) of ``dataset``.

    Runs the TransformerLens bridge with its hooks (any other hooks on the model fire too), with
    ``intervention`` applied if one is given.
    """
    from emlens.interventions import check_hook_name

    check_hook_name(model, hook_name)
    runner = runner_for(model)
    plan = runner.plan(intervention, cache_prefix=False)
    rows: list[Tensor] = []
    store: dict[str, Tensor] = {}

    def grab(act: Tensor, hook: Any) -> None:
        store["act"] = act.detach()

    if intervention is not None and intervention.acts_per_position():
        batch_size = 1  # its positions count within each sequence: every row runs alone, unpadded (as the runner does)
    for batch in dataset.batches(batch_size):
        batch = batch.to(runner.device)
        with runner.applied(intervention, plan), model.hooks(fwd_hooks=[(hook_name, grab)]):
            model(batch.input_ids, attention_mask=batch.attention_mask)
        mask = batch.loss_mask if assistant_only else batch.attention_mask.bool()
        rows.append(store["act"][mask.to(store["act"].device)].float().cpu())
    return torch.cat(rows)
