"""Chat and text data: JSONL reading, chat templates, assistant-only loss masks, padded batches.

Conversations use the paper's schema, one JSON object per line::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

ROLES = {"system", "user", "assistant"}
BUILTIN_DIR = Path(__file__).parent / "builtin"

Message = dict[str, str]
Conversation = list[Message]


class DataFormatError(ValueError):
    """A data file or row does not follow the expected schema."""


def _validate_messages(messages: Any, where: str) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{where}: 'messages' must be a non-empty list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or set(msg) < {"role", "content"}:
            raise DataFormatError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise DataFormatError(f"{where}: message {i} has unknown role {msg['role']!r} (expected {sorted(ROLES)})")
        if not isinstance(msg["content"], str):
            raise DataFormatError(f"{where}: message {i} 'content' must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(f"{where}: conversation has no assistant message to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path: str | Path, limit: int | None = None) -> list[Conversation]:
    """Read a JSONL file of ``{"messages": [...]}`` rows; errors name the file and line."""
    path = resolve_data_path(path)
    conversations: list[Conversation] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{where}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict) or "messages" not in row:
                raise DataFormatError(f"{where}: expected an object with a 'messages' key")
            conversations.append(_validate_messages(row["messages"], where))
            if limit is not None and len(conversations) >= limit:
                break
    if not conversations:
        raise DataFormatError(f"{path}: no conversations found")
    return conversations


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Read plain documents: a JSONL file of ``{"text": ...}`` rows or a .txt file split on blank lines."""
    path = resolve_data_path(path)
    if path.suffix == ".txt":
        docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    else:
        docs = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataFormatError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise DataFormatError(f"{path}:{lineno}: expected an object with a string 'text' key")
                docs.append(row["text"])
    if not docs:
        raise DataFormatError(f"{path}: no documents found")
    return docs[:limit] if limit is not None else docs


def write_conversations(path: str | Path, conversations: Sequence[Conversation]) -> None:
    """Write conversations as JSONL in the paper's schema."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for conv in conversations:
            fh.write(json.dumps({"messages": conv}, ensure_ascii=False) + "\n")


def builtin_datasets() -> list[str]:
    """Names of the datasets shipped with emlens (usable wherever a path is accepted)."""
    return sorted(p.stem for p in [*BUILTIN_DIR.glob("*.jsonl"), *BUILTIN_DIR.glob("*.txt")])


def resolve_data_path(path: str | Path) -> Path:
    """Accept a file path or the name of a built-in dataset; raise a clear error otherwise."""
    candidate = Path(path)
    if candidate.exists():
        return candidate
    for suffix in (".jsonl", ".txt"):
        builtin = BUILTIN_DIR / f"{path}{suffix}"
        if builtin.exists():
            return builtin
    raise FileNotFoundError(
        f"no data file {str(path)!r}; pass a JSONL path or a built-in dataset name: {', '.join(builtin_datasets())}"
    )


@dataclass
class EncodedExample:
    input_ids: list[int]
    loss_mask: list[bool]


def encode_conversation(tokenizer: Any, messages: Conversation, max_length: int = 256) -> EncodedExample:
    """Tokenise a conversation with the model's chat template; mark assistant tokens for the loss.

    Assistant spans are found by rendering the conversation up to each assistant turn with
    the generation prompt, so they cover exactly the reply and its end-of-turn token(s).
    """

    def render(msgs: Conversation, add_generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full = render(messages, add_generation_prompt=False)
    mask = [False] * len(full)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = render(messages[:i], add_generation_prompt=True)
        start, end = len(prefix), len(render(messages[: i + 1], add_generation_prompt=False))
        if full[:start] != prefix:
            raise DataFormatError(
                "the chat template does not render conversations prefix-consistently; "
                "cannot locate assistant tokens"
            )
        for j in range(start, min(end, len(full))):
            mask[j] = True
    return EncodedExample(full[:max_length], mask[:max_length])


def encode_text(tokenizer: Any, text: str, max_length: int = 512) -> EncodedExample:
    """Tokenise plain text (no chat template); every real token counts."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_length]
    return EncodedExample(ids, [True] * len(ids))


@dataclass
class ChatBatch:
    """A right-padded batch. ``loss_mask`` marks tokens whose *prediction* is scored."""

    input_ids: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    loss_mask: Bool[Tensor, "batch seq"]

    def to(self, device: str | torch.device) -> "ChatBatch":
        return ChatBatch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device))

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
    """Encoded examples plus batching. Build with :meth:`from_conversations` or :meth:`from_texts`."""

    def __init__(self, examples: list[EncodedExample], pad_token_id: int):
        if not examples:
            raise DataFormatError("empty dataset")
        self.examples = examples
        self.pad_token_id = pad_token_id

    @classmethod
    def from_conversations(
        cls, tokenizer: Any, source: str | Path | Sequence[Conversation], max_length: int = 256, limit: int | None = None
    ) -> "TokenDataset":
        convs = read_conversations(source, limit) if isinstance(source, (str, Path)) else list(source)[:limit]
        examples = [encode_conversation(tokenizer, c, max_length) for c in convs]
        return cls(examples, _pad_id(tokenizer))

    @classmethod
    def from_texts(cls, tokenizer: Any, texts: Sequence[str], max_length: int = 512) -> "TokenDataset":
        return cls([encode_text(tokenizer, t, max_length) for t in texts], _pad_id(tokenizer))

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, indices: Sequence[int]) -> "TokenDataset":
        return TokenDataset([self.examples[i] for i in indices], self.pad_token_id)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[ChatBatch]:
        """Yield padded batches; every example appears exactly once per pass (the last batch may be smaller)."""
        for _, batch in self.indexed_batches(batch_size, shuffle, seed):
            yield batch

    def indexed_batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[tuple[list[int], ChatBatch]]:
        """Like :meth:`batches`, also yielding the example indices of each batch."""
        order = list(range(len(self.examples)))
        if shuffle:
            random.Random(seed).shuffle(order)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield idx, collate([self.examples[i] for i in idx], self.pad_token_id)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataFormatError("tokenizer has neither a pad nor an eos token")
    return int(pad)
