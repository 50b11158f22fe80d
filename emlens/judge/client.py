"""The OpenAI-compatible judge: requests through the official ``openai`` client, retries, and the on-disk reply cache."""

from __future__ import annotations

import email.utils
import hashlib
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from emlens.jsonl import JsonlCache
from emlens.judge.errors import JudgeError, JudgeResponseError, JudgeUnavailableError, SplitNumberError
from emlens.judge.judges import Judgement
from emlens.judge.scoring import (
    MAX_LOGPROB,
    MAX_UNLISTED_MASS,
    TOP_LOGPROBS,
    UNRESOLVED_TOLERANCE,
    JudgeReply,
    NumberTokens,
    Score,
    as_logprob,
    score_reply_noted,
)

OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_JUDGE_MODEL = "gpt-4o-2024-08-06"  # the paper's judge
DEFAULT_MAX_TOKENS = 4  # "100" split into digits, plus a leading space token
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_CACHE_FORMAT = 3  # 3: replies with short top lists became unusable; bump when the cached reply format or the request changes meaning


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, ``retry-after`` in seconds or as an HTTP date."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers.get(name) or "") * scale)
        except ValueError:
            pass
    try:
        when = email.utils.parsedate_to_datetime(headers.get("retry-after") or "")
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _snippet(text: str, n: int = 200) -> str:
    text = " ".join(text.split())
    return text[:n] + ("…" if len(text) > n else "")


def default_cache_path() -> Path:
    """Where judge replies are cached unless told: the emlens cache folder ($EMLENS_CACHE, $XDG_CACHE_HOME/emlens or ~/.cache/emlens)."""
    from emlens.models import cache_dir

    return cache_dir() / "judge_cache.jsonl"


class ReplyCache(JsonlCache[JudgeReply]):
    """Append-only JSONL cache of judge replies. A truncated last line (a crash mid-write) is cut off at load."""

    def __init__(self, path: str | Path | None):
        super().__init__(path, "reply", JudgeReply.from_json, JudgeReply.to_json, "judge cache")


class OpenAIJudge:
    """An LLM judge behind any OpenAI-compatible ``/chat/completions`` endpoint, through the official ``openai`` client.

    One number-only reply per prompt at temperature 0 with the top-20 logprobs and up to ``max_tokens``
    tokens (so numbers split into digits can be followed, see :func:`score_reply`).

    * API key: ``api_key``, else the variable named by ``api_key_env``; a local endpoint may have none.
      ``base_url`` defaults to ``$OPENAI_BASE_URL`` or the OpenAI API.
    * Retries (our loop; the client's own are off, see docs/evaluation.md): refused connections, timeouts and
      :data:`RETRY_STATUSES` are retried up to ``max_retries`` times with exponential backoff or after the
      server's ``Retry-After``; a server that asks for more than ``max_retry_wait`` seconds stops the run at
      once (:class:`JudgeUnavailableError`). Other HTTP errors and malformed bodies raise at once, naming the endpoint.
    * Cache: usable replies are cached on disk, keyed by endpoint, model, prompt and request settings, each with
      the model the server said answered (the reply's ``model`` field); replies without usable logprobs
      (missing, a refusal, NaN or positive values, or a top list shorter than the 20 asked for that leaves more than
      5% of a position's probability unlisted) score ``None`` with a note and are asked again next time.
      Duplicate prompts are sent once; at most ``max_workers`` requests run at a time.
    * Responding model: the first request of a judge is always live (never from the cache), and the model it
      reports is the session's (:meth:`responding_model`). Cached replies recorded from another responding model
      (a server that swapped the model behind the same URL and name) are asked again, with a warning; a server
      whose responding model changes during the session stops the run (:class:`JudgeResponseError`).
    * ``on_ambiguous``: a reply that cannot be scored exactly (a judge that splits numbers, see
      :func:`score_reply`) raises :class:`SplitNumberError` (``"error"``) or scores ``None`` with a note (``"none"``).
    """

    def __init__(
        self,
        model: str = DEFAULT_JUDGE_MODEL,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        cache_path: str | Path | None = "default",
        max_workers: int = 8,
        max_retries: int = 4,
        timeout: float | int = 60.0,
        max_retry_wait: float = 120.0,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        number_tokens: NumberTokens = "auto",
        unresolved_tolerance: float = UNRESOLVED_TOLERANCE,
        on_ambiguous: Literal["error", "none"] = "error",
        progress: bool = True,
        sleep: Callable[[float], None] = time.sleep,
    ):
        import openai

        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if api_key is None and api_key_env:
            api_key = os.environ.get(api_key_env) or None
        # the client resolves the URL (None: $OPENAI_BASE_URL or the OpenAI API; an empty variable counts as unset) and
        # needs some key: without one, a placeholder that the omitted Authorization header never sends
        base = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self._client = openai.OpenAI(api_key=api_key or "none", base_url=base, timeout=timeout, max_retries=0)
        self._headers: dict[str, Any] = {} if api_key else {"Authorization": openai.Omit()}
        self.model, self.base_url = model, str(self._client.base_url).rstrip("/")
        if api_key is None and api_key_env and (api_key_env != "OPENAI_API_KEY" or self.base_url == OPENAI_BASE_URL):
            self._client.close()
            raise JudgeError(
                f"no API key for the judge at {self.base_url}: the environment variable {api_key_env} is not set "
                "(set it, or name another variable with api_key_env)"
            )
        self.url = f"{self.base_url}/chat/completions"
        self.max_workers, self.max_retries, self.max_retry_wait = max(1, max_workers), max_retries, max_retry_wait
        self.max_tokens, self.number_tokens, self.unresolved_tolerance = max_tokens, number_tokens, unresolved_tolerance
        self.on_ambiguous, self.progress, self._sleep = on_ambiguous, progress, sleep
        self.cache = ReplyCache(default_cache_path() if cache_path == "default" else cache_path)
        self.n_requests = 0
        self._count_lock = threading.Lock()
        self._session_lock = threading.Lock()
        self._responding: str | None = None
        self._stale: list[str | None] = []  # responding models of cached replies not reused (this call of judgements)

    def close(self) -> None:
        self._client.close()

    def _key(self, prompt: str) -> str:
        ident = [_CACHE_FORMAT, self.base_url, self.model, prompt, self.max_tokens, TOP_LOGPROBS]
        return hashlib.sha256(json.dumps(ident).encode()).hexdigest()

    def _body(self, prompt: str) -> dict[str, Any]:
        ask = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": self.max_tokens}
        return ask | {"temperature": 0, "logprobs": True, "top_logprobs": TOP_LOGPROBS, "seed": 0}

    def request(self, prompt: str) -> tuple[JudgeReply | None, str]:
        """Ask the endpoint once (with retries): the reply, or ``None`` and why it is unusable."""
        reply, why, _ = self._request(prompt)
        return reply, why

    def _request(self, prompt: str) -> tuple[JudgeReply | None, str, str]:
        """:meth:`request`, plus the model the server said answered (``""`` when it named none)."""
        import openai

        last = ""
        for attempt in range(self.max_retries + 1):
            wait = min(0.5 * 2**attempt, 30.0)
            with self._count_lock:
                self.n_requests += 1
            try:
                raw = self._client.chat.completions.with_raw_response.create(**self._body(prompt), extra_headers=self._headers)
            except openai.APIConnectionError as err:  # refused connections and timeouts
                cause = err.__cause__ or err
                last = f"{type(cause).__name__}: {cause}"
            except openai.APIStatusError as err:
                status, message = err.status_code, _snippet(err.response.text)
                if status not in RETRY_STATUSES:
                    hint = " (check the API key: pass api_key, or set the variable named by api_key_env)" if status in (401, 403) else ""
                    raise JudgeError(f"judge endpoint {self.url} answered HTTP {status}: {message}{hint}") from None
                asked = _retry_after(err.response.headers)
                if asked is not None and asked > self.max_retry_wait:
                    raise JudgeUnavailableError(
                        f"judge endpoint {self.url} answered HTTP {status} and asked to retry after {asked:.0f} s, more than "
                        f"max_retry_wait={self.max_retry_wait:.0f} s; stopping. Judgements made so far are kept: re-run later to continue."
                    ) from None
                wait, last = (wait if asked is None else asked), f"HTTP {status}: {message}"
            else:
                return self._parse(raw.http_response)
            if attempt < self.max_retries:
                self._sleep(wait)
        raise JudgeUnavailableError(
            f"judge endpoint {self.url} failed {self.max_retries + 1} time(s); last error: {last}. "
            "Judgements made so far are kept: re-run to continue."
        )

    def _parse(self, resp: Any) -> tuple[JudgeReply | None, str, str]:
        where = f"judge endpoint {self.url}"
        ctype = resp.headers.get("content-type", "?")
        try:
            data = json.loads(resp.text)
        except ValueError:
            raise JudgeResponseError(
                f"{where} returned a body that is not JSON (Content-Type {ctype}): {_snippet(resp.text)!r}; "
                "is the URL an OpenAI-compatible API (usually ending in /v1)?"
            ) from None
        if not isinstance(data, dict):
            raise JudgeResponseError(f"{where} returned JSON that is not an object: {_snippet(resp.text)!r}")
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise JudgeResponseError(f"{where} returned no choices: {_snippet(resp.text)!r}")
        named = data.get("model")
        model = named if isinstance(named, str) else ""
        choice = choices[0]
        message = choice.get("message")
        if isinstance(message, dict) and message.get("refusal"):
            return None, f"the judge refused: {_snippet(str(message['refusal']), 80)}", model
        logprobs = choice.get("logprobs")
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        if not content:
            return None, "no logprobs in the reply (does the endpoint support logprobs/top_logprobs?)", model
        if not isinstance(content, list):
            raise JudgeResponseError(f"{where} returned logprobs.content that is not a list: {_snippet(resp.text)!r}")
        tokens: list[str] = []
        positions: list[tuple[tuple[str, float], ...]] = []
        for item in content:
            if not isinstance(item, dict) or not isinstance(item.get("token"), str):
                raise JudgeResponseError(f"{where} returned a malformed logprobs entry: {_snippet(json.dumps(item))!r}")
            tops = [t for t in item.get("top_logprobs") or [] if isinstance(t, dict) and isinstance(t.get("token"), str)]
            entries: list[tuple[str, float]] = []
            for top in [*tops, item]:  # the chosen token last: counted only when the top list lacks it
                lp = as_logprob(top.get("logprob"))
                if lp is not None and lp > MAX_LOGPROB:
                    why = f"a positive logprob ({lp:+g} for {top['token']!r}): the server is broken, no probability exceeds 1"
                    return None, why, model
                if lp is not None and (top is not item or item["token"] not in {t for t, _ in entries}):
                    entries.append((top["token"], lp))
            if not entries:
                return None, "the reply's logprobs are missing or not finite (NaN)", model
            unlisted = 1.0 - sum(math.exp(lp) for _, lp in entries)
            if len(tops) < TOP_LOGPROBS and unlisted > MAX_UNLISTED_MASS:  # a server that ignores or caps top_logprobs
                why = (
                    f"the endpoint listed {len(tops)} of the {TOP_LOGPROBS} top logprobs asked for at position {len(tokens)}, "
                    f"leaving {unlisted:.2f} of the probability unlisted: the weighted score would be taken over too few tokens"
                )
                return None, why, model
            tokens.append(item["token"])
            positions.append(tuple(entries))
        finish = choice.get("finish_reason")
        return JudgeReply(tuple(tokens), tuple(positions), finish if isinstance(finish, str) else None, model), "", model

    def responding_model(self, probe: str) -> str:
        """The model that answers at this endpoint (the replies' ``model`` field; ``""`` when the server names none).

        Learnt once per judge from a live request of ``probe`` (never from the cache, so a server that swapped
        the model behind the same URL and name is noticed); the reply is cached as usual. Cached replies and
        judged rows are reused only when recorded with this same responding model.
        """
        with self._session_lock:
            if self._responding is None:
                reply, _, model = self._request(probe)
                self._responding = model
                if reply is not None:
                    self.cache.put(self._key(probe), reply)
            return self._responding

    def _fresh(self, prompt: str) -> tuple[JudgeReply | None, str, str]:
        """A live request; refused when another model answers than the one this session started with (a reply
        that names no model cannot tell, and passes)."""
        reply, why, model = self._request(prompt)
        with self._session_lock:
            if model and not self._responding:
                self._responding = model  # the first request got a reply that named no model (an error reply, say)
            changed = bool(model and self._responding and model != self._responding)
        if changed:
            raise JudgeResponseError(
                f"the model answering at {self.url} changed during the run: {self._responding!r} at first, {model!r} now "
                f"(requested {self.model!r}). Judgements made so far are kept; re-run to judge with the model now served "
                "(answers judged by the other model are judged again)."
            )
        return reply, why, model

    def reply(self, prompt: str) -> tuple[JudgeReply | None, str]:
        """The cached reply when the same model answered it, or a fresh one (cached only when usable)."""
        session = self.responding_model(prompt)
        key = self._key(prompt)
        cached = self.cache.get(key)
        if cached is not None:
            if cached.model == session:
                return cached, ""
            with self._count_lock:
                self._stale.append(cached.model)
        reply, why, _ = self._fresh(prompt)
        if reply is not None:
            self.cache.put(key, reply)
        return reply, why

    def _judge_one(self, prompt: str) -> Judgement:
        reply, why = self.reply(prompt)
        if reply is None:
            return Judgement(None, final=False, note=why)
        try:
            score, note = score_reply_noted(reply, 100, self.number_tokens, self.unresolved_tolerance)
        except SplitNumberError as err:
            if self.on_ambiguous == "none":
                return Judgement(None, final=True, note=f"ambiguous multi-token number: {err}")
            raise SplitNumberError(
                f"judge {self.model!r} at {self.base_url}: {err}. Use a judge with one token per number from 0 to 100 "
                "(such as the OpenAI GPT-4o models), raise unresolved_tolerance to accept the approximation, or pass "
                "on_ambiguous='none' to leave such answers unscored."
            ) from None
        return Judgement(score, note=note)  # the note: mass a number score left out on unresolved prefixes, if any

    def judgements(self, prompts: Sequence[str]) -> list[Judgement]:
        """One judgement per prompt; each distinct prompt is asked once, concurrently."""
        unique = list(dict.fromkeys(prompts))
        if unique:
            self.responding_model(unique[0])  # the session's first request is live: it names the model that answers
        with self._count_lock:
            self._stale = []
        with ThreadPoolExecutor(self.max_workers) as pool:
            done = tqdm(pool.map(self._judge_one, unique), total=len(unique), desc="judge", leave=False, disable=not self.progress)
            results = dict(zip(unique, done))
        if self._stale:
            before = ", ".join(sorted({repr(m) if m is not None else "not recorded (an older emlens)" for m in self._stale}))
            warnings.warn(
                f"{len(self._stale)} cached judge repl{'y was' if len(self._stale) == 1 else 'ies were'} answered by another "
                f"model ({before}) than the one answering at {self.url} now ({self._responding!r}, requested {self.model!r}); "
                "asked again, so replies of two judges are never mixed",
                stacklevel=2,
            )
        pending = sum(1 for p in unique if not results[p].final)
        if pending:
            notes = sorted({results[p].note for p in unique if not results[p].final})
            warnings.warn(
                f"{pending} of {len(unique)} judge replies from {self.url} were unusable ({'; '.join(notes)}); "
                "they score None, were not cached, and will be asked again on a re-run",
                stacklevel=2,
            )
        return [results[p] for p in prompts]

    def score(self, prompts: Sequence[str]) -> list[Score]:
        return [j.score for j in self.judgements(prompts)]
