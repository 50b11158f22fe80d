"""Issue 10, data: bad inputs are refused clearly and no row is lost silently."""

import json
import warnings

import pytest

from emlens.data import (
    DataFormatError,
    TokenDataset,
    TruncationWarning,
    encode_conversation,
    read_conversations,
    read_texts,
    write_conversations,
)
from emlens.models import byte_tokenizer
from emlens.validation import ConfigError
from tests.conftest import CONVERSATIONS


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write_rows(path, conversations):
    path.write_text(
        "".join(json.dumps({"messages": c}) + "\n" for c in conversations),
        encoding="utf-8",
    )
    return path


def first_scored_index(tok, conversation):
    """Index of the first assistant token that a model predicts (0 is never predicted)."""
    enc = encode_conversation(tok, conversation, max_length=10_000)
    return next(i for i, m in enumerate(enc.loss_mask) if m and i > 0)


# --- limit and max_length ---------------------------------------------------------------


@pytest.mark.parametrize("limit", [0, -3, True, 1.5, "2"])
def test_bad_limit_is_refused_everywhere(tmp_path, tok, limit):
    path = write_rows(tmp_path / "d.jsonl", CONVERSATIONS)
    calls = [
        lambda: read_conversations(path, limit=limit),
        lambda: read_texts("web_text", limit=limit),
        lambda: TokenDataset.from_conversations(tok, path, limit=limit),
        lambda: TokenDataset.from_conversations(tok, CONVERSATIONS, limit=limit),
    ]
    for call in calls:
        with pytest.raises(ConfigError, match=r"limit must be None or an integer >= 1, got"):
            call()


def test_limit_one_keeps_one_row(tmp_path, tok):
    path = write_rows(tmp_path / "d.jsonl", CONVERSATIONS)
    assert len(read_conversations(path, limit=1)) == 1
    assert len(TokenDataset.from_conversations(tok, CONVERSATIONS, limit=1)) == 1


@pytest.mark.parametrize("max_length", [0, -5, 2.5, None])
def test_bad_max_length_is_refused(tok, max_length):
    with pytest.raises(ConfigError, match=r"max_length must be an integer >= 1"):
        TokenDataset.from_conversations(tok, CONVERSATIONS, max_length=max_length)
    with pytest.raises(ConfigError, match=r"max_length must be an integer >= 1"):
        encode_conversation(tok, CONVERSATIONS[0], max_length=max_length)
    with pytest.raises(ConfigError, match=r"max_length must be an integer >= 1"):
        TokenDataset.from_texts(tok, ["some text"], max_length=max_length)


def test_batch_size_zero_is_refused(tok):
    data = TokenDataset.from_conversations(tok, CONVERSATIONS)
    with pytest.raises(ConfigError, match=r"batch_size must be an integer >= 1, got 0"):
        next(data.batches(0))


# --- truncation -------------------------------------------------------------------------


def test_rows_truncated_to_nothing_are_dropped_and_reported(tmp_path, tok):
    starts = [first_scored_index(tok, c) for c in CONVERSATIONS]
    max_length = sorted(starts)[1] + 1  # keeps the two rows whose replies start earliest
    lost = [i for i, s in enumerate(starts) if s >= max_length]
    assert lost, "the test needs a row that loses its reply"
    with pytest.warns(TruncationWarning) as record:
        data = TokenDataset.from_conversations(tok, CONVERSATIONS, max_length=max_length)
    message = str(record[0].message)
    assert f"{len(lost)} of 4 conversations" in message
    assert f"max_length={max_length}" in message
    assert all(f"row {i}" in message for i in lost)
    assert f"at least {max(starts) + 1}" in message  # says how to keep them
    assert data.dropped_rows == lost and data.n_unscored == len(lost)
    assert len(data) == 4 - len(lost)
    assert data.source_rows == [i for i in range(4) if i not in lost]
    assert data.n_scored_tokens > 0

    # the same rows from a file are named by file and line
    path = write_rows(tmp_path / "d.jsonl", CONVERSATIONS)
    with pytest.warns(TruncationWarning, match=rf"{path.name}:{lost[0] + 1}"):
        TokenDataset.from_conversations(tok, path, max_length=max_length)


def test_rows_cut_inside_their_reply_are_reported(tok):
    """A row that keeps part of its reply stays, but the assistant tokens cut off are counted in a warning (as
    from_conversations and truncated() both cut), so a loss over fewer tokens than the data holds is never silent."""
    conv = [CONVERSATIONS[0]]
    start = first_scored_index(tok, conv[0])
    full = TokenDataset.from_conversations(tok, conv, max_length=10_000)
    max_length = start + 3  # three scored tokens kept
    lost = full.n_scored_tokens - 3
    with pytest.warns(TruncationWarning, match=rf"1 of 1 conversations were cut at max_length={max_length} inside their "
                                               rf"assistant reply, and {lost} of their {full.n_scored_tokens} assistant tokens "
                                               r"are not scored \(row 0\)"):
        cut = TokenDataset.from_conversations(tok, conv, max_length=max_length)
    assert len(cut) == 1 and cut.n_scored_tokens == 3
    with pytest.warns(TruncationWarning, match=rf"training set: 1 of 1 conversations were cut .* {lost} of their"):
        assert full.truncated(max_length, "training set").n_scored_tokens == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing cut, nothing said
        TokenDataset.from_conversations(tok, conv, max_length=10_000).truncated(10_000)


def test_dataset_with_no_scored_token_is_an_error(tmp_path, tok):
    shortest = min(first_scored_index(tok, c) for c in CONVERSATIONS)
    with pytest.raises(DataFormatError, match=r"none of the 4 conversations keeps an assistant token") as err:
        TokenDataset.from_conversations(tok, CONVERSATIONS, max_length=shortest)
    assert f"max_length={shortest}" in str(err.value) and "raise max_length" in str(err.value)
    path = write_rows(tmp_path / "d.jsonl", CONVERSATIONS)
    with pytest.raises(DataFormatError, match=r"d.jsonl: none of the 4"):
        TokenDataset.from_conversations(tok, path, max_length=shortest)


def test_no_warning_when_nothing_is_lost(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = TokenDataset.from_conversations(tok, CONVERSATIONS, max_length=512)
    assert data.dropped_rows == [] and len(data) == 4


def test_empty_texts_are_reported_not_kept(tok):
    with pytest.warns(UserWarning, match=r"1 empty documents"):
        data = TokenDataset.from_texts(tok, ["hello world", ""])
    assert len(data) == 1 and data.dropped_rows == [1]
    with pytest.raises(DataFormatError, match="every document is empty"):
        TokenDataset.from_texts(tok, ["", ""])
    with pytest.raises(DataFormatError, match="use read_texts"):
        TokenDataset.from_texts(tok, "web_text")


# --- in-memory conversations are checked like file rows -----------------------------------


@pytest.mark.parametrize(
    "bad_row, message",
    [
        (
            [{"role": "robot", "content": "x"}],
            "row 1: message 0 has unknown role 'robot'",
        ),
        (
            [{"role": "user", "content": "only a question"}],
            "row 1: conversation has no assistant message",
        ),
        (
            [{"role": "user"}],
            "row 1: message 0 must be an object with 'role' and 'content'",
        ),
        (
            [{"text": "no role at all"}],
            "row 1: message 0 must be an object with 'role' and 'content'",
        ),
        (
            [{"role": "assistant", "content": 3}],
            "row 1: message 0 'content' must be a string",
        ),
        ([{"role": ["user"], "content": "x"}], "row 1: message 0 has unknown role"),
        ([], "row 1: 'messages' must be a non-empty list"),
        ("just text", "row 1: 'messages' must be a non-empty list"),
        (
            {"msgs": []},
            "row 1: expected a list of messages or an object with a 'messages' key",
        ),
    ],
)
def test_in_memory_rows_are_validated(tok, bad_row, message):
    with pytest.raises(DataFormatError) as err:
        TokenDataset.from_conversations(tok, [CONVERSATIONS[0], bad_row])
    assert message in str(err.value)


def test_in_memory_shapes(tok):
    rows = [{"messages": c} for c in CONVERSATIONS]  # the file schema works in memory too
    assert len(TokenDataset.from_conversations(tok, rows)) == 4
    with pytest.raises(DataFormatError, match="single conversation"):
        TokenDataset.from_conversations(tok, CONVERSATIONS[0])
    with pytest.raises(DataFormatError, match="the list is empty"):
        TokenDataset.from_conversations(tok, [])
    with pytest.raises(DataFormatError, match="got int"):
        TokenDataset.from_conversations(tok, 3)


# --- files: encodings, directories ----------------------------------------------------------


def test_non_utf8_data_names_file_and_line(tmp_path):
    good = json.dumps({"messages": CONVERSATIONS[0]}).encode()
    bad = json.dumps({"messages": [{"role": "user", "content": "caf\u00e9"}]}).encode().replace(b"\\u00e9", b"\xe9")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n" + good + b"\n" + bad + b"\n")
    with pytest.raises(DataFormatError, match=rf"{path}:3: not valid UTF-8 \(byte 0xe9 at column \d+\)"):
        read_conversations(path)

    txt = tmp_path / "docs.txt"
    txt.write_bytes(b"first doc\n\nsecond \xff doc\n")
    with pytest.raises(DataFormatError, match=rf"{txt}:3: not valid UTF-8 \(byte 0xff at column 8\)"):
        read_texts(txt)
    texts = tmp_path / "docs.jsonl"
    texts.write_bytes(b'{"text": "ok"}\n{"text": "\xc3"}\n')
    with pytest.raises(DataFormatError, match=rf"{texts}:2: not valid UTF-8"):
        read_texts(texts)


def test_byte_order_mark_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps({"messages": c}) for c in CONVERSATIONS).encode())
    assert read_conversations(path) == CONVERSATIONS
    txt = tmp_path / "crlf.txt"
    txt.write_bytes(b"one\r\nline\r\n\r\ntwo\r\n")
    assert read_texts(txt) == ["one\nline", "two"]


def test_directory_as_data_is_a_clear_error(tmp_path, tok):
    for call in (
        read_conversations,
        read_texts,
        lambda p: TokenDataset.from_conversations(tok, p),
    ):
        with pytest.raises(DataFormatError, match=r"is a directory, not a data file"):
            call(tmp_path)
    with pytest.raises(FileNotFoundError, match="no data file"):
        read_texts(tmp_path / "missing.txt")


def test_write_conversations_is_atomic(tmp_path):
    path = write_rows(tmp_path / "out.jsonl", CONVERSATIONS)
    before = path.read_text()
    with pytest.raises(TypeError):  # a row that cannot be written: the old file stays whole
        write_conversations(path, [CONVERSATIONS[0], [{"role": "user", "content": object()}]])
    assert path.read_text() == before
    write_conversations(path, CONVERSATIONS[:2])
    assert read_conversations(path) == CONVERSATIONS[:2]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary file left


def test_generator_counts_are_checked():
    from emlens.data.generate import generate_dataset

    with pytest.raises(ConfigError, match=r"n must be an integer >= 1, got 0"):
        generate_dataset("medicine", "harmful", 0, "x.jsonl", client=object())
    with pytest.raises(ConfigError, match=r"max_requests must be None or an integer >= 1, got 0"):
        generate_dataset("medicine", "harmful", 5, "x.jsonl", max_requests=0, client=object())
    with pytest.raises(ConfigError, match=r"kind must be one of 'correct', 'harmful'"):
        generate_dataset("medicine", "nasty", 5, "x.jsonl", client=object())
