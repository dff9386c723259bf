"""A fake Hugging Face Hub on loopback: it stands in for the Hub in tests, nothing more.

It answers the few endpoints that huggingface_hub's `create_repo`, `upload_folder` (README.md
metadata included),
`create_commit`, `repo_info`, `list_repo_tree`, `get_paths_info`, `whoami`, `file_exists`,
`hf_hub_download` and `snapshot_download` call, with real HTTP, so the real client code runs
end to end. It keeps every commit in memory. Not covered: the LFS/Xet large-file path
(preupload always answers `uploadMode: "regular"`, so file contents travel base64-encoded in
the commit NDJSON), pull requests, branches other than `main`, pagination, and permissions
beyond "a valid token may do everything". Point the client at it with HF_ENDPOINT.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_oid(data: bytes) -> str:
    """The git blob id of `data` (what the Hub reports as a file's `oid`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class Repo:
    type: str
    id: str
    private: bool
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)

    def files(self, rev: str | None) -> dict[str, bytes] | None:
        if rev in (None, "main"):
            return self.commits[-1][1] if self.commits else {}
        return next((f for sha, f in self.commits if sha == rev), None)

    @property
    def sha(self) -> str:
        return self.commits[-1][0]


class FakeHub:
    """In-memory Hub state plus a threaded HTTP server (start/stop, or use `servers.hub_server`)."""

    def __init__(self, token: str = "hf_fake_write_token", role: str = "write") -> None:
        self.token = token
        self.role = role
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._oids: dict[tuple[str, str, str], str] = {}
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # --------------------------------------------------------- test helpers

    def file(self, repo_id: str, path: str, repo_type: str = "model") -> bytes:
        """The content of `path` at the head of a repo."""
        return self.repos[(repo_type, repo_id)].files(None)[path]  # type: ignore[index]

    def corrupt(self, repo_id: str, path: str, repo_type: str = "model") -> None:
        """Flip a byte of a stored file while the tree keeps reporting the original oid
        (server-side rot)."""
        files = self.repos[(repo_type, repo_id)].files(None)
        assert files is not None
        self._oids[(repo_type, repo_id, path)] = git_oid(files[path])
        bad = bytearray(files[path])
        bad[len(bad) // 2] ^= 0xFF
        files[path] = bytes(bad)

    def oid(self, repo: Repo, path: str, data: bytes) -> str:
        return self._oids.get((repo.type, repo.id, path)) or git_oid(data)

    # --------------------------------------------------------------- server

    def start(self) -> FakeHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ------------------------------------------------------------ the API

    def authorized(self, headers: Any) -> bool:
        return headers.get("Authorization", "") == f"Bearer {self.token}"

    def commit(self, repo: Repo, lines: list[dict[str, Any]]) -> str:
        files = dict(repo.files(None) or {})
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                self._oids.pop((repo.type, repo.id, value["path"]), None)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            elif key != "header":
                raise ValueError(f"commit line '{key}' is not supported by the fake Hub")
        sha = hashlib.sha1(f"{repo.id}{len(repo.commits)}{time.time_ns()}".encode(),
                           usedforsecurity=False).hexdigest()
        repo.commits.append((sha, files))
        return sha


def _entries(hub: FakeHub, repo: Repo, files: dict[str, bytes], base: str,
             recursive: bool) -> list[dict[str, Any]]:
    prefix = base.strip("/") + "/" if base.strip("/") else ""
    out: dict[str, dict[str, Any]] = {}
    for path, data in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        if "/" in rest and not recursive:
            d = prefix + rest.split("/")[0]
            out[d] = {"type": "directory", "oid": git_oid(d.encode()), "size": 0, "path": d}
            continue
        if recursive:
            parts = rest.split("/")[:-1]
            for i in range(len(parts)):
                d = prefix + "/".join(parts[: i + 1])
                out.setdefault(d, {"type": "directory", "oid": git_oid(d.encode()), "size": 0,
                                   "path": d})
        out[path] = {"type": "file", "oid": hub.oid(repo, path, data), "size": len(data),
                     "path": path}
    return list(out.values())


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    # -------------------------------------------------------------- plumbing

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None,
              raw: bytes | None = None) -> None:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if raw is None else
                         "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _repo(self, kind: str, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get((TYPES.get(kind, kind), repo_id))
        if repo is None or (repo.private and not self.hub.authorized(self.headers)):
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        return repo

    def _files(self, repo: Repo, rev: str) -> dict[str, bytes] | None:
        files = repo.files(unquote(rev))
        if files is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return files

    def _need_token(self) -> bool:
        if self.hub.authorized(self.headers):
            return True
        self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        return False

    # --------------------------------------------------------------- routes

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._safely(self._get)

    def do_POST(self) -> None:
        self._safely(self._post)

    def _safely(self, fn: Any) -> None:
        try:
            fn()
        except Exception as err:  # a bug in the fake: answer 500 rather than hang up
            self._error(500, "FakeHubBug", f"{type(err).__name__}: {err}")
            raise

    def _get(self) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        with self.hub.lock:
            self.hub.requests.append((self.command, path))
        if path == "/api/whoami-v2":
            if self._need_token():
                self._send(200, {"type": "user", "name": "sft-tester", "orgs": [], "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "test", "role": self.hub.role}}})
            return
        m = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if m:
            self._info(m.group(1), m.group(2), m.group(3) or "main")
            return
        m = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?",
                         path)
        if m:
            recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
            self._tree(m.group(1), m.group(2), m.group(3), m.group(4) or "", recursive)
            return
        m = re.fullmatch(r"(?:/(datasets|spaces))?/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            self._resolve(m.group(1) or "models", m.group(2), m.group(3), m.group(4))
            return
        self._error(404, "NotFound", f"the fake Hub has no route GET {path}")

    def _post(self) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        body = self._body()
        with self.hub.lock:
            self.hub.requests.append((self.command, path))
        if path == "/api/repos/create":
            self._create(json.loads(body))
            return
        if path == "/api/validate-yaml":  # README.md metadata, checked before a commit
            self._validate_yaml(json.loads(body).get("content", ""))
            return
        m = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/(preupload|commit|paths-info)"
                         r"/(.+)", path)
        if not m:
            self._error(404, "NotFound", f"the fake Hub has no route POST {path}")
            return
        kind, repo_id, verb, rev = m.groups()
        if verb == "paths-info":
            self._paths_info(kind, repo_id, rev, parse_qs(body.decode()))
            return
        if not self._need_token():
            return
        repo = self._repo(kind, repo_id)
        if repo is None:
            return
        if verb == "preupload":
            files = json.loads(body)["files"]
            self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                        "shouldIgnore": False} for f in files]})
            return
        lines = [json.loads(x) for x in body.splitlines() if x.strip()]
        try:
            with self.hub.lock:
                sha = self.hub.commit(repo, lines)
        except ValueError as err:
            self._error(400, "BadRequest", str(err))
            return
        prefix = "" if repo.type == "model" else f"/{repo.type}s"
        self._send(200, {"success": True, "commitOid": sha, "pullRequestUrl": None,
                         "commitUrl": f"{self.hub.url}{prefix}/{repo_id}/commit/{sha}"})

    # ------------------------------------------------------------- handlers

    def _create(self, req: dict[str, Any]) -> None:
        if not self._need_token():
            return
        repo_id = f"{req.get('organization') or 'sft-tester'}/{req['name']}"
        kind = req.get("type") or "model"
        prefix = "" if kind == "model" else f"/{kind}s"
        url = f"{self.hub.url}{prefix}/{repo_id}"
        with self.hub.lock:
            if (kind, repo_id) in self.hub.repos:
                self._send(409, {"error": "You already created this repo", "url": url})
                return
            private = req.get("visibility", "private" if req.get("private") else "public")
            repo = Repo(kind, repo_id, private != "public")
            self.hub.commit(repo, [])
            self.hub.repos[(kind, repo_id)] = repo
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, content: str) -> None:
        import yaml

        m = re.match(r"^---\n(.*?)\n---", content, re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else {}
        except yaml.YAMLError as err:
            self._send(400, {"errors": [{"message": str(err)}], "warnings": []})
            return
        warnings = [] if meta else [{"message": "empty or missing yaml metadata in repo card"}]
        self._send(200, {"errors": [], "warnings": warnings})

    def _info(self, kind: str, repo_id: str, rev: str) -> None:
        repo = self._repo(kind, repo_id)
        files = repo and self._files(repo, rev)
        if repo is None or files is None:
            return
        sha = next(s for s, f in repo.commits if f is files)
        self._send(200, {"id": repo_id, "sha": sha, "private": repo.private,
                         "siblings": [{"rfilename": p} for p in sorted(files)]})

    def _tree(self, kind: str, repo_id: str, rev: str, base: str, recursive: bool) -> None:
        repo = self._repo(kind, repo_id)
        files = repo and self._files(repo, rev)
        if repo is None or files is None:
            return
        entries = _entries(self.hub, repo, files, base, recursive)
        if base and not entries and base not in files:
            self._error(404, "EntryNotFound", f"{base} does not exist on {rev}")
            return
        self._send(200, entries)

    def _paths_info(self, kind: str, repo_id: str, rev: str, form: dict[str, list[str]]) -> None:
        repo = self._repo(kind, repo_id)
        files = repo and self._files(repo, rev)
        if repo is None or files is None:
            return
        out = []
        for p in form.get("paths", []):
            if p in files:
                out.append({"type": "file", "oid": self.hub.oid(repo, p, files[p]),
                            "size": len(files[p]), "path": p})
            elif any(f.startswith(p.rstrip("/") + "/") for f in files):
                out.append({"type": "directory", "oid": git_oid(p.encode()), "size": 0, "path": p})
        self._send(200, out)

    def _resolve(self, kind: str, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(kind, repo_id)
        files = repo and self._files(repo, rev)
        if repo is None or files is None:
            return
        if path not in files:
            self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
            return
        data = files[path]
        sha = next(s for s, f in repo.commits if f is files)
        self._send(200, raw=data, headers={"X-Repo-Commit": sha,
                                           "ETag": f'"{self.hub.oid(repo, path, data)}"'})
