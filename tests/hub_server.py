"""A small Hugging Face Hub stand-in for tests: a real HTTP server on 127.0.0.1.

It speaks the part of the Hub API that `huggingface_hub`'s client uses to push and pull a model repo:

    POST /api/repos/create                                   create a repo (409 if it exists)
    POST /api/validate-yaml                                  README metadata check
    GET  /api/models/{repo}[/revision/{rev}]                 model info (sha, siblings)
    GET  /api/models/{repo}/tree/{rev}[/{path}]              file tree (recursive or not)
    POST /api/models/{repo}/preupload/{rev}                  upload mode of each file (regular or lfs)
    POST /{repo}.git/info/lfs/objects/batch                  LFS batch API (basic transfer)
    PUT  /lfs-objects/{oid}                                  LFS object upload (checked against its sha256)
    POST /api/models/{repo}/commit/{rev}                     ndjson commit (regular, lfs, deleted files; PRs)
    POST /api/models/{repo}/branch/{branch}                  create a branch
    HEAD/GET /{repo}/resolve/{rev}/{path}                    file metadata and download

Repos live in memory as commits (path -> blob); blob contents are files in a folder. Private repos answer 401
to requests without the owner's bearer token, like the Hub. Run it with `HubServer(folder)` as a context manager
and point `HF_ENDPOINT` at `server.url`. Requests are recorded in `server.requests` (method, path, headers).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png", ".h5", ".onnx", ".gguf")
LFS_MIN_SIZE = 10 * 1024 * 1024


@dataclass
class Blob:
    size: int
    sha256: str
    git_oid: str  # git blob sha1 of the content (regular files) or of the LFS pointer
    lfs: bool


@dataclass
class Commit:
    oid: str
    parent: Optional[str]
    message: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    private: bool
    token: Optional[str]
    branches: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    num_prs: int = 0


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubState:
    """Repos, commits and blobs; all methods hold one lock."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(os.path.join(folder, "blobs"), exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()

    def blob_path(self, sha256: str) -> str:
        return os.path.join(self.folder, "blobs", sha256)

    def store(self, content: bytes) -> str:
        sha = hashlib.sha256(content).hexdigest()
        with open(self.blob_path(sha), "wb") as handle:
            handle.write(content)
        return sha

    def new_commit(self, repo: Repo, parent: Optional[str], message: str, files: dict[str, Blob]) -> Commit:
        oid = hashlib.sha1(f"{repo.repo_id}{parent}{message}{time.time_ns()}{sorted(files)}".encode()).hexdigest()
        commit = Commit(oid=oid, parent=parent, message=message, files=files)
        repo.commits[oid] = commit
        return commit

    def resolve(self, repo: Repo, revision: str) -> Optional[Commit]:
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        return repo.commits.get(revision)


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    # ------------------------------------------------------------------ plumbing
    def log_message(self, format, *args):  # keep test output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: Optional[dict] = None, head: bool = False) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    def _error(
        self, status: int, message: str, code: Optional[str] = None, head: bool = False, headers: Optional[dict] = None
    ) -> None:
        extra = dict(headers or {})
        if code:
            extra["X-Error-Code"] = code
        extra["X-Error-Message"] = message
        self._json(status, {"error": message}, extra, head)

    def _token(self) -> Optional[str]:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def _repo(self, repo_id: str, head: bool = False, write: bool = False) -> Optional[Repo]:
        state = self.server.state
        repo = state.repos.get(repo_id)
        token = self._token()
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound", head)
            return None
        if (repo.private or write) and token != repo.token:
            self._error(401, "Invalid username or password.", "RepoNotFound", head)
            return None
        return repo

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        segments = [unquote(s) for s in parts.path.strip("/").split("/")] if parts.path.strip("/") else []
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.server.requests.append((method, parts.path, dict(self.headers)))
        with self.server.state.lock:
            try:
                self._route(method, segments, query)
            except (BrokenPipeError, ConnectionResetError):
                raise
            except Exception as err:  # report server bugs to the client instead of hanging
                self._error(500, f"test hub server error: {type(err).__name__}: {err}")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # ------------------------------------------------------------------ routes
    def _route(self, method: str, seg: list[str], query: dict) -> None:
        head = method == "HEAD"
        if method == "POST" and seg == ["api", "repos", "create"]:
            return self._create_repo(json.loads(self._body() or b"{}"))
        if method == "POST" and seg == ["api", "validate-yaml"]:
            self._body()
            return self._json(200, {"errors": [], "warnings": []})
        if method == "PUT" and len(seg) == 2 and seg[0] == "lfs-objects":
            return self._lfs_put(seg[1])
        if len(seg) >= 4 and seg[:2] == ["api", "models"]:
            repo_id, rest = f"{seg[2]}/{seg[3]}", seg[4:]
            if method == "GET" and not rest:
                return self._model_info(repo_id, "main")
            if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                return self._model_info(repo_id, rest[1])
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), query)
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(repo_id, rest[1], json.loads(self._body() or b"{}"))
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._commit(repo_id, rest[1], self._body(), query)
            if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                self._body()
                return self._create_branch(repo_id, rest[1])
        if (
            method == "POST"
            and len(seg) == 6
            and seg[1].endswith(".git")
            and seg[2:] == ["info", "lfs", "objects", "batch"]
        ):
            return self._lfs_batch(f"{seg[0]}/{seg[1][: -len('.git')]}", json.loads(self._body() or b"{}"))
        if method in ("GET", "HEAD") and len(seg) >= 5 and seg[2] == "resolve":
            return self._resolve(f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]), head)
        if method in ("POST", "PUT"):
            self._body()
        self._error(404, f"{method} {self.path} is not served by the test hub", head=head)

    def _create_repo(self, payload: dict) -> None:
        state = self.server.state
        token = self._token()
        if token is None:
            return self._error(401, "Invalid credentials in Authorization header")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        if repo_id in state.repos:  # the Hub's 409 still carries the repo's url
            return self._json(
                409, {"error": "You already created this model repo", "url": f"{self.server.url}/{repo_id}"}
            )
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_id=repo_id, private=private, token=token)
        attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        sha = state.store(attributes)
        files = {".gitattributes": Blob(len(attributes), sha, git_blob_oid(attributes), False)}
        repo.branches["main"] = state.new_commit(repo, None, "initial commit", files).oid
        state.repos[repo_id] = repo
        self._json(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        commit = self.server.state.resolve(repo, revision)
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        siblings = []
        for path, blob in sorted(commit.files.items()):
            entry = {"rfilename": path, "size": blob.size, "blobId": blob.git_oid}
            if blob.lfs:
                entry["lfs"] = {
                    "size": blob.size,
                    "sha256": blob.sha256,
                    "pointerSize": len(lfs_pointer(blob.sha256, blob.size)),
                }
            siblings.append(entry)
        self._json(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit.oid,
                "private": repo.private,
                "siblings": siblings,
                "tags": [],
                "lastModified": "2024-01-01T00:00:00.000Z",
            },
        )

    def _tree(self, repo_id: str, revision: str, path: str, query: dict) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        commit = self.server.state.resolve(repo, revision)
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        recursive = query.get("recursive", "false").lower() in ("1", "true")
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        entries, folders = [], set()
        for file_path, blob in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix) :]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if not recursive and len(parts) > 1:
                continue
            entry = {"type": "file", "oid": blob.git_oid, "size": blob.size, "path": file_path}
            if blob.lfs:
                entry["lfs"] = {
                    "oid": blob.sha256,
                    "size": blob.size,
                    "pointerSize": len(lfs_pointer(blob.sha256, blob.size)),
                }
            entries.append(entry)
        if prefix and not entries and not folders:
            return self._error(404, f"{path} not found", "EntryNotFound")
        entries += [
            {"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
            for f in sorted(folders)
        ]
        self._json(200, entries)

    def _preupload(self, repo_id: str, revision: str, payload: dict) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        commit = self.server.state.resolve(repo, revision)
        files = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item["size"])
            lfs = path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
            existing = commit.files.get(path) if commit is not None else None
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else existing.git_oid
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": files, "commitOid": commit.oid if commit else None})

    def _lfs_batch(self, repo_id: str, payload: dict) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not os.path.isfile(self.server.state.blob_path(oid)):
                entry["actions"] = {"upload": {"href": f"{self.server.url}/lfs-objects/{oid}", "header": {}}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, oid: str) -> None:
        content = self._body()
        if hashlib.sha256(content).hexdigest() != oid:
            return self._error(400, "LFS object does not match its oid")
        self.server.state.store(content)
        self.server.lfs_uploads.append(oid)
        self._send(200)

    def _commit(self, repo_id: str, revision: str, body: bytes, query: dict) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        state = self.server.state
        create_pr = query.get("create_pr") == "1"
        base_branch = "main" if create_pr else revision
        if base_branch not in repo.branches:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        parent = repo.commits[repo.branches[base_branch]]
        files = dict(parent.files)
        header = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                content = (
                    base64.b64decode(value["content"])
                    if value.get("encoding") == "base64"
                    else value["content"].encode()
                )
                sha = state.store(content)
                files[value["path"]] = Blob(len(content), sha, git_blob_oid(content), False)
            elif key == "lfsFile":
                if not os.path.isfile(state.blob_path(value["oid"])):
                    return self._error(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                pointer = lfs_pointer(value["oid"], int(value["size"]))
                files[value["path"]] = Blob(int(value["size"]), value["oid"], git_blob_oid(pointer), True)
            elif key == "deletedFile":
                if value["path"] not in files:
                    return self._error(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(prefix)}
            else:
                return self._error(400, f"unsupported commit operation {key!r}")
        commit = state.new_commit(repo, parent.oid, header.get("summary", ""), files)
        response = {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self.server.url}/{repo_id}/commit/{commit.oid}",
            "pullRequestUrl": None,
        }
        if create_pr:
            repo.num_prs += 1
            repo.branches[f"refs/pr/{repo.num_prs}"] = commit.oid
            response["pullRequestUrl"] = f"{self.server.url}/{repo_id}/discussions/{repo.num_prs}"
        else:
            repo.branches[revision] = commit.oid
        self.server.commits.append((repo_id, revision, header.get("summary", ""), sorted(files)))
        self._json(200, response)

    def _create_branch(self, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        if branch in repo.branches:
            return self._error(409, f"Branch {branch} already exists")
        repo.branches[branch] = repo.branches["main"]
        self._json(200, {})

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
        repo = self._repo(repo_id, head=head)
        if repo is None:
            return
        commit = self.server.state.resolve(repo, revision)
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head)
        blob = commit.files.get(path)
        if blob is None:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound", head, {"X-Repo-Commit": commit.oid})
        with open(self.server.state.blob_path(blob.sha256), "rb") as handle:
            content = handle.read()
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.git_oid}"', "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        if not head:
            self.server.downloads.append((repo_id, path))
        self._send(200, content, headers, head)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: str):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.state = HubState(folder)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests: list = []
        self.commits: list = []
        self.downloads: list = []
        self.lfs_uploads: list = []


class HubServer:
    """Context manager running the test hub in a background thread on an ephemeral loopback port."""

    def __init__(self, folder: str):
        self._server = _Server(folder)
        self._thread = threading.Thread(target=self._server.serve_forever, name="test-hub", daemon=True)

    @property
    def url(self) -> str:
        return self._server.url

    def __getattr__(self, name):
        return getattr(self._server, name)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        """Content of a file as the server holds it (for assertions)."""
        state = self._server.state
        repo = state.repos[repo_id]
        blob = state.resolve(repo, revision).files[path]
        with open(state.blob_path(blob.sha256), "rb") as handle:
            return handle.read()

    def files(self, repo_id: str, revision: str = "main") -> list[str]:
        state = self._server.state
        return sorted(state.resolve(state.repos[repo_id], revision).files)
