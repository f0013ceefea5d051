"""Hostile Hub repositories and the token's destination, tried as an attacker would.

A forged commit's id is the correct hash of its record (kedit's own `record_id`), so the hash
check passes: only the name grammar (kedit/core/names.py) stands between the record and a file
written outside the repository. Every refusal must be one line, and nothing may be written:
no PWNED file, no clone folder, the existing repository's refs, objects and history unchanged.

The token tests run a second Hub server on another port and read the Authorization header of
every request it received.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import CommitOperationAdd, HfApi
from safetensors.torch import save

from kedit.cli import cli
from kedit.core.hashing import hash_bytes, record_id, tensors_object_id
from kedit.core.repo import Repository
from kedit.core.tensors import hash_tensor
from kedit.hub.layout import REFS_FILE, commit_path, document_bytes, object_path, shard_of
from tests.helpers_engine import snapshot
from tests.hubserver import HubServer
from tests.jsondoc import doc
from tests.test_hub import DOWN0, REPO_ID, TOKEN, URL, edit, hub, origin  # noqa: F401 - fixtures

OTHER_TOKEN = "hf_other_host_token_9876543210fedcba"


def run(where: Path, *args: str, code: int = 0) -> str:
    """The command's stdout (stderr when it fails); neither token may appear in either."""
    result = CliRunner().invoke(cli, ["--repo", str(where), *args])
    out = result.stdout + result.stderr
    assert result.exit_code == code, out
    assert "Traceback" not in out and TOKEN not in out and OTHER_TOKEN not in out
    return result.stdout if code == 0 else result.stderr


HOSTILE = ["file-climbs-out", "file-absolute", "file-backslash", "tensor-climbs-out", "tensor-absolute",
           "adapter-climbs-out", "duplicate-file", "duplicate-tensor"]


def _upload(server: HubServer, files: dict[str, bytes]) -> None:
    HfApi(endpoint=server.url, token=TOKEN).create_commit(
        REPO_ID, [CommitOperationAdd(p, data) for p, data in files.items()], commit_message="evil")


def _tensor_object(value: torch.Tensor, metadata: dict[str, str] | None = None) -> tuple[str, bytes]:
    metadata = metadata or {}
    oid = tensors_object_id({"value": hash_tensor(value)}, metadata)
    return oid, save({"value": value}, metadata=metadata or None)


def forge(server: HubServer, tip: str, kind: str, target: Path) -> None:
    """Put on the Hub's main branch a child of `tip` whose record names `target` in the way
    `kind` says, with a correct id, the objects it needs, and refs.json pointing at it."""
    climb = "../" * 24 + str(target).lstrip("/")
    record: dict = {"kind": "edit", "parents": [tip], "method": "rome", "hparams": {}, "requests": [],
                    "message": "innocent", "tensors": {}, "adapters": [], "files": {},
                    "author": "mallory", "created": "2026-12-01T00:00:00+00:00", "kedit_version": "0"}
    changes, adapter_ops, uploads = [], [], {}
    blob = b"PWNED\n"
    blob_id = hash_bytes(blob)
    uploads[object_path(blob_id, "blob")] = blob
    value = torch.ones(2, 2)
    value_id, value_bytes = _tensor_object(value)
    uploads[object_path(value_id, "st")] = value_bytes
    if kind.startswith(("file", "duplicate-file")):
        name = {"file-climbs-out": climb, "file-absolute": str(target),
                "file-backslash": "..\\..\\PWNED", "duplicate-file": "config.json"}[kind]
        record["files"] = {name: blob_id}
    elif kind.startswith("tensor") or kind == "duplicate-tensor":
        name = {"tensor-climbs-out": climb, "tensor-absolute": str(target),
                "duplicate-tensor": "model.norm.weight"}[kind]
        record["tensors"] = {name: {"source": None, "steps": [["", value_id, "exact"]], "hash": hash_tensor(value)}}
    else:  # the adapter's kind names its exported file: kedit_adapters/0000-<kind>.safetensors
        adapter_kind = climb
        oid, data = _tensor_object(value, {"kind": adapter_kind, "config": "{}"})
        uploads[object_path(oid, "st")] = data
        record["adapters"] = [["add", oid, adapter_kind, ""]]
    cid = record_id(record)
    for name, t in record["tensors"].items():
        change = {"name": name, "source": None, "hash": t["hash"], "dtype": "F32", "shape": [2, 2],
                  "encoding": "exact", "rank": None, "norm": None, "rel": None, "stored": len(value_bytes),
                  "steps": [[cid, value_id, "exact"]]}
        changes += [change, change] if kind == "duplicate-tensor" else [change]
    adapter_ops = [[op, oid, k, cid] for op, oid, k, _ in record["adapters"]]
    doc = {"format": 1, "id": cid, "parent": tip, "record": json.dumps(record), "method": "rome", "hparams": {},
           "requests": [], "info": {}, "changes": changes, "adapter_ops": adapter_ops, "files": record["files"],
           "metrics": [], "memory": None}
    text = document_bytes(doc)
    if kind == "duplicate-file":  # JSON that says config.json twice: a plain parser keeps the last
        other = hash_bytes(b"{}")
        uploads[object_path(other, "blob")] = b"{}"
        text = text.replace(b'"config.json": ', f'"config.json": "{other}", "config.json": '.encode())
    uploads[commit_path(cid)] = text
    uploads[REFS_FILE] = json.dumps({"format": 1, "branch": "main", "commit": cid, "checkpoint": tip,
                                     "push_id": "f" * 16}).encode()
    _upload(server, uploads)


def _nothing_outside(tmp_path: Path, target: Path) -> None:
    assert not list(target.parent.glob("PWNED*")), "the attacker's file was written"
    assert not list(tmp_path.rglob("PWNED*")), "the attacker's file was written"


@pytest.fixture
def pushed(origin: Repository, hub: HubServer) -> Repository:  # noqa: F811 - the fixtures above
    run(origin.root, "push")
    return origin


@pytest.mark.parametrize("kind", HOSTILE)
def test_clone_refuses_a_hostile_repository_and_writes_nothing(pushed: Repository, hub: HubServer,  # noqa: F811
                                                               tmp_path: Path, kind: str) -> None:
    target = tmp_path / "outside" / "PWNED"
    target.parent.mkdir()
    forge(hub, pushed.head(), kind, target)
    err = run(tmp_path, "clone", URL, str(tmp_path / "copy"), code=1)
    assert err.count("\n") == 1 and err.startswith("kedit: error:"), err
    assert "nothing was changed" in err
    assert not (tmp_path / "copy").exists()
    _nothing_outside(tmp_path, target)


@pytest.mark.parametrize("command", ["fetch", "pull"])
@pytest.mark.parametrize("kind", HOSTILE)
def test_fetch_and_pull_refuse_a_hostile_repository_and_change_nothing(
        pushed: Repository, hub: HubServer, tmp_path: Path, kind: str, command: str) -> None:  # noqa: F811
    target = tmp_path / "outside" / "PWNED"
    target.parent.mkdir()
    before = snapshot(pushed)
    worktree = {p.name: p.stat().st_mtime_ns for p in (pushed.path / "worktree").iterdir()}
    forge(hub, pushed.head(), kind, target)
    err = run(pushed.root, command, code=1)
    assert err.count("\n") == 1 and "nothing was changed" in err, err
    assert snapshot(pushed) == before
    assert {p.name: p.stat().st_mtime_ns for p in (pushed.path / "worktree").iterdir()} == worktree
    _nothing_outside(tmp_path, target)


def test_a_hostile_repository_is_named_in_the_refusal(pushed: Repository, hub: HubServer,  # noqa: F811
                                                      tmp_path: Path) -> None:
    forge(hub, pushed.head(), "file-climbs-out", tmp_path / "PWNED")
    err = run(tmp_path, "clone", URL, str(tmp_path / "copy"), code=1)
    assert f"refused {REPO_ID}" in err and "unsafe file name" in err and "climbs out" in err


# -- the token goes only to its origin ------------------------------------------------------


@pytest.fixture
def other(tmp_path: Path):
    """A second Hub on another port of 127.0.0.1, holding bob/repo; its token is OTHER_TOKEN."""
    server = HubServer(tmp_path / "other-hub", {OTHER_TOKEN: "bob"}).start()
    server.store.create_repo("bob/repo")
    yield server
    server.stop()


def _sent(server: HubServer, since: int = 0) -> set[str | None]:
    """The Authorization headers the server received since request `since` (LFS uploads go to a
    pre-signed URL, to which huggingface_hub sends no token on any host: left out)."""
    pairs = zip(server.requests[since:], server.authorizations[since:], strict=True)
    return {auth for (_method, path), auth in pairs if not path.startswith("/lfs-upload/")}


def test_hf_token_goes_only_to_hf_endpoint(origin: Repository, hub: HubServer, other: HubServer,  # noqa: F811
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"{other.url}/bob/repo"
    run(origin.root, "remote", "add", "other", url)
    err = run(origin.root, "push", "other", code=1)  # HF_TOKEN is set, but not for this host
    assert "asks for a token and none is set" in err and "--token-env" in err
    assert other.authorizations and _sent(other) == {None}

    monkeypatch.setenv("OTHER_HOST_TOKEN", OTHER_TOKEN)
    run(origin.root, "remote", "remove", "other")
    run(origin.root, "remote", "add", "other", url, "--token-env", "OTHER_HOST_TOKEN")
    seen = len(other.authorizations)
    run(origin.root, "push", "other")
    assert _sent(other, seen) == {f"Bearer {OTHER_TOKEN}"}  # that variable's token, and only it

    seen = len(other.authorizations)
    run(tmp_path, "clone", url, str(tmp_path / "copy"))  # a public read: no remote names a token
    run(tmp_path / "copy", "fetch")
    run(tmp_path / "copy", "pull")
    assert _sent(other, seen) == {None}
    monkeypatch.delenv("OTHER_HOST_TOKEN")
    edit(origin, DOWN0, "third", 3)
    err = run(origin.root, "push", "other", code=1)  # the named variable is unset: no fallback to HF_TOKEN
    assert "$OTHER_HOST_TOKEN" in err and _sent(other) <= {None, f"Bearer {OTHER_TOKEN}"}

    run(origin.root, "remote", "add", "hubremote", URL)
    seen = len(hub.authorizations)
    run(origin.root, "push", "hubremote")
    assert _sent(hub, seen) == {f"Bearer {TOKEN}"}  # HF_ENDPOINT's host still gets HF_TOKEN

    for root in (origin.path, tmp_path / "copy" / ".kedit"):
        for file in root.rglob("*"):
            data = file.read_bytes() if file.is_file() else b""
            assert TOKEN.encode() not in data and OTHER_TOKEN.encode() not in data, file


def test_clone_token_env_sends_that_token(origin: Repository, other: HubServer, hub: HubServer,  # noqa: F811
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTHER_HOST_TOKEN", OTHER_TOKEN)
    url = f"{other.url}/bob/repo"
    run(origin.root, "remote", "add", "other", url, "--token-env", "OTHER_HOST_TOKEN")
    run(origin.root, "push", "other")
    seen = len(other.authorizations)
    out = run(tmp_path, "clone", url, str(tmp_path / "copy"), "--token-env", "OTHER_HOST_TOKEN")
    assert "cloned" in out and _sent(other, seen) == {f"Bearer {OTHER_TOKEN}"}
    remotes = doc(run(tmp_path / "copy", "remote", "list", "--json"))["remotes"]
    assert remotes[0]["token_env"] == "OTHER_HOST_TOKEN"


@pytest.mark.parametrize("url", ["http://example.com/bob/repo", "http://10.0.0.7:8080/bob/repo",
                                 "http://[2001:db8::1]/bob/repo"])
def test_plain_http_is_refused_except_to_loopback(repo: Repository, tmp_path: Path, url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    err = run(repo.root, "remote", "add", "x", url, code=1)
    assert "plain http" in err and err.count("\n") == 1
    err = run(tmp_path, "clone", url, str(tmp_path / "x"), code=1)
    assert "plain http" in err and not (tmp_path / "x").exists()
    run(repo.root, "remote", "add", "viaendpoint", "hf://bob/repo")  # the endpoint is read when it is used
    monkeypatch.setenv("HF_ENDPOINT", url.rsplit("/", 2)[0])
    err = run(repo.root, "fetch", "viaendpoint", code=1)
    assert "plain http" in err and err.count("\n") == 1
    for i, ok in enumerate(("http://127.0.0.1:9/bob/repo", "http://localhost:9/bob/repo", "http://[::1]:9/bob/repo")):
        run(repo.root, "remote", "add", f"loopback{i}", ok)


def test_token_env_takes_a_variable_name_not_a_token(repo: Repository) -> None:
    err = run(repo.root, "remote", "add", "x", "https://hub.example.org/bob/repo", "--token-env", TOKEN, code=1)
    assert "NAME of an environment variable" in err and TOKEN not in err
    assert doc(run(repo.root, "remote", "list", "--json")) == {"remotes": []}


@pytest.mark.parametrize("branch", ["60BC4E6E", "refs/heads/x"])
def test_a_hub_branch_named_to_shadow_a_commit_is_refused(pushed: Repository, hub: HubServer,  # noqa: F811
                                                          tmp_path: Path, branch: str) -> None:
    HfApi(endpoint=hub.url, token=TOKEN).create_branch(REPO_ID, branch=branch)  # a copy of main, refs.json too
    before = snapshot(pushed)
    for where, args in ((tmp_path, ("clone", URL, str(tmp_path / "copy"))), (pushed.root, ("fetch",))):
        err = run(where, *args, code=1)
        assert err.count("\n") == 1 and "invalid remote branch name" in err and "nothing was changed" in err, err
    assert not (tmp_path / "copy").exists() and snapshot(pushed) == before
    err = run(pushed.root, "push", "--to", branch, code=1)
    assert "invalid remote branch name" in err and err.count("\n") == 1


# -- the weights' index is checked with the rest ------------------------------------------


@pytest.mark.parametrize("shard", ["../" * 12 + "PWNED.safetensors", "/tmp/PWNED.safetensors",
                                   "sub/../../PWNED.safetensors", "..\\PWNED.safetensors"])
def test_a_hostile_shard_name_in_the_index_refuses_the_clone_before_any_object_is_fetched(
        pushed: Repository, hub: HubServer, tmp_path: Path, shard: str) -> None:  # noqa: F811
    """The remote's model.safetensors.index.json names the shard each base tensor is read from:
    a hostile name is refused with the commit records, before a single object is downloaded."""
    index = {"metadata": {}, "weight_map": {name: shard_of(name) for name in pushed.manifest()}}
    index["weight_map"][DOWN0] = shard
    _upload(hub, {"model.safetensors.index.json": json.dumps(index).encode()})
    since = len(hub.requests)
    err = run(tmp_path, "clone", URL, str(tmp_path / "copy"), code=1)
    assert err.count("\n") == 1 and "unsafe shard name" in err and "nothing was changed" in err, err
    fetched = [path for _method, path in hub.requests[since:] if "/resolve/" in path]
    assert fetched and not [p for p in fetched if "/objects/" in p or p.endswith(".safetensors")], fetched
    assert not (tmp_path / "copy").exists()
    assert not list(tmp_path.rglob("PWNED*"))
