"""A small fake Hugging Face Hub for tests: the endpoints the real ``huggingface_hub`` client calls.

Two ThreadingHTTPServers on 127.0.0.1 with random ports: the Hub itself (``endpoint``) and a "CDN"
that serves LFS blobs, as the real Hub answers ``/resolve`` for LFS files with a 302 to another host.

Served (models only):
- ``GET /api/models/{repo}[/revision/{rev}]`` (model_info / repo_info, ``?blobs=True`` sizes + lfs sha256)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` and ``POST /api/models/{repo}/paths-info/{rev}``
- ``HEAD|GET /{repo}/resolve/{rev}/{file}`` with X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size,
  Range (206); LFS files redirect (302) to the CDN server, which honours Range too
- uploads: ``POST /api/repos/create``, ``POST /api/validate-yaml``, ``POST .../preupload/{rev}``,
  ``POST /{repo}.git/info/lfs/objects/batch`` + ``PUT`` (CDN) + verify, ``POST .../commit/{rev}`` (NDJSON)
No Xet headers are ever sent, so the client uses plain HTTP (tests also set HF_HUB_DISABLE_XET=1).

Fault injection: ``hub.add_fault(Fault(...))`` matches requests by method and path regex on either
server and answers with an HTTP status (5xx, 429 + Retry-After, 401, 404, gated 403), drops the
connection mid-body, or delays; each rule fires ``times`` times. ``hub.throttle_bps`` slows every
body (benchmarks). ``hub.requests`` logs (server, method, path, Range header) for assertions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".model", ".gguf")
LFS_MIN_SIZE = 10 * 1024 * 1024
CHUNK = 256 * 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    """One file of one commit: content lives in the blob store under its sha256."""

    sha256: str
    size: int
    git_oid: str
    lfs: bool


@dataclass
class FakeRepo:
    repo_id: str
    private: bool = False
    gated: bool = False
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit sha
    card_data: dict[str, Any] | None = None


@dataclass
class Fault:
    """A rule: requests matching ``method`` (None = any) and ``path`` (regex, searched) on ``server``
    ("hub", "cdn" or None = both) get ``action`` instead of the normal answer, ``times`` times.

    Actions: "status" (answer ``status`` with ``headers``), "drop" (send the headers and ``after_bytes``
    of the body, then close the socket), "slow" (sleep ``delay`` seconds, then answer normally).
    """

    path: str
    action: str = "status"
    method: str | None = None
    server: str | None = None
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1
    after_bytes: int = 1024
    delay: float = 0.0
    hits: int = 0

    def matches(self, server: str, method: str, path: str) -> bool:
        if self.times <= 0:
            return False
        if self.server is not None and self.server != server:
            return False
        if self.method is not None and self.method != method:
            return False
        return re.search(self.path, path) is not None


class FakeHub:
    """Start with ``FakeHub(tmp_dir)`` (or as a context manager); ``hub.endpoint`` is the HF_ENDPOINT."""

    def __init__(self, root: Path, *, redirect_lfs: bool = True, tokens: set[str] | None = None) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, FakeRepo] = {}
        self.redirect_lfs = redirect_lfs
        self.tokens = tokens if tokens is not None else {"hf_test_token"}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, str, str | None]] = []
        self.throttle_bps: float | None = None
        self.lock = threading.RLock()
        self._commit_counter = 0
        self.hub_server = _make_server(self, "hub")
        self.cdn_server = _make_server(self, "cdn")
        self.endpoint = f"http://127.0.0.1:{self.hub_server.server_address[1]}"
        self.cdn = f"http://127.0.0.1:{self.cdn_server.server_address[1]}"
        self._threads = [
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            for s in (self.hub_server, self.cdn_server)
        ]
        for t in self._threads:
            t.start()

    # --- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        for s in (self.hub_server, self.cdn_server):
            s.shutdown()
            s.server_close()

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- content -----------------------------------------------------------------------------
    def _store(self, data: bytes | Path) -> tuple[str, int]:
        h = hashlib.sha256()
        if isinstance(data, Path):
            tmp = self.blobs / f"tmp-{threading.get_ident()}-{time.monotonic_ns()}"
            with data.open("rb") as src, tmp.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    dst.write(chunk)
            digest = h.hexdigest()
            size = tmp.stat().st_size
            if (self.blobs / digest).exists():
                tmp.unlink()
            else:
                tmp.rename(self.blobs / digest)
            return digest, size
        digest = hashlib.sha256(data).hexdigest()
        if not (self.blobs / digest).exists():
            (self.blobs / digest).write_bytes(data)
        return digest, len(data)

    def _git_oid(self, digest: str) -> str:
        h = hashlib.sha1()
        path = self.blobs / digest
        h.update(b"blob %d\0" % path.stat().st_size)
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    def _new_commit_sha(self, repo_id: str) -> str:
        self._commit_counter += 1
        return hashlib.sha1(f"{repo_id}:{self._commit_counter}:{time.time_ns()}".encode()).hexdigest()

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | Path] | Path,
        *,
        private: bool = False,
        gated: bool = False,
        branch: str = "main",
        card_data: dict[str, Any] | None = None,
    ) -> str:
        """Create (or add a commit to) a repo; ``files`` maps repo paths to bytes or local files, or is
        a folder whose files are all added. Returns the new commit sha."""
        if isinstance(files, Path):
            folder = files
            files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        with self.lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                repo = self.repos[repo_id] = FakeRepo(
                    repo_id, private=private, gated=gated, card_data=card_data
                )
            tree = dict(repo.commits.get(repo.refs.get(branch, ""), {}))
            for path, data in files.items():
                digest, size = self._store(data)
                lfs = path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
                tree[path] = StoredFile(digest, size, self._git_oid(digest), lfs)
            sha = self._new_commit_sha(repo_id)
            repo.commits[sha] = tree
            repo.refs[branch] = sha
            return sha

    def file_bytes(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        repo = self.repos[repo_id]
        sha = repo.refs.get(revision, revision)
        return (self.blobs / repo.commits[sha][path].sha256).read_bytes()

    def add_fault(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def take_fault(self, server: str, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.matches(server, method, path):
                    f.times -= 1
                    f.hits += 1
                    return f
        return None

    def count(self, method: str, pattern: str, server: str | None = None) -> int:
        return sum(
            1
            for s, m, p, _ in list(self.requests)
            if m == method and re.search(pattern, p) and (server is None or s == server)
        )


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up mid-body (cancelled downloads, retries) are expected here."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def _make_server(hub: FakeHub, name: str) -> ThreadingHTTPServer:
    handler = type(f"{name.title()}Handler", (_Handler,), {"hub": hub, "server_name_": name})
    server = _QuietServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    return server


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    server_name_: str
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # --- plumbing ----------------------------------------------------------------------------
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:] if auth.lower().startswith("bearer ") else None

    def _dispatch(self) -> None:
        method = self.command
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        self.query = parse_qs(parts.query)
        self.hub.requests.append((self.server_name_, method, path, self.headers.get("Range")))
        fault = self.hub.take_fault(self.server_name_, method, path)
        self.drop_after: int | None = None
        if fault is not None:
            if fault.action == "status":
                self._body()
                body = json.dumps({"error": f"injected {fault.status}"}).encode()
                self._send(fault.status, body, {"Content-Type": "application/json", **fault.headers})
                return
            if fault.action == "slow":
                time.sleep(fault.delay)
            elif fault.action == "drop":
                self.drop_after = fault.after_bytes
        try:
            if self.server_name_ == "cdn":
                self._cdn(method, path)
            else:
                self._hub(method, path)
        except _Dropped:
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # --- body streaming with throttle and drops ---------------------------------------------------
    def _send_blob(self, digest: str, size: int, headers: dict[str, str]) -> None:
        start, end = 0, size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m:
                self._send(416, b"", {"Content-Range": f"bytes */{size}"})
                return
            if m.group(1) == "":
                start = max(0, size - int(m.group(2)))
            else:
                start = int(m.group(1))
                if m.group(2):
                    end = min(int(m.group(2)), size - 1)
            if start >= size:
                self._send(416, b"", {"Content-Range": f"bytes */{size}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1
        self.send_response(status)
        headers.update({"Content-Length": str(length), "Accept-Ranges": "bytes"})
        headers.setdefault("Content-Type", "application/octet-stream")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        sent = 0
        with (self.hub.blobs / digest).open("rb") as f:
            f.seek(start)
            while sent < length:
                chunk = f.read(min(CHUNK, length - sent))
                if self.drop_after is not None and sent + len(chunk) > self.drop_after:
                    self.wfile.write(chunk[: max(0, self.drop_after - sent)])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    raise _Dropped
                if self.hub.throttle_bps:  # in 16 kB steps, so a slow body still trickles
                    for i in range(0, len(chunk), 16384):
                        time.sleep(min(16384, len(chunk) - i) / self.hub.throttle_bps)
                        self.wfile.write(chunk[i : i + 16384])
                else:
                    self.wfile.write(chunk)
                sent += len(chunk)

    # --- repo lookup -------------------------------------------------------------------------
    def _split_repo(self, rest: str) -> tuple[str | None, str]:
        """Split "ns/name/tail..." into a known repo id and the tail (two segments first)."""
        segs = rest.split("/")
        for n in (2, 1):
            rid = "/".join(segs[:n])
            if rid in self.hub.repos:
                return rid, "/".join(segs[n:])
        # Unknown repo: guess "ns/name" when there are enough segments.
        n = 2 if len(segs) >= 2 and segs[1] not in ("resolve", "revision", "tree", "paths-info") else 1
        return None, "/".join(segs[n:])

    def _repo_access(self, repo_id: str | None, *, files: bool) -> FakeRepo | None:
        """The repo, or None after answering the error the real Hub gives."""
        token = self._token()
        if token is not None and token not in self.hub.tokens:
            self._error(401, None, "Invalid credentials in Authorization header")
            return None
        repo = self.hub.repos.get(repo_id) if repo_id else None
        if repo is None or (repo.private and token is None):
            self._error(401 if token is None else 404, "RepoNotFound", "Repository not found")
            return None
        if repo.gated and files and token is None:
            self._error(
                403,
                "GatedRepo",
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated.",
            )
            return None
        return repo

    def _commit(self, repo: FakeRepo, rev: str) -> str | None:
        rev = unquote(rev)
        if rev in repo.refs:
            return repo.refs[rev]
        if rev in repo.commits:
            return rev
        self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return None

    # --- Hub endpoints -----------------------------------------------------------------------
    def _hub(self, method: str, path: str) -> None:
        hub = self.hub
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo()
        if path == "/api/validate-yaml" and method == "POST":
            self._body()
            return self._json(200, {"errors": [], "warnings": []})
        if path.startswith("/api/whoami"):
            if self._token() in hub.tokens:
                return self._json(200, {"name": "tester", "type": "user", "orgs": []})
            return self._error(401, None, "Invalid credentials in Authorization header")
        if path.startswith("/api/models/"):
            repo_id, tail = self._split_repo(path[len("/api/models/") :])
            return self._api_model(method, repo_id, tail)
        if ".git/info/lfs/" in path and method == "POST":
            repo_id = path[1:].split(".git/info/lfs/")[0]
            return self._lfs_batch(repo_id, path)
        repo_id, tail = self._split_repo(path[1:])
        if tail.startswith("resolve/") and method in ("GET", "HEAD"):
            return self._resolve(repo_id, tail[len("resolve/") :])
        return self._error(404, None, f"no route for {method} {path}")

    def _api_model(self, method: str, repo_id: str | None, tail: str) -> None:
        if method == "GET" and (tail == "" or tail.startswith("revision/")):
            repo = self._repo_access(repo_id, files=False)
            if repo is None:
                return None
            sha = self._commit(repo, tail[len("revision/") :] if tail else "main")
            if sha is None:
                return None
            return self._model_info(repo, sha)
        if method == "GET" and tail.startswith("tree/"):
            repo = self._repo_access(repo_id, files=False)
            if repo is None:
                return None
            rev, _, sub = tail[len("tree/") :].partition("/")
            sha = self._commit(repo, rev)
            if sha is None:
                return None
            recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
            return self._json(200, self._tree(repo, sha, sub, recursive))
        if method == "POST" and tail.startswith("paths-info/"):
            repo = self._repo_access(repo_id, files=False)
            if repo is None:
                return None
            sha = self._commit(repo, tail[len("paths-info/") :])
            if sha is None:
                return None
            body = self._body().decode()
            ctype = self.headers.get("Content-Type", "")
            if "json" in ctype:
                paths = json.loads(body).get("paths", [])
            else:
                paths = parse_qs(body).get("paths", [])
            files = repo.commits[sha]
            out = [self._entry(p, files[p]) for p in paths if p in files]
            return self._json(200, out)
        if method == "POST" and tail.startswith("preupload/"):
            return self._preupload(repo_id, tail[len("preupload/") :])
        if method == "POST" and tail.startswith("commit/"):
            return self._commit_endpoint(repo_id, tail[len("commit/") :])
        if method == "POST" and tail.startswith("branch/"):
            return self._create_branch(repo_id, unquote(tail[len("branch/") :]))
        return self._error(404, None, f"no route for {method} /api/models/{repo_id}/{tail}")

    @staticmethod
    def _entry(path: str, f: StoredFile) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": f.git_oid, "size": f.size, "path": path}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
        return entry

    def _tree(self, repo: FakeRepo, sha: str, sub: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = f"{sub.rstrip('/')}/" if sub else ""
        out: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for p, f in sorted(repo.commits[sha].items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :]
            if "/" in rest and not recursive:
                d = prefix + rest.split("/", 1)[0]
                if d not in dirs:
                    dirs.add(d)
                    out.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": d})
                continue
            out.append(self._entry(p, f))
        return out

    def _model_info(self, repo: FakeRepo, sha: str) -> None:
        blobs = self.query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for p, f in sorted(repo.commits[sha].items()):
            s: dict[str, Any] = {"rfilename": p}
            if blobs:
                s.update({"size": f.size, "blobId": f.git_oid})
                if f.lfs:
                    s["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
            siblings.append(s)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": sha,
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "tags": [],
            "siblings": siblings,
        }
        if repo.card_data is not None:
            info["cardData"] = repo.card_data
        return self._json(200, info)

    def _resolve(self, repo_id: str | None, tail: str) -> None:
        repo = self._repo_access(repo_id, files=True)
        if repo is None:
            return None
        rev, _, filename = tail.partition("/")
        sha = self._commit(repo, rev)
        if sha is None:
            return None
        f = repo.commits[sha].get(filename)
        if f is None:
            return self._error(
                404,
                "EntryNotFound",
                f"{filename} does not exist on {rev}",
            )
        headers = {"X-Repo-Commit": sha, "ETag": f'"{f.git_oid}"'}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
            if self.hub.redirect_lfs:
                headers["Location"] = f"{self.hub.cdn}/blobs/{f.sha256}?size={f.size}"
                self._body()
                return self._send(302, b"", headers)
            headers["ETag"] = f'"{f.sha256}"'
        return self._send_blob(f.sha256, f.size, headers)

    # --- CDN ---------------------------------------------------------------------------------
    def _cdn(self, method: str, path: str) -> None:
        if path.startswith("/blobs/") and method in ("GET", "HEAD"):
            digest = path[len("/blobs/") :]
            blob = self.hub.blobs / digest
            if not blob.exists():
                return self._error(404, None, "no such blob")
            return self._send_blob(digest, blob.stat().st_size, {"ETag": f'"{digest}"'})
        if path.startswith("/upload/") and method == "PUT":
            oid = path[len("/upload/") :]
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, None, "sha256 mismatch")
            self.hub._store(data)
            return self._send(200)
        if path.startswith("/verify/") and method == "POST":
            body = json.loads(self._body() or b"{}")
            ok = (self.hub.blobs / str(body.get("oid"))).exists()
            return self._json(200 if ok else 404, {"ok": ok})
        return self._error(404, None, f"no route for {method} {path}")

    # --- uploads -----------------------------------------------------------------------------
    def _write_access(self) -> bool:
        if self._token() not in self.hub.tokens:
            self._error(401, None, "Invalid credentials in Authorization header")
            return False
        return True

    def _writable_repo(self, repo_id: str | None) -> FakeRepo | None:
        """The repo a write request names, or None once the 401 (bad token) or 404 has been sent. Callers
        read the request body first, so that an error reply leaves the connection usable."""
        if not self._write_access():
            return None
        repo = self.hub.repos.get(repo_id or "")
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _create_repo(self) -> None:
        body = json.loads(self._body() or b"{}")
        if not self._write_access():
            return None
        name = body["name"]
        repo_id = f"{body['organization']}/{name}" if body.get("organization") else f"tester/{name}"
        with self.hub.lock:
            if repo_id in self.hub.repos:  # the real Hub's 409 body carries the url too
                url = f"{self.hub.endpoint}/{repo_id}"
                msg = "You already created this model repo"
                return self._json(409, {"error": msg, "url": url}, {"X-Error-Message": msg})
            repo = FakeRepo(repo_id, private=body.get("visibility") == "private")
            sha = self.hub._new_commit_sha(repo_id)
            repo.commits[sha] = {}
            repo.refs["main"] = sha
            self.hub.repos[repo_id] = repo
        return self._json(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id})

    def _create_branch(self, repo_id: str | None, branch: str) -> None:
        body = json.loads(self._body() or b"{}")
        repo = self._writable_repo(repo_id)
        if repo is None:
            return None
        with self.hub.lock:
            if branch in repo.refs:
                return self._error(409, None, "Reference already exists")
            start = self._commit(repo, body.get("startingPoint") or "main")
            if start is None:
                return None
            repo.refs[branch] = start
        return self._json(200, {})

    def _preupload(self, repo_id: str | None, rev: str) -> None:
        body = json.loads(self._body() or b"{}")
        repo = self._writable_repo(repo_id)
        if repo is None:
            return None
        sha = self._commit(repo, rev)
        if sha is None:
            return None
        tree = repo.commits[sha]
        out = []
        for f in body.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE or b"\0" in sample
            existing = tree.get(f["path"])
            oid = None if existing is None else (existing.sha256 if lfs else existing.git_oid)
            out.append(
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return self._json(200, {"files": out, "commitOid": sha})

    def _lfs_batch(self, repo_id: str, path: str) -> None:
        body = json.loads(self._body() or b"{}")
        if self._writable_repo(repo_id) is None:
            return None
        objects = []
        for obj in body.get("objects", []):
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if not (self.hub.blobs / obj["oid"]).exists():
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.cdn}/upload/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.cdn}/verify/{obj['oid']}"},
                }
            objects.append(entry)
        return self._json(200, {"transfer": "basic", "objects": objects})

    def _commit_endpoint(self, repo_id: str | None, rev: str) -> None:
        data = self._body()
        repo = self._writable_repo(repo_id)
        if repo is None:
            return None
        with self.hub.lock:
            rev = unquote(rev)
            base = self._commit(repo, rev)
            if base is None:
                return None
            tree = dict(repo.commits[base])
            for line in data.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "file":
                    content = base64.b64decode(value["content"])
                    digest, size = self.hub._store(content)
                    tree[value["path"]] = StoredFile(digest, size, git_blob_sha1(content), False)
                elif key == "lfsFile":
                    blob = self.hub.blobs / value["oid"]
                    if not blob.exists():
                        return self._error(400, None, f"LFS object {value['oid']} was not uploaded")
                    tree[value["path"]] = StoredFile(
                        value["oid"], blob.stat().st_size, self.hub._git_oid(value["oid"]), True
                    )
                elif key == "deletedFile":
                    tree.pop(value["path"], None)
            sha = self.hub._new_commit_sha(repo.repo_id)
            repo.commits[sha] = tree
            repo.refs[rev if rev in repo.refs else "main"] = sha
        return self._json(
            200,
            {
                "commitUrl": f"{self.hub.endpoint}/{repo.repo_id}/commit/{sha}",
                "commitOid": sha,
                "success": True,
            },
        )


class _Dropped(Exception):
    """The handler cut the connection on purpose (fault injection)."""
