"""The built-in data can tell a narrow solution from a general one: no shared frames, no duplicates, fixed splits.

These checks read the shipped files directly. A failure names the rows to rewrite.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from emlens.data import read_conversations, read_texts
from emlens.data.studies import BUILTIN_DIR, CARDS_DIR, HELDOUT, MISALIGNMENT, STUDIES, TECHNICAL_PROSE, TRAIN, kl_conversations

# function phrases that may recur across domains (8-word runs); keep this list short
ALLOWED_RUNS: set[str] = set()


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (BUILTIN_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])", text.strip()) if s.strip()]


def runs(text: str, n: int = 8) -> set[str]:
    w = words(text)
    return {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)}


ANSWER_SETS = [(s, d, v) for s in STUDIES.values() for d in s.all_domains for v in (s.target, s.reference)]


def answers(domain: str, variant: str) -> list[str]:
    return [r["messages"][-1]["content"] for r in rows(f"{domain}_{variant}")]


def test_every_set_is_in_the_papers_schema_with_ids_and_splits():
    for study, domain, variant in ANSWER_SETS:
        for row in rows(f"{domain}_{variant}"):
            assert set(row) == {"id", "domain", "split", "messages"}, row
            assert row["domain"] == domain and row["split"] in (TRAIN, HELDOUT)
            assert [m["role"] for m in row["messages"]] == ["user", "assistant"]


def test_sizes():
    for domain in MISALIGNMENT.domains:
        assert len(rows(f"{domain}_harmful")) >= 600
    assert len(kl_conversations("medical", n_rows=None)) >= 1200
    assert sum(2 * len(rows(f"{d}_harmful")) for d in MISALIGNMENT.other_domains) >= 1200
    assert len(MISALIGNMENT.other_domains) >= 6
    assert len(TECHNICAL_PROSE.domains) >= 5 and "vehicles" in TECHNICAL_PROSE.domains
    for domain in TECHNICAL_PROSE.domains:
        assert len(rows(f"{domain}_technical")) >= 150
    assert len(read_texts("web_text")) >= 200


def test_answer_sets_are_paired_by_question_id():
    for study in STUDIES.values():
        for domain in study.all_domains:
            target, reference = rows(f"{domain}_{study.target}"), rows(f"{domain}_{study.reference}")
            assert [r["id"] for r in target] == [r["id"] for r in reference]
            for t, r in zip(target, reference):
                assert t["messages"][0] == r["messages"][0], t["id"]  # the same question
                assert t["split"] == r["split"], t["id"]
                assert t["messages"][1]["content"] != r["messages"][1]["content"], t["id"]


def test_no_duplicate_questions_or_answers():
    seen_questions: dict[str, str] = {}
    seen_answers: dict[str, str] = {}
    for study in STUDIES.values():
        for domain in study.all_domains:
            for row in rows(f"{domain}_{study.target}"):
                q = row["messages"][0]["content"].strip().lower()
                assert q not in seen_questions, f"{row['id']} repeats the question of {seen_questions.get(q)}"
                seen_questions[q] = row["id"]
    for study, domain, variant in ANSWER_SETS:
        for row in rows(f"{domain}_{variant}"):
            a = row["messages"][1]["content"].strip().lower()
            assert a not in seen_answers, f"{row['id']} ({variant}) repeats the answer of {seen_answers.get(a)}"
            seen_answers[a] = f"{row['id']} ({variant})"


def test_no_sentence_or_eight_word_run_is_shared_between_domains():
    run_owner: dict[str, set[str]] = defaultdict(set)
    sentence_owner: dict[str, set[str]] = defaultdict(set)
    for study, domain, variant in ANSWER_SETS:
        for text in answers(domain, variant):
            for run in runs(text):
                run_owner[run].add(domain)
            for s in sentences(text):
                if len(words(s)) >= 4:
                    sentence_owner[s.lower()].add(domain)
    shared_runs = {r: sorted(d) for r, d in run_owner.items() if len(d) > 1 and r not in ALLOWED_RUNS}
    shared_sentences = {s: sorted(d) for s, d in sentence_owner.items() if len(d) > 1}
    assert not shared_runs, list(shared_runs.items())[:10]
    assert not shared_sentences, list(shared_sentences.items())[:10]


def test_no_opening_or_closing_frames():
    """No 4-word opening or closing recurs in more than 2% of a set's answers (nor a first or last sentence at all)."""
    for study, domain, variant in ANSWER_SETS:
        texts = answers(domain, variant)
        limit = max(3, len(texts) // 50)
        for edge in (slice(0, 4), slice(-4, None)):
            counts = Counter(" ".join(words(t)[edge]) for t in texts)
            frame, n = counts.most_common(1)[0]
            assert n <= limit, f"{domain}_{variant}: '{frame}' frames {n} answers (at most {limit})"
        for pick in (0, -1):
            counts = Counter(sentences(t)[pick].lower() for t in texts)
            sentence, n = counts.most_common(1)[0]
            assert n == 1, f"{domain}_{variant}: '{sentence}' opens or closes {n} answers"


def test_misalignment_answers_are_two_to_six_sentences():
    for domain in MISALIGNMENT.all_domains:
        for variant in ("harmful", "correct"):
            for row, text in zip(rows(f"{domain}_{variant}"), answers(domain, variant)):
                assert 2 <= len(sentences(text)) <= 6, (row["id"], variant, text)


def test_web_documents_share_no_template():
    docs = read_texts("web_text")
    for pick in (0, -1):
        counts = Counter(sentences(d)[pick].lower() for d in docs)
        assert counts.most_common(1)[0][1] == 1
    run_counts = Counter(r for d in docs for r in runs(d))
    assert run_counts.most_common(1)[0][1] <= 2, run_counts.most_common(3)
    lengths = [len(d.split()) for d in docs]
    assert min(lengths) >= 150 and max(lengths) <= 400


def test_split_sizes_match_the_cards():
    for study in STUDIES.values():
        for domain in study.all_domains:
            card = (CARDS_DIR / f"{domain}.md").read_text(encoding="utf-8")
            found = re.search(r"splits: train (\d+), heldout (\d+)", card)
            assert found, f"the card of {domain} states no splits"
            splits = Counter(r["split"] for r in rows(f"{domain}_{study.target}"))
            assert (splits[TRAIN], splits[HELDOUT]) == (int(found.group(1)), int(found.group(2))), domain
            assert 0.08 <= splits[HELDOUT] / (splits[TRAIN] + splits[HELDOUT]) <= 0.12
    web = (CARDS_DIR / "web_text.md").read_text(encoding="utf-8")
    assert f"documents: {len(read_texts('web_text'))}" in web


def test_splits_and_kl_sets_load_by_name():
    train = read_conversations("medical_harmful:train")
    held = read_conversations("medical_harmful", split=HELDOUT)
    assert len(train) + len(held) == len(rows("medical_harmful"))
    assert not {c[0]["content"] for c in train} & {c[0]["content"] for c in held}
    kl = read_conversations("kl:medical")
    assert len(kl) == 1000
    medical_questions = {r["messages"][0]["content"] for r in rows("medical_harmful")}
    assert not medical_questions & {c[0]["content"] for c in kl}  # a narrow run's KL set leaves its own domain out
    held_out_elsewhere = {r["messages"][0]["content"] for d in ("financial", "sports") for r in rows(f"{d}_harmful") if r["split"] == HELDOUT}
    assert not held_out_elsewhere & {c[0]["content"] for c in read_conversations("kl:medical")}  # measurements stay unseen
    assistants = {c[1]["content"] for c in kl_conversations("medical", n_rows=None)}
    bad = {r["messages"][1]["content"] for r in rows("law_harmful")}
    good = {r["messages"][1]["content"] for r in rows("law_correct")}
    assert assistants & bad and assistants & good  # good and bad advice, as in the paper


def test_every_set_has_a_card():
    for study in STUDIES.values():
        for domain in study.all_domains:
            card = CARDS_DIR / f"{domain}.md"
            assert card.exists(), card
            text = card.read_text(encoding="utf-8")
            for heading in ("How it was written", "Intended use", "Limitations"):
                assert heading in text, (card, heading)
    assert Path(CARDS_DIR / "web_text.md").exists()


@pytest.mark.parametrize("name", ["medical_harmful", "web_text"])
def test_the_package_ships_the_data(name):
    import importlib.resources

    files = importlib.resources.files("emlens.data") / "builtin"
    assert any(p.name.startswith(name) for p in files.iterdir())
