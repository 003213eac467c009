"""A Hugging Face Hub stand-in on loopback, for the tests and ``examples/hub_share.py --local-hub``: the endpoints the
real ``huggingface_hub`` client calls. Standard library only, so importing it does not import ``huggingface_hub``.

Point a process at it with ``HF_ENDPOINT=<FakeHub.url>`` set *before* ``huggingface_hub`` is imported (the library
reads the endpoint once, at import); the client then runs its own code unmodified. What it speaks (model repos only):

- ``GET /api/whoami-v2``; ``POST /api/repos/create`` (409 with the URL when the repo exists, as the Hub does);
  ``POST /api/validate-yaml``;
- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (model info with ``sha`` and ``siblings``),
  ``/refs``, ``/tree/{rev}[/{path}]``, ``POST /paths-info/{rev}``, ``POST /branch/{name}``;
- ``POST /api/models/{repo}/preupload/{rev}``: every file is ``"regular"`` (never LFS, so never Xet), and the
  ``/commit/{rev}`` ndjson endpoint with base64 ``file`` and ``deletedFile`` lines (``?create_pr=1`` opens
  ``refs/pr/N``). A commit is applied whole or not at all;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (the git blob id) and
  ``Content-Length``, and no Xet headers, so downloads are plain HTTP.

Errors carry the Hub's ``X-Error-Code`` / ``X-Error-Message`` headers and a JSON ``{"error": ...}`` body, which the
client turns into its own exception types: an unknown token gets 401 "Invalid credentials in Authorization header";
a private repo asked for without a valid token, or a missing repo, 401/404 ``RepoNotFound``; a missing file 404
``EntryNotFound``; a missing branch 404 ``RevisionNotFound``.

Test hooks: :meth:`FakeHub.fail_next` makes the next request of a kind fail (an HTTP status, or the connection
dropped before any response); :attr:`FakeHub.log` records every request; :attr:`FakeHub.unhandled` lists requests
no route matched, so a test can assert that the client used nothing this server does not speak.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["FakeHub", "git_blob_id"]


def git_blob_id(content: bytes) -> str:
    """The id git gives a file's content (what the Hub sends as the ``ETag`` of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class _Repo:
    owner: str
    private: bool
    refs: dict = field(default_factory=dict)  # branch or "refs/pr/N" -> commit id
    commits: dict = field(default_factory=dict)  # commit id -> {path: bytes}
    pull_requests: int = 0

    def resolve(self, revision: str) -> Optional[str]:
        if revision in self.refs:
            return self.refs[revision]
        if revision in self.commits:
            return revision
        return None


class _Failure:
    def __init__(self, kind: str, status: Optional[int], drop: bool, message: str):
        self.kind, self.status, self.drop, self.message = kind, status, drop, message


class FakeHub:
    """A loopback Hub server in a background thread. Use as a context manager, or call :meth:`start` / :meth:`stop`.

    Args:
        users: ``{token: username}``; a request with ``Authorization: Bearer <token>`` acts as that user.

    Example:

    ```python
    >>> with FakeHub({"hf_secret": "alice"}) as hub:  # doctest: +SKIP
    ...     env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_secret"}  # for a subprocess
    ```
    """

    def __init__(self, users: Optional[dict] = None):
        self.users = dict(users or {})
        self.repos: dict[str, _Repo] = {}
        self.log: list[tuple[str, str, int]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._failures: list[_Failure] = []
        self._lock = threading.RLock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ---------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ---------------------------------------------------------------------------------------------- test hooks

    def fail_next(self, kind: str, *, status: Optional[int] = 500, drop: bool = False, message: str = "") -> None:
        """Make the next request of ``kind`` (``"commit"``, ``"preupload"``, ``"resolve"``, ``"create"``, ...) fail.

        ``drop=True`` closes the connection without answering (the request body is read first); otherwise the
        request is answered with ``status`` and ``message``. Nothing is changed on the server either way.
        """
        with self._lock:
            self._failures.append(_Failure(kind, status, drop, message or "Internal Error (injected by FakeHub)"))

    def seed(self, repo_id: str, files: dict[str, bytes], *, private: bool = False) -> str:
        """Create ``repo_id`` (owned by its namespace) holding ``files`` on ``main``; returns the commit id."""
        repo = _Repo(owner=repo_id.split("/")[0], private=private)
        commit = _new_commit_id(repo_id, "seed")
        repo.commits[commit] = dict(files)
        repo.refs["main"] = commit
        with self._lock:
            self.repos[repo_id] = repo
        return commit

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (``{}`` for a missing repo or revision)."""
        with self._lock:
            repo = self.repos.get(repo_id)
            commit = repo.resolve(revision) if repo else None
            return dict(repo.commits[commit]) if commit else {}

    def requests_of(self, kind: str) -> list[tuple[str, str, int]]:
        """Logged requests whose path contains ``kind`` (e.g. ``"/commit/"``)."""
        return [entry for entry in self.log if kind in entry[1]]

    def _take_failure(self, kind: str) -> Optional[_Failure]:
        with self._lock:
            for i, failure in enumerate(self._failures):
                if failure.kind == kind:
                    return self._failures.pop(i)
        return None


class _Response(Exception):
    """Raised by a route to answer with an error (or a non-JSON body)."""

    def __init__(self, status: int, message: str = "", code: Optional[str] = None, body: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer carries Content-Length
    hub: FakeHub

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr logging
        pass

    # ---------------------------------------------------------------------------------------------- dispatch

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        self.raw_body = self._read_body()
        segments = [s for s in split.path.split("/") if s != ""]
        status = 500
        try:
            route, kind = self._route(method, segments)
            failure = self.hub._take_failure(kind) if kind else None
            if failure is not None and failure.drop:
                self.close_connection = True
                status = 0
                return
            if failure is not None:
                raise _Response(failure.status, failure.message)
            status = route()
        except _Response as answer:
            status = answer.status
            self._send_error(answer)
        finally:
            with self.hub._lock:
                self.hub.log.append((method, self.path, status))

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return b""

    def _route(self, method: str, seg: list[str]):
        """(handler, failure kind) for a request, or an answer for one that no route matches."""
        if seg[:2] == ["api", "whoami-v2"] and method == "GET":
            return self._whoami, "whoami"
        if seg[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo, "create"
        if seg[:2] == ["api", "validate-yaml"] and method == "POST":
            return lambda: self._send_json({"errors": [], "warnings": []}), "validate"
        if len(seg) >= 4 and seg[:2] == ["api", "models"]:
            repo_id, rest = f"{seg[2]}/{seg[3]}", seg[4:]
            if not rest and method == "GET":
                return (lambda: self._model_info(repo_id, "main")), "info"
            if rest[:1] == ["revision"] and len(rest) == 2 and method == "GET":
                return (lambda: self._model_info(repo_id, unquote(rest[1]))), "info"
            if rest == ["refs"] and method == "GET":
                return (lambda: self._refs(repo_id)), "refs"
            if rest[:1] == ["preupload"] and len(rest) == 2 and method == "POST":
                return (lambda: self._preupload(repo_id, unquote(rest[1]))), "preupload"
            if rest[:1] == ["commit"] and len(rest) == 2 and method == "POST":
                return (lambda: self._commit(repo_id, unquote(rest[1]))), "commit"
            if rest[:1] == ["branch"] and len(rest) == 2 and method == "POST":
                return (lambda: self._create_branch(repo_id, unquote(rest[1]))), "branch"
            if rest[:1] == ["tree"] and len(rest) >= 2 and method == "GET":
                return (lambda: self._tree(repo_id, unquote(rest[1]), "/".join(unquote(s) for s in rest[2:]))), "tree"
            if rest[:1] == ["paths-info"] and len(rest) == 2 and method == "POST":
                return (lambda: self._paths_info(repo_id, unquote(rest[1]))), "paths-info"
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id, revision, path = f"{seg[0]}/{seg[1]}", unquote(seg[3]), "/".join(unquote(s) for s in seg[4:])
            return (lambda: self._resolve(repo_id, revision, path, head=method == "HEAD")), "resolve"
        with self.hub._lock:
            self.hub.unhandled.append((method, self.path))
        raise _Response(404, f"FakeHub does not speak {method} {self.path}")

    # ---------------------------------------------------------------------------------------------- auth

    def _user(self) -> Optional[str]:
        """The caller's user name; ``None`` when anonymous. An unknown token is refused, as on the Hub."""
        header = self.headers.get("Authorization") or ""
        if not header:
            return None
        token = header.split(" ", 1)[1] if header.lower().startswith("bearer ") else header
        user = self.hub.users.get(token)
        if user is None:
            raise _Response(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id: str, *, write: bool = False) -> _Repo:
        user = self._user()
        with self.hub._lock:
            repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            # The Hub does not reveal that a private repo exists: same answer as for a missing one.
            status = 401 if user is None else 404
            raise _Response(status, "Repository not found", code="RepoNotFound")
        if write and user != repo.owner:
            raise _Response(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit_of(self, repo: _Repo, revision: str) -> str:
        commit = repo.resolve(revision)
        if commit is None:
            raise _Response(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commit

    # ---------------------------------------------------------------------------------------------- routes

    def _whoami(self) -> int:
        user = self._user()
        if user is None:
            raise _Response(401, "Invalid credentials in Authorization header")
        return self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _create_repo(self) -> int:
        user = self._user()
        if user is None:
            raise _Response(401, "You must be authenticated to create a repo")
        payload = json.loads(self.raw_body or b"{}")
        if payload.get("type", "model") not in (None, "model"):
            raise _Response(400, "FakeHub only hosts model repos")
        namespace = payload.get("organization") or user
        if namespace != user:
            raise _Response(403, f"You don't have the rights to create a repo under {namespace}")
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub._lock:
            if repo_id in self.hub.repos:
                raise _Response(409, "You already created this model repo", body={"url": url})
            # huggingface_hub >= 1.x sends "visibility"; older clients "private"
            private = bool(payload.get("private")) or payload.get("visibility") in ("private", "protected")
            repo = _Repo(owner=user, private=private)
            initial = _new_commit_id(repo_id, "initial")
            repo.commits[initial] = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            repo.refs["main"] = initial
            self.hub.repos[repo_id] = repo
        return self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _model_info(self, repo_id: str, revision: str) -> int:
        repo = self._repo(repo_id)
        commit = self._commit_of(repo, revision)
        files = repo.commits[commit]
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        return self._send_json(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "createdAt": now,
                "lastModified": now,
                "siblings": [{"rfilename": path} for path in sorted(files)],
            }
        )

    def _refs(self, repo_id: str) -> int:
        repo = self._repo(repo_id)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit}
            for name, commit in repo.refs.items()
            if not name.startswith("refs/")
        ]
        return self._send_json({"branches": branches, "converts": [], "tags": []})

    def _create_branch(self, repo_id: str, branch: str) -> int:
        repo = self._repo(repo_id, write=True)
        payload = json.loads(self.raw_body or b"{}")
        with self.hub._lock:
            if branch in repo.refs:
                raise _Response(409, f"Reference already exists: refs/heads/{branch}")
            repo.refs[branch] = self._commit_of(repo, payload.get("startingPoint") or "main")
        return self._send_json({})

    def _preupload(self, repo_id: str, revision: str) -> int:
        repo = self._repo(repo_id, write=True)
        if "create_pr" not in self.query:
            self._commit_of(repo, revision)
        payload = json.loads(self.raw_body)
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in payload["files"]]
        return self._send_json({"files": files, "commitOid": repo.resolve(revision)})

    def _commit(self, repo_id: str, revision: str) -> int:
        repo = self._repo(repo_id, write=True)
        create_pr = self.query.get("create_pr", ["0"])[0] == "1"
        lines = [json.loads(line) for line in self.raw_body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Response(400, "The commit payload must start with a header line")
        with self.hub._lock:
            parent = self._commit_of(repo, revision)
            files = dict(repo.commits[parent])
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise _Response(400, "FakeHub only accepts base64 file content")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise _Response(404, "A file with this name doesn't exist", code="EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: c for p, c in files.items() if not p.startswith(prefix)}
                else:
                    raise _Response(400, f"FakeHub accepts regular files only, got a {key!r} line")
            commit = _new_commit_id(repo_id, lines[0]["value"].get("summary", ""), parent, len(repo.commits))
            repo.commits[commit] = files
            pr_url = None
            if create_pr:
                repo.pull_requests += 1
                repo.refs[f"refs/pr/{repo.pull_requests}"] = commit
                pr_url = f"{self.hub.url}/{repo_id}/discussions/{repo.pull_requests}"
            else:
                repo.refs[revision] = commit
        return self._send_json(
            {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit}", "commitOid": commit, "pullRequestUrl": pr_url}
        )

    def _tree(self, repo_id: str, revision: str, path: str) -> int:
        repo = self._repo(repo_id)
        files = repo.commits[self._commit_of(repo, revision)]
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.rstrip("/") + "/" if path else ""
        entries, folders = [], set()
        for name, content in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/", 1)[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            entries.append(_file_entry(name, content))
        entries += [{"type": "directory", "oid": _new_commit_id(d), "size": 0, "path": d} for d in sorted(folders)]
        if path and not entries:
            raise _Response(404, f"{path} does not exist", code="EntryNotFound")
        return self._send_json(entries)

    def _paths_info(self, repo_id: str, revision: str) -> int:
        repo = self._repo(repo_id)
        files = repo.commits[self._commit_of(repo, revision)]
        form = parse_qs(self.raw_body.decode())
        if self.headers.get("Content-Type", "").startswith("application/json"):
            form = {"paths": json.loads(self.raw_body).get("paths", [])}
        return self._send_json([_file_entry(p, files[p]) for p in form.get("paths", []) if p in files])

    def _resolve(self, repo_id: str, revision: str, path: str, *, head: bool) -> int:
        repo = self._repo(repo_id)
        commit = self._commit_of(repo, revision)
        content = repo.commits[commit].get(path)
        if content is None:
            raise _Response(404, "Entry not found", code="EntryNotFound", body=None)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(content)))
        self.send_header("ETag", f'"{git_blob_id(content)}"')
        self.send_header("X-Repo-Commit", commit)
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not head:
            self.wfile.write(content)
        return 200

    # ---------------------------------------------------------------------------------------------- answers

    def _send_json(self, payload, status: int = 200) -> int:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        return status

    def _send_error(self, answer: _Response) -> None:
        body = {"error": answer.message, **(answer.body or {})}
        data = json.dumps(body).encode()
        self.send_response(answer.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if answer.code:
            self.send_header("X-Error-Code", answer.code)
        if answer.message:
            self.send_header("X-Error-Message", answer.message)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _file_entry(path: str, content: bytes) -> dict:
    return {"type": "file", "oid": git_blob_id(content), "size": len(content), "path": path}


def _new_commit_id(*parts) -> str:
    return hashlib.sha1(("\0".join(map(str, parts)) + f"\0{time.time_ns()}").encode()).hexdigest()
