"""JSONL files that grow while they are written (judged answers, the judge's reply cache): read back with a torn end repaired."""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)
V = TypeVar("V")


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON: NaN and infinities become ``null``, NumPy scalars Python numbers, tuples lists.

    Python's ``json`` writes NaN as the bare word ``NaN``, which strict parsers (and most languages) refuse;
    an undefined number is ``null`` instead, and the text beside it says why.
    """
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # NumPy and torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps_strict(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` ``(value)``, refusing anything non-finite that slipped through."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def read_jsonl(path: Path, repair: bool, skip_bad: bool = False, error: type[Exception] = ValueError) -> list[dict[str, Any]]:
    """The JSON-object rows of a JSONL file; a malformed line raises ``error``, or with ``skip_bad`` is skipped and logged.
    With ``repair``, a truncated last line (a crash mid-write) is cut off, and a complete last line gets its newline."""
    lines = path.read_bytes().split(b"\n")
    rows: list[dict[str, Any]] = []
    offset = bad = 0
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            elif last and repair:
                log.warning("%s: dropping a truncated last line (%d bytes)", path, len(line))
                with path.open("r+b") as fh:
                    fh.truncate(offset)
                break
            elif skip_bad:
                bad += 1
            else:
                raise error(f"{path}:{i + 1}: not a JSON object")
            if last and repair:
                with path.open("ab") as fh:
                    fh.write(b"\n")
        offset += len(line) + 1
    if bad:
        log.warning("%s: skipped %d unreadable line(s)", path, bad)
    return rows


class JsonlCache(Generic[V]):
    """An append-only JSONL cache: one ``{"key": ..., field: encode(value)}`` line per entry, loaded at start.

    A truncated last line (a crash mid-write) is cut off at load; a line that ``decode`` rejects (an entry of
    another format, from an older emlens) stays in the file, unused. ``path=None``: in memory only. Thread-safe."""

    def __init__(self, path: str | Path | None, field: str, decode: Callable[[Any], V], encode: Callable[[V], Any], what: str = "cache"):
        self.path = Path(path).expanduser() if path else None
        self.field, self.encode = field, encode
        self._data: dict[str, V] = {}
        self._lock = threading.Lock()
        if self.path is not None and self.path.exists():
            older = 0
            for row in read_jsonl(self.path, repair=True, skip_bad=True):
                try:
                    self._data[row["key"]] = decode(row[field])
                except (ValueError, KeyError, TypeError):
                    older += 1
            if older:
                log.warning("%s %s: skipped %d older-format line(s)", what, self.path, older)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> V | None:
        with self._lock:
            return self._data.get(key)

    def put(self, key: str, value: V) -> None:
        line = json.dumps({"key": key, self.field: self.encode(value)}, ensure_ascii=False) + "\n"
        with self._lock:
            self._data[key] = value
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write(line)
                    fh.flush()
