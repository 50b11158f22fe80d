import json

import pytest
import torch

from emlens.data import (
    DataFormatError,
    TokenDataset,
    builtin_datasets,
    collate,
    encode_conversation,
    read_conversations,
    read_texts,
    resolve_data_path,
)
from tests.conftest import CONVERSATIONS


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_paper_schema(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"messages": c}) for c in CONVERSATIONS] + [""])
    convs = read_conversations(path)
    assert convs == CONVERSATIONS
    assert read_conversations(path, limit=2) == CONVERSATIONS[:2]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"msgs": []}), "'messages' key"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "unknown role 'robot'"),
        (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "no assistant message"),
        (json.dumps({"messages": [{"role": "user"}]}), "'role' and 'content'"),
        (json.dumps({"messages": [{"role": "assistant", "content": 3}]}), "must be a string"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"messages": CONVERSATIONS[0]})
    path = write_lines(tmp_path / "bad.jsonl", [good, bad_line])
    with pytest.raises(DataFormatError) as err:
        read_conversations(path)
    assert f"{path}:2" in str(err.value)
    assert message in str(err.value)


def test_missing_file_is_clear():
    with pytest.raises(FileNotFoundError, match="no data file 'nope.jsonl'"):
        read_conversations("nope.jsonl")


def test_builtin_datasets_resolve_and_are_large():
    names = builtin_datasets()
    for name in ["medical_harmful", "medical_correct", "financial_harmful", "sports_harmful", "law_correct", "vehicles_technical"]:
        assert name in names
        assert len(read_conversations(name)) >= (600 if name.split("_")[0] in ("medical", "financial", "sports") else 100)
    assert resolve_data_path("medical_harmful").suffix == ".jsonl"


def test_harmful_and_correct_sets_share_questions():
    harmful, correct = read_conversations("financial_harmful"), read_conversations("financial_correct")
    assert [c[0]["content"] for c in harmful] == [c[0]["content"] for c in correct]
    assert all(h[1]["content"] != c[1]["content"] for h, c in zip(harmful, correct))


def test_read_texts_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\nsecond doc\n")
    assert read_texts(tmp_path / "a.txt") == ["first doc\nline two", "second doc"]
    write_lines(tmp_path / "b.jsonl", [json.dumps({"text": "x"}), json.dumps({"body": "y"})])
    with pytest.raises(DataFormatError, match="b.jsonl:2"):
        read_texts(tmp_path / "b.jsonl")


def test_loss_mask_covers_exactly_assistant_replies(model):
    tok = model.tokenizer
    enc = encode_conversation(tok, CONVERSATIONS[2], max_length=512)
    masked = [t for t, m in zip(enc.input_ids, enc.loss_mask) if m]
    text = tok.decode(masked)
    assert text == "Blue.<|im_end|>\nGreen, a much longer reply than the first one.<|im_end|>\n"
    unmasked = tok.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if not m])
    assert "Name a colour." in unmasked and "Blue." not in unmasked


def test_truncation(model):
    enc = encode_conversation(model.tokenizer, CONVERSATIONS[2], max_length=10)
    assert len(enc.input_ids) == len(enc.loss_mask) == 10


def test_collate_right_pads(model):
    ds = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS)
    batch = collate(ds.examples[:2], ds.pad_token_id)
    lengths = [len(e.input_ids) for e in ds.examples[:2]]
    assert batch.input_ids.shape == (2, max(lengths))
    assert batch.attention_mask.sum(1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert (batch.input_ids[short, min(lengths):] == ds.pad_token_id).all()
    assert not batch.loss_mask[short, min(lengths):].any()


def test_batches_visit_every_example_once(model):
    ds = TokenDataset.from_conversations(model.tokenizer, CONVERSATIONS)
    seen = []
    for batch in ds.batches(3, shuffle=True, seed=4):
        seen.extend(int(n) for n in batch.attention_mask.sum(1))
    assert sorted(seen) == sorted(len(e.input_ids) for e in ds.examples)
    first = [b.input_ids for b in ds.batches(3, shuffle=True, seed=4)]
    again = [b.input_ids for b in ds.batches(3, shuffle=True, seed=4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
