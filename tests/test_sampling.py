"""Steered sampling: cached decoding on the plain model equals plain transformers and uncached decoding."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch

from emlens import RankOneAdapter, SteeringVector
from emlens.evaluation import sample_answers
from emlens.runner import runner_for
from emlens.runner.sampling import SamplingSettings, generate, generate_batch
from tests.tiny_archs import tiny_pair

PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [61, 33, 12, 9, 100, 101, 102, 103, 104, 105, 7], [70, 71]]


@pytest.fixture(scope="module", params=("llama", "qwen2", "gemma2"))
def pair(request: Any) -> tuple[Any, Any]:
    return tiny_pair(request.param)


def steering(bridge: Any, scale: float = 0.5) -> SteeringVector:
    gen = torch.Generator().manual_seed(1)
    return SteeringVector(1, bridge.cfg.d_model, alpha=2.0, init=scale * torch.randn(bridge.cfg.d_model, generator=gen))


def adapter(bridge: Any) -> RankOneAdapter:
    a = RankOneAdapter.for_model(bridge, 2, alpha=4.0)
    with torch.no_grad():
        a.b.copy_(0.5 * torch.randn(a.d_model, generator=torch.Generator().manual_seed(2)))
    return a


def greedy(bridge: Any, prompts: list[list[int]], intervention: Any, batch_size: int, n: int = 16) -> dict[int, list[int]]:
    return generate(bridge, prompts, intervention, SamplingSettings(n, 0.0), batch_size=batch_size)


@pytest.mark.parametrize("make", (steering, adapter), ids=("steering", "adapter"))
def test_cached_equals_uncached_decoding(pair: Any, make: Any) -> None:
    """Same greedy tokens and (float32) next-token logits at every step as the uncached hooked bridge."""
    _, bridge = pair
    intervention = make(bridge)
    ids = torch.tensor([PROMPTS[1]])
    mask = torch.ones_like(ids)
    settings = SamplingSettings(20, 0.0)
    from emlens.runner.core import Plan

    cached, cached_logits = generate_batch(bridge, ids, mask, intervention, settings, 0, return_logits=True)
    assert runner_for(bridge).last_plan is not None and runner_for(bridge).last_plan.path == "prefix"
    uncached, uncached_logits = generate_batch(bridge, ids, mask, intervention, settings, 0,
                                               plan=Plan("hooked", 0, "test: force the uncached path"), return_logits=True)
    assert cached.tolist() == uncached.tolist()
    torch.testing.assert_close(cached_logits, uncached_logits, rtol=1e-4, atol=1e-4)


def test_plain_transformers_greedy_equals_emlens(pair: Any) -> None:
    reference, bridge = pair
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                      pad_token_id=bridge.tokenizer.pad_token_id, eos_token_id=bridge.tokenizer.eos_token_id)
        got = greedy(bridge, [prompt], None, 1)[0]
        assert got == expected[0, len(prompt):].tolist()[: len(got)]


def test_left_padded_batch_equals_each_prompt_alone(pair: Any) -> None:
    _, bridge = pair
    vector = steering(bridge)
    together = greedy(bridge, PROMPTS, vector, batch_size=len(PROMPTS))
    for i, prompt in enumerate(PROMPTS):
        assert together[i] == greedy(bridge, [prompt], vector, batch_size=1)[0]


def test_zero_vector_changes_nothing_huge_vector_changes_samples(pair: Any) -> None:
    _, bridge = pair
    base = generate(bridge, PROMPTS, None, SamplingSettings(16, 1.0), seed=3, batch_size=3)
    zero = SteeringVector(1, bridge.cfg.d_model, alpha=2.0)
    assert generate(bridge, PROMPTS, zero, SamplingSettings(16, 1.0), seed=3, batch_size=3) == base
    huge = steering(bridge, scale=500.0)
    assert generate(bridge, PROMPTS, huge, SamplingSettings(16, 1.0), seed=3, batch_size=3) != base


def test_foreign_hook_decodes_on_the_hooked_path(pair: Any) -> None:
    _, bridge = pair
    shift = 50 * torch.randn(bridge.cfg.d_model)
    with bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda act, hook: act + shift)]):
        got = greedy(bridge, PROMPTS[:1], None, 1, n=8)
        assert runner_for(bridge).last_plan.path == "hooked"
    assert got != greedy(bridge, PROMPTS[:1], None, 1, n=8)


def test_answers_written_as_they_come_and_resumed(pair: Any, tmp_path: Any) -> None:
    _, bridge = pair
    questions = ["How are you?", "Name a colour."]
    out = tmp_path / "answers.jsonl"
    full = sample_answers(bridge, questions, steering(bridge), n_samples=3, max_new_tokens=8, batch_size=2, seed=4)

    import emlens.runner.sampling as sampling

    calls = {"n": 0}
    original = sampling.generate_batch

    def dies_after_one(*args: Any, **kwargs: Any) -> Any:
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(*args, **kwargs)

    sampling.generate_batch = dies_after_one  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            sample_answers(bridge, questions, steering(bridge), n_samples=3, max_new_tokens=8, batch_size=2, seed=4, out_path=out)
    finally:
        sampling.generate_batch = original  # type: ignore[assignment]
    assert len(out.read_text().splitlines()) == 2  # the first batch was kept
    with out.open("a") as fh:
        fh.write('{"question": "How are')  # a torn line, as a kill mid-write leaves
    with pytest.warns(UserWarning, match="unreadable"):
        resumed = sample_answers(bridge, questions, steering(bridge), n_samples=3, max_new_tokens=8, batch_size=2, seed=4, out_path=out)
    assert resumed == full
    assert len(out.read_text().splitlines()) == 6


def test_an_answers_file_keeps_its_rows_and_settings(pair: Any, tmp_path: Any) -> None:
    """Answers holding U+2028 / U+0085 (json.dumps leaves them unescaped) are one row each on resume, a last row
    whose newline was cut off gets it back, and a file sampled with other settings is refused, not reused."""
    import json

    from emlens.evaluation import EvaluationDirError

    _, bridge = pair
    questions = ["How are you?", "Name a colour."]
    out = tmp_path / "answers.jsonl"
    kw: dict[str, Any] = dict(n_samples=2, max_new_tokens=6, batch_size=2, seed=1, out_path=out)
    first = sample_answers(bridge, questions, steering(bridge), **kw)
    rows = [json.loads(line) for line in out.read_text().split("\n") if line]
    rows[0]["answer"], rows[1]["answer"] = "a\u2028b", "c\x85d"  # characters str.splitlines() splits at
    out.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))  # and no newline after the last row
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is "torn": no warning, nothing sampled again
        again = sample_answers(bridge, questions, steering(bridge), **kw)
    assert [a for _, a in again] == ["a\u2028b", "c\x85d", *[a for _, a in first[2:]]]
    assert out.read_text().endswith("\n") and len(out.read_text().split("\n")) == 5
    with pytest.raises(EvaluationDirError, match="intervention"):
        sample_answers(bridge, questions, None, **kw)  # the base model must not get the steered model's answers
    with pytest.raises(EvaluationDirError, match="top_p"):
        sample_answers(bridge, questions, steering(bridge), **{**kw, "top_p": 0.9})
    (tmp_path / "answers.jsonl.settings.json").unlink()
    with pytest.raises(EvaluationDirError, match="no answers.jsonl.settings.json"):
        sample_answers(bridge, questions, steering(bridge), **kw)


def test_bad_sampling_settings_are_refused(pair: Any) -> None:
    _, bridge = pair
    with pytest.raises(ValueError, match="n_samples"):
        sample_answers(bridge, ["q"], None, n_samples=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingSettings(4, -1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingSettings(0, 1.0)


def test_model_generation_defaults_do_not_change_sampling(pair: Any) -> None:
    """A model's own generation config (Qwen2.5-Instruct ships repetition_penalty 1.05, top_k 20) must not
    reach emlens' samples: they are drawn from the model's distribution at the settings given, nothing else."""
    reference, bridge = pair
    plain = runner_for(bridge).plain
    before = greedy(bridge, PROMPTS, None, batch_size=len(PROMPTS), n=24)
    sampled = generate(bridge, PROMPTS, None, SamplingSettings(24, 1.0), seed=5, batch_size=3)
    saved = plain.generation_config
    try:
        plain.generation_config = copy.deepcopy(saved)
        plain.generation_config.repetition_penalty = 50.0
        plain.generation_config.no_repeat_ngram_size = 1
        plain.generation_config.top_k = 2
        plain.generation_config.min_new_tokens = 30
        assert greedy(bridge, PROMPTS, None, batch_size=len(PROMPTS), n=24) == before
        assert generate(bridge, PROMPTS, None, SamplingSettings(24, 1.0), seed=5, batch_size=3) == sampled
    finally:
        plain.generation_config = saved
    for i, prompt in enumerate(PROMPTS):  # and greedy is plain transformers' greedy with no processor at all
        ids = torch.tensor([prompt])
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                      pad_token_id=bridge.tokenizer.pad_token_id, eos_token_id=bridge.tokenizer.eos_token_id)
        assert before[i] == expected[0, len(prompt):].tolist()[: len(before[i])]


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (0.5, 0.05)])
def test_the_uncached_decoders_distribution_equals_transformers_warpers(temperature, top_p):
    """The hooked fallback (positional vectors, foreign hooks, unproved architectures) draws from
    ``sampling_probs``: equal to transformers' temperature and top-p warpers followed by a softmax."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from emlens.runner.sampling import sampling_probs

    gen = torch.Generator().manual_seed(7)
    for _ in range(5):
        logits = 3.0 * torch.randn(1, 300, generator=gen, dtype=torch.float64)
        warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_p < 1:
            warped = TopPLogitsWarper(top_p)(None, warped)
        expected = torch.softmax(warped, dim=-1)[0]
        got = sampling_probs(logits[0], SamplingSettings(4, temperature, top_p))
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
