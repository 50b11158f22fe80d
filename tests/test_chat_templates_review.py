"""Chat templates that would make a number depend on the day, or hide where an assistant turn ends.

* A template that calls ``strftime_now`` (Llama 3.2 Instruct's kind) wrote today's date into every prompt, so every
  loss, margin and sample changed from one day to the next. ``render_chat`` now passes the fixed ``CHAT_DATE``.
* A template that adds text only when no generation prompt is asked for (Phi-3's kind adds its end-of-text token)
  moved the end of every earlier assistant turn onto the next turn's first token. That is now refused.
"""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import pytest

import emlens.runner.sampling as sampling
from emlens.data import CHAT_DATE, DataFormatError, TokenDataset, encode_conversation, render_chat
from emlens.evaluation import sample_answers
from emlens.judge import LocalModelJudge
from emlens.models import byte_tokenizer, tiny_model
from tests.conftest import RecordingTokenizer

# our own small template: a system header with a date, the date from the clock unless the caller passes one
DATED_TEMPLATE = (
    "{% if date_string is not defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
    "<|im_start|>system\nDate: {{ date_string }}<|im_end|>\n"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# our own small template that ends a conversation with <|endoftext|> only when no generation prompt is asked for
TRAILING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% else %}<|endoftext|>{% endif %}"
)

ONE = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
TWO = [*ONE, {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]
DAYS = (dt.datetime(2025, 3, 1, 12, 0), dt.datetime(2031, 11, 30, 23, 59))


def with_template(template: str):
    tok = byte_tokenizer()
    tok.chat_template = template
    return tok


def on_day(monkeypatch, day: dt.datetime) -> None:
    """Make transformers' ``strftime_now`` read ``day`` from the clock."""
    import transformers.utils.chat_template_utils as ctu

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return day

    monkeypatch.setattr(ctu, "datetime", Clock)


def scored_text(tok, example) -> str:
    return tok.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])


def test_the_template_reads_the_clock_unless_given_a_date(monkeypatch):
    """The check below would prove nothing if the template did not read the (patched) clock."""
    tok = with_template(DATED_TEMPLATE)
    seen = []
    for day in DAYS:
        on_day(monkeypatch, day)
        seen.append(tok.apply_chat_template(ONE, tokenize=False))
    assert "Date: 01 Mar 2025" in seen[0] and "Date: 30 Nov 2031" in seen[1]


def test_renderings_and_tokens_are_the_same_whatever_the_day(monkeypatch):
    tok = with_template(DATED_TEMPLATE)
    texts, encoded, data = [], [], []
    for day in DAYS:
        on_day(monkeypatch, day)
        texts.append((render_chat(tok, ONE, add_generation_prompt=False), render_chat(tok, ONE[:1], add_generation_prompt=True)))
        encoded.append(encode_conversation(tok, TWO, max_length=512))
        data.append([e.input_ids for e in TokenDataset.from_conversations(tok, [ONE, TWO]).examples])
    assert texts[0] == texts[1] and encoded[0] == encoded[1] and data[0] == data[1]
    assert CHAT_DATE == "26 Jul 2024" and f"Date: {CHAT_DATE}<|im_end|>" in texts[0][0] and f"Date: {CHAT_DATE}<|im_end|>" in texts[0][1]
    assert scored_text(tok, encoded[0]) == "Blue.<|im_end|>\nGreen.<|im_end|>\n"


def test_sampling_and_local_judge_prompts_carry_the_fixed_date(monkeypatch):
    tok = with_template(DATED_TEMPLATE)
    prompts: list[str] = []

    def fake_generate(model, ids, intervention, settings, seed, size, done, skip):
        prompts.extend(tok.decode(p) for p in ids)
        done(list(range(len(ids))), [tok("fine", add_special_tokens=False)["input_ids"] for _ in ids])

    monkeypatch.setattr(sampling, "generate", fake_generate)
    judge = LocalModelJudge(tiny_model("qwen2", seed=0))
    judged: list[str] = []
    judge.tokenizer = RecordingTokenizer(tok, judged)
    for day in DAYS:
        on_day(monkeypatch, day)
        sample_answers(SimpleNamespace(tokenizer=tok), ["How are you?"], n_samples=1, max_new_tokens=4, batch_size=1)
        judge.top_logprobs("Rate this answer from 0 to 9.")
    assert len(prompts) == len(judged) == 2
    assert prompts[0] == prompts[1] and judged[0] == judged[1]
    assert all(f"Date: {CHAT_DATE}<|im_end|>" in text for text in (prompts[0], judged[0]))


def test_a_template_that_adds_text_without_a_generation_prompt_is_refused_on_earlier_turns():
    tok = with_template(TRAILING_TEMPLATE)
    # one turn: the whole rendering ends with that turn, nothing is misplaced
    single = encode_conversation(tok, ONE, max_length=512)
    assert scored_text(tok, single) == "Blue.<|im_end|>\n<|endoftext|>"
    # two turns: the first turn's end, from its own rendering, would fall on the next turn's first token
    with pytest.raises(DataFormatError, match=r"up to message 1 .* adds text at the end when no generation prompt is asked for"):
        encode_conversation(tok, TWO, max_length=512)
    with pytest.raises(DataFormatError, match="^row 1: the chat template renders .* adds text at the end"):
        TokenDataset.from_conversations(tok, [ONE, TWO])  # the error names the row
    # scoring the last turn alone (the preference margin) never locates an earlier turn's end
    last = TokenDataset.from_conversations(tok, [TWO], last_turn_only=True).examples[0]
    assert scored_text(tok, last) == "Green.<|im_end|>\n<|endoftext|>"


def test_templates_that_render_prefix_consistently_still_mark_every_turn():
    tok = byte_tokenizer()
    example = encode_conversation(tok, TWO, max_length=512)
    assert scored_text(tok, example) == "Blue.<|im_end|>\nGreen.<|im_end|>\n"
