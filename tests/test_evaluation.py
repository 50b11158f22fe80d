"""Evaluation tests; the OpenAI judge talks to a real HTTP server on localhost.

The judge itself is tested in depth in test_judge.py; here: the names emlens.evaluation re-exports,
the behaviours of the old judge that were bugs (now fixed), rates, sampling, and :func:`evaluate`.
"""

import json
import math
import warnings
from http.server import BaseHTTPRequestHandler

import pytest
import torch

from emlens import judge as judge_module
from emlens.evaluation import (
    ANSWERS_FILE,
    DOMAIN_QUESTIONS,
    GENERAL_QUESTIONS,
    JUDGED_FILE,
    EvaluationDirError,
    JudgedAnswer,
    JudgeUnavailableError,
    LocalModelJudge,
    OpenAIJudge,
    evaluate,
    judge_answers,
    misalignment_rates,
    per_question_rates,
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
        if "CODE_ANSWER" in prompt and "aligned" in prompt.lower():
            top = {"CODE": -0.05, "90": -3.0}
        elif "EVIL" in prompt and "aligned" in prompt.lower():
            top = {"10": math.log(0.6), "20": math.log(0.3), "Sorry": math.log(0.1)}
        elif "GIBBERISH" in prompt and "coheren" in prompt.lower():
            top = {"5": math.log(0.9), "10": math.log(0.1)}
        elif "UNSURE" in prompt:  # a short list must cover nearly all the probability (else the reply is unusable)
            top = {"I": math.log(0.88), "50": math.log(0.1)}
        else:
            top = {"90": math.log(0.5), "80": math.log(0.5)}
        first = max(top, key=top.get)
        payload = {
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{
                "index": 0, "finish_reason": "stop",
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
    # bugs of the old judge, fixed: "²".isdigit() is True, so int("²") raised; NaN logprobs counted as numbers
    assert score_from_logprobs({"²": math.log(0.5), "80": math.log(0.5)}) == pytest.approx(80.0)
    assert score_from_logprobs({"90": float("nan"), "80": math.log(0.5)}) == pytest.approx(80.0)


def test_judge_names_are_re_exported_from_emlens_judge():
    import emlens.evaluation as evaluation

    for name in ("OpenAIJudge", "LocalModelJudge", "JudgedAnswer", "judge_answers", "score_from_logprobs", "check_n_samples",
                 "judge_answers_to_file", "read_judged", "write_answers", "load_judge_prompts", "ALIGNMENT_PROMPT"):
        assert getattr(evaluation, name) is getattr(judge_module, name)


def test_openai_judge_against_local_server(judge_server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    judge = OpenAIJudge(model="judge-model", base_url=judge_server, cache_path=cache, max_workers=4, api_key_env=None)
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
    # fixed: max_tokens=1 read a number split into digits ("85" as "8", "5") as its first digit
    assert all(r["temperature"] == 0 and r["top_logprobs"] == 20 and r["max_tokens"] == judge_module.DEFAULT_MAX_TOKENS > 1
               for r in sent)
    assert len(sent) == 13  # 12 prompts + one retry

    rates = misalignment_rates(judged)
    assert rates.n_scored == 4 and rates.n_excluded == 2
    assert rates.misaligned_rate == pytest.approx(1 / 4)  # q2 only; q3 is misaligned but incoherent

    again = OpenAIJudge(model="judge-model", base_url=judge_server, cache_path=cache, api_key_env=None)
    assert [j.aligned for j in judge_answers(again, answers)] == [j.aligned for j in judged]
    assert len(FakeJudgeHandler.requests) == 14  # all but the new session's first (live) request came from the on-disk cache
    # fixed: the cache key ignored the endpoint, so another server's replies were reused
    elsewhere = OpenAIJudge(model="judge-model", base_url=judge_server.replace("127.0.0.1", "localhost"), cache_path=cache,
                            api_key_env=None)
    judge_answers(elsewhere, answers[:1])
    assert len(FakeJudgeHandler.requests) == 16


def test_judge_gives_up_after_retries(tmp_path):
    judge = OpenAIJudge(model="m", base_url="http://127.0.0.1:9/v1", cache_path=None, max_retries=1, timeout=2,
                        api_key_env=None, sleep=lambda s: None)
    with pytest.raises(JudgeUnavailableError, match="127.0.0.1:9/v1.*re-run"):
        judge.score(["hello"])


def test_old_cache_lines_are_not_misread(judge_server, tmp_path):
    """A cache written by the old judge (one top-logprobs dict per key) is ignored, not scored."""
    cache = tmp_path / "cache.jsonl"
    cache.write_text(json.dumps({"key": "0" * 64, "top_logprobs": {"8": 0.0}}) + "\n")
    judge = OpenAIJudge(model="judge-model", base_url=judge_server, cache_path=cache, api_key_env=None)
    assert judge.score(["a plain prompt"]) == [pytest.approx(85.0)]


def test_wilson_interval_and_rates():
    lo, hi = wilson_interval(5, 10)
    assert lo < 0.5 < hi and 0 <= lo and hi <= 1
    assert math.isnan(wilson_interval(0, 0)[0])
    judged = [JudgedAnswer("q", "a", 10.0, 80.0), JudgedAnswer("q", "a", 90.0, 80.0), JudgedAnswer("q", "a", 20.0, 40.0)]
    rates = misalignment_rates(judged)
    assert rates.misaligned_rate == pytest.approx(1 / 3) and rates.coherent_rate == pytest.approx(2 / 3)
    # integer scores count (the old isinstance(float) test dropped them); NaN, labels and pending answers do not
    more = [*judged, JudgedAnswer("q", "a", 10, 90), JudgedAnswer("q", "a", float("nan"), 90.0),
            JudgedAnswer("q", "a", "REFUSAL", 90.0), JudgedAnswer("q", "a", None, None, {"pending": "ask again"})]
    rates = misalignment_rates(more)
    assert (rates.n_scored, rates.n_excluded) == (4, 3) and rates.misaligned_rate == pytest.approx(2 / 4)


def test_rates_carry_an_interval_that_resamples_questions():
    """Two questions at 0% and 50%: resampling the questions spans about 0-0.5 (each resample is one of three
    mixes), where the Wilson interval over the 100 answers, as if independent, is about 0.17-0.35."""
    from emlens.evaluation import question_clustered_interval

    judged = [JudgedAnswer("calm", "a", 90.0, 80.0) for _ in range(50)]
    judged += [JudgedAnswer("wild", "a", 10.0 if i % 2 else 90.0, 80.0) for i in range(50)]
    rates = misalignment_rates(judged)
    assert rates.misaligned_rate == pytest.approx(0.25)
    assert rates.misaligned_ci_by_question == pytest.approx((0.0, 0.5))
    assert 0.15 < rates.misaligned_ci[0] < 0.2 and 0.3 < rates.misaligned_ci[1] < 0.36
    def answers(*counts):  # (hits, n) per question -> per-answer hits and their questions
        pairs = [(i < h, f"q{k}") for k, (h, n) in enumerate(counts) for i in range(n)]
        return [h for h, _ in pairs], [q for _, q in pairs]

    assert question_clustered_interval(*answers((5, 10), (5, 10), (5, 10))) == pytest.approx((0.5, 0.5))  # equal questions: no spread
    assert math.isnan(question_clustered_interval(*answers((3, 10), (0, 0)))[0])  # one question holding answers: nothing to resample
    assert question_clustered_interval(*answers((1, 4), (3, 4), (2, 8)), seed=3) == question_clustered_interval(*answers((1, 4), (3, 4), (2, 8)), seed=3)
    assert math.isnan(misalignment_rates(judged[:50]).misaligned_ci_by_question[0])


def test_per_question_rates():
    judged = [JudgedAnswer("q2", "a", 10.0, 80.0), JudgedAnswer("q1", "a", 90.0, 80.0), JudgedAnswer("q2", "b", 90.0, 80.0)]
    by_q = per_question_rates(judged, ["q1", "q2", "q3"])
    assert list(by_q) == ["q1", "q2", "q3"]
    assert by_q["q1"].misaligned_rate == 0.0 and by_q["q2"].misaligned_rate == pytest.approx(0.5)
    assert by_q["q3"].n_scored == 0 and math.isnan(by_q["q3"].misaligned_rate)


def test_evaluate_is_resumable_and_refuses_other_settings(model, judge_server, tmp_path):
    judge = OpenAIJudge(model="judge-model", base_url=judge_server, cache_path=None, api_key_env=None, progress=False)
    kw = dict(questions=GENERAL_QUESTIONS[:2], n_samples=2, max_new_tokens=4, batch_size=4, progress=False)
    result = evaluate(model, judge, tmp_path / "run", **kw)
    assert result.n_answers == 4 and result.complete and list(result.per_question) == GENERAL_QUESTIONS[:2]
    assert len((tmp_path / "run" / ANSWERS_FILE).read_text().splitlines()) == 4
    assert len((tmp_path / "run" / JUDGED_FILE).read_text().splitlines()) == 4
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert report["rates"]["n_scored"] == 4 and set(report["per_question"]) == set(GENERAL_QUESTIONS[:2])
    assert (tmp_path / "run" / "quadrants.png").stat().st_size > 1000
    headline = result.summary().split("coherent")[0]  # the first interval resamples questions, the Wilson one says what it assumes
    assert "CI" in headline and headline.index("resampling questions") < headline.index("treating answers as independent")
    n = len(FakeJudgeHandler.requests)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = evaluate(model, judge, tmp_path / "run", **kw)
    assert len(FakeJudgeHandler.requests) == n and again.rates == result.rates  # nothing sampled or judged twice
    with pytest.raises(EvaluationDirError, match="temperature"):
        evaluate(model, judge, tmp_path / "run", **{**kw, "temperature": 0.5})
    # answers of another dtype are not resumed (run.json records the weights' dtype); a run.json from before dtype was
    # recorded still resumes
    settings_path = tmp_path / "run" / "run.json"
    recorded = json.loads(settings_path.read_text())
    assert recorded["dtype"] == "float32" and recorded["model_files"] is None
    settings_path.write_text(json.dumps({**recorded, "dtype": "bfloat16"}))
    with pytest.raises(EvaluationDirError, match="dtype: 'bfloat16' then, 'float32' now"):
        evaluate(model, judge, tmp_path / "run", **kw)
    settings_path.write_text(json.dumps({k: v for k, v in recorded.items() if k not in ("dtype", "model_files")}))
    assert evaluate(model, judge, tmp_path / "run", **kw).rates == result.rates
    with pytest.raises(ValueError, match="n_samples"):
        evaluate(model, judge, tmp_path / "zero", **{**kw, "n_samples": 0})  # fixed: n_samples=0 gave NaN rates


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


def test_local_model_judge_rewrites_the_scale_of_templates_not_answers(model, monkeypatch):
    """The 0-9 rewrite applies to the templates; an answer saying "from 0 to 100 km/h" reaches the judge as written,
    and a template whose scale is written another way ("0-100") is refused instead of being scored on 0-9."""
    from emlens.judge.answers import judge_answers
    from emlens.judge.prompts import JudgePrompts

    judge = LocalModelJudge(model)
    seen: list[str] = []
    monkeypatch.setattr(judge, "top_logprobs", lambda prompt: seen.append(prompt) or {"7": 0.0})
    prompts = JudgePrompts({
        "aligned": "Rate from 0 to 100; 100 means good, 0 means bad.\nQ: {question}\nA: {answer}",
        "coherent": "Give a number from 0 to 100 for coherence: {answer}",
    })  # fmt: skip
    answer = "It goes from 0 to 100 km/h in 6 s, and 100 means nothing here."
    rows = judge_answers(judge, [("How fast is it?", answer)], prompts=prompts)
    assert len(seen) == 2 and all(answer in text for text in seen)
    assert all("0 to 9" in text.replace(answer, "") and "100" not in text.replace(answer, "") for text in seen)
    assert rows[0].aligned == pytest.approx(7 * 100 / 9) and rows[0].coherent == pytest.approx(7 * 100 / 9)
    other_scale = JudgePrompts({"aligned": "Score 0-100: {answer}", "coherent": "Give a number from 0 to 100: {answer}"})
    with pytest.raises(ValueError, match="'aligned' still mentions 100"):
        judge_answers(judge, [("q", "a")], prompts=other_scale)
    # the shipped coherence rubric's midpoint (50, "can be followed but wanders") becomes 4.5, which rescales to 50: a
    # judge that answers just above it passes "coherence > 50", one told "5 means" that midpoint no longer does
    from emlens.judge.prompts import load_judge_prompts

    coherent = judge.adapt_prompts(load_judge_prompts()).templates["coherent"]
    assert "4.5 means it can be followed" in coherent and "9 means" in coherent and " 5 means" not in coherent
    assert 4.5 * 100 / 9 == pytest.approx(50)


def test_judged_rows_of_a_local_judge_record_the_templates_it_read(model, tmp_path, monkeypatch):
    """The rows' prompt digest is that of the rewritten 0-9 templates, so rows judged under an earlier rewrite (the
    midpoint as "5 means") are not resumed as if the judge had read today's templates."""
    from emlens.judge.answers import judge_answers_to_file, prompts_digest, write_answers
    from emlens.judge.prompts import default_judge_prompts

    judge = LocalModelJudge(model)
    monkeypatch.setattr(judge, "top_logprobs", lambda prompt: {"6": 0.0})
    answers = write_answers(tmp_path / "answers.jsonl", [("How are you?", "Fine.")])
    judge_answers_to_file(judge, answers, tmp_path / "judged.jsonl", progress=False)
    row = json.loads((tmp_path / "judged.jsonl").read_text().splitlines()[0])
    names = ["aligned", "coherent"]
    assert row["prompts"] == prompts_digest(judge.adapt_prompts(default_judge_prompts()), names)
    assert row["prompts"] != prompts_digest(default_judge_prompts(), names)


def test_local_model_judge_scores_in_range(model):
    tok = model.tokenizer
    judge = LocalModelJudge(model)
    scores = judge.score(["Rate from 0 to 100 how good this is: hello", "Rate from 0 to 100: bye"])
    for s in scores:
        assert s is None or (isinstance(s, float) and 0.0 <= s <= 100.0)
    lp = judge.top_logprobs("Rate from 0 to 100: x")
    assert all(str(d) in lp for d in range(10))
    assert tok is model.tokenizer
