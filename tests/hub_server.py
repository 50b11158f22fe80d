"""A local Hugging Face Hub-compatible HTTP endpoint, for testing ``emlens.hub`` offline.

It answers what ``huggingface_hub`` (2.4) sends for:

* ``create_repo`` (``POST /api/repos/create``; 409 with the repo's url when it exists) and
  ``create_branch`` (``POST /api/{type}s/{id}/branch/{branch}``);
* ``upload_folder`` / ``upload_file`` / ``create_commit``: ``POST …/preupload/{rev}`` answers that
  every file is a ``regular`` upload (with the oid of the file already there, so unchanged files
  are skipped as on the Hub), so the contents travel inline, base64, in the NDJSON payload of
  ``POST …/commit/{rev}`` (``header``, ``file``, ``deletedFile``, ``deletedFolder``; ``lfsFile``
  is refused); ``POST /api/validate-yaml`` for the README front matter (the path taken without
  ``hf_xet``);
* ``repo_info`` (``GET /api/{type}s/{id}`` and ``…/revision/{rev}``), ``list_repo_tree`` /
  ``list_repo_files`` (``GET …/tree/{rev}[/{path}]``) and ``list_repo_commits`` (``GET …/commits/{rev}``);
* ``hf_hub_download`` / ``snapshot_download``: ``HEAD`` and ``GET /{id}/resolve/{rev}/{file}`` with
  ``ETag`` (the git blob id), ``X-Repo-Commit``, ``Content-Length`` and byte ranges; the Hub's
  ``X-Error-Code`` headers (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) on errors.

Repositories live in a folder: ``{type}s/{owner}/{name}/repo.json`` (branches, and every commit
with its parents and tree: path → blob id and size) and ``blobs/`` (content-addressed). With a
``token``, writes and reads of private repos need ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

USER = "emlens-tester"
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_id(data: bytes) -> str:
    """The id git gives ``data`` as a blob (what the Hub returns as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class HubError(Exception):
    """An HTTP error answer, with the Hub's ``X-Error-Code`` when it has one."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


@dataclass
class Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json_answer(payload: Any, status: int = 200) -> Answer:
    return Answer(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})


class LocalHub:
    """Repositories stored under ``root``; every method runs under one lock (one request at a time)."""

    def __init__(self, root: str | Path, token: str | None = None):
        self.root = Path(root)
        self.token = token
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.url = ""  # set by running_hub

    # --- storage -------------------------------------------------------------------------
    def _dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / f"{repo_type}s" / repo_id

    def load(self, repo_type: str, repo_id: str) -> dict[str, Any]:
        path = self._dir(repo_type, repo_id) / "repo.json"
        if not path.is_file():
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return json.loads(path.read_text())

    def _save(self, repo: dict[str, Any]) -> None:
        path = self._dir(repo["type"], repo["id"]) / "repo.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(repo, indent=1))
        tmp.replace(path)

    def _put_blob(self, repo: dict[str, Any], data: bytes) -> str:
        oid = git_blob_id(data)
        path = self._dir(repo["type"], repo["id"]) / "blobs" / oid
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(data)
        return oid

    def blob(self, repo: dict[str, Any], oid: str) -> bytes:
        return (self._dir(repo["type"], repo["id"]) / "blobs" / oid).read_bytes()

    # --- repositories, revisions, commits ------------------------------------------------------
    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> bool:
        """Create ``repo_id`` with a first commit holding ``.gitattributes`` (as the Hub does); False if it exists."""
        try:
            self.load(repo_type, repo_id)
            return False
        except HubError:
            pass
        repo = {"type": repo_type, "id": repo_id, "private": private, "created": _now(), "branches": {}, "commits": {}}
        self.commit(repo, "main", "initial commit", "", {".gitattributes": GITATTRIBUTES}, [], new_branch=True)
        return True

    def resolve(self, repo: dict[str, Any], revision: str) -> str:
        """A branch name or a full commit id → the commit id."""
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if revision in repo["commits"]:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def tree(self, repo: dict[str, Any], commit: str) -> dict[str, dict[str, Any]]:
        return repo["commits"][commit]["tree"]

    def commit(
        self,
        repo: dict[str, Any],
        branch: str,
        summary: str,
        description: str,
        files: dict[str, bytes],
        deleted: list[str],
        parent_commit: str | None = None,
        new_branch: bool = False,
    ) -> str:
        """Commit ``files`` (added or replaced) and ``deleted`` paths (files, or folders ending in ``/``) on ``branch``."""
        if new_branch:
            head = None
            tree: dict[str, dict[str, Any]] = {}
        else:
            if branch not in repo["branches"]:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo["branches"][branch]
            tree = dict(self.tree(repo, head))
        if parent_commit is not None and parent_commit != head:
            raise HubError(412, f"A commit has happened since {parent_commit}; the head of {branch} is {head}")
        for path in deleted:
            if path.endswith("/"):
                gone = [p for p in tree if p.startswith(path)]
                if not gone:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del tree[p]
            elif tree.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        for path, data in files.items():
            tree[path] = {"oid": self._put_blob(repo, data), "size": len(data)}
        date = _now()
        seed = json.dumps([head, tree, summary, description, date, time.perf_counter_ns()]).encode()
        commit_id = hashlib.sha1(seed).hexdigest()
        repo["commits"][commit_id] = {
            "id": commit_id,
            "parents": [head] if head else [],
            "title": summary,
            "message": description,
            "date": date,
            "tree": tree,
        }
        repo["branches"][branch] = commit_id
        self._save(repo)
        return commit_id

    def history(self, repo: dict[str, Any], commit: str) -> list[dict[str, Any]]:
        """The commits reachable from ``commit`` by first parents, newest first."""
        out = []
        current: str | None = commit
        while current:
            entry = repo["commits"][current]
            out.append(entry)
            current = entry["parents"][0] if entry["parents"] else None
        return out

    def corrupt(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> None:
        """Flip the last byte of ``path``'s stored blob (same size, same recorded oid): storage or transport corruption."""
        with self.lock:
            repo = self.load(repo_type, repo_id)
            oid = self.tree(repo, self.resolve(repo, revision))[path]["oid"]
            blob = self._dir(repo_type, repo_id) / "blobs" / oid
            data = bytearray(blob.read_bytes())
            data[-1] ^= 0xFF
            blob.write_bytes(bytes(data))

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Every file of ``repo_id`` at ``revision`` (for assertions)."""
        with self.lock:
            repo = self.load(repo_type, repo_id)
            return {p: self.blob(repo, e["oid"]) for p, e in self.tree(repo, self.resolve(repo, revision)).items()}


class HubHandler(BaseHTTPRequestHandler):
    """The HTTP side of :class:`LocalHub` (bound to one by :func:`running_hub`)."""

    hub: LocalHub
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects of the Hub

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        pass  # quiet: tests read hub.requests instead

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    # --- plumbing ------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()  # the CRLF after each chunk
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        body = self._body() if method == "POST" else b""
        try:
            with self.hub.lock:
                self.hub.requests.append((method, url.path))
                answer = self._route(method, url.path, parse_qs(url.query), body)
        except HubError as err:
            headers = {"Content-Type": "application/json", "X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            if err.commit:
                headers["X-Repo-Commit"] = err.commit
            answer = Answer(err.status, json.dumps({"error": err.message}).encode(), headers)
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", answer.headers.get("Content-Length", str(len(answer.body))))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(answer.body)

    @property
    def base(self) -> str:
        return f"http://{self.headers.get('Host')}"

    def _authorised(self) -> bool:
        return self.hub.token is None or self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _require_token(self) -> None:
        if not self._authorised():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, plural: str, owner: str, name: str) -> dict[str, Any]:
        repo = self.hub.load(TYPES[plural], f"{unquote(owner)}/{unquote(name)}")
        if repo["private"] and not self._authorised():
            raise HubError(404, f"Repository {repo['id']} not found", "RepoNotFound")  # as the Hub hides private repos
        return repo

    # --- routes --------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> Answer:
        raw = path.split("/")[1:]
        if method == "POST" and raw == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body))
        if method == "POST" and raw == ["api", "validate-yaml"]:
            return self._validate_yaml(json.loads(body))
        if len(raw) >= 4 and raw[0] == "api" and raw[1] in TYPES:
            repo = self._repo(raw[1], raw[2], raw[3])
            action, rest = (raw[4], [unquote(p) for p in raw[5:]]) if len(raw) > 4 else ("", [])
            if method == "GET" and action == "":
                return self._info(repo, "main")
            if method == "GET" and action == "revision" and rest:
                return self._info(repo, rest[0])
            if method == "GET" and action == "tree" and rest:
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return self._tree(repo, rest[0], "/".join(rest[1:]), recursive)
            if method == "GET" and action == "commits" and rest:
                return self._commits(repo, rest[0])
            if method == "POST" and action == "preupload" and rest:
                return self._preupload(repo, rest[0], json.loads(body))
            if method == "POST" and action == "commit" and rest:
                self._require_token()
                if query.get("create_pr"):
                    raise HubError(400, "this local hub does not do pull requests")
                return self._commit(repo, rest[0], body)
            if method == "POST" and action == "branch" and rest:
                self._require_token()
                return self._branch(repo, rest[0], json.loads(body or b"{}"))
        resolve = [i for i, part in enumerate(raw) if part == "resolve"]
        if method in ("GET", "HEAD") and resolve and len(raw) > resolve[0] + 2:
            i = resolve[0]
            plural = raw[0] if i == 3 else "models"
            if (i == 3 and plural in TYPES) or i == 2:
                repo = self._repo(plural, raw[i - 2], raw[i - 1])
                return self._resolve(repo, unquote(raw[i + 1]), unquote("/".join(raw[i + 2 :])))
        raise HubError(404, f"no route for {method} {path}")

    def _create_repo(self, payload: dict[str, Any]) -> Answer:
        self._require_token()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.base}/{prefix}{repo_id}"
        if not self.hub.create_repo(repo_type, repo_id, private):
            return _json_answer({"error": f"You already created this {repo_type} repo", "url": url}, 409)
        return _json_answer({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict[str, Any]) -> Answer:
        import yaml

        content = payload.get("content", "")
        found = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(found.group(1)) if found else {}
        except yaml.YAMLError as err:
            return _json_answer({"errors": [{"message": f"invalid YAML: {err}"}]}, 400)
        if meta is not None and not isinstance(meta, dict):
            return _json_answer({"errors": [{"message": "the metadata must be a YAML mapping"}]}, 400)
        return _json_answer({"errors": [], "warnings": []})

    def _info(self, repo: dict[str, Any], revision: str) -> Answer:
        commit = self.hub.resolve(repo, revision)
        entry = repo["commits"][commit]
        owner = repo["id"].partition("/")[0]
        return _json_answer(
            {
                "_id": hashlib.sha1(repo["id"].encode()).hexdigest()[:24],
                "id": repo["id"],
                "author": owner,
                "sha": commit,
                "private": repo["private"],
                "gated": False,
                "disabled": False,
                "createdAt": repo["created"],
                "lastModified": entry["date"],
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "siblings": [{"rfilename": p} for p in sorted(entry["tree"])],
            }
        )

    def _tree(self, repo: dict[str, Any], revision: str, folder: str, recursive: bool) -> Answer:
        commit = self.hub.resolve(repo, revision)
        tree = self.hub.tree(repo, commit)
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        below = {p: e for p, e in tree.items() if p.startswith(prefix)}
        if prefix and not below:
            raise HubError(404, f"{folder} does not exist at {revision}", "EntryNotFound", commit)
        entries: dict[str, dict[str, Any]] = {}
        for path, entry in sorted(below.items()):
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                if recursive or depth == 1:
                    name = prefix + "/".join(parts[:depth])
                    entries.setdefault(name, {"type": "directory", "oid": git_blob_id(name.encode()), "size": 0, "path": name})
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        return _json_answer(list(entries.values()))

    def _commits(self, repo: dict[str, Any], revision: str) -> Answer:
        commit = self.hub.resolve(repo, revision)
        return _json_answer(
            [
                {"id": c["id"], "title": c["title"], "message": c["message"], "date": c["date"], "authors": [{"user": USER}]}
                for c in self.hub.history(repo, commit)
            ]
        )

    def _preupload(self, repo: dict[str, Any], revision: str, payload: dict[str, Any]) -> Answer:
        tree = self.hub.tree(repo, self.hub.resolve(repo, revision))
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": tree.get(f["path"], {}).get("oid")}
            for f in payload["files"]
        ]
        return _json_answer({"files": files})

    def _commit(self, repo: dict[str, Any], branch: str, body: bytes) -> Answer:
        header: dict[str, Any] | None = None
        files: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append(value["path"])
            elif key == "deletedFolder":
                deleted.append(value["path"].rstrip("/") + "/")
            else:
                raise HubError(400, f"this local hub stores regular files only, not {key!r} operations")
        if header is None:
            raise HubError(400, "the commit payload has no header line")
        commit = self.hub.commit(
            repo, branch, header.get("summary", ""), header.get("description", ""), files, deleted, header.get("parentCommit")
        )
        prefix = "" if repo["type"] == "model" else f"{repo['type']}s/"
        return _json_answer({"success": True, "commitOid": commit, "commitUrl": f"{self.base}/{prefix}{repo['id']}/commit/{commit}"})

    def _branch(self, repo: dict[str, Any], branch: str, payload: dict[str, Any]) -> Answer:
        if branch in repo["branches"]:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self.hub.resolve(repo, payload.get("startingPoint") or "main")
        repo["branches"][branch] = start
        self.hub._save(repo)
        return _json_answer({})

    def _resolve(self, repo: dict[str, Any], revision: str, path: str) -> Answer:
        commit = self.hub.resolve(repo, revision)
        entry = self.hub.tree(repo, commit).get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit)
        data = self.hub.blob(repo, entry["oid"])
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{entry["oid"]}"',
            "X-Repo-Commit": commit,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rpartition("/")[2]}"',
        }
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged:
            start = int(ranged.group(1))
            end = int(ranged.group(2)) if ranged.group(2) else len(data) - 1
            if start >= len(data):
                raise HubError(416, "Requested range not satisfiable")
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return Answer(206, data[start : end + 1], headers)
        return Answer(200, data, headers)


@contextmanager
def running_hub(root: str | Path, token: str | None = None) -> Iterator[LocalHub]:
    """Serve a :class:`LocalHub` stored in ``root`` on a free port of 127.0.0.1 in a thread; ``hub.url`` is its endpoint."""
    hub = LocalHub(root, token)
    handler = type("BoundHubHandler", (HubHandler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="local-hub", daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
