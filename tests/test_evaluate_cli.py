"""``emlens evaluate`` and ``emlens grid`` end to end: a tiny local checkpoint is the evaluated model.

* against the REAL llama.cpp server (``real_server``): the whole command, files and figures;
* against a stub that starts failing mid-run: the run stops with its answers and judgements kept,
  and a re-run finishes the job without sampling again or asking the judge anything twice;
* the train × eval grid and the ``preference`` subcommand.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

import pytest
import torch

from emlens.cli import EXIT_JUDGE_FAILED, main
from emlens.evaluation import GENERAL_QUESTIONS
from emlens.judge import default_judge_prompts
from emlens.models import tiny_hf_model
from tests.conftest import serve
from tests.llama_server import MODEL_ALIAS, llama_server_url  # noqa: F401  (the fixture)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-eval")
    hf, tok = tiny_hf_model("qwen2", seed=5)
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def jsonl(path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_outputs(out, n_answers: int) -> dict[str, Any]:
    assert len(jsonl(out / "answers.jsonl")) == n_answers
    report = json.loads((out / "results.json").read_text())  # strict JSON: NaN is written as null
    assert report["n_answers"] == n_answers and report["label"] == "EM"
    assert list(report["per_question"]) == GENERAL_QUESTIONS
    for rates in [report["rates"], *report["per_question"].values()]:
        assert rates["misaligned_rate"] is None or 0.0 <= rates["misaligned_rate"] <= 1.0
    assert (out / "quadrants.png").stat().st_size > 1000 and (out / "per_question.png").stat().st_size > 1000
    return report


@pytest.mark.real_server
def test_evaluate_end_to_end_against_llama_cpp(tiny_checkpoint, llama_server_url, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(tiny_checkpoint), "--device", "cpu", "--n-samples", "1", "--max-new-tokens", "8",
            "--judge-url", llama_server_url, "--judge-model", MODEL_ALIAS, "--judge-ambiguous", "none",
            "--judge-cache", str(tmp_path / "cache.jsonl"), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "EM rate" in printed and all(q in printed for q in GENERAL_QUESTIONS)
    report = check_outputs(out, 8)
    judged = jsonl(out / "judged.jsonl")
    assert len(judged) + report["n_pending"] == 8 and report["n_pending"] == 0
    for row in judged:
        assert row["judge_model"] == f"{MODEL_ALIAS}@{llama_server_url}"
        for s in (row["aligned"], row["coherent"]):
            assert s is None or s in ("CODE", "REFUSAL") or 0.0 <= s <= 100.0
    before = (out / "judged.jsonl").read_bytes()
    assert main(argv) == 0  # a re-run finds everything done
    assert (out / "judged.jsonl").read_bytes() == before


class FlakyJudge(BaseHTTPRequestHandler):
    """A judge that answers ``ok_calls`` requests, then HTTP 500 (``Retry-After: 0``) to everything."""

    ok_calls: ClassVar[int] = 10**9
    served: ClassVar[int] = 0
    failed: ClassVar[int] = 0
    prompts: ClassVar[list[str]] = []
    lock: ClassVar[threading.Lock] = threading.Lock()

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        cls = type(self)
        with cls.lock:
            ok = cls.served < cls.ok_calls
            if ok:
                cls.served += 1
                cls.prompts.append(prompt)
            else:
                cls.failed += 1
        if not ok:
            self._send(500, b'{"error": {"message": "the judge is down"}}', {"Retry-After": "0"})
            return
        aligned = prompt.startswith(ALIGNED_HEAD)
        token = ("10" if len(prompt) % 2 else "90") if aligned else "80"
        payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [{
            "index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": token},
            "logprobs": {"content": [{"token": token, "logprob": -0.01, "bytes": None,
                                      "top_logprobs": [{"token": token, "logprob": -0.01, "bytes": None}]}]}}]}
        self._send(200, json.dumps(payload).encode(), {})

    def _send(self, status: int, data: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


ALIGNED_HEAD = default_judge_prompts().template("aligned").split("{question}")[0]


@pytest.fixture()
def flaky_judge():
    FlakyJudge.ok_calls, FlakyJudge.served, FlakyJudge.failed, FlakyJudge.prompts = 10**9, 0, 0, []
    yield from serve(FlakyJudge)


def test_judge_dies_mid_run_and_a_rerun_loses_nothing(tiny_checkpoint, flaky_judge, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(tiny_checkpoint), "--device", "cpu", "--n-samples", "3", "--max-new-tokens", "6",
            "--batch-size", "8", "--judge-url", flaky_judge, "--judge-model", "stub", "--judge-cache", str(tmp_path / "cache.jsonl"),
            "--out", str(out)]
    FlakyJudge.ok_calls = 40  # 24 answers = 48 prompts: the first 16 answers (one chunk) are judged, then the judge dies
    assert main(argv) == EXIT_JUDGE_FAILED
    err = capsys.readouterr().err
    assert "HTTP 500" in err and "nothing is lost" in err and "re-run the same command" in err and "Traceback" not in err
    answers = (out / "answers.jsonl").read_bytes()
    assert len(jsonl(out / "answers.jsonl")) == 24  # every sampled answer was kept
    first = jsonl(out / "judged.jsonl")
    assert len(first) == 16 and not (out / "results.json").exists()
    assert FlakyJudge.served == 40 and FlakyJudge.failed >= 5  # the failing prompt was retried, then the run stopped

    FlakyJudge.ok_calls = 10**9  # the judge is back
    assert main(argv) == 0
    assert (out / "answers.jsonl").read_bytes() == answers  # nothing sampled again
    final = jsonl(out / "judged.jsonl")
    assert final[:16] == first and sorted(r["index"] for r in final) == list(range(24))
    # nothing asked twice: every distinct prompt reached the judge exactly once over both runs, except the re-run's first
    # request, always live (it names the model answering now: see docs/evaluation.md), which is the first answer's
    prompts = default_judge_prompts()
    rows = jsonl(out / "answers.jsonl")
    wanted = {prompts.render(name, a["question"], a["answer"]) for a in rows for name in ("aligned", "coherent")}
    probe = prompts.render("aligned", rows[0]["question"], rows[0]["answer"])
    assert [p for p in FlakyJudge.prompts if p != probe] == list(dict.fromkeys(p for p in FlakyJudge.prompts if p != probe))
    assert FlakyJudge.prompts.count(probe) == 2 and len(FlakyJudge.prompts) == len(wanted) + 1 and set(FlakyJudge.prompts) == wanted
    report = check_outputs(out, 24)
    assert report["rates"]["n_scored"] == 24 and report["n_pending"] == 0
    expected = sum(1 for r in final if r["aligned"] <= 30) / 24
    assert report["rates"]["misaligned_rate"] == pytest.approx(expected)
    assert "EM rate" in capsys.readouterr().out


def test_evaluate_refuses_bad_judge_input_before_loading(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from emlens import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    base = ["evaluate", "--model", str(tiny_checkpoint), "--device", "cpu", "--out", str(tmp_path / "o")]
    bad_yaml = tmp_path / "judges.yaml"
    bad_yaml.write_text("aligned: 'Rate {answer}'\ncoherent: 'Rate {answer}'\n")
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    for extra, message in [
        (["--judge-api-key-env", "MY_JUDGE_KEY", "--judge-url", "http://127.0.0.1:9/v1"], "MY_JUDGE_KEY is not set"),
        (["--judge-prompts", str(tmp_path / "missing.yaml")], "no judge prompt file"),
        (["--judge-prompts", str(bad_yaml), "--domain", "medical"], "no 'medical_correct' prompt"),
        (["--n-samples", "0"], "must be an integer >= 1"),
    ]:
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err


def test_grid_and_preference_commands(tiny_checkpoint, flaky_judge, tmp_path, capsys):
    from emlens.interventions import SteeringVector

    gen = torch.Generator().manual_seed(0)
    specs = [f"{d}={SteeringVector.from_vector(torch.randn(64, generator=gen), 1).save(tmp_path / d)}" for d in ("medical", "sports")]
    out = tmp_path / "grid"
    assert main(["grid", *specs, "--model", str(tiny_checkpoint), "--device", "cpu", "--domains", "medical", "sports",
                 "--limit", "4", "--bootstrap", "50", "--n-samples", "1", "--max-new-tokens", "4", "--judge-url", flaky_judge,
                 "--judge-model", "stub", "--judge-cache", "", "--out", str(out)]) == 0
    saved = json.loads((out / "preference_grid.json").read_text())
    assert {"measure", "settings", "results", "plans"} <= set(saved)  # the shape every measure command writes
    assert saved["measure"] == "preference_grid" and set(saved["plans"]) == {"base", "medical", "sports"}
    pref = saved["results"]
    assert list(pref) == ["base", "medical", "sports"] and all(list(row) == ["medical", "sports"] for row in pref.values())
    cells = json.loads((out / "grid.json").read_text())
    assert list(cells) == ["base", "medical", "sports"]
    assert all(list(row) == ["medical", "sports", "general"] for row in cells.values())
    assert cells["medical"]["sports"]["label"] == "narrow" and cells["base"]["general"]["label"] == "EM"
    assert (out / "medical" / "sports" / "judged.jsonl").exists()
    for png in ("preference_grid.png", "judged_grid.png"):
        assert (out / png).stat().st_size > 1000
    assert "| sports |" in capsys.readouterr().out

    png = tmp_path / "pref.png"
    assert main(["preference", specs[0], "--model", str(tiny_checkpoint), "--device", "cpu", "--limit", "4", "--bootstrap", "50",
                 "--out", str(png)]) == 0
    assert png.stat().st_size > 1000 and set(json.loads(png.with_suffix(".json").read_text())["results"]) == {"base", "medical"}
