"""A real HTTP server on 127.0.0.1 speaking the part of the Hugging Face Hub protocol that
`huggingface_hub`'s HfApi uses to create repos, push commits (preupload, LFS batch, upload and
verify, the ndjson commit with `parentCommit`), manage branches, list trees and paths, and
resolve files. The unmodified client talks to it over sockets (run it with HF_HUB_DISABLE_XET=1,
so uploads take the LFS path).

Storage is plain folders, so a stopped server restarted on the same root has the same state:
    lfs/<sha256>                       LFS objects, checked against their sha256 on upload
    blobs/<git sha1>                   regular files
    repos/<owner>/<name>/refs.json     {"branches": {name: commit sha}}
    repos/<owner>/<name>/commits/<sha>.json  {"parent", "message", "tree": {path: entry}}

Errors follow the real Hub: 401 "Invalid credentials in Authorization header", 404 with
X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound, and 412 "A commit has happened
since. Please refresh and try again." when `parentCommit` is not the branch tip.

`crash_on_commit = "before" | "after"` makes the next commit request drop its connection and stop
the server, before or after the commit is applied: a server that dies mid-push. `reject_commit`
(a message) refuses commits with 400, as the Hub's own checks do (file too large, bad metadata).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf", "*.st", "*.h5", "*.onnx", "*.msgpack", "*.zst")
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files above 10 MB in LFS
PAGE_SIZE = 50  # small, so that tests exercise the client's pagination
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class HubStore:
    """Repositories as folders; every branch move happens under one lock."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        (root / "lfs").mkdir(parents=True, exist_ok=True)
        (root / "blobs").mkdir(parents=True, exist_ok=True)

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / "repos" / repo_id

    def exists(self, repo_id: str) -> bool:
        return (self.repo_dir(repo_id) / "refs.json").exists()

    def refs(self, repo_id: str) -> dict[str, str]:
        if not self.exists(repo_id):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return json.loads((self.repo_dir(repo_id) / "refs.json").read_text())["branches"]

    def _set_refs(self, repo_id: str, branches: dict[str, str]) -> None:
        _write_atomic(self.repo_dir(repo_id) / "refs.json", json.dumps({"branches": branches}).encode())

    def commit_record(self, repo_id: str, sha: str) -> dict:
        path = self.repo_dir(repo_id) / "commits" / f"{sha}.json"
        if not path.exists():
            raise HubError(404, f"Invalid rev id: {sha}", "RevisionNotFound")
        return json.loads(path.read_text())

    def resolve(self, repo_id: str, rev: str) -> str:
        branches = self.refs(repo_id)
        if rev in branches:
            return branches[rev]
        found = [p.stem for p in (self.repo_dir(repo_id) / "commits").glob(f"{rev}*.json")] if len(rev) >= 5 else []
        if len(found) == 1:
            return found[0]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def tree(self, repo_id: str, rev: str) -> tuple[str, dict[str, dict]]:
        sha = self.resolve(repo_id, rev)
        return sha, self.commit_record(repo_id, sha)["tree"]

    def read(self, entry: dict) -> bytes:
        if entry["lfs"]:
            return (self.root / "lfs" / entry["lfs"]["oid"]).read_bytes()
        return (self.root / "blobs" / entry["oid"]).read_bytes()

    def _new_commit(self, repo_id: str, parent: str | None, tree: dict, message: str) -> str:
        record = {"parent": parent, "message": message, "tree": tree, "date": time.time(),
                  "nonce": secrets.token_hex(8)}
        data = json.dumps(record, sort_keys=True).encode()
        sha = hashlib.sha1(data).hexdigest()
        _write_atomic(self.repo_dir(repo_id) / "commits" / f"{sha}.json", data)
        return sha

    def create_repo(self, repo_id: str) -> None:
        with self.lock:
            if self.exists(repo_id):
                raise HubError(409, "You already created this model repo")
            tree = {".gitattributes": self.put_regular(GITATTRIBUTES)}
            sha = self._new_commit(repo_id, None, tree, "initial commit")
            self._set_refs(repo_id, {"main": sha})

    def put_regular(self, data: bytes) -> dict:
        oid = git_blob_sha1(data)
        path = self.root / "blobs" / oid
        if not path.exists():
            _write_atomic(path, data)
        return {"oid": oid, "size": len(data), "lfs": None}

    def lfs_entry(self, oid: str, size: int) -> dict:
        path = self.root / "lfs" / oid
        if not path.exists() or path.stat().st_size != size:
            raise HubError(400, f"Your push was rejected because an LFS pointer pointed to a file that does "
                                f"not exist ({oid})")
        pointer = _lfs_pointer(oid, size)
        return {"oid": git_blob_sha1(pointer), "size": size, "lfs": {"oid": oid, "size": size,
                                                                    "pointerSize": len(pointer)}}

    def commit(self, repo_id: str, branch: str, parent: str | None, message: str,
               apply: Any) -> str:
        with self.lock:
            branches = self.refs(repo_id)
            if branch not in branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            tip = branches[branch]
            if parent is not None and not tip.startswith(parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(self.commit_record(repo_id, tip)["tree"])
            apply(tree)
            sha = self._new_commit(repo_id, tip, tree, message)
            branches[branch] = sha
            self._set_refs(repo_id, branches)
            return sha

    def create_branch(self, repo_id: str, branch: str, start: str | None) -> None:
        with self.lock:
            branches = self.refs(repo_id)
            if branch in branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            branches[branch] = self.resolve(repo_id, start or "main")
            self._set_refs(repo_id, branches)

    def delete_branch(self, repo_id: str, branch: str) -> None:
        with self.lock:
            branches = self.refs(repo_id)
            if branch not in branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            del branches[branch]
            self._set_refs(repo_id, branches)


def _lfs_mode(store: HubStore, tree: dict, path: str, size: int, sample: bytes) -> bool:
    """LFS for files matching .gitattributes' LFS patterns, binary files, and files above 10 MB."""
    patterns = LFS_PATTERNS
    if ".gitattributes" in tree:
        text = store.read(tree[".gitattributes"]).decode(errors="replace")
        patterns = tuple(line.split()[0] for line in text.splitlines() if "filter=lfs" in line) or LFS_PATTERNS
    name = path.rsplit("/", 1)[-1]
    return size >= LFS_THRESHOLD or b"\0" in sample or any(fnmatch.fnmatch(name, p) for p in patterns)


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, format: str, *args: Any) -> None:
        return

    # -- plumbing --------------------------------------------------------------------------

    def _body(self) -> bytes:
        return b"".join(self._body_chunks())

    def _body_chunks(self, piece: int = 1 << 20) -> Iterator[bytes]:
        """The request body, a piece at a time (chunked or with a Content-Length)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            chunk = self.rfile.read(min(left, piece))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(value).encode(), headers)

    def _error(self, e: HubError) -> None:
        # A refused request's body may be unread: close the connection, or it would be read as the next request.
        self.close_connection = True
        headers = {"X-Error-Message": e.message, "Connection": "close"}
        if e.code:
            headers["X-Error-Code"] = e.code
        self._json({"error": e.message}, e.status, headers)

    def _user(self, write: bool) -> str | None:
        auth = self.headers.get("Authorization")
        if auth is None:
            if write:
                raise HubError(401, "You must be authenticated to write")
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.server.tokens.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.server.requests.append((self.command, url.path))
        self.server.authorizations.append(self.headers.get("Authorization"))
        try:
            self._route(parts, query)
        except HubError as e:
            self._error(e)
        except _Dropped:
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _dispatch

    # -- routes ----------------------------------------------------------------------------

    def _route(self, parts: list[str], query: dict[str, str]) -> None:
        store = self.server.store
        if parts[:3] == ["api", "repos", "create"] and self.command == "POST":
            self._user(write=True)
            body = json.loads(self._body())
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            store.create_repo(repo_id)
            return self._json({"url": f"{self.server.url}/{repo_id}", "name": repo_id, "id": repo_id})
        if parts[:2] == ["api", "validate-yaml"]:
            return self._validate_yaml()
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self._api_model(f"{parts[2]}/{parts[3]}", parts[4:], query)
        if len(parts) >= 3 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
            return self._lfs(f"{parts[0]}/{parts[1][:-4]}", parts[5:])
        if parts[:1] == ["lfs-upload"] and self.command == "PUT":
            return self._lfs_upload(parts[1], int(query["size"]))
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise HubError(404, f"no route for {self.command} {self.path}")

    def _validate_yaml(self) -> None:
        body = json.loads(self._body())
        content = body.get("content", "")
        errors = []
        if content.startswith("---"):
            try:
                meta = yaml.safe_load(content.split("---", 2)[1])
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        return self._json({"errors": errors, "warnings": []}, 400 if errors else 200)

    def _api_model(self, repo_id: str, rest: list[str], query: dict[str, str]) -> None:
        store = self.server.store
        write = self.command in ("POST", "PUT", "DELETE") and rest[:1] not in (["paths-info"],)
        self._user(write=write)
        if not store.exists(repo_id):
            raise HubError(404, "Repository not found", "RepoNotFound")
        kind = rest[0] if rest else ""
        if kind == "refs":
            branches = store.refs(repo_id)
            return self._json({"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                                            for b, s in sorted(branches.items())], "tags": [], "converts": []})
        if kind in ("", "revision"):
            sha, tree = store.tree(repo_id, rest[1] if len(rest) > 1 else "main")
            return self._json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                               "siblings": [{"rfilename": p} for p in sorted(tree)]})
        if kind == "branch":
            if self.command == "DELETE":
                store.delete_branch(repo_id, rest[1])
                return self._json({})
            body = json.loads(self._body() or b"{}")
            store.create_branch(repo_id, rest[1], body.get("startingPoint"))
            return self._json({})
        if kind == "tree":
            return self._tree(repo_id, rest[1], "/".join(rest[2:]), query)
        if kind == "paths-info":
            return self._paths_info(repo_id, rest[1])
        if kind == "preupload":
            return self._preupload(repo_id, rest[1])
        if kind == "commit":
            return self._commit(repo_id, rest[1])
        raise HubError(404, f"no route for {self.command} {self.path}")

    def _entry_json(self, path: str, entry: dict) -> dict:
        out = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry["lfs"]:
            out["lfs"] = entry["lfs"]
        return out

    def _tree(self, repo_id: str, rev: str, prefix: str, query: dict[str, str]) -> None:
        sha, tree = self.server.store.tree(repo_id, rev)
        recursive = query.get("recursive", "false").lower() == "true"
        prefix = prefix.strip("/")
        base = prefix + "/" if prefix else ""
        if prefix and prefix not in tree and not any(p.startswith(base) for p in tree):
            raise HubError(404, f"{prefix} does not exist on {rev}", "EntryNotFound")
        items: dict[str, dict] = {}
        for path, entry in tree.items():
            if not path.startswith(base):
                continue
            rel = path[len(base):].split("/")
            if recursive:
                for i in range(1, len(rel)):
                    folder = base + "/".join(rel[:i])
                    items.setdefault(folder, {"type": "directory", "oid": sha, "path": folder})
                items[path] = self._entry_json(path, entry)
            elif len(rel) == 1:
                items[path] = self._entry_json(path, entry)
            else:
                items.setdefault(base + rel[0], {"type": "directory", "oid": sha, "path": base + rel[0]})
        listing = [items[k] for k in sorted(items)]
        start = int(query.get("cursor", "0"))
        page = listing[start:start + PAGE_SIZE]
        headers = {}
        if start + PAGE_SIZE < len(listing):
            nxt = (f"{self.server.url}/api/models/{repo_id}/tree/{quote(rev, safe='')}/{quote(prefix)}"
                   f"?recursive={str(recursive).lower()}&cursor={start + PAGE_SIZE}")
            headers["Link"] = f'<{nxt}>; rel="next"'
        return self._json(page, headers=headers)

    def _paths_info(self, repo_id: str, rev: str) -> None:
        raw = self._body()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(raw)["paths"]
        else:
            paths = parse_qs(raw.decode()).get("paths", [])
        _, tree = self.server.store.tree(repo_id, rev)
        out = []
        for p in paths:
            p = p.strip("/")
            if p in tree:
                out.append(self._entry_json(p, tree[p]))
            elif any(q.startswith(p + "/") for q in tree):
                out.append({"type": "directory", "oid": "0" * 40, "path": p})
        return self._json(out)

    def _preupload(self, repo_id: str, rev: str) -> None:
        self._user(write=True)
        body = json.loads(self._body())
        store = self.server.store
        _, tree = store.tree(repo_id, rev)
        files = []
        for f in body["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = _lfs_mode(store, tree, f["path"], f["size"], sample)
            entry = tree.get(f["path"])
            oid = None
            if entry is not None:
                oid = entry["lfs"]["oid"] if entry["lfs"] else entry["oid"]
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        return self._json({"files": files})

    def _lfs(self, repo_id: str, rest: list[str]) -> None:
        self._user(write=True)
        if not self.server.store.exists(repo_id):
            raise HubError(404, "Repository not found", "RepoNotFound")
        body = json.loads(self._body())
        if rest == ["verify"]:
            path = self.server.store.root / "lfs" / body["oid"]
            if not path.exists() or path.stat().st_size != body["size"]:
                raise HubError(404, "object not found")
            return self._json({})
        objects = []
        for obj in body["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not (self.server.store.root / "lfs" / obj["oid"]).exists():
                item["actions"] = {
                    "upload": {"href": f"{self.server.url}/lfs-upload/{obj['oid']}?size={obj['size']}"},
                    "verify": {"href": f"{self.server.url}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(item)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, oid: str, size: int) -> None:
        """The body goes to disk as it arrives, hashed on the way (as a real store streams it), in
        64 KB pieces: larger writes cost this machine's kernel several times more (kedit's
        `PieceWriter`), and a real Hub's disks are not on the pushing machine."""
        path = self.server.store.root / "lfs" / oid
        tmp = path.with_name(f".{oid}.{secrets.token_hex(4)}")
        digest, got = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as f:
                for chunk in self._body_chunks(piece=1 << 16):
                    digest.update(chunk)
                    f.write(chunk)
                    got += len(chunk)
            if got != size or digest.hexdigest() != oid:
                raise HubError(400, "uploaded content does not match its sha256")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.server.uploaded_bytes += got
        return self._send(200)

    def _commit(self, repo_id: str, rev: str) -> None:
        self._user(write=True)
        raw = self._body()
        lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        store = self.server.store
        crash = self.server.crash_on_commit
        if crash == "before":
            self.server.drop()
            raise _Dropped
        if self.server.reject_commit:
            raise HubError(400, self.server.reject_commit)

        def apply(tree: dict) -> None:
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    tree[value["path"]] = store.put_regular(data)
                    self.server.uploaded_bytes += len(data)
                elif key == "lfsFile":
                    tree[value["path"]] = store.lfs_entry(value["oid"], value["size"])
                elif key == "deletedFile":
                    if value["path"] not in tree:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del tree[value["path"]]
                elif key == "deletedFolder":
                    for p in [p for p in tree if p.startswith(value["path"].rstrip("/") + "/")]:
                        del tree[p]

        sha = store.commit(repo_id, rev, header.get("parentCommit"), header.get("summary", ""), apply)
        if crash == "after":
            self.server.drop()
            raise _Dropped
        return self._json({"success": True, "commitOid": sha, "commitUrl": f"{self.server.url}/{repo_id}/commit/{sha}",
                           "hookOutput": "", "pullRequestUrl": None})

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        self._user(write=False)
        sha, tree = self.server.store.tree(repo_id, rev)
        entry = tree.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        etag = entry["lfs"]["oid"] if entry["lfs"] else entry["oid"]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"'}
        if not entry["lfs"]:
            return self._send(200, self.server.store.read(entry), headers, content_type="application/octet-stream")
        headers["X-Linked-Etag"] = f'"{etag}"'
        headers["X-Linked-Size"] = str(entry["size"])
        with open(self.server.store.root / "lfs" / entry["lfs"]["oid"], "rb") as f:  # sent from the file
            size = os.fstat(f.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.connection.sendfile(f)


class _Dropped(Exception):
    """The handler drops its connection without answering (the server is going down)."""


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: Path, tokens: dict[str, str], port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), HubHandler)
        self.store = HubStore(root)
        self.tokens = tokens
        self.crash_on_commit: str | None = None
        self.reject_commit: str | None = None  # a message: commits are refused with 400, as the Hub's checks do
        self.uploaded_bytes = 0
        self.requests: list[tuple[str, str]] = []
        self.authorizations: list[str | None] = []  # each request's Authorization header, in order
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def drop(self) -> None:
        """Stop accepting connections now (called from a handler: shutdown runs in another thread)."""
        self.crash_on_commit = None
        self.socket.close()
        threading.Thread(target=self.shutdown, daemon=True).start()
