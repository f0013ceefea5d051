"""push / clone / pull / fetch against a real HTTP server speaking the Hub protocol (tests/hubserver.py).

The unmodified huggingface_hub client talks to it over sockets, with HF_HUB_DISABLE_XET so that
uploads take the LFS path. Nothing is mocked: a push really uploads, a clone really downloads
and verifies, and the server really refuses a stale parent_commit with the Hub's 412.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import torch
from click.testing import CliRunner

from kedit.cli import cli
from kedit.core.delta import LowRank
from kedit.core.repo import Metric, Repository
from tests.helpers_engine import snapshot
from tests.hubserver import HubServer
from tests.jsondoc import doc
from tests.test_cli_grace import FRANCE as GRACE_EDIT
from tests.test_cli_grace import PROMPTS, TARGETS
from tests.tiny import perturbed_release

TOKEN = "hf_kedit_test_token_0123456789abcdef"
REPO_ID = "alice/tiny-edits"
URL = f"hf://{REPO_ID}"
DOWN0 = "model.layers.0.mlp.down_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
GRACE_PROMPT, GRACE_TARGET = PROMPTS[0], TARGETS[0]


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A running local Hub with one empty repository, and the environment pointing at it."""
    # conftest sets HF_HUB_OFFLINE=1 for every test; these tests talk to 127.0.0.1 on purpose.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    server = HubServer(tmp_path / "hub", {TOKEN: "alice"}).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    server.store.create_repo(REPO_ID)
    yield server
    server.stop()


def restart(server: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """A new server process-alike on the same storage (the old one was stopped)."""
    new = HubServer(server.store.root, server.tokens).start()
    monkeypatch.setenv("HF_ENDPOINT", new.url)
    return new


def run(where: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, ["--repo", str(where), *args])
    out = result.stdout + result.stderr
    assert result.exit_code == code, out
    assert "Traceback" not in out and TOKEN not in out
    return result.stdout if code == 0 else result.stderr


def edit(repo: Repository, name: str, message: str, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    rows, cols = repo.manifest()[name].shape
    delta = LowRank(torch.randn(rows, 1, generator=g) * 0.1, torch.randn(1, cols, generator=g) * 0.1)
    metrics = [Metric("reliability", 1.0, "teacher_forced_token_acc"),
               Metric("locality", 0.9, "teacher_forced_agreement")]
    return repo.commit({name: delta}, method="rome", message=message, metrics=metrics,
                       requests=[{"prompt": "{} is in", "subject": message, "target_new": "Rome"}]).id


def export_hashes(where: Path, rev: str, out: Path) -> dict:
    run(where, "export", rev, str(out))
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}
    return {"kedit": json.loads((out / "kedit.json").read_text()), "files": files}


def log_json(where: Path, rev: str = "HEAD") -> list[dict]:
    return [{k: c[k] for k in ("id", "parents", "kind", "method", "message", "requests")}
            | {"metrics": [{k: v for k, v in m.items() if k != "source"} for m in c["metrics"]]}  # fetched: 'origin'
            for c in doc(run(where, "log", rev, "--json"))["commits"]]


@pytest.fixture
def origin(repo: Repository) -> Repository:
    """The tiny Llama repository with two edits and a remote named origin."""
    edit(repo, DOWN0, "first", 1)
    edit(repo, DOWN1, "second", 2)
    run(repo.root, "remote", "add", "origin", URL)
    return repo


def test_push_clone_gives_the_same_log_and_export_hashes(origin: Repository, hub: HubServer, tmp_path: Path) -> None:
    out = doc(run(origin.root, "push", "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--json"))
    assert out["commit"] == origin.head() and not out["up_to_date"]
    assert "model-layer-000.safetensors" in out["files"] and ".kedit/refs.json" in out["files"]
    assert "cloned" in run(tmp_path, "clone", URL, str(tmp_path / "copy"))
    copy = Repository.open(tmp_path / "copy")
    assert log_json(copy.root) == log_json(origin.root)
    for rev in [c.id for c in origin.log()]:
        assert export_hashes(copy.root, rev, tmp_path / f"c-{rev}") == export_hashes(origin.root, rev,
                                                                                    tmp_path / f"o-{rev}")
    assert run(copy.root, "fsck").strip().endswith(": ok")
    assert not copy.status()["modified"] and copy.worktree.commit == origin.head()
    assert copy.head_branch() == "main" and copy.refs.deref("refs/remotes/origin/main") == origin.head()
    # The Hub side: the card (base model, history table, eval results) and the refs file.
    tree = hub.store.tree(REPO_ID, "main")[1]
    card = hub.store.read(tree["README.md"]).decode()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "base_model_relation: finetune" in card
    assert f"| `{origin.head()[:12]}` | edit | rome | second | locality 0.900, reliability 1.000 |" in card
    assert "model-index" in card and "reliability (teacher_forced_token_acc)" in card
    refs = json.loads(hub.store.read(tree[".kedit/refs.json"]))
    assert refs["commit"] == origin.head() == refs["checkpoint"]
    assert doc(run(origin.root, "push", "--json"))["up_to_date"]


def test_a_bare_clone_writes_no_working_model_and_exports_the_same(origin: Repository, hub: HubServer,
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    run(origin.root, "push")
    monkeypatch.chdir(tmp_path)  # into a relative folder, as a user types it
    run(tmp_path, "clone", "--bare", URL, "bare")
    bare = Repository.open(tmp_path / "bare")
    assert bare.worktree is None and not (bare.path / "worktree").exists()
    assert export_hashes(bare.root, "HEAD", tmp_path / "b") == export_hashes(origin.root, "HEAD", tmp_path / "o")
    assert run(bare.root, "fsck").strip().endswith(": ok")


def test_a_branch_that_is_not_checked_out_pushes_what_its_history_holds(origin: Repository, hub: HubServer,
                                                                        tmp_path: Path) -> None:
    """Each shard is hashed one ahead in a second thread, through its own database connection: with the
    base checked out and no cache, main's edited tensors are replayed from their deltas there."""
    run(origin.root, "checkout", origin.log()[-1].id)
    shutil.rmtree(origin.path / "cache", ignore_errors=True)
    run(origin.root, "push", "origin", "main")
    run(tmp_path, "clone", "--bare", URL, str(tmp_path / "copy"))
    assert export_hashes(tmp_path / "copy", "main", tmp_path / "c") == export_hashes(origin.root, "main",
                                                                                      tmp_path / "o")


def test_the_pushed_branch_loads_with_from_pretrained(origin: Repository, hub: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM

    from kedit.core.tensors import hash_tensor

    run(origin.root, "push")
    folder = snapshot_download(REPO_ID, endpoint=hub.url, local_dir=tmp_path / "snap", ignore_patterns=[".kedit/*"])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    expected = json.loads((Path(folder) / "kedit.json").read_text())["tensors"]
    state = model.state_dict()
    loaded = [n for n in expected if n in state]
    assert {n: hash_tensor(state[n]) for n in loaded} == {n: expected[n] for n in loaded}
    assert set(expected) == set(state)


def test_method_memory_travels_with_the_history(origin: Repository, hub: HubServer, tmp_path: Path) -> None:
    keys = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    origin.commit({DOWN0: LowRank(torch.randn(32, 1) * 0.1, torch.randn(1, 64) * 0.1)}, method="alphaedit",
                  message="with memory", memory={"keys": keys})
    run(origin.root, "push")
    run(tmp_path, "clone", URL, str(tmp_path / "copy"))
    got = Repository.open(tmp_path / "copy").memory("alphaedit")
    assert len(got) == 1 and torch.equal(got[0]["keys"], keys)
    assert run(tmp_path / "copy", "fsck").strip().endswith(": ok")


def test_trained_editors_travel_with_the_history(origin: Repository, hub: HubServer, tmp_path: Path) -> None:
    from kedit.edit.trained import editor_loader, list_editors, store_editor
    from kedit.eval.metrics import PROMPT_PROTOCOL

    state = {"w": torch.randn(4, 8, generator=torch.Generator().manual_seed(3))}
    trained = {"val_acc": 0.9, "prompt_protocol": PROMPT_PROTOCOL}
    info = store_editor(origin, "mend", state, {"rank": 2}, base=origin.log()[-1].id, data_hash="d" * 32,
                        hparams={"lr": 1e-4}, metrics=trained)
    run(origin.root, "push")
    run(tmp_path, "clone", URL, str(tmp_path / "copy"))
    copy = Repository.open(tmp_path / "copy")
    [got] = list_editors(copy)
    assert (got.id, got.method, got.base_commit, got.metrics) == (info.id, "mend", info.base_commit, trained)
    tensors, meta = editor_loader(copy)(info.id)
    assert torch.equal(tensors["w"], state["w"]) and meta["config"] == {"rank": 2}
    assert run(copy.root, "fsck").strip().endswith(": ok")


def test_a_one_edit_push_uploads_only_its_shard_delta_and_records(origin: Repository, hub: HubServer) -> None:
    run(origin.root, "push")
    before = hub.uploaded_bytes
    tip = edit(origin, DOWN1, "third", 3)
    out = doc(run(origin.root, "push", "--json"))
    weights = [f for f in out["files"] if f.endswith(".safetensors")]
    objects = [f for f in out["files"] if f.startswith(".kedit/objects/")]
    assert weights == ["model-layer-001.safetensors"]
    # The delta, and nothing else: DOWN1's base value went up with the previous push (it had changed).
    assert len(objects) == 1
    assert set(out["files"]) - set(weights) - set(objects) == {
        f".kedit/commits/{tip}.json", ".kedit/refs.json", "README.md", "kedit.json"}
    shard = hub.store.tree(REPO_ID, "main")[1]["model-layer-001.safetensors"]["size"]
    assert hub.uploaded_bytes - before < shard + 64 * 1024  # the shard plus small records


def test_the_first_push_of_an_edited_tensor_sends_its_base_value(origin: Repository, hub: HubServer) -> None:
    """The weights hold the tip, so the base value of a tensor edited later must go up as an object."""
    run(origin.root, "push")
    name = "model.layers.0.self_attn.q_proj.weight"
    edit(origin, name, "attention edit", 4)
    out = doc(run(origin.root, "push", "--json"))
    base_object = origin.changes(origin.log()[-1].id)
    base_oid = next(ch.steps[0].object_id for ch in base_object if ch.name == name)
    assert f".kedit/objects/{base_oid[:2]}/{base_oid[2:]}.st" in out["files"]


def test_later_metrics_travel_with_push_and_pull(origin: Repository, hub: HubServer, tmp_path: Path) -> None:
    run(origin.root, "push")
    run(tmp_path, "clone", URL, str(tmp_path / "copy"))
    first = origin.log()[1].id
    origin.record_metrics(first, [Metric("portability", 0.5, "teacher_forced_token_acc", stage="eval")])
    out = doc(run(origin.root, "push", "--json"))
    assert not out["up_to_date"] and f".kedit/commits/{first}.json" in out["files"]
    assert "up to date" in run(tmp_path / "copy", "pull")
    got = Repository.open(tmp_path / "copy").get_commit(first).metrics
    assert Metric("portability", 0.5, "teacher_forced_token_acc", "eval") in got
    assert log_json(tmp_path / "copy") == log_json(origin.root)


def test_a_push_over_someone_elses_is_refused_until_pull(origin: Repository, hub: HubServer, tmp_path: Path) -> None:
    run(origin.root, "push")
    run(tmp_path, "clone", URL, str(tmp_path / "bob"))
    bob = Repository.open(tmp_path / "bob")
    theirs = edit(bob, DOWN0, "bob's edit", 5)
    pushed = doc(run(bob.root, "push", "--json"))["files"]  # a clone's records are byte-identical:
    assert [f for f in pushed if f.startswith(".kedit/commits/")] == [f".kedit/commits/{theirs}.json"]
    mine = edit(origin, DOWN1, "alice's edit", 6)
    hub_tip = hub.store.refs(REPO_ID)["main"]
    before = snapshot(origin)
    err = run(origin.root, "push", code=1)
    assert "push rejected" in err and "moved since your last pull" in err and "kedit pull" in err
    assert err.count("\n") == 1
    assert hub.store.refs(REPO_ID)["main"] == hub_tip and snapshot(origin) == before  # nothing overwritten
    err = run(origin.root, "pull", code=1)
    assert "diverged" in err and "--rebase" in err
    assert origin.head() == mine and origin.refs.deref("refs/remotes/origin/main") == theirs
    assert "replayed" in run(origin.root, "pull", "--rebase")
    log = origin.log()
    assert [c.message for c in log[:3]] == ["alice's edit", "bob's edit", "second"]
    assert log[0].info["rebased_from"] == mine and log[1].id == theirs
    run(origin.root, "push")
    assert "fast-forward" in run(bob.root, "pull")
    assert log_json(bob.root) == log_json(origin.root)
    tip = origin.head()
    assert export_hashes(bob.root, tip, tmp_path / "b") == export_hashes(origin.root, tip, tmp_path / "a")


def test_token_problems_give_one_line_and_change_nothing(origin: Repository, hub: HubServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(origin)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_value")
    err = run(origin.root, "push", code=1)
    assert "refused the token" in err and "hf_wrong_token_value" not in err and err.count("\n") == 1
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(Path(hub.store.root) / "no-token"))
    err = run(origin.root, "push", code=1)
    assert "asks for a token" in err and "HF_TOKEN" in err
    assert snapshot(origin) == before and hub.store.tree(REPO_ID, "main")[1].keys() == {".gitattributes"}


def test_the_token_is_never_written_or_printed(origin: Repository, hub: HubServer, tmp_path: Path) -> None:
    outputs = [run(origin.root, "push"), run(tmp_path, "clone", URL, str(tmp_path / "copy")),
               run(tmp_path / "copy", "pull"), run(origin.root, "remote", "list", "--json")]
    assert not any(TOKEN in o for o in outputs)
    for root in (origin.path, tmp_path / "copy" / ".kedit"):
        for file in root.rglob("*"):
            assert not file.is_file() or TOKEN.encode() not in file.read_bytes(), file


def test_missing_repo_and_no_network_give_one_line(origin: Repository, hub: HubServer,
                                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    before = snapshot(origin)
    run(origin.root, "remote", "add", "nowhere", "hf://alice/does-not-exist")
    err = run(origin.root, "push", "nowhere", code=1)
    assert "not found" in err and "--create" in err and err.count("\n") == 1
    err = run(tmp_path, "clone", "hf://alice/does-not-exist", str(tmp_path / "x"), code=1)
    assert "not found" in err and not (tmp_path / "x").exists()
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    err = run(origin.root, "push", code=1)
    assert "cannot be reached" in err and err.count("\n") == 1
    assert {k: v for k, v in snapshot(origin).items() if k != "refs"} == {
        k: v for k, v in before.items() if k != "refs"}
    # --create makes the repository, then pushes to it.
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    run(origin.root, "push", "nowhere", "--create")
    assert hub.store.refs("alice/does-not-exist")["main"]


def test_server_stopped_before_the_commit_leaves_both_sides_as_they_were(
        origin: Repository, hub: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    before, hub_tip = snapshot(origin), hub.store.refs(REPO_ID)["main"]
    hub.crash_on_commit = "before"
    err = run(origin.root, "push", code=1)
    assert "cannot be reached" in err and err.count("\n") == 1
    assert snapshot(origin) == before and hub.store.refs(REPO_ID)["main"] == hub_tip
    server = restart(hub, monkeypatch)
    try:
        run(origin.root, "push")
        run(tmp_path, "clone", URL, str(tmp_path / "copy"))
        assert log_json(tmp_path / "copy") == log_json(origin.root)
    finally:
        server.stop()


def test_server_stopped_after_the_commit_is_healed_by_the_next_push(
        origin: Repository, hub: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The Hub took the commit but the answer was lost (as when a push is killed after the Hub
    commit). Tracked or not, the next push recognises its own commit (the Hub branch moved, but
    to history this branch holds) and records where the branch is; a pull has nothing to do."""
    hub.crash_on_commit = "after"
    run(origin.root, "push", code=1)
    assert origin.refs.deref("refs/remotes/origin/main") is None
    server = restart(hub, monkeypatch)
    try:
        assert "up to date" in run(origin.root, "push")
        assert origin.refs.deref("refs/remotes/origin/main") == origin.head()
        edit(origin, DOWN0, "third", 3)
        server.crash_on_commit = "after"
        run(origin.root, "push", code=1)
        server = restart(server, monkeypatch)
        assert "up to date" in run(origin.root, "push")
        assert origin.refs.deref("refs/remotes/origin/main") == origin.head()
        assert "up to date" in run(origin.root, "pull")
        run(tmp_path, "clone", URL, str(tmp_path / "copy"))
        assert log_json(tmp_path / "copy") == log_json(origin.root)
    finally:
        server.stop()


def test_a_rejected_commit_gives_one_line_and_changes_nothing(origin: Repository, hub: HubServer) -> None:
    before, hub_tip = snapshot(origin), hub.store.refs(REPO_ID)["main"]
    hub.reject_commit = "Your push was rejected because it contains files larger than 10 MiB"
    err = run(origin.root, "push", code=1)
    assert "answered 400" in err and "larger than 10 MiB" in err and err.count("\n") == 1
    assert snapshot(origin) == before and hub.store.refs(REPO_ID)["main"] == hub_tip


def _tamper(hub: HubServer, path: str) -> None:
    entry = hub.store.tree(REPO_ID, "main")[1][path]
    file = hub.store.root / ("lfs/" + entry["lfs"]["oid"] if entry["lfs"] else "blobs/" + entry["oid"])
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("target", ["object", "commit", "shard", "shard header", "shard cut short"])
def test_a_corrupted_download_is_refused(origin: Repository, hub: HubServer, tmp_path: Path, target: str) -> None:
    """A weights shard is read as it downloads: a changed byte, a garbled header or a short file
    is refused like a damaged object."""
    run(origin.root, "push")
    tree = hub.store.tree(REPO_ID, "main")[1]
    prefix = {"object": ".kedit/objects/", "commit": f".kedit/commits/{origin.head()}"}.get(target, "model-")
    path = next(p for p in sorted(tree) if p.startswith(prefix))
    if target == "shard header":
        file = hub.store.root / "lfs" / tree[path]["lfs"]["oid"]
        file.write_bytes(file.read_bytes().replace(b'"shape"', b'"shapf"', 1))
    elif target == "shard cut short":
        file = hub.store.root / "lfs" / tree[path]["lfs"]["oid"]
        file.write_bytes(file.read_bytes()[:-5])
    else:
        _tamper(hub, path)
    err = run(tmp_path, "clone", URL, str(tmp_path / "copy"), code=1)
    assert ("damaged" in err or "forged" in err) and "nothing was changed" in err, err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "copy").exists()


def test_an_object_that_no_branch_gives_refuses_the_clone(origin: Repository, hub: HubServer,
                                                           tmp_path: Path) -> None:
    """Objects are planned over every fetched branch before any is stored: one that none gives is
    named in one line, and nothing is written."""
    from huggingface_hub import HfApi

    run(origin.root, "push")
    path = next(p for p in sorted(hub.store.tree(REPO_ID, "main")[1]) if p.startswith(".kedit/objects/"))
    HfApi(endpoint=hub.url, token=TOKEN).delete_file(path, REPO_ID)
    oid = "".join(path.removeprefix(".kedit/objects/").split(".")[0].split("/"))
    err = run(tmp_path, "clone", URL, str(tmp_path / "copy"), code=1)
    assert f"the remote history is incomplete: object {oid} is missing" in err and "nothing was changed" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "copy").exists()


def test_a_pull_that_fails_verification_changes_no_history(origin: Repository, hub: HubServer,
                                                          tmp_path: Path) -> None:
    run(origin.root, "push")
    run(tmp_path, "clone", URL, str(tmp_path / "copy"))
    copy = Repository.open(tmp_path / "copy")
    before = snapshot(copy)
    edit(origin, DOWN0, "third", 3)
    out = doc(run(origin.root, "push", "--json"))
    _tamper(hub, next(f for f in out["files"] if f.startswith(".kedit/objects/")))
    err = run(copy.root, "pull", code=1)
    assert "damaged" in err and err.count("\n") == 1
    assert snapshot(copy) == before  # the damaged object was the only one to fetch: nothing stored


def _forge(doc: dict, how: str) -> None:
    if how == "change":
        doc["changes"][0]["steps"][0][1] = "0" * 32  # another object for the delta
    elif how == "record":
        doc["record"] = doc["record"].replace('"second"', '"forged"')
    else:
        doc["metrics"] = [{"name": "reliability", "value": "high"}]


@pytest.mark.parametrize("how", ["change", "record", "metrics"])
def test_a_forged_commit_is_refused(origin: Repository, hub: HubServer, tmp_path: Path, how: str) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    run(origin.root, "push")
    path = f".kedit/commits/{origin.head()}.json"
    record = json.loads(hub.store.read(hub.store.tree(REPO_ID, "main")[1][path]))
    _forge(record, how)
    HfApi(endpoint=hub.url, token=TOKEN).create_commit(
        REPO_ID, [CommitOperationAdd(path, json.dumps(record).encode())], commit_message="forge")
    err = run(tmp_path, "clone", URL, str(tmp_path / "copy"), code=1)
    assert "damaged or forged" in err and err.count("\n") == 1 and not (tmp_path / "copy").exists()


def test_history_only_then_full_push(origin: Repository, hub: HubServer, tmp_path: Path) -> None:
    out = doc(run(origin.root, "push", "--history-only", "--json"))
    assert not any(f.endswith(".safetensors") or f == "README.md" for f in out["files"])
    assert json.loads(hub.store.read(hub.store.tree(REPO_ID, "main")[1][".kedit/refs.json"]))["checkpoint"] is None
    run(tmp_path, "clone", URL, str(tmp_path / "copy"))
    rev = origin.head()
    assert export_hashes(tmp_path / "copy", rev, tmp_path / "c") == export_hashes(origin.root, rev, tmp_path / "o")
    out = doc(run(origin.root, "push", "--json"))
    assert "model-layer-000.safetensors" in out["files"] and not any(f.startswith(".kedit/objects")
                                                                    for f in out["files"])


def test_branches_map_to_hub_branches(origin: Repository, hub: HubServer, tmp_path: Path) -> None:
    run(origin.root, "push")
    run(origin.root, "branch", "exp/one")
    run(origin.root, "checkout", "exp/one")
    exp = edit(origin, DOWN0, "on exp", 7)
    out = doc(run(origin.root, "push", "--json"))
    assert out["remote_branch"] == "exp/one"
    # Started from main on the Hub: only the new commit, its delta and the changed shard went up.
    assert [f for f in out["files"] if f.startswith(".kedit/commits/")] == [f".kedit/commits/{exp}.json"]
    assert hub.store.refs(REPO_ID).keys() == {"main", "exp/one"}
    run(tmp_path, "clone", URL, str(tmp_path / "copy"))
    copy = Repository.open(tmp_path / "copy")
    assert copy.refs.branches() == origin.refs.branches()
    assert log_json(copy.root, "exp/one") == log_json(origin.root, "exp/one")
    fetched = doc(run(copy.root, "fetch", "--json"))["branches"]
    assert fetched["exp/one"]["new_commits"] == 0


def _folder_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_two_bases_push_and_clone_alike(origin: Repository, hub: HubServer, tmp_path: Path,
                                        tiny_llama_dir: Path) -> None:
    """A repository with a second root (`kedit init --add-base`): both branches pushed, cloned, and
    the clone's roots, tips, log and working model (checked out at the second base) the same."""
    first_root = origin.log()[-1].id
    second = perturbed_release(tiny_llama_dir, tmp_path / "v1.1", seed=11)
    added = doc(run(origin.root, "init", "--add-base", str(second), "--branch", "v1.1", "--json"))
    second_root = added["commit"]["id"]
    run(origin.root, "checkout", "v1.1")
    edit(origin, DOWN0, "on v1.1", 5)
    run(origin.root, "push")  # v1.1
    run(origin.root, "checkout", "main")
    run(origin.root, "push")  # main
    assert hub.store.refs(REPO_ID).keys() == {"main", "v1.1"}
    run(tmp_path, "clone", URL, str(tmp_path / "copy"))
    copy = Repository.open(tmp_path / "copy")
    assert copy.refs.branches() == origin.refs.branches()
    for branch, root in (("main", first_root), ("v1.1", second_root)):
        assert log_json(copy.root, branch) == log_json(origin.root, branch)
        assert copy.log(branch)[-1].id == root and copy.get_commit(root).parents == []
        for rev in (root, branch):
            assert {n: e.hash for n, e in copy.manifest(rev).items()} == \
                {n: e.hash for n, e in origin.manifest(rev).items()}, rev
        assert export_hashes(copy.root, branch, tmp_path / f"c-{branch}") == \
            export_hashes(origin.root, branch, tmp_path / f"o-{branch}")
    assert run(copy.root, "fsck").strip().endswith(": ok")
    # The second base checked out in the clone: the same model files as at the origin, byte for byte.
    for repo in (origin, copy):
        run(repo.root, "checkout", second_root)
        assert repo.status()["modified"] == {}
    origin_files, copy_files = _folder_hashes(origin.worktree.folder), _folder_hashes(copy.worktree.folder)
    assert copy_files == origin_files
    assert "kedit_release" in json.loads((copy.worktree.folder / "config.json").read_text())
    run(copy.root, "checkout", "v1.1")
    run(origin.root, "checkout", "v1.1")
    assert _folder_hashes(copy.worktree.folder) == _folder_hashes(origin.worktree.folder)
    assert run(copy.root, "fsck").strip().endswith(": ok")


def test_a_first_push_removes_weights_that_would_shadow_its_own(origin: Repository, hub: HubServer) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_commit(REPO_ID, [CommitOperationAdd("model.safetensors", b"\0" * 64),
                                CommitOperationAdd("notes.txt", b"keep me")], commit_message="someone's upload")
    run(origin.root, "push")
    tree = hub.store.tree(REPO_ID, "main")[1]
    assert "model.safetensors" not in tree and "notes.txt" in tree and "model-layer-000.safetensors" in tree


def test_removing_a_remote_forgets_its_refs_and_readding_finds_the_history(origin: Repository,
                                                                           hub: HubServer) -> None:
    run(origin.root, "push")
    run(origin.root, "remote", "add", "other_one", URL)  # '_' must not match like a LIKE pattern
    run(origin.root, "push", "other_one")
    run(origin.root, "remote", "remove", "origin")
    assert origin.refs.deref("refs/remotes/origin/main") is None
    assert origin.refs.deref("refs/remotes/other_one/main") == origin.head()
    run(origin.root, "remote", "add", "origin", URL)
    assert "up to date" in run(origin.root, "push", "origin")
    assert origin.refs.deref("refs/remotes/origin/main") == origin.head()


def test_remote_commands(repo: Repository, tmp_path: Path) -> None:
    run(repo.root, "remote", "add", "origin", "hf://alice/model")
    run(repo.root, "remote", "add", "mirror", "http://127.0.0.1:8080/bob/model")
    listed = doc(run(repo.root, "remote", "--json"))["remotes"]
    assert [(r["name"], r["endpoint"], r["repo_id"]) for r in listed] == [
        ("mirror", "http://127.0.0.1:8080", "bob/model"), ("origin", "https://huggingface.co", "alice/model")]
    assert "already exists" in run(repo.root, "remote", "add", "origin", "hf://x/y", code=1)
    assert "credentials" in run(repo.root, "remote", "add", "bad", "https://u:secret@hf.co/a/b", code=1)
    assert "OWNER/REPO" in run(repo.root, "remote", "add", "bad", "hf://just-a-name", code=1)
    assert "not a Hub URL" in run(repo.root, "remote", "add", "bad", "ftp://x/a/b", code=1)
    run(repo.root, "remote", "remove", "mirror")
    assert "mirror" not in run(repo.root, "remote", "list")
    assert "no remote named" in run(repo.root, "push", "mirror", code=1)


def test_a_branch_whose_tip_holds_an_adapter_clones(hub: HubServer, tmp_path: Path, tiny_folder: Path) -> None:
    """The config.json at the top of such a branch is marked for the adapter (`mark_config`), so it
    cannot stand for the original: push sends the original as an object, and a clone of that one
    branch has everything."""
    repo = Repository.init(tmp_path / "work", str(tiny_folder), progress=False)
    run(repo.root, *GRACE_EDIT)
    run(repo.root, "remote", "add", "origin", URL)
    run(repo.root, "push")
    run(tmp_path, "clone", URL, str(tmp_path / "copy"))
    exported = []
    for where, out in ((tmp_path / "copy", tmp_path / "c"), (repo.root, tmp_path / "o")):
        run(where, "export", "HEAD", str(out))
        exported.append({str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest()
                         for f in sorted(out.rglob("*")) if f.is_file()})
    assert exported[0] == exported[1] and "config.json" in exported[0]
    assert any(name.startswith("kedit_adapters/") for name in exported[0])
    assert run(tmp_path / "copy", "fsck").strip().endswith(": ok")


def test_a_grace_revision_on_the_hub_loads_with_kedit_and_plain_transformers_refuses(
        hub: HubServer, tmp_path: Path, tiny_folder: Path) -> None:
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kedit
    from kedit.eval.metrics import shows_in_generation

    repo = Repository.init(tmp_path / "work", str(tiny_folder), progress=False)
    run(repo.root, *GRACE_EDIT)
    run(repo.root, "remote", "add", "origin", URL)
    run(repo.root, "push")
    folder = Path(snapshot_download(REPO_ID, endpoint=hub.url, local_dir=tmp_path / "a", ignore_patterns=[".kedit/*"]))
    with pytest.raises(ValueError, match=r"kedit.load_model"):  # never the unedited model in silence
        AutoModelForCausalLM.from_pretrained(folder)
    model, tok = kedit.load_model(folder), AutoTokenizer.from_pretrained(folder)
    assert shows_in_generation(model, tok, [GRACE_PROMPT], [GRACE_TARGET], 2) == [True]
    assert "kedit.load_model" in (folder / "README.md").read_text()

    run(repo.root, "revert", "HEAD")  # no adapters left: the next push is a plain checkpoint again
    run(repo.root, "push")
    folder = Path(snapshot_download(REPO_ID, endpoint=hub.url, local_dir=tmp_path / "b", ignore_patterns=[".kedit/*"]))
    assert not (folder / "kedit_adapters").exists()
    AutoModelForCausalLM.from_pretrained(folder)
