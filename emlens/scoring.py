"""What a scored token is, and the two quantities computed on scored tokens: NLL and KL.

Every loss in emlens goes through these functions: the SFT loss in training, ``evaluate_loss``,
every sweep and the pre-training KL. Position ``t`` of a sequence predicts token ``t + 1``;
it is *scored* when token ``t + 1`` is a real assistant token (:attr:`ChatBatch.scored_positions`).
The KL term is averaged over real tokens (never padding) and summed, not averaged, over the
vocabulary.

:func:`softcapped` and :func:`nll_sum_unchecked` also run inside ``torch.compile``'d code (the
runner's compiled unembedding), so they carry ``@no_type_check``: the test suite checks the
annotations of every emlens function at run time (beartype through jaxtyping's import hook),
and dynamo cannot trace those checks (a check of named dimensions fails on matching shapes; on
some torch versions checking a plain ``float`` argument breaks the trace too).
"""

from __future__ import annotations

from typing import no_type_check

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor


def nll_per_token(logits: Float[Tensor, "n vocab"], targets: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Next-token cross-entropy of each row of ``logits`` against its target token (float32)."""
    return F.cross_entropy(logits.float(), targets.to(logits.device), reduction="none")


def nll_sum(logits: Float[Tensor, "n vocab"], targets: Int[Tensor, " n"]) -> Float[Tensor, ""]:
    """Summed next-token cross-entropy (float32): divide by the token count of the whole batch."""
    return nll_sum_unchecked(logits, targets)


@no_type_check  # traced by torch.compile: see the module docstring
def nll_sum_unchecked(logits: Tensor, targets: Tensor) -> Tensor:
    """:func:`nll_sum` without the run-time shape check, for code that ``torch.compile`` traces."""
    return F.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum")


def kl_per_token(base_logits: Float[Tensor, "*rows vocab"], steered_logits: Float[Tensor, "*rows vocab"]) -> Float[Tensor, "*rows"]:
    """``KL(p_base ‖ p_steered)`` at each row, summed over the vocabulary (not divided by it)."""
    base_logp = F.log_softmax(base_logits.float(), dim=-1)
    steered_logp = F.log_softmax(steered_logits.float(), dim=-1)
    return (base_logp.exp() * (base_logp - steered_logp)).sum(-1)


def masked_mean(values: Float[Tensor, "*shape"], mask: Tensor) -> Float[Tensor, ""]:
    """Mean of ``values`` where ``mask`` is set (values elsewhere, even non-finite ones, are ignored)."""
    mask = mask.bool()
    return values.masked_fill(~mask, 0).sum() / mask.sum().clamp(min=1)


@no_type_check  # traced by torch.compile: see the module docstring
def softcapped(logits: Tensor, cap: float | None) -> Tensor:
    """``cap · tanh(logits / cap)`` (Gemma's final logit soft-cap), or ``logits`` when there is none."""
    return torch.tanh(logits / cap) * cap if cap else logits
