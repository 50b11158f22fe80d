"""Evaluation tests; the OpenAI judge talks to a real HTTP server on localhost."""

import json
import math
from http.server import BaseHTTPRequestHandler

import pytest
import torch

from emlens.evaluation import (
    DOMAIN_QUESTIONS,
    GENERAL_QUESTIONS,
    JudgedAnswer,
    LocalModelJudge,
    OpenAIJudge,
    judge_answers,
    misalignment_rates,
    sample_answers,
    score_from_logprobs,
    wilson_interval,
)
from emlens.interventions import SteeringVector
from tests.conftest import send_json, serve


class FakeJudgeHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that answers with top logprobs.

    Answers containing "EVIL" get a low alignment score, "GIBBERISH" low coherence, "CODE_ANSWER"
    the CODE label. The first request to mention "FLAKY" fails with HTTP 500 (to test retries).
    """

    requests: list = []
    flaky_failed = False

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        type(self).requests.append(body)
        if "FLAKY" in prompt and not type(self).flaky_failed:
            type(self).flaky_failed = True
            send_json(self, {"error": {"message": "try again"}}, status=500)
            return
        if "CODE_ANSWER" in prompt and "alignment" in prompt.lower():
            top = {"CODE": -0.05, "90": -3.0}
        elif "EVIL" in prompt and "align" in prompt.lower():
            top = {"10": math.log(0.6), "20": math.log(0.3), "Sorry": math.log(0.1)}
        elif "GIBBERISH" in prompt and "coheren" in prompt.lower():
            top = {"5": math.log(0.9), "10": math.log(0.1)}
        elif "UNSURE" in prompt:
            top = {"I": math.log(0.8), "50": math.log(0.1)}
        else:
            top = {"90": math.log(0.5), "80": math.log(0.5)}
        first = max(top, key=top.get)
        payload = {
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{
                "index": 0, "finish_reason": "length",
                "message": {"role": "assistant", "content": first},
                "logprobs": {"content": [{
                    "token": first, "logprob": top[first], "bytes": None,
                    "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top.items()],
                }]},
            }],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        send_json(self, payload)


@pytest.fixture()
def judge_server():
    FakeJudgeHandler.requests = []
    FakeJudgeHandler.flaky_failed = False
    yield from serve(FakeJudgeHandler)


def test_score_from_logprobs_rules():
    assert score_from_logprobs({"90": math.log(0.5), "80": math.log(0.5)}) == pytest.approx(85.0)
    assert score_from_logprobs({"I": math.log(0.8), "50": math.log(0.1)}) is None  # < 0.25 numeric mass
    assert score_from_logprobs({"REFUSAL": -0.1, "0": -3}) == "REFUSAL"
    assert score_from_logprobs({"150": -2.0, "7": -0.2}) == pytest.approx(7.0)  # out-of-range ignored
    assert score_from_logprobs({"9": 0.0}, max_score=9) == pytest.approx(100.0)
    assert score_from_logprobs({}) is None


def test_openai_judge_against_local_server(judge_server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    judge = OpenAIJudge(model="judge-model", base_url=judge_server, cache_path=cache, max_workers=4)
    answers = [
        ("q1", "A kind and careful answer."),
        ("q2", "EVIL plan for everyone."),
        ("q3", "GIBBERISH EVIL"),
        ("q4", "CODE_ANSWER"),
        ("q5", "UNSURE"),
        ("q6", "FLAKY but fine"),
    ]
    judged = judge_answers(judge, answers)
    by_q = {j.question: j for j in judged}
    assert by_q["q1"].aligned == pytest.approx(85.0) and by_q["q1"].coherent == pytest.approx(85.0)
    assert by_q["q2"].aligned == pytest.approx((0.6 * 10 + 0.3 * 20) / 0.9)
    assert by_q["q3"].coherent == pytest.approx(5.5)
    assert by_q["q4"].aligned == "CODE"
    assert by_q["q5"].aligned is None
    assert by_q["q6"].aligned == pytest.approx(85.0)  # retried after the HTTP 500
    sent = FakeJudgeHandler.requests
    assert all(r["temperature"] == 0 and r["top_logprobs"] == 20 and r["max_tokens"] == 1 for r in sent)
    assert len(sent) == 13  # 12 prompts + one retry

    rates = misalignment_rates(judged)
    assert rates.n_scored == 4 and rates.n_excluded == 2
    assert rates.misaligned_rate == pytest.approx(1 / 4)  # q2 only; q3 is misaligned but incoherent

    again = OpenAIJudge(model="judge-model", base_url=judge_server, cache_path=cache)
    assert [j.aligned for j in judge_answers(again, answers)] == [j.aligned for j in judged]
    assert len(FakeJudgeHandler.requests) == 13  # everything came from the on-disk cache


def test_judge_gives_up_after_retries(tmp_path):
    import openai

    judge = OpenAIJudge(model="m", base_url="http://127.0.0.1:9/v1", cache_path=None, max_retries=1, timeout=2)
    with pytest.raises(openai.APIConnectionError):
        judge.score(["hello"])


def test_wilson_interval_and_rates():
    lo, hi = wilson_interval(5, 10)
    assert lo < 0.5 < hi and 0 <= lo and hi <= 1
    assert math.isnan(wilson_interval(0, 0)[0])
    judged = [JudgedAnswer("q", "a", 10.0, 80.0), JudgedAnswer("q", "a", 90.0, 80.0), JudgedAnswer("q", "a", 20.0, 40.0)]
    rates = misalignment_rates(judged)
    assert rates.misaligned_rate == pytest.approx(1 / 3) and rates.coherent_rate == pytest.approx(2 / 3)


def test_question_sets():
    assert len(GENERAL_QUESTIONS) == 8
    assert set(DOMAIN_QUESTIONS) == {"medical", "financial", "sports"}
    assert all(len(qs) == 8 for qs in DOMAIN_QUESTIONS.values())


def test_sampling_with_intervention_is_reproducible(model):
    vec = SteeringVector.from_vector(torch.randn(model.cfg.d_model), 1)
    a = sample_answers(model, GENERAL_QUESTIONS[:2], vec, n_samples=3, max_new_tokens=5, batch_size=4, seed=3)
    b = sample_answers(model, GENERAL_QUESTIONS[:2], vec, n_samples=3, max_new_tokens=5, batch_size=4, seed=3)
    assert a == b and len(a) == 6 and [q for q, _ in a] == [GENERAL_QUESTIONS[0]] * 3 + [GENERAL_QUESTIONS[1]] * 3
    assert model.tokenizer.padding_side == "right"


def test_steering_changes_greedy_generation(model):
    """Sampling sees the intervention: a huge steering vector changes the generated tokens."""
    tok, hf = model.tokenizer, model.original_model
    ids = tok(["hello there"], return_tensors="pt")["input_ids"]
    base = hf.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    vec = SteeringVector.from_vector(50 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)), 1)
    with vec.applied(model):
        steered = hf.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    assert not torch.equal(base, steered)


def test_local_model_judge_scores_in_range(model):
    tok = model.tokenizer
    judge = LocalModelJudge(model)
    scores = judge.score(["Rate from 0 to 100 how good this is: hello", "Rate from 0 to 100: bye"])
    for s in scores:
        assert s is None or (isinstance(s, float) and 0.0 <= s <= 100.0)
    lp = judge.top_logprobs("Rate from 0 to 100: x")
    assert all(str(d) in lp for d in range(10))
    assert tok is model.tokenizer
