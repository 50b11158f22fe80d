"""Judged answers and their files: judge rows of answers, write and read them, and resume a judging run."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from emlens.jsonl import read_jsonl
from emlens.judge.errors import JudgeFileError
from emlens.judge.judges import Judge, Judgement, judgements
from emlens.judge.prompts import JudgePrompts, as_judge_prompts
from emlens.judge.scoring import SCORING_RULE, Score


@dataclass
class JudgedAnswer:
    """One answer with its two scores. ``aligned`` holds in-domain correctness when judged in a domain."""

    question: str
    answer: str
    aligned: Score
    coherent: Score
    notes: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pending(self) -> bool:
        """True when a judge reply was unusable: the answer should be judged again."""
        return "pending" in self.notes


def _judge_rows(
    judge: Judge, rows: Sequence[tuple[str, str]], domain: str | None, prompts: JudgePrompts
) -> list[tuple[Judgement, Judgement]]:
    adapt = getattr(judge, "adapt_prompts", None)  # a judge on another scale rewrites the templates, never the answers
    if callable(adapt):
        prompts = adapt(prompts)
    first = prompts.domain_judge(domain)
    texts = [prompts.render(first, q, a) for q, a in rows] + [prompts.render("coherent", q, a) for q, a in rows]
    results = judgements(judge, texts)
    return list(zip(results[: len(rows)], results[len(rows) :]))


def _judged(question: str, answer: str, pair: tuple[Judgement, Judgement], extra: dict[str, Any] | None = None) -> JudgedAnswer:
    notes = {name: j.note for name, j in zip(("aligned", "coherent"), pair) if j.note}
    if not all(j.final for j in pair):
        notes["pending"] = "no usable judge reply; re-run to judge again"
    return JudgedAnswer(question, answer, pair[0].score, pair[1].score, notes, dict(extra or {}))


def judge_answers(
    judge: Judge, answers: Sequence[tuple[str, str]], domain: str | None = None, prompts: JudgePrompts | str | Path | None = None
) -> list[JudgedAnswer]:
    """Score each answer for alignment (or ``<domain>_correct`` when ``domain`` is given) and coherence.

    ``prompts``: a :class:`JudgePrompts`, a YAML path (see :func:`load_judge_prompts`), or ``None`` for the defaults.
    """
    p = as_judge_prompts(prompts)
    return [_judged(q, a, pair) for (q, a), pair in zip(answers, _judge_rows(judge, answers, domain, p))]


def write_answers(path: str | Path, answers: Iterable[tuple[str, str] | Mapping[str, Any]]) -> Path:
    """Write sampled answers as JSONL rows ``{"question", "answer", ...}`` (before any judging)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in answers:
            item = dict(row) if isinstance(row, Mapping) else {"question": row[0], "answer": row[1]}
            fh.write(json.dumps(item, ensure_ascii=False) + "\n")
    return path


def read_answers(path: str | Path) -> list[dict[str, Any]]:
    """Read an answers JSONL written by :func:`write_answers`; each row needs ``question`` and ``answer``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no answers file {str(path)!r}")
    rows = read_jsonl(path, repair=False, error=JudgeFileError)
    for i, row in enumerate(rows, start=1):
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise JudgeFileError(f"{path}:{i}: expected string 'question' and 'answer' keys")
    return rows


def judge_identity(judge: Judge) -> str:
    """``model@endpoint`` of an API judge (the class name for others): recorded with each judged row."""
    model, base_url = getattr(judge, "model", None), getattr(judge, "base_url", None)
    if isinstance(model, str) and isinstance(base_url, str):
        return f"{model}@{base_url}"
    return type(judge).__name__


def judge_scoring(judge: Judge) -> dict[str, Any]:
    """The settings that turn a judge's replies into scores: the rule, and the judge's ``on_ambiguous``,
    ``number_tokens`` and ``unresolved_tolerance`` (``None`` for a judge without them). Recorded with each judged
    row: a resume with other settings is refused, since the same replies would score differently."""
    settings: dict[str, Any] = {"rule": SCORING_RULE}
    for name in ("on_ambiguous", "number_tokens", "unresolved_tolerance"):
        value = getattr(judge, name, None)
        settings[name] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    return settings


def responding_model(judge: Judge, probe: str | None) -> str | None:
    """The model answering for ``judge`` (learnt from a live request of ``probe``), ``None`` for judges that cannot say."""
    learn = getattr(judge, "responding_model", None)
    return learn(probe) if callable(learn) and probe is not None else None


def prompts_digest(prompts: JudgePrompts, names: Sequence[str]) -> str:
    """A short hash of the named templates: judged rows record it, so other prompts are never mixed in."""
    text = "\0".join(f"{n}\0{prompts.template(n)}" for n in names)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _row_from_judged(
    index: int, judge_name: str, judge_id: str, digest: str, j: JudgedAnswer, responded: str | None, scoring: dict[str, Any]
) -> dict[str, Any]:
    row = {"index": index, **j.extra, "question": j.question, "answer": j.answer, "judge": judge_name, "judge_model": judge_id}
    row |= {"judge_responded": responded, "scoring": scoring, "prompts": digest, "aligned": j.aligned, "coherent": j.coherent}
    return row | ({"notes": j.notes} if j.notes else {})


def _judged_from_row(row: Mapping[str, Any]) -> JudgedAnswer:
    core = {"index", "question", "answer", "judge", "judge_model", "judge_responded", "scoring", "prompts", "aligned", "coherent", "notes"}
    extra = {k: v for k, v in row.items() if k not in core}
    return JudgedAnswer(row["question"], row["answer"], row["aligned"], row["coherent"], dict(row.get("notes") or {}), extra)


def judge_answers_to_file(
    judge: Judge,
    answers_path: str | Path,
    out_path: str | Path,
    domain: str | None = None,
    prompts: JudgePrompts | str | Path | None = None,
    chunk_size: int = 16,
    progress: bool = True,
) -> list[JudgedAnswer]:
    """Judge the answers in ``answers_path`` (JSONL), appending each judged row to ``out_path`` as it comes.

    Resumable: rows already in ``out_path`` are skipped (an output written for other answers, another
    judge, other prompt templates, another judge model/endpoint or other scoring settings is refused), and
    a truncated last line there is repaired. Each row records the model the server said answered (learnt
    from a live first request, see :meth:`OpenAIJudge.responding_model`): rows judged by another responding
    model, or written before emlens recorded it and the scoring rule, are removed and judged again, with a
    warning. Rows whose judge reply was unusable are not written, so a re-run asks again;
    the returned list (in answer order) holds them with ``None`` scores and ``pending`` set. A judge
    failure (HTTP 5xx, refused connection, long 429) raises after writing everything finished so far.
    """
    answers = read_answers(answers_path)
    out_path = Path(out_path)
    p = as_judge_prompts(prompts)
    judge_name = p.domain_judge(domain)
    judge_id = judge_identity(judge)
    adapt = getattr(judge, "adapt_prompts", None)  # the digest is of the templates the judge reads (a local judge's 0-9 ones)
    digest = prompts_digest(adapt(p) if callable(adapt) else p, [judge_name, "coherent"])
    scoring = judge_scoring(judge)
    probe = p.render(judge_name, answers[0]["question"], answers[0]["answer"]) if answers else None
    responded = responding_model(judge, probe)
    done: dict[int, JudgedAnswer] = {}
    kept: list[dict[str, Any]] = []
    stale: list[Any] = []
    if out_path.exists():
        for row in read_jsonl(out_path, repair=True, error=JudgeFileError):
            i = row.get("index")
            if not isinstance(i, int) or not 0 <= i < len(answers):
                raise JudgeFileError(f"{out_path}: row index {i!r} is not a row of {answers_path}")
            src = answers[i]
            if row.get("question") != src["question"] or row.get("answer") != src["answer"]:
                raise JudgeFileError(f"{out_path} was written for different answers than {answers_path} (row {i}); use a new output path")
            if row.get("judge") != judge_name:
                raise JudgeFileError(f"{out_path} holds {row.get('judge')!r} judgements, not {judge_name!r}; use a new output path")
            if row.get("judge_model") != judge_id:
                raise JudgeFileError(f"{out_path} was judged by {row.get('judge_model')!r}, not {judge_id!r}; use a new output path")
            if row.get("prompts") != digest:
                raise JudgeFileError(
                    f"{out_path} was judged with other {judge_name!r}/'coherent' prompt templates ({p.source} now); use a new output path"
                )
            if "scoring" in row and row["scoring"] != scoring:
                then, now = row["scoring"], scoring
                diffs = ", ".join(f"{k} {then.get(k)!r} then, {now.get(k)!r} now" for k in now if then.get(k) != now.get(k))
                raise JudgeFileError(
                    f"{out_path} was scored with other settings ({diffs or then}); resume with the same judge settings "
                    "(--judge-ambiguous), or use a new output path"
                )
            if "scoring" not in row or row.get("judge_responded") != responded:
                stale.append(row.get("judge_responded"))
                continue
            kept.append(row)
            done[i] = _judged_from_row(row)
    if stale:
        who = ", ".join(sorted({repr(m) if m is not None else "not recorded (an older emlens)" for m in stale}))
        warnings.warn(
            f"{out_path}: {len(stale)} judged answer(s) were judged by another responding model ({who}) than the one "
            f"answering now ({responded!r}, {judge_id}), or before emlens recorded the scoring rule; they are judged again",
            stacklevel=2,
        )
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, out_path)
    todo = [i for i in range(len(answers)) if i not in done]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pending: dict[int, JudgedAnswer] = {}
    with tqdm(total=len(todo), desc="judging answers", disable=not progress or not todo) as bar:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            rows = [(answers[i]["question"], answers[i]["answer"]) for i in chunk]
            pairs = _judge_rows(judge, rows, domain, p)
            responded = responding_model(judge, probe)  # no request: the session's model, named by now if it was not at first
            with out_path.open("a", encoding="utf-8") as fh:
                for i, (q, a), pair in zip(chunk, rows, pairs):
                    extra = {k: v for k, v in answers[i].items() if k not in ("question", "answer")}
                    judged = _judged(q, a, pair, extra)
                    if judged.pending:
                        pending[i] = judged
                    else:
                        done[i] = judged
                        row = _row_from_judged(i, judge_name, judge_id, digest, judged, responded, scoring)
                        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                fh.flush()
            bar.update(len(chunk))
    if pending:
        warnings.warn(f"{len(pending)} answer(s) in {answers_path} got no usable judge reply; re-run to judge them", stacklevel=2)
    return [done[i] if i in done else pending[i] for i in range(len(answers))]


def read_judged(path: str | Path) -> list[JudgedAnswer]:
    """Judged answers from a file written by :func:`judge_answers_to_file`, in answer order."""
    rows = read_jsonl(Path(path), repair=False, error=JudgeFileError)
    return [_judged_from_row(r) for r in sorted(rows, key=lambda r: r["index"])]
