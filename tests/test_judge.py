"""Judge tests: number scoring rules, and every failure mode of the client against a hand-written localhost server."""

from __future__ import annotations

import json
import math
import threading
import warnings
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import pytest

from emlens.judge import (
    JudgedAnswer,
    JudgeError,
    JudgeFileError,
    JudgeReply,
    JudgeResponseError,
    JudgeUnavailableError,
    OpenAIJudge,
    ReplyCache,
    SplitNumberError,
    _retry_after,
    check_n_samples,
    default_judge_prompts,
    judge_answers,
    judge_answers_to_file,
    load_judge_prompts,
    number_distribution,
    read_judged,
    score_from_logprobs,
    score_reply,
    write_answers,
)
from tests.conftest import serve

LN = math.log


def completion(positions: list[tuple[str, dict[str, float]]], finish: str = "stop", model: str = "m") -> dict[str, Any]:
    """An OpenAI chat completion whose reply has the given (chosen token, {token: probability}) positions."""
    content = [
        {"token": tok, "logprob": LN(top[tok]) if top.get(tok, 0) > 0 else -30.0, "bytes": None,
         "top_logprobs": [{"token": t, "logprob": LN(p) if p > 0 else -math.inf, "bytes": None} for t, p in top.items()]}
        for tok, top in positions
    ]
    return {"id": "x", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": "".join(t for t, _ in positions)},
                         "logprobs": {"content": content}}]}


def single(scores: dict[str, float]) -> dict[str, Any]:
    best = max(scores, key=lambda t: scores[t])
    return completion([(best, scores)])


Response = tuple[int, dict[str, str], bytes]


class Handler(BaseHTTPRequestHandler):
    """Answers POST /v1/chat/completions with whatever ``respond(body, headers)`` returns."""

    respond: ClassVar[Callable[[dict[str, Any], Any], Any]] = staticmethod(lambda body, headers: single({"50": 1.0}))
    requests: ClassVar[list[dict[str, Any]]] = []
    auth: ClassVar[list[str | None]] = []
    lock: ClassVar[threading.Lock] = threading.Lock()

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._send(200, {"Content-Type": "application/json"}, b'{"data": []}')

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with type(self).lock:
            type(self).requests.append(body)
            type(self).auth.append(self.headers.get("Authorization"))
        out = type(self).respond(body, self.headers)
        if isinstance(out, dict):
            out = (200, {"Content-Type": "application/json"}, json.dumps(out).encode())
        self._send(*out)

    def _send(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def _server_url():
    yield from serve(Handler)


@pytest.fixture(scope="module")
def second_server():
    yield from serve(Handler)


@pytest.fixture()
def server(_server_url):
    """The localhost server, with a fresh request log and the default reply (one shared server: fast teardown)."""
    Handler.requests, Handler.auth = [], []
    Handler.respond = staticmethod(lambda body, headers: single({"50": 1.0}))
    return _server_url


def prompt_of(body: dict[str, Any]) -> str:
    return body["messages"][0]["content"]


def make_judge(url: str, tmp_path: Path, **kw: Any) -> OpenAIJudge:
    kw.setdefault("cache_path", tmp_path / "cache.jsonl")
    kw.setdefault("sleep", lambda s: None)
    return OpenAIJudge(model="m", base_url=url, progress=False, **kw)


# --------------------------------------------------------------------------- scoring rules


def test_single_token_rules():
    assert score_from_logprobs({"90": LN(0.5), "80": LN(0.5)}) == pytest.approx(85.0)
    assert score_from_logprobs({"I": LN(0.8), "50": LN(0.1)}) is None  # < 0.25 number mass
    assert score_from_logprobs({"REFUSAL": -0.1, "0": -3}) == "REFUSAL"
    assert score_from_logprobs({"150": -2.0, "7": -0.2}) == pytest.approx(7.0)  # out of range ignored
    assert score_from_logprobs({"9": 0.0}, max_score=9) == pytest.approx(100.0)
    assert score_from_logprobs({}) is None


def test_non_ascii_digits_are_not_numbers():
    assert "²".isdigit() and "½".isnumeric()  # what broke the old parser
    top = {"²": LN(0.4), "½": LN(0.2), "٣": LN(0.1), "60": LN(0.3)}
    assert score_from_logprobs(top) == pytest.approx(60.0)
    assert score_from_logprobs({"²": LN(0.9), "5": LN(0.1)}) is None


def test_nan_logprobs_are_not_counted():
    assert score_from_logprobs({"10": float("nan"), "90": LN(0.6)}) == pytest.approx(90.0)
    assert score_from_logprobs({"10": float("nan")}) is None


def test_number_split_into_tokens_is_scored_exactly():
    # "85" = "8","5",<end>: p(85) = .9 * .8 * .95; "80" cannot continue in range; "850" is no score
    reply = JudgeReply(
        ("8", "5", ""),
        ((("8", LN(0.9)), ("The", LN(0.1))),
         (("5", LN(0.8)), ("0", LN(0.2))),
         (("", LN(0.95)), ("0", LN(0.05)))),
    )
    p85, p80 = 0.9 * 0.8 * 0.95, 0.9 * 0.2
    dist = number_distribution(reply)
    assert dist.split and dist.unresolved == 0
    assert dist.probs == pytest.approx({85: p85, 80: p80, 8: 0.0}, abs=1e-12)
    assert score_reply(reply) == pytest.approx((85 * p85 + 80 * p80) / (p85 + p80))
    # the old one-token reading of the same reply: "85" scored as 8
    assert score_from_logprobs(dict(reply.top_logprobs[0])) == pytest.approx(8.0)


def test_hundred_and_leading_space():
    reply = JudgeReply((" ", "1", "0", "0"), (
        ((" ", LN(0.9)), ("Sure", LN(0.1))),
        (("1", LN(1.0)),),
        (("0", LN(1.0)),),
        (("0", LN(0.7)), ("\n", LN(0.3))),
    ), finish_reason="length")
    dist = number_distribution(reply)
    nonzero = {n: p for n, p in dist.probs.items() if p > 0}
    assert nonzero == pytest.approx({100: 0.9 * 0.7, 10: 0.9 * 0.3}) and dist.unresolved == 0
    assert score_reply(reply) == pytest.approx(0.7 * 100 + 0.3 * 10)


def test_hesitating_split_judge_is_refused():
    # the judge wrote "85" but gave "9" (9? 90–99?) 0.4: the API never shows what follows "9"
    reply = JudgeReply(("8", "5"), ((("8", LN(0.5)), ("9", LN(0.4)), ("A", LN(0.1))), (("5", LN(1.0)),)))
    with pytest.raises(SplitNumberError, match="several tokens"):
        score_reply(reply)
    assert score_reply(reply, unresolved_tolerance=1.0) == pytest.approx(85.0)
    # a digit cut off by max_tokens=1 cannot be read either
    cut = JudgeReply(("8",), ((("8", LN(0.9)), ("7", LN(0.1))),), finish_reason="length")
    with pytest.raises(SplitNumberError):
        score_reply(cut)


def test_a_reply_without_evidence_of_how_numbers_are_written_says_so():
    """No multi-digit token and no continued number: "auto" must assume split (the safe reading) and say that it
    only assumed it, naming number_tokens='whole' for a judge with one token per number."""
    reply = JudgeReply(("7",), ((("7", LN(0.6)), ("8", LN(0.4))),))
    dist = number_distribution(reply)
    assert dist.split and dist.split_assumed and dist.unresolved == pytest.approx(0.4)
    with pytest.raises(SplitNumberError, match="no multi-digit token.*number_tokens='whole'"):
        score_reply(reply)
    assert score_reply(reply, number_tokens="whole") == pytest.approx(0.6 * 7 + 0.4 * 8)
    seen = number_distribution(JudgeReply(("8", "5"), ((("8", LN(0.5)), ("9", LN(0.5))), (("5", LN(1.0)),))))
    assert seen.split and not seen.split_assumed  # the judge's own answer continued a number: seen, not assumed


def test_whole_number_vocabulary_keeps_single_digits():
    # multi-digit tokens in the list: the judge's vocabulary has one token per number, so "9" means 9
    reply = JudgeReply(("85",), ((("85", LN(0.5)), ("9", LN(0.3)), ("80", LN(0.2))),))
    assert score_reply(reply) == pytest.approx(0.5 * 85 + 0.3 * 9 + 0.2 * 80)
    assert score_reply(reply, number_tokens="split", unresolved_tolerance=0.5) == pytest.approx((0.5 * 85 + 0.2 * 80) / 0.7)


def test_labels():
    assert score_reply(JudgeReply(("REF", "US", "AL"), ((("REF", -0.1),), (("US", -0.1),), (("AL", -0.1),)), "length")) == "REFUSAL"
    assert score_reply(JudgeReply(("CODE",), ((("CODE", -0.05), ("90", -3.0)),))) == "CODE"
    assert score_reply(JudgeReply(("Cod", "ify"), ((("Cod", -0.1),), (("ify", -0.1),)), "stop")) is None


def test_retry_after_header_forms():
    assert _retry_after({"retry-after": "7"}) == 7.0
    assert _retry_after({"retry-after-ms": "1500"}) == 1.5
    assert 50 < (_retry_after({"retry-after": "Wed, 21 Oct 2099 07:28:00 GMT"}) or 0)
    assert _retry_after({"retry-after": "soon"}) is None and _retry_after({}) is None


def test_check_n_samples():
    assert check_n_samples(3) == 3
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n_samples"):
            check_n_samples(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- prompts


def test_default_prompts_follow_the_paper_semantics():
    p = default_judge_prompts()
    assert {"aligned", "coherent", "medical_correct", "financial_correct", "sports_correct", "technical_prose"} <= set(p.names())
    assert "CODE" in p.template("aligned") and "REFUSAL" in p.template("aligned")
    assert "not sure" in p.template("aligned")
    coherent = p.template("coherent").lower()
    assert "do not take into account whether the content is harmful" in coherent
    assert "off-topic" not in coherent
    text = p.render("aligned", "Q?", "A {weird} answer")
    assert "Q?" in text and "A {weird} answer" in text


def test_prompts_from_yaml(tmp_path, server):
    path = tmp_path / "judges.yaml"
    path.write_text("aligned: |-\n  ALIGN {question} => {answer} {\"json\": 1}\ncoherent: |-\n  COH {answer}\n"
                    "medical_correct: |-\n  MED {question} {answer}\n")
    prompts = load_judge_prompts(path)
    Handler.respond = staticmethod(lambda body, h: single({"20": 1.0}) if prompt_of(body).startswith("MED") else single({"70": 1.0}))
    judge = make_judge(server, tmp_path)
    [general] = judge_answers(judge, [("q", "a")], prompts=path)
    [medical] = judge_answers(judge, [("q", "a")], domain="medical", prompts=prompts)
    assert (general.aligned, general.coherent) == (70.0, 70.0) and medical.aligned == 20.0
    sent = {prompt_of(b) for b in Handler.requests}
    assert sent == {'ALIGN q => a {"json": 1}', "COH a", "MED q a"}
    with pytest.raises(KeyError, match="sports_correct"):
        judge_answers(judge, [("q", "a")], domain="sports", prompts=prompts)
    bad = tmp_path / "bad.yaml"
    bad.write_text("aligned: 'no answer placeholder'\ncoherent: '{answer}'\n")
    with pytest.raises(JudgeFileError, match="answer"):
        load_judge_prompts(bad)
    (tmp_path / "missing.yaml").write_text("aligned: '{answer}'\n")
    with pytest.raises(JudgeFileError, match="coherent"):
        load_judge_prompts(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- the client


def test_request_protocol_duplicates_and_cache(server, second_server, tmp_path):
    def respond(body: dict[str, Any], headers: Any) -> dict[str, Any]:
        return single({"10": 0.6, "20": 0.3, "Sorry": 0.1}) if "EVIL" in prompt_of(body) else single({"90": 0.5, "80": 0.5})

    Handler.respond = staticmethod(respond)
    judge = make_judge(server, tmp_path)
    answers = [("q1", "fine"), ("q2", "EVIL plan"), ("q1", "fine"), ("q1", "fine")]
    judged = judge_answers(judge, answers)
    assert [j.aligned for j in judged] == [pytest.approx(85.0), pytest.approx((0.6 * 10 + 0.3 * 20) / 0.9), pytest.approx(85.0), pytest.approx(85.0)]
    assert len(Handler.requests) == 4  # 8 prompts, 4 distinct: each sent once
    body = Handler.requests[0]
    assert body["temperature"] == 0 and body["top_logprobs"] == 20 and body["logprobs"] is True and body["max_tokens"] == 4

    again = make_judge(server, tmp_path)  # same endpoint: all but the session's first (live) request come from the disk cache
    assert [j.aligned for j in judge_answers(again, answers)] == [j.aligned for j in judged]
    assert len(Handler.requests) == 5
    other = make_judge(second_server, tmp_path)  # another endpoint with the same model name: asked again
    judge_answers(other, answers[:1])
    assert len(Handler.requests) == 7


def test_server_error_is_retried_then_gives_up(server, tmp_path):
    calls = {"n": 0}

    def respond(body: dict[str, Any], headers: Any) -> Any:
        calls["n"] += 1
        return (500, {"Content-Type": "application/json"}, b'{"error": "boom"}') if calls["n"] == 1 else single({"40": 1.0})

    Handler.respond = staticmethod(respond)
    waits: list[float] = []
    judge = make_judge(server, tmp_path, sleep=waits.append)
    assert judge.score(["p"]) == [40.0] and len(waits) == 1
    Handler.respond = staticmethod(lambda body, h: (503, {}, b"down"))
    with pytest.raises(JudgeUnavailableError, match=r"failed 3 time.*HTTP 503"):
        make_judge(server, tmp_path, max_retries=2).score(["other prompt"])


def test_retry_after_is_honoured(server, tmp_path):
    calls = {"n": 0}

    def respond(body: dict[str, Any], headers: Any) -> Any:
        calls["n"] += 1
        return (429, {"Retry-After": "3"}, b'{"error": "slow down"}') if calls["n"] == 1 else single({"30": 1.0})

    Handler.respond = staticmethod(respond)
    waits: list[float] = []
    assert make_judge(server, tmp_path, sleep=waits.append).score(["p"]) == [30.0]
    assert waits == [3.0]


def test_unusable_replies_are_not_cached(server, tmp_path):
    replies = {
        "missing": {"choices": [{"index": 0, "message": {"role": "assistant", "content": "5"}, "finish_reason": "stop"}]},
        "empty": {"choices": [{"index": 0, "message": {"content": ""}, "logprobs": {"content": []}}]},
        "refusal": {"choices": [{"index": 0, "message": {"content": None, "refusal": "I can't help with that."}, "logprobs": None}]},
    }
    Handler.respond = staticmethod(lambda body, h: replies[prompt_of(body)])
    judge = make_judge(server, tmp_path)
    with pytest.warns(UserWarning, match="3 of 3 judge replies"):
        assert judge.score(list(replies)) == [None, None, None]
    assert len(judge.cache) == 0 and not (tmp_path / "cache.jsonl").exists()
    Handler.respond = staticmethod(lambda body, h: single({"60": 1.0}))
    assert make_judge(server, tmp_path).score(list(replies)) == [60.0] * 3  # asked again, now usable


def test_nan_reply_is_refused(server, tmp_path):
    nan_body = json.dumps(completion([("7", {"7": 0.5})])).replace("-0.6931471805599453", "NaN").encode()
    assert b"NaN" in nan_body
    Handler.respond = staticmethod(lambda body, h: (200, {"Content-Type": "application/json"}, nan_body))
    judge = make_judge(server, tmp_path)
    with pytest.warns(UserWarning, match="not finite"):
        assert judge.score(["p"]) == [None]
    assert len(judge.cache) == 0


def test_positive_logprobs_mean_a_broken_server(server, tmp_path):
    # e^5 is no probability: the old parser dropped "85" at +5.0 and scored what was left, "10" at 0.0, as 10.0
    item = {"token": "85", "logprob": 5.0, "top_logprobs": [{"token": "85", "logprob": 5.0}, {"token": "10", "logprob": 0.0}]}
    broken = {"choices": [{"index": 0, "finish_reason": "stop", "message": {"content": "85"}, "logprobs": {"content": [item]}}]}
    Handler.respond = staticmethod(lambda body, h: broken)
    judge = make_judge(server, tmp_path)
    with pytest.warns(UserWarning, match="1 of 1 judge replies.*positive logprob"):
        [j] = judge.judgements(["p"])
    assert j.score is None and not j.final and "positive logprob" in j.note and "'85'" in j.note
    assert len(judge.cache) == 0 and not (tmp_path / "cache.jsonl").exists()
    assert score_from_logprobs({"85": 5.0, "10": 0.0}) is None
    Handler.respond = staticmethod(lambda body, h: single({"85": 1.0}))
    assert make_judge(server, tmp_path).score(["p"]) == [85.0]  # not cached: asked again once the server works


@pytest.mark.parametrize(
    ("status", "ctype", "data", "match"),
    [
        (200, "text/html", b"<html><body>Welcome to nginx</body></html>", "not JSON.*nginx"),
        (200, "application/json", b'{"choices": [', "not JSON"),
        (200, "application/json", b'{"choices": []}', "no choices"),
        (200, "application/json", b'[1, 2]', "not an object"),
        (404, "text/html", b"<html>Not Found</html>", "HTTP 404"),
    ],
)
def test_malformed_bodies_name_the_endpoint(server, tmp_path, status, ctype, data, match):
    Handler.respond = staticmethod(lambda body, h: (status, {"Content-Type": ctype}, data))
    with pytest.raises(JudgeError, match=match) as info:
        make_judge(server, tmp_path).score(["p"])
    assert f"{server}/chat/completions" in str(info.value)
    assert len(Handler.requests) == 1  # not retried
    if status == 200:
        assert isinstance(info.value, JudgeResponseError)


def test_refused_connection(tmp_path):
    judge = OpenAIJudge(model="m", base_url="http://127.0.0.1:9/v1", cache_path=None, max_retries=1, timeout=2,
                        sleep=lambda s: None, progress=False)
    with pytest.raises(JudgeUnavailableError, match=r"127\.0\.0\.1:9/v1/chat/completions failed 2 time"):
        judge.score(["hello"])


def test_api_key_from_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    make_judge(server, tmp_path).score(["a"])
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-custom")
    make_judge(server, tmp_path, api_key_env="MY_JUDGE_KEY").score(["b"])
    monkeypatch.delenv("OPENAI_API_KEY")
    make_judge(server, tmp_path).score(["c"])  # a local endpoint needs no key
    assert Handler.auth == ["Bearer sk-from-env", "Bearer sk-custom", None]
    with pytest.raises(JudgeError, match="NOT_SET_ANYWHERE"):
        make_judge(server, tmp_path, api_key_env="NOT_SET_ANYWHERE")
    with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
        OpenAIJudge(base_url=None, cache_path=None)
    Handler.respond = staticmethod(lambda body, h: (401, {}, b'{"error": "bad key"}'))
    with pytest.raises(JudgeError, match="API key"):
        make_judge(server, tmp_path).score(["d"])


def test_split_number_judge_is_refused_with_a_clear_message(server, tmp_path):
    reply = completion([("8", {"8": 0.5, "9": 0.4, "I": 0.1}), ("5", {"5": 1.0})], finish="length")
    Handler.respond = staticmethod(lambda body, h: reply)
    with pytest.raises(SplitNumberError, match=r"several tokens.*one token per number"):
        make_judge(server, tmp_path).score(["p"])
    [j] = make_judge(server, tmp_path, on_ambiguous="none").judgements(["p"])
    assert j.score is None and j.final and "ambiguous" in j.note


# --------------------------------------------------------------------------- files


def test_truncated_cache_line_is_repaired(server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    judge = make_judge(server, tmp_path)
    judge.score(["a", "b"])
    good = cache.read_bytes()
    assert good.count(b"\n") == 2
    cache.write_bytes(good + b'{"key": "abc", "reply": {"tok')  # a crash in the middle of a write
    again = make_judge(server, tmp_path)
    assert len(again.cache) == 2 and cache.read_bytes() == good
    again.score(["c"])
    assert len(ReplyCache(cache)) == 3 and len(Handler.requests) == 3
    cache.write_bytes(cache.read_bytes().rstrip(b"\n"))  # complete last entry without its newline: kept
    assert len(ReplyCache(cache)) == 3 and cache.read_bytes().endswith(b"}\n")
    old = b'{"key": "k", "top_logprobs": {"8": -0.1}}'  # an older emlens' entry: unused, but not cut off
    cache.write_bytes(cache.read_bytes() + old)
    assert len(ReplyCache(cache)) == 3 and cache.read_bytes().endswith(old + b"\n")


def test_resumable_judging_keeps_answers_through_failures(server, tmp_path):
    answers = [{"question": f"q{i}", "answer": f"answer {i}", "sample": i} for i in range(6)]
    answers_path = write_answers(tmp_path / "answers.jsonl", answers)
    out = tmp_path / "judged.jsonl"
    state = {"ok": 4}  # four good requests (two rows), then the server goes down with a long 429

    def respond(body: dict[str, Any], headers: Any) -> Any:
        with Handler.lock:
            state["ok"] -= 1
            if state["ok"] < 0:
                return (429, {"Retry-After": "3600"}, b'{"error": "quota"}')
        return single({"20": 1.0}) if "answer 1" in prompt_of(body) else single({"90": 1.0})

    Handler.respond = staticmethod(respond)
    with pytest.raises(JudgeUnavailableError, match="3600 s"):
        judge_answers_to_file(make_judge(server, tmp_path, cache_path=None, max_workers=1), answers_path, out,
                              chunk_size=2, progress=False)
    assert answers_path.read_text().count("\n") == 6  # sampled answers untouched
    assert [r.question for r in read_judged(out)] == ["q0", "q1"]
    out.write_bytes(out.read_bytes() + b'{"index": 2, "question": "q2", "ans')  # and a crash mid-write

    state["ok"] = 10**6
    before = len(Handler.requests)
    judged = judge_answers_to_file(make_judge(server, tmp_path, cache_path=None), answers_path, out, chunk_size=2, progress=False)
    assert len(Handler.requests) - before == 1 + 8  # the session's first request (live), then only the four unjudged rows
    assert [j.aligned for j in judged] == [90.0, 20.0, 90.0, 90.0, 90.0, 90.0]
    assert all(isinstance(j, JudgedAnswer) and j.extra["sample"] == i for i, j in enumerate(judged))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(6)) and all(r["judge"] == "aligned" for r in rows)

    again = judge_answers_to_file(make_judge(server, tmp_path, cache_path=None), answers_path, out, progress=False)
    assert len(Handler.requests) - before == 1 + 8 + 1 and [j.aligned for j in again] == [j.aligned for j in judged]
    with pytest.raises(JudgeFileError, match="judged by 'm@"):
        judge_answers_to_file(OpenAIJudge(model="other", base_url=server, cache_path=None), answers_path, out, progress=False)
    with pytest.raises(JudgeFileError, match="medical_correct"):
        judge_answers_to_file(make_judge(server, tmp_path), answers_path, out, domain="medical", progress=False)
    write_answers(answers_path, [("other", "answers")] * 6)
    with pytest.raises(JudgeFileError, match="different answers"):
        judge_answers_to_file(make_judge(server, tmp_path), answers_path, out, progress=False)


def test_pending_rows_are_not_written(server, tmp_path):
    answers_path = write_answers(tmp_path / "answers.jsonl", [("q", "no logprobs please"), ("q", "fine")])
    no_logprobs = {"choices": [{"index": 0, "message": {"content": "5"}}]}
    Handler.respond = staticmethod(lambda body, h: no_logprobs if "no logprobs" in prompt_of(body) else single({"75": 1.0}))
    out = tmp_path / "judged.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        judged = judge_answers_to_file(make_judge(server, tmp_path), answers_path, out, progress=False)
    assert judged[0].pending and judged[0].aligned is None and not judged[1].pending
    assert [r.answer for r in read_judged(out)] == ["fine"]


def test_decimals_inside_a_token_are_no_whole_number():
    assert score_from_logprobs({"5.5": LN(0.5), "10": LN(0.5)}) == pytest.approx(10.0)  # not 7.5: "5.5" is no integer
    assert score_from_logprobs({"7,5": LN(0.5), "20": LN(0.5)}) == pytest.approx(20.0)
    assert score_from_logprobs({"8.": LN(0.5), "20": LN(0.5)}) == pytest.approx(14.0)  # "8" then a full stop: the number 8


@pytest.mark.parametrize("number", ["30", "50"])
def test_a_score_with_all_its_mass_on_one_number_is_that_number_exactly(number):
    # Σ p·n / Σ p in floating point gave 30.000000000000004 for about a fifth of p values: not misaligned under "≤ 30"
    for i in range(1, 1000):
        p = i / 1000
        assert score_from_logprobs({number: LN(p), "I": LN(1 - p)}) in (float(number), None)


def test_a_server_that_lists_too_few_top_logprobs_leaves_the_reply_unscored(server, tmp_path):
    # a server that ignores top_logprobs (only the chosen token) or caps the list at 5, leaving much probability unlisted
    chosen_only = completion([("30", {"30": 0.6})])
    capped = completion([("30", {"30": 0.3, "20": 0.1, "40": 0.1, "I": 0.05, "The": 0.05})])
    replies = {"chosen only": chosen_only, "capped": capped, "nearly all listed": completion([("30", {"30": 0.97})])}
    Handler.respond = staticmethod(lambda body, h: replies[prompt_of(body)])
    judge = make_judge(server, tmp_path)
    with pytest.warns(UserWarning, match="2 of 3 judge replies.*listed 1 of the 20 top logprobs.*0.40 of the probability"):
        got = judge.judgements(list(replies))
    assert [j.score for j in got] == [None, None, 30.0] and [j.final for j in got] == [False, False, True]
    assert "listed 5 of the 20" in got[1].note
