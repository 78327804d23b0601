"""A fake Hugging Face Hub on loopback: the two endpoints `hearth pull` uses, and ways to break them.

GET /api/models/{org}/{name}[/revision/{rev}]  model info with siblings (size, blobId, lfs)
GET|HEAD /{org}/{name}/resolve/{rev}/{file}     file bytes: ETag, X-Repo-Commit, Content-Length, Range

`drop[file] = [n, ...]`: each GET of `file` sends n bytes then closes the connection (one entry per GET).
`stall[file] = n`: a GET sends n bytes then waits for `release` (to kill the client midway).
`sent[file]`: body bytes served; `log`: (method, path, Range header) of every request.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_MIN = 1024  # files from this size on are "LFS" (sha256 etag), like the Hub's large files


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False
    commit: str = field(init=False)

    def __post_init__(self):
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + hashlib.sha1(self.files[name]).digest())
        self.commit = h.hexdigest()


def _blob(data: bytes) -> tuple[str, bool]:
    if len(data) >= LFS_MIN:
        return hashlib.sha256(data).hexdigest(), True
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(), False


class _Server(ThreadingHTTPServer):
    """Stays quiet when a client hangs up: socketserver would print that traceback to the stderr the tests read."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.drop: dict[str, list[int]] = {}
        self.stall: dict[str, int] = {}
        self.release = threading.Event()
        self.sent: Counter[str] = Counter()
        self.log: list[tuple[str, str, str | None]] = []
        self.server = _Server(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo_id: str, files: dict[str, bytes] | Path, gated: bool = False) -> Repo:
        if isinstance(files, Path):
            files = {p.name: p.read_bytes() for p in sorted(files.iterdir()) if p.is_file()}
        self.repos[repo_id] = Repo(dict(files), gated)
        return self.repos[repo_id]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def info(self, repo_id: str) -> dict:
        repo = self.repos[repo_id]
        siblings = []
        for name, data in sorted(repo.files.items()):
            blob, lfs = _blob(data)
            s = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
            if lfs:
                s["lfs"] = {"sha256": blob, "size": len(data), "pointerSize": 134}
            siblings.append(s)
        return {"id": repo_id, "sha": repo.commit, "gated": "manual" if repo.gated else False, "siblings": siblings}


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head_only: bool = False) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head_only:
                self.wfile.write(body)

        def _error(self, code: int, error_code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self._send(code, body, {"X-Error-Code": error_code, "X-Error-Message": message})

        def do_HEAD(self):
            self._route(head_only=True)

        def do_GET(self):
            self._route(head_only=False)

        def _route(self, head_only: bool) -> None:
            path = unquote(urlparse(self.path).path)
            hub.log.append((self.command, path, self.headers.get("Range")))
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
                return self._info(m[1], m[2] or "main")
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._file(m[1], m[2], m[3], head_only)
            self._error(404, "EntryNotFound", f"no route {path}")

        def _repo(self, repo_id: str, rev: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
            elif rev not in ("main", repo.commit):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            else:
                return repo
            return None

        def _info(self, repo_id: str, rev: str) -> None:
            if self._repo(repo_id, rev):
                body = json.dumps(hub.info(repo_id)).encode()
                self._send(200, body, {"Content-Type": "application/json"})

        def _file(self, repo_id: str, rev: str, name: str, head_only: bool) -> None:
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            if repo.gated and "authorization" not in {k.lower() for k in self.headers}:
                return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted.")
            data = repo.files.get(name)
            if data is None:
                return self._error(404, "EntryNotFound", f"{name} does not exist")
            blob, _ = _blob(data)
            headers = {"ETag": f'"{blob}"', "X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes"}
            start, end, code = 0, len(data), 200
            if rng := self.headers.get("Range"):
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
                start, end, code = int(m[1]), (int(m[2]) + 1 if m[2] else len(data)), 206
                if start >= len(data):
                    return self._send(416, headers={"Content-Range": f"bytes */{len(data)}"})
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            self._body(name, data[start:end], code, headers, head_only)

        def _body(self, name: str, body: bytes, code: int, headers: dict, head_only: bool) -> None:
            cut, stalled = None, False
            if not head_only and hub.drop.get(name):
                cut = hub.drop[name].pop(0)
            elif not head_only and name in hub.stall:
                cut, stalled = hub.stall.pop(name), True
            if cut is None:
                self._send(code, body, headers, head_only)
                hub.sent[name] += 0 if head_only else len(body)
                return
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))  # promise everything, send `cut` bytes
            self.end_headers()
            self.wfile.write(body[:cut])
            self.wfile.flush()
            hub.sent[name] += min(cut, len(body))
            if stalled:
                hub.release.wait(600)  # hold the connection open until the test lets go (600 s: a safety net)
            self.close_connection = True

    return Handler
