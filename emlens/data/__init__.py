"""Chat and text data: JSONL reading, chat templates, assistant-only loss masks, padded batches.

Conversations use the paper's schema, one JSON object per line::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from emlens.validation import check_int, check_optional_int

ROLES = {"system", "user", "assistant"}
BUILTIN_DIR = Path(__file__).parent / "builtin"

Message = dict[str, str]
Conversation = list[Message]

_SHOWN_ROWS = 5  # how many dropped rows a warning lists by location
# the date every chat template renders with (Llama 3.2's own fallback): a template that calls strftime_now
# (Llama 3.2 Instruct's) would otherwise write today's date into every prompt, and every number would depend on the day
CHAT_DATE = "26 Jul 2024"
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, skipped at the start of a file


class DataFormatError(ValueError):
    """A data file or row does not follow the expected schema."""


class DataLossWarning(UserWarning):
    """Some rows of a data set were left out; the message says which and why."""


class TruncationWarning(DataLossWarning):
    """Truncation cost rows scored (assistant) tokens: some of them (the rows stay), or all (the rows are left out)."""


def _warn_cut(origin: str, cut: list[tuple[str, int, int]], n_rows: int, max_length: int) -> None:
    """Warn that the rows ``cut`` (``(name, scored tokens lost, scored tokens it had)``) kept only part of their reply."""
    if not cut:
        return
    lost, had = sum(c[1] for c in cut), sum(c[2] for c in cut)
    shown = ", ".join(c[0] for c in cut[:_SHOWN_ROWS]) + (f" and {len(cut) - _SHOWN_ROWS} more" if len(cut) > _SHOWN_ROWS else "")
    warnings.warn(
        f"{origin}: {len(cut)} of {n_rows} conversations were cut at max_length={max_length} inside their assistant "
        f"reply, and {lost} of their {had} assistant tokens are not scored ({shown}); raise max_length to score them all",
        TruncationWarning,
        stacklevel=3,
    )


def _validate_messages(messages: Any, where: str) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{where}: 'messages' must be a non-empty list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not {"role", "content"} <= set(msg):
            raise DataFormatError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if not isinstance(msg["role"], str) or msg["role"] not in ROLES:
            raise DataFormatError(f"{where}: message {i} has unknown role {msg['role']!r} (expected {sorted(ROLES)})")
        if not isinstance(msg["content"], str):
            raise DataFormatError(f"{where}: message {i} 'content' must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(f"{where}: conversation has no assistant message to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _validate_row(row: Any, where: str) -> Conversation:
    """One in-memory conversation: a list of messages or a ``{"messages": [...]}`` row."""
    if isinstance(row, dict):
        if "messages" not in row:
            raise DataFormatError(f"{where}: expected a list of messages or an object with a 'messages' key")
        row = row["messages"]
    return _validate_messages(row, where)


def _undecodable(path: Path, lineno: int, line: bytes, column: int) -> DataFormatError:
    bad = line[column : column + 1].hex()
    return DataFormatError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{bad} at column {column + 1}); save the file as UTF-8")


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The lines of a UTF-8 file with 1-based numbers; bad bytes name the file and line."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1:
                raw = raw.removeprefix(_BOM)
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _undecodable(path, lineno, raw, err.start) from None


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """The parsed JSON value of every non-blank line of a JSONL file, with its 1-based number; bad JSON names the line."""
    for lineno, line in _numbered_lines(path):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err


def _read_text_file(path: Path) -> str:
    """A whole UTF-8 text file with universal newlines; bad bytes name the file and line."""
    data = path.read_bytes()
    data = data.removeprefix(_BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = data.count(b"\n", 0, err.start) + 1
        line_start = data.rfind(b"\n", 0, err.start) + 1
        raise _undecodable(path, lineno, data[line_start:], err.start - line_start) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _source_and_split(source: str | os.PathLike, split: str | None) -> tuple[str | os.PathLike, str | None]:
    """``NAME:train`` / ``NAME:heldout`` select a split of a built-in set or file (or ``split`` does)."""
    from emlens.data.studies import SPLITS

    text = str(source)
    base, sep, suffix = text.rpartition(":")
    if sep and suffix in SPLITS and not Path(text).exists():
        if split is not None and split != suffix:
            raise DataFormatError(f"{text!r} names the {suffix} split, but split={split!r} was asked for")
        return base, suffix
    if split is not None and split not in SPLITS:
        raise DataFormatError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return source, split


def _kl_rows(name: str) -> tuple[str, list[tuple[int, dict[str, Any]]]] | None:
    """The rows of a built-in KL set ``kl:DOMAIN`` (None when ``name`` is not one)."""
    if not name.startswith("kl:"):
        return None
    from emlens.data.studies import kl_conversations

    try:
        convs = kl_conversations(name[3:])
    except ValueError as err:
        raise DataFormatError(f"{name!r}: {err}") from None
    return name, [(i + 1, {"messages": conv}) for i, conv in enumerate(convs)]


def _json_rows(source: str | os.PathLike, split: str | None, limit: int | None) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """``(origin, [(location, row), ...])`` of a JSONL source, split-filtered, each row a validated object."""
    source, split = _source_and_split(source, split)
    kl = _kl_rows(str(source))
    if kl is not None:
        origin, numbered = kl
        if split is not None:
            raise DataFormatError(f"{origin} is drawn from train splits only; drop the :{split}")
    else:
        path = resolve_data_path(source)
        origin, numbered = str(path), []
        for lineno, row in _json_lines(path):
            if not isinstance(row, dict) or "messages" not in row:
                raise DataFormatError(f"{path}:{lineno}: expected an object with a 'messages' key")
            numbered.append((lineno, row))
    rows: list[tuple[str, dict[str, Any]]] = []
    for lineno, row in numbered:
        where = f"{origin}:{lineno}"
        if split is not None:
            if "split" not in row:
                raise DataFormatError(f"{where}: a split ({split}) was asked for, but this row has no 'split' field")
            if row["split"] != split:
                continue
        row = {**row, "messages": _validate_messages(row["messages"], where)}
        rows.append((where, row))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DataFormatError(f"{origin}: no conversations found" + (f" in the {split} split" if split else ""))
    return origin, rows


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)``, first and last included (every index when ``k >= n``)."""
    import numpy as np

    if k >= n:
        return list(range(n))
    return [int(i) for i in np.unique(np.linspace(0, n - 1, k).round().astype(int))]


def read_rows(source: str | os.PathLike, split: str | None = None, limit: object = None) -> list[dict[str, Any]]:
    """The rows of a JSONL source as objects (``messages`` validated; ``id``, ``split``, ``domain`` kept when present)."""
    return [row for _, row in _json_rows(source, split, check_optional_int("limit", limit, minimum=1))[1]]


def read_conversations(path: str | os.PathLike, limit: object = None, split: str | None = None) -> list[Conversation]:
    """Read a JSONL file of ``{"messages": [...]}`` rows; errors name the file and line.

    ``path`` is a file, a built-in set (``medical_harmful``), a split of one (``medical_harmful:heldout``,
    or ``split="heldout"``) or a built-in KL set (``kl:medical``). ``limit`` (None or an integer >= 1,
    else :class:`~emlens.validation.ConfigError`) keeps only the first rows.
    """
    return [row["messages"] for row in read_rows(path, split, limit)]


def read_texts(path: str | os.PathLike, limit: object = None) -> list[str]:
    """Read plain documents: a JSONL file of ``{"text": ...}`` rows or a .txt file split on blank lines.

    ``limit`` (None or an integer >= 1, else :class:`~emlens.validation.ConfigError`) keeps only the first documents.
    """
    limit = check_optional_int("limit", limit, minimum=1)
    path = resolve_data_path(path)
    if path.suffix == ".txt":
        text = _read_text_file(path)
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    else:
        docs = []
        for lineno, row in _json_lines(path):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataFormatError(f"{path}:{lineno}: expected an object with a string 'text' key")
            docs.append(row["text"])
            if limit is not None and len(docs) >= limit:
                break
    if not docs:
        raise DataFormatError(f"{path}: no documents found")
    return docs[:limit] if limit is not None else docs


def write_conversations(path: str | Path, conversations: Sequence[Conversation]) -> None:
    """Write conversations as JSONL in the paper's schema.

    The file is written under a temporary name and renamed into place, so an
    interrupted write never leaves a half-written file behind.
    """
    path = Path(path)
    lines = [json.dumps({"messages": conv}, ensure_ascii=False) + "\n" for conv in conversations]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(lines)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def builtin_datasets() -> list[str]:
    """Names of the datasets shipped with emlens (usable wherever a path is accepted; add ``:train`` or ``:heldout``)."""
    return sorted(p.stem for p in [*BUILTIN_DIR.glob("*.jsonl"), *BUILTIN_DIR.glob("*.txt")])


def resolve_data_path(path: str | os.PathLike) -> Path:
    """Accept a file path or the name of a built-in dataset; raise a clear error otherwise."""
    if not isinstance(path, (str, os.PathLike)):
        raise DataFormatError(f"a data source must be a file path or a built-in dataset name, got {path!r}")
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    for suffix in (".jsonl", ".txt"):
        builtin = BUILTIN_DIR / f"{path}{suffix}"
        if builtin.is_file():
            return builtin
    names = ", ".join(builtin_datasets())
    if candidate.is_dir():
        raise DataFormatError(
            f"{str(path)!r} is a directory, not a data file; pass a JSONL (or .txt) file inside it or a built-in dataset name: {names}"
        )
    if candidate.exists():
        raise DataFormatError(f"{str(path)!r} is not a regular file; pass a JSONL file")
    raise FileNotFoundError(f"no data file {str(path)!r}; pass a JSONL path or a built-in dataset name: {names}")


@dataclass
class EncodedExample:
    input_ids: list[int]
    loss_mask: list[bool]


def render_chat(tokenizer: Any, messages: Conversation, add_generation_prompt: bool) -> str:
    """The chat template's text for ``messages``, rendered with thinking off (``enable_thinking=False``)
    and the fixed date :data:`CHAT_DATE` (``date_string``).

    Every conversation emlens trains on, samples from or judges with is rendered here. A template with a
    thinking switch (Qwen3's) then closes an empty think block right after the generation prompt, so the
    reply that follows is the answer itself: trained targets hold no think block, and sampled answers hold
    no reasoning text for the judge to score. A template that writes a date (Llama 3.2's "Today Date")
    writes :data:`CHAT_DATE`, never today's, so that a rendering does not change from day to day.
    Templates without these variables ignore them.
    """
    return str(
        tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, enable_thinking=False, date_string=CHAT_DATE
        )
    )


def _encode_full(tokenizer: Any, messages: Conversation, last_turn_only: bool = False) -> EncodedExample:
    """A conversation's tokens and assistant mask, before any truncation (``last_turn_only``: the last assistant turn's only)."""

    def render(msgs: Conversation, add_generation_prompt: bool) -> list[int]:
        text = render_chat(tokenizer, msgs, add_generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full = render(messages, add_generation_prompt=False)
    mask = [False] * len(full)
    turns = [i for i, msg in enumerate(messages) if msg["role"] == "assistant"]
    for i in turns[-1:] if last_turn_only else turns:
        prefix = render(messages[:i], add_generation_prompt=True)
        start = len(prefix)
        upto = render(messages[: i + 1], add_generation_prompt=False)
        end = len(upto)
        if full[:start] != prefix:
            raise DataFormatError("the chat template does not render conversations prefix-consistently; cannot locate assistant tokens")
        if full[:end] != upto:
            raise DataFormatError(
                f"the chat template renders the conversation up to message {i} (an assistant turn) otherwise than the start "
                "of the whole conversation: it adds text at the end when no generation prompt is asked for (as Phi-3's "
                "adds its end-of-text token), so the end of that turn's tokens cannot be located"
            )
        for j in range(start, end):
            mask[j] = True
    return EncodedExample(full, mask)


def encode_conversation(tokenizer: Any, messages: Conversation, max_length: object = 256) -> EncodedExample:
    """Tokenise a conversation with the model's chat template; mark assistant tokens for the loss.

    Assistant spans are found by rendering the conversation up to each assistant turn with
    the generation prompt, so they cover exactly the reply and its end-of-turn token(s).
    The result is cut to ``max_length`` (an integer >= 1, else :class:`~emlens.validation.ConfigError`) tokens.
    """
    max_length = check_int("max_length", max_length, minimum=1)
    full = _encode_full(tokenizer, messages)
    return EncodedExample(full.input_ids[:max_length], full.loss_mask[:max_length])


def _has_scored_token(example: EncodedExample) -> bool:
    """Whether some token after the first is an assistant token (the first is never predicted)."""
    return any(example.loss_mask[1:])


def _scored_count(example: EncodedExample) -> int:
    """How many of its tokens are scored (assistant tokens after the first position)."""
    return sum(1 for m in example.loss_mask[1:] if m)


def _partly_cut(name: str, full: EncodedExample, kept: EncodedExample) -> tuple[str, int, int] | None:
    """``(name, scored tokens lost, scored tokens it had)`` when cutting ``full`` to ``kept`` lost some; else None."""
    had = _scored_count(full)
    lost = had - _scored_count(kept)
    return (name, lost, had) if lost else None


def encode_text(tokenizer: Any, text: str, max_length: object = 512) -> EncodedExample:
    """Tokenise plain text (no chat template), cut to ``max_length`` (an integer >= 1) tokens; every real token counts."""
    max_length = check_int("max_length", max_length, minimum=1)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_length]
    return EncodedExample(ids, [True] * len(ids))


@dataclass
class ChatBatch:
    """A right-padded batch. ``loss_mask`` marks tokens whose *prediction* is scored."""

    input_ids: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    loss_mask: Bool[Tensor, "batch seq"]

    def to(self, device: str | torch.device) -> ChatBatch:
        return ChatBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.loss_mask.to(device),
        )

    @property
    def scored(self) -> Bool[Tensor, "batch seq_minus_1"]:
        """Positions whose next-token prediction is scored: ``t`` counts when token ``t+1`` is a real assistant token."""
        return self.loss_mask[:, 1:] & self.attention_mask[:, 1:].bool()

    @property
    def scored_positions(self) -> Bool[Tensor, "batch seq"]:
        """:attr:`scored` at the batch's full width (the last position predicts nothing)."""
        out = torch.zeros_like(self.loss_mask)
        out[:, :-1] = self.scored
        return out

    @property
    def scored_targets(self) -> Int[Tensor, " n_scored"]:
        """The tokens predicted at the scored positions, in row-major order."""
        return self.input_ids[:, 1:][self.scored]

    @property
    def n_loss_tokens(self) -> int:
        return int(self.loss_mask[:, 1:].sum())


def collate(examples: Sequence[EncodedExample], pad_token_id: int) -> ChatBatch:
    """Right-pad examples into a batch (right padding keeps positions identical to unpadded runs)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    loss = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attn[row, :n] = 1
        loss[row, :n] = torch.tensor(ex.loss_mask, dtype=torch.bool)
    return ChatBatch(ids, attn, loss)


class TokenDataset:
    """Encoded examples plus batching. Build with :meth:`from_conversations` or :meth:`from_texts`.

    ``dropped_rows`` lists the source rows (0-based, after ``limit``) that were left out
    because truncation removed every token they score; ``source_rows`` maps each
    example back to its source row.
    """

    def __init__(
        self,
        examples: list[EncodedExample],
        pad_token_id: int,
        *,
        dropped_rows: Sequence[int] = (),
        source_rows: Sequence[int] | None = None,
    ):
        if not examples:
            raise DataFormatError("empty dataset")
        self.examples = examples
        self.pad_token_id = pad_token_id
        self.dropped_rows: list[int] = list(dropped_rows)
        self.source_rows: list[int] = list(source_rows) if source_rows is not None else list(range(len(examples)))

    @property
    def n_unscored(self) -> int:
        """How many source rows were left out for having no scored token."""
        return len(self.dropped_rows)

    @property
    def n_scored_tokens(self) -> int:
        """Tokens whose prediction the loss scores, over the whole dataset."""
        return sum(sum(e.loss_mask[1:]) for e in self.examples)

    @classmethod
    def from_conversations(
        cls,
        tokenizer: Any,
        source: object,
        max_length: object = 256,
        limit: object = None,
        split: str | None = None,
        *,
        last_turn_only: bool = False,
    ) -> TokenDataset:
        """Encode conversations from a JSONL file, a built-in name or an in-memory list.

        ``split`` (or a ``NAME:train`` / ``NAME:heldout`` source) keeps one split of a set whose rows
        carry a ``split`` field, as the built-in sets do.

        ``source`` is a path, a built-in dataset name or an iterable of conversations;
        anything else raises :class:`DataFormatError`. ``max_length`` (an integer >= 1) and
        ``limit`` (None or an integer >= 1) raise :class:`~emlens.validation.ConfigError` when they are not.

        In-memory rows (lists of messages, or ``{"messages": [...]}`` objects) are
        checked like file rows; errors name ``row N`` (0-based). Rows that truncation to
        ``max_length`` leaves without any assistant token are left out with a
        :class:`TruncationWarning` naming them (see ``dropped_rows``); if no row keeps
        one, :class:`DataFormatError` is raised.

        ``last_turn_only`` marks only the last assistant turn of each conversation (the answer a
        preference margin compares), not the earlier ones; truncation counts those tokens alone.
        """
        max_length = check_int("max_length", max_length, minimum=1)
        limit = check_optional_int("limit", limit, minimum=1)
        if isinstance(source, (str, os.PathLike)):
            origin, rows = _json_rows(source, split, limit)
            located = [(where, row["messages"]) for where, row in rows]
        else:
            located = [(f"row {i}", _validate_row(row, f"row {i}")) for i, row in enumerate(_in_memory_rows(source, limit))]
            origin = "conversations"
        examples: list[EncodedExample] = []
        kept: list[int] = []
        dropped: list[int] = []
        needed = 0  # the max_length that would keep every dropped row
        cut: list[tuple[str, int, int]] = []  # rows kept with part of their reply cut off
        for i, (where, conv) in enumerate(located):
            try:
                full = _encode_full(tokenizer, conv, last_turn_only)
            except DataFormatError as err:  # name the row, as every other row error does
                raise DataFormatError(f"{where}: {err}") from None
            example = EncodedExample(full.input_ids[:max_length], full.loss_mask[:max_length])
            if _has_scored_token(example):
                examples.append(example)
                kept.append(i)
                if (partial := _partly_cut(where, full, example)) is not None:
                    cut.append(partial)
                continue
            dropped.append(i)
            first = next((j for j, m in enumerate(full.loss_mask) if m and j > 0), None)
            if first is not None:
                needed = max(needed, first + 1)
        fix = f"raise max_length to at least {needed} to keep them" if needed else "check the chat template marks their replies"
        if not examples:
            raise DataFormatError(
                f"{origin}: none of the {len(located)} conversations keeps an assistant "
                f"token after truncation to max_length={max_length}, so there is "
                f"nothing to score; {fix}"
            )
        if dropped:
            shown = ", ".join(located[i][0] for i in dropped[:_SHOWN_ROWS])
            more = f" and {len(dropped) - _SHOWN_ROWS} more" if len(dropped) > _SHOWN_ROWS else ""
            warnings.warn(
                f"{origin}: {len(dropped)} of {len(located)} conversations lost every "
                f"assistant token to truncation at max_length={max_length} and were "
                f"left out ({shown}{more}); {fix}",
                TruncationWarning,
                stacklevel=2,
            )
        _warn_cut(origin, cut, len(located), max_length)
        return cls(examples, _pad_id(tokenizer), dropped_rows=dropped, source_rows=kept)

    @classmethod
    def from_texts(cls, tokenizer: Any, texts: Iterable[str], max_length: object = 512) -> TokenDataset:
        """Encode plain documents (every token counts), cut to ``max_length`` (an integer >= 1) tokens."""
        max_length = check_int("max_length", max_length, minimum=1)
        if isinstance(texts, (str, bytes, os.PathLike)):
            raise DataFormatError("from_texts needs a list of documents, not a single string or path; use read_texts(path) to read a file")
        examples: list[EncodedExample] = []
        kept: list[int] = []
        dropped: list[int] = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataFormatError(f"text {i}: expected a string, got {type(text).__name__}")
            example = encode_text(tokenizer, text, max_length)
            if example.input_ids:
                examples.append(example)
                kept.append(i)
            else:
                dropped.append(i)
        if not examples:
            raise DataFormatError("no text to encode: every document is empty")
        if dropped:
            warnings.warn(
                f"{len(dropped)} empty documents were left out (texts "
                f"{', '.join(map(str, dropped[:_SHOWN_ROWS]))}"
                f"{', ...' if len(dropped) > _SHOWN_ROWS else ''})",
                DataLossWarning,
                stacklevel=2,
            )
        return cls(examples, _pad_id(tokenizer), dropped_rows=dropped, source_rows=kept)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def longest(self) -> int:
        """The longest example, in tokens."""
        return max(len(e.input_ids) for e in self.examples)

    def truncated(self, max_length: object, name: str = "dataset") -> TokenDataset:
        """Every example cut to ``max_length`` tokens (``self`` when none is longer).

        Examples that lose every scored token are left out with a :class:`TruncationWarning`
        naming them (by source row), as :meth:`from_conversations` reports them.
        """
        max_length = check_int("max_length", max_length, minimum=1)
        if self.longest <= max_length:
            return self
        kept: list[EncodedExample] = []
        rows: list[int] = []
        dropped: list[int] = []
        partly: list[tuple[str, int, int]] = []  # rows kept with part of their scored tokens cut off
        for example, row in zip(self.examples, self.source_rows):
            cut = EncodedExample(example.input_ids[:max_length], example.loss_mask[:max_length])
            if _has_scored_token(cut) or not any(example.loss_mask[1:]):
                kept.append(cut)
                rows.append(row)
                if (partial := _partly_cut(f"row {row}", example, cut)) is not None:
                    partly.append(partial)
            else:
                dropped.append(row)
        if not kept:
            raise DataFormatError(f"{name}: no example keeps a scored token after truncation to max_length={max_length}")
        if dropped:
            shown = ", ".join(f"row {r}" for r in dropped[:_SHOWN_ROWS])
            more = f" and {len(dropped) - _SHOWN_ROWS} more" if len(dropped) > _SHOWN_ROWS else ""
            warnings.warn(
                f"{name}: {len(dropped)} of {len(self.examples)} examples lost every scored token to truncation at "
                f"max_length={max_length} and were left out ({shown}{more})",
                TruncationWarning,
                stacklevel=2,
            )
        _warn_cut(name, partly, len(self.examples), max_length)
        return TokenDataset(kept, self.pad_token_id, dropped_rows=[*self.dropped_rows, *dropped], source_rows=rows)

    def subset(self, indices: Sequence[int]) -> TokenDataset:
        """The examples at ``indices`` (their ``source_rows`` are kept)."""
        return TokenDataset(
            [self.examples[i] for i in indices],
            self.pad_token_id,
            source_rows=[self.source_rows[i] for i in indices],
        )

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[ChatBatch]:
        """Yield padded batches; every example appears exactly once per pass (the last batch may be smaller)."""
        for _, batch in self.indexed_batches(batch_size, shuffle, seed):
            yield batch

    def indexed_batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[tuple[list[int], ChatBatch]]:
        """Like :meth:`batches`, also yielding the example indices of each batch."""
        batch_size = check_int("batch_size", batch_size, minimum=1)
        order = list(range(len(self.examples)))
        if shuffle:
            random.Random(seed).shuffle(order)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield idx, collate([self.examples[i] for i in idx], self.pad_token_id)


def _in_memory_rows(source: Any, limit: int | None) -> list[Any]:
    if isinstance(source, (bytes, dict)) or not isinstance(source, Iterable):
        raise DataFormatError(
            f"conversations must be a file path, a built-in dataset name or a list of conversations, got {type(source).__name__}"
        )
    rows = list(source)
    if rows and isinstance(rows[0], dict) and "role" in rows[0]:
        raise DataFormatError("got a single conversation (a list of messages) where a list of conversations is expected; wrap it in a list")
    if not rows:
        raise DataFormatError("no conversations given (the list is empty)")
    return rows[:limit] if limit is not None else rows


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataFormatError("tokenizer has neither a pad nor an eos token")
    return int(pad)
