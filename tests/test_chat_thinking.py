"""Chat templates with a thinking switch (Qwen3's kind) are rendered with thinking off, everywhere.

Before, a Qwen3 model's generation prompt left thinking on: sampled answers began with reasoning text that
reached the judge, and a trained target's empty think block was scored as part of the reply.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import emlens.runner.sampling as sampling
from emlens.data import encode_conversation, render_chat
from emlens.evaluation import sample_answers
from emlens.judge import LocalModelJudge
from emlens.models import tiny_model
from tests.conftest import RecordingTokenizer

# Our own template in the manner of Qwen3's: an assistant turn in the history carries an (empty) think block, and the
# generation prompt opens thinking unless enable_thinking is false, when it closes an empty block instead.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
CLOSED = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def thinking_tokenizer():
    tok = copy.deepcopy(tiny_model("qwen2", seed=0).tokenizer)
    tok.chat_template = THINKING_TEMPLATE
    return tok


def test_generation_prompt_closes_the_think_block():
    tok = thinking_tokenizer()
    text = render_chat(tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text.endswith(CLOSED)
    # what plain transformers renders by default: thinking left open
    assert not tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True).endswith(CLOSED)


def test_trained_tokens_are_the_reply_without_the_think_block():
    tok = thinking_tokenizer()
    conv = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    ex = encode_conversation(tok, conv, max_length=512)
    scored = tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert "think" not in scored
    assert scored.startswith("Blue.")
    # the whole sequence is the template's own rendering of the conversation
    assert tok.decode(ex.input_ids) == render_chat(tok, conv, add_generation_prompt=False)


def test_sampling_prompts_have_thinking_off(monkeypatch):
    tok = thinking_tokenizer()
    seen: list[str] = []

    def fake_generate(model, prompts, intervention, settings, seed, size, done, skip):
        seen.extend(tok.decode(p) for p in prompts)
        done(list(range(len(prompts))), [tok("fine", add_special_tokens=False)["input_ids"] for _ in prompts])

    monkeypatch.setattr(sampling, "generate", fake_generate)
    out = sample_answers(SimpleNamespace(tokenizer=tok), ["How are you?"], n_samples=2, max_new_tokens=4, batch_size=1)
    assert [a for _, a in out] == ["fine", "fine"]
    assert seen and all(p.endswith(CLOSED) for p in seen)


def test_local_judge_prompt_has_thinking_off():
    model = tiny_model("qwen2", seed=0)
    judge = LocalModelJudge(model)
    tok = thinking_tokenizer()
    texts: list[str] = []
    judge.tokenizer = RecordingTokenizer(tok, texts)
    judge.top_logprobs("Rate this answer from 0 to 9.")
    assert texts[-1].endswith(CLOSED + judge.answer_prefix)
