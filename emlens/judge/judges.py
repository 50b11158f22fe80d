"""What a judge is (anything that scores prompts), what it returns, and the offline judge: a local model."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from emlens.data import render_chat
from emlens.judge.prompts import JudgePrompts
from emlens.judge.scoring import TOP_LOGPROBS, Score, score_from_logprobs


@dataclass(frozen=True)
class Judgement:
    """One prompt's result. ``final`` is False when it should be asked again later (no usable reply)."""

    score: Score
    final: bool = True
    note: str = ""


@runtime_checkable
class Judge(Protocol):
    """Anything that scores prompts: returns one score (0–100), label or ``None`` per prompt."""

    def score(self, prompts: Sequence[str]) -> list[Score]: ...


def judgements(judge: Judge, prompts: Sequence[str]) -> list[Judgement]:
    """Judgements from any judge: its own ``judgements`` method when it has one, else its scores."""
    detailed = getattr(judge, "judgements", None)
    if callable(detailed):
        return list(detailed(prompts))
    return [Judgement(s) for s in judge.score(prompts)]


_HUNDRED = re.compile(r"(?<![\d.])100(?![\d.])")


class LocalModelJudge:
    """Offline judge: a local chat model scores on a single-digit scale (0–9), rescaled to 0–100.

    An approximation: small local models are far weaker judges than the paper's GPT-4o, and a 10-point scale
    is coarser. Same probability-weighting rule, no network. :func:`~emlens.judge.answers.judge_answers` puts the
    templates on its scale first (:meth:`adapt_prompts`: "from 0 to 100" becomes "from 0 to 9"), so the answers
    inside the prompts are never rewritten; :meth:`score` takes prompts as they are. The rubric's anchors keep their
    places: 0 → 0, 50 → 4.5, 100 → 9, each rescaled back to the same 0–100 value.

    Its reply is primed with ``answer_prefix`` (a digit is expected next), so it practically never answers
    ``CODE`` or ``REFUSAL``: refusals and code get a number, where an API judge's label would leave them out of
    the rates.
    """

    def __init__(self, model: Any, answer_prefix: str = "Rating (0-9): "):
        self.model = model
        self.answer_prefix = answer_prefix
        self.tokenizer = model.tokenizer
        self.digit_ids: dict[int, Any] = {}
        for d in range(10):
            ids = self.tokenizer(str(d), add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"the judge model's tokenizer does not encode digit {d} as one token")
            self.digit_ids[d] = ids[0]

    def adapt_prompts(self, prompts: JudgePrompts) -> JudgePrompts:
        """The templates on this judge's 0-9 scale; a template whose scale is written another way is refused, since
        it would ask for 0-100 and be scored as 0-9."""
        adapted = {}
        for name, template in prompts.templates.items():
            # the midpoint anchor goes to 4.5, which the rescaling (×100/9) puts back at 50: a "5" rescales to 55.6, so
            # an anchor written "5 means" made the rubric's borderline answer pass "coherence > 50"
            text = template.replace("from 0 to 100", "from 0 to 9").replace("100 means", "9 means").replace("50 means", "4.5 means")
            left = _HUNDRED.search(text)
            if left is not None:
                raise ValueError(
                    f"{prompts.source}: judge prompt {name!r} still mentions 100 after LocalModelJudge put it on its "
                    f"0-9 scale (...{text[max(0, left.start() - 30) : left.end() + 10]!r}...); it rewrites only "
                    "'from 0 to 100', '100 means' and '50 means': write the scale with those phrases, or on 0-9"
                )
            adapted[name] = text
        return JudgePrompts(adapted, f"{prompts.source} (on LocalModelJudge's 0-9 scale)")

    @torch.no_grad()
    def top_logprobs(self, prompt: str) -> dict[str, float]:
        text = render_chat(self.tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        text += self.answer_prefix  # primes a one-digit answer, as an API judge's number-only reply would be
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        device = next(self.model.parameters()).device
        logits = self.model(ids.to(device))[0, -1].float()
        logprobs = torch.log_softmax(logits, -1)
        top = torch.topk(logprobs, TOP_LOGPROBS)
        out = {self.tokenizer.decode([int(i)]): float(v) for v, i in zip(top.values, top.indices)}
        for d, tid in self.digit_ids.items():  # digits always present, so mass is measured exactly
            out[str(d)] = float(logprobs[tid])
        return out

    def score(self, prompts: Sequence[str]) -> list[Score]:
        unique = list(dict.fromkeys(prompts))
        scores = {p: score_from_logprobs(self.top_logprobs(p), max_score=9) for p in tqdm(unique, desc="local judge", leave=False)}
        return [scores[p] for p in prompts]
