"""Bad input gets one clear line on stderr, a non-zero exit, no traceback, and changes nothing.

Each test takes a snapshot of the repository (refs, reflog, commits, stored objects) before
the refused command and compares it afterwards; where objects were damaged on purpose, fsck
is run once the damage is undone to show that the refusal itself broke nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kedit.core import history
from kedit.core.delta import Dense, LowRank
from kedit.core.maintenance import fsck
from kedit.core.repo import Repository
from kedit.core.tensors import hash_tensor
from kedit.core.worktree import shard_name

from .helpers_engine import kedit, refused, snapshot

DOWN0 = "model.layers.0.mlp.down_proj.weight"
NORM = "model.norm.weight"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEDIT_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("KEDIT_DEBUG", raising=False)  # it turns error lines into tracebacks
    monkeypatch.delenv("KEDIT_DIR", raising=False)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> tuple[Path, list[str]]:
    """A repository over the tiny Llama (conftest) with two edits of one tensor on main:
    [low-rank, dense]. Built once; each test gets a copy (a fresh init costs ~40 fsyncs)."""
    root = tmp_path_factory.mktemp("template") / "work"
    repo = Repository.init(root, str(tiny_llama_dir), progress=False)
    gen = torch.Generator().manual_seed(0)
    first = repo.commit({DOWN0: LowRank(torch.randn(32, 1, generator=gen) * 0.1,
                                        torch.randn(1, 64, generator=gen) * 0.1)}, message="low-rank")
    second = repo.commit({DOWN0: Dense(torch.randn(32, 64, generator=gen) * 0.01)}, message="dense")
    repo.db.conn.close()  # checkpoints the WAL, so the folder can be copied
    return root, [first.id, second.id]


@pytest.fixture
def repo(template: tuple[Path, list[str]], tmp_path: Path) -> Repository:
    """This test's own copy of the template repository (overrides conftest's fresh one)."""
    return Repository.open(shutil.copytree(template[0], tmp_path / "work"))


@pytest.fixture
def edits(template: tuple[Path, list[str]]) -> list[str]:
    return template[1]


def fsck_output(repo: Repository, code: int) -> str:
    result = kedit("fsck", repo=repo)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


def object_of(repo: Repository, commit_id: str, name: str = DOWN0) -> Path:
    """The file holding the delta that `commit_id` introduced for `name`."""
    object_id = history.change(repo.db, commit_id, name).steps[0].object_id
    path = repo.store.path(object_id, "st")
    assert path.exists()
    return path


# -- revisions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "code"), [
    (["show", "nosuch"], 1),
    (["log", "nosuch"], 1),
    (["checkout", "nosuch"], 1),
    (["reset", "nosuch"], 1),
    (["revert", "nosuch"], 1),
    (["branch", "x", "nosuch"], 1),
    (["tag", "t", "nosuch"], 1),
    (["export", "nosuch", "{out}"], 1),
    (["diff", "nosuch"], 2),  # diff: 1 means "the models differ", so errors are 2
    (["diff", "HEAD", "nosuch"], 2),
])
def test_unknown_revision_is_refused_by_every_command(repo: Repository, edits: list[str], tmp_path: Path,
                                                      args: list[str], code: int) -> None:
    out = tmp_path / "exported"
    args = [a.format(out=out) for a in args]
    before = snapshot(repo)
    line = refused(*args, repo=repo, code=code)
    assert "unknown revision 'nosuch'" in line
    assert snapshot(repo) == before
    assert not out.exists()


@pytest.mark.parametrize(("rev", "says"), [
    ("deadbeef", "unknown revision 'deadbeef'"),  # hex, but no commit has that prefix
    ("HEAD~9", "goes back past the initial commit"),
    ("main~3", "goes back past the initial commit"),
    ("HEAD^^^", "goes back past the initial commit"),
    ("", "empty revision"),
    ("refs/heads/nosuch", "unknown revision"),
])
def test_revisions_that_name_no_commit(repo: Repository, edits: list[str], rev: str, says: str) -> None:
    before = snapshot(repo)
    assert says in refused("show", rev, repo=repo)
    assert says in refused("checkout", rev, repo=repo)
    assert snapshot(repo) == before


def test_prefix_shorter_than_four_digits_is_not_a_revision(repo: Repository, edits: list[str]) -> None:
    before = snapshot(repo)
    assert "unknown revision" in refused("show", edits[1][:3], repo=repo)
    assert kedit("show", edits[1][:4], repo=repo).exit_code == 0
    assert snapshot(repo) == before


def test_ambiguous_prefix_is_refused_and_a_longer_one_resolves(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # Commit until two ids share their first 4 hex digits: by the birthday bound over 16 bits that
    # takes ~320 commits on average, and more than 1500 with probability below 1e-7. Bare, because
    # a commit then costs a third as many fsyncs (no working model to update).
    repo = Repository.init(tmp_path / "bare", str(tiny_llama_dir), worktree=False, progress=False)
    seen: dict[str, str] = {}
    pair = None
    for i in range(3000):
        cid = repo.commit({NORM: Dense(torch.full((32,), 1e-3))}, message=f"edit {i}").id
        if cid[:4] in seen:
            pair = (seen[cid[:4]], cid)
            break
        seen[cid[:4]] = cid
    assert pair is not None, "no two of 3000 commit ids share 4 hex digits: ids are not uniform"
    a, b = pair
    prefix = a[:4]
    before = snapshot(repo)
    line = refused("show", prefix, repo=repo)
    assert f"ambiguous revision '{prefix}'" in line and a[:12] in line and b[:12] in line
    refused("checkout", prefix, repo=repo)
    refused("revert", prefix, repo=repo)
    assert snapshot(repo) == before
    differ_at = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    for cid in (a, b):  # one digit past the shared prefix is enough
        result = kedit("show", "--json", cid[: differ_at + 1], repo=repo)
        assert result.exit_code == 0, result.output
        assert f'"id": "{cid}"' in result.stdout


# -- refs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["branch", "tag"])
@pytest.mark.parametrize(("name", "says"), [
    ("../x", "use letters, digits"),
    ("", "it is empty"),
    ("a b", "use letters, digits"),
    ("-x", "use letters, digits"),
    ("a..b", "may not contain '..'"),
    ("x/", "nor end with '/'"),
    ("x.lock", "'.lock'"),
    ("a/.b", "no part of it may start with '.'"),
    ("HEAD", "HEAD is reserved"),
    ("0123456789abcdef0123456789abcdef", "looks like a commit id"),
    ("beef", "looks like a commit id"),
])
def test_bad_ref_names_are_refused(repo: Repository, kind: str, name: str, says: str) -> None:
    before = snapshot(repo)
    line = refused(kind, "--", name, repo=repo)  # "--": a name like -x is an argument, not an option
    assert f"invalid {kind} name {name!r}" in line and says in line
    assert snapshot(repo) == before


def test_existing_branch_and_tag_names_are_refused(repo: Repository, edits: list[str]) -> None:
    assert kedit("tag", "v1", "HEAD~1", repo=repo).exit_code == 0
    before = snapshot(repo)
    assert "a branch named 'main' already exists" in refused("branch", "main", "HEAD~1", repo=repo)
    assert "a tag named 'v1' already exists" in refused("tag", "v1", "HEAD", repo=repo)
    assert snapshot(repo) == before
    assert repo.refs.tags()["v1"] == edits[0]


def test_deleting_the_current_or_an_unknown_branch_is_refused(repo: Repository, edits: list[str]) -> None:
    before = snapshot(repo)
    line = refused("branch", "-d", "main", repo=repo)
    assert "cannot delete the branch 'main': it is checked out" in line and "kedit checkout" in line
    assert "no branch named 'nosuch'" in refused("branch", "-d", "nosuch", repo=repo)
    assert "no tag named 'nosuch'" in refused("tag", "-d", "nosuch", repo=repo)
    assert snapshot(repo) == before


def test_revert_of_the_initial_commit_is_refused(repo: Repository, edits: list[str]) -> None:
    initial = repo.log()[-1].id
    before = snapshot(repo)
    assert "the initial commit (the base model) cannot be reverted" in refused("revert", initial, repo=repo)
    assert "cannot be reverted" in refused("revert", "HEAD~2", repo=repo)
    assert snapshot(repo) == before


# -- damaged or missing storage -----------------------------------------------------------------


def test_missing_object_is_named_and_points_to_fsck(repo: Repository, edits: list[str], tmp_path: Path) -> None:
    path = object_of(repo, edits[0])
    object_id = path.parent.name + path.name.split(".")[0]
    saved = tmp_path / "saved.st"
    path.rename(saved)
    shutil.rmtree(repo.cache.root, ignore_errors=True)  # cached values are hash-verified copies: drop them
    before = snapshot(repo)

    for args, code in ((["checkout", edits[0]], 1), (["export", edits[0], str(tmp_path / "out")], 1),
                       (["diff", "HEAD~2", "HEAD~1"], 2), (["reset", "HEAD~1"], 1)):
        line = refused(*args, repo=repo, code=code)
        assert f"object {object_id} is missing" in line and "kedit fsck" in line, line
    assert snapshot(repo) == before
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if ".kedit-" in p.name] == []  # no export staging left
    assert repo.status()["modified"] == {}

    output = fsck_output(repo, code=1)
    assert f"object {object_id} is missing" in output
    saved.rename(path)
    assert fsck(repo).ok


def test_damaged_object_fails_fsck_and_checkout(repo: Repository, edits: list[str]) -> None:
    path = object_of(repo, edits[0])
    object_id = path.parent.name + path.name.split(".")[0]
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[-1] ^= 0x01  # one bit of the last tensor value
    path.write_bytes(bytes(damaged))
    shutil.rmtree(repo.cache.root, ignore_errors=True)  # cached values are hash-verified copies: drop them
    before = snapshot(repo)

    output = fsck_output(repo, code=1)
    assert f"object {object_id} is damaged" in output
    line = refused("checkout", edits[0], repo=repo)
    assert f"tensor {DOWN0} at commit {edits[0][:12]}" in line and "kedit fsck" in line
    assert snapshot(repo) == before

    header = bytearray(original)
    header[10] ^= 0x55  # inside the safetensors JSON header
    path.write_bytes(bytes(header))
    assert f"object {object_id} is damaged" in fsck_output(repo, code=1)
    assert "kedit fsck" in refused("checkout", edits[0], repo=repo)

    path.write_bytes(original)
    assert fsck(repo).ok
    assert snapshot(repo) == before


def test_no_copy_base_file_that_moved_or_changed(tiny_llama_dir: Path, tmp_path: Path) -> None:
    source = shutil.copytree(tiny_llama_dir, tmp_path / "model")
    weights = source / "model.safetensors"
    # Bare: a working model would serve HEAD's tensors itself and hide the missing base file.
    result = kedit("--repo", str(tmp_path / "work"), "init", str(source), "--no-copy", "--bare")
    assert result.exit_code == 0, result.output
    repo = Repository.open(tmp_path / "work")
    before = snapshot(repo)

    weights.rename(source / "elsewhere.safetensors")
    line = refused("export", "HEAD", str(tmp_path / "out"), repo=repo)
    assert f"the base file {weights} has moved or been deleted" in line and "--no-copy" in line
    assert f"the base file {weights} has moved" in fsck_output(repo, code=1)
    (source / "elsewhere.safetensors").rename(weights)
    assert fsck(repo).ok

    tensors = load_file(weights)
    tensors[DOWN0] = tensors[DOWN0] + 1.0  # a tensor no other one shares content with
    save_file(tensors, weights, metadata={"format": "pt"})
    line = refused("export", "HEAD", str(tmp_path / "out"), repo=repo)
    assert f"the base file {weights} has changed since 'kedit init'" in line and DOWN0 in line
    assert "has changed since 'kedit init'" in fsck_output(repo, code=1)
    assert not (tmp_path / "out").exists()
    assert snapshot(repo) == before


def test_export_into_a_non_empty_folder_is_refused(repo: Repository, edits: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "is not empty" in refused("export", "HEAD", str(out), repo=repo)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# -- what is not a model, or not a repository ---------------------------------------------------


def _not_models(root: Path) -> dict[str, tuple[Path, str]]:
    empty = root / "empty"
    empty.mkdir()
    config_only = root / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text("{}")
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not even a real pickle")
    text = root / "notes.txt"
    text.write_text("The capital of France is Paris.")
    return {
        "empty folder": (empty, "it has no .safetensors weights"),
        "config only": (config_only, "it has no .safetensors weights"),
        "pickles": (pickled, "unpickling runs arbitrary code"),
        "text file": (text, "is not a model kedit can read"),
        "missing path": (root / "no" / "such" / "dir", "is not a file, a folder or a model id"),
    }


@pytest.mark.parametrize("case", ["empty folder", "config only", "pickles", "text file", "missing path"])
def test_init_refuses_what_is_not_a_model(tmp_path: Path, case: str) -> None:
    path, says = _not_models(tmp_path)[case]
    target = tmp_path / "work"
    line = refused("--repo", str(target), "init", str(path))
    assert says in line
    if case == "pickles":
        assert "pickled weights" in line and "safetensors" in line
    assert not target.exists(), "a refused init left a repository behind"


def test_init_twice_is_refused(repo: Repository, edits: list[str], tiny_llama_dir: Path) -> None:
    before = snapshot(repo)
    line = refused("init", str(tiny_llama_dir), repo=repo)
    assert f"a kedit repository already exists at {repo.path}" in line
    assert snapshot(repo) == before
    assert fsck(repo).ok


def test_outside_a_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for args in (["log"], ["status"], ["branch", "x"], ["fsck"]):
        line = refused(*args)
        assert "not a kedit repository" in line and "kedit init" in line
    assert list(empty.iterdir()) == []


def test_real_process_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    """The installed `kedit` entry point (not CliRunner): exit 1, one line, nothing on stdout."""
    script = Path(sys.executable).with_name("kedit")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "kedit.cli"]
    env = {k: v for k, v in os.environ.items() if k not in ("KEDIT_DIR", "KEDIT_DEBUG")}
    done = subprocess.run([*command, "log"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("kedit: error: not a kedit repository") and "kedit init" in done.stderr


# -- the working model ---------------------------------------------------------------------------


def _modify_by_hand(repo: Repository, name: str = NORM) -> torch.Tensor:
    shard = repo.worktree.folder / shard_name(name)
    tensors = load_file(shard)
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, shard, metadata={"format": "pt"})
    return tensors[name]


def test_checkout_over_a_hand_modified_tensor_needs_force(repo: Repository, edits: list[str]) -> None:
    mine = _modify_by_hand(repo)
    assert repo.status()["modified"] == {NORM: "modified"}
    before = snapshot(repo)
    for args in (["checkout", "HEAD~1"], ["reset", "HEAD~1"], ["checkout", edits[0]]):
        line = refused(*args, repo=repo)
        assert f"the working model has changes kedit did not make: {NORM}" in line and "--force" in line
    assert snapshot(repo) == before
    shard = repo.worktree.folder / shard_name(NORM)
    assert torch.equal(load_file(shard)[NORM], mine), "a refused checkout overwrote the hand-made change"

    result = kedit("checkout", "--force", "HEAD~1", repo=repo)
    assert result.exit_code == 0, result.output
    assert repo.head() == edits[0] and repo.head_branch() is None
    status = repo.status()
    assert status["modified"] == {} and status["worktree_commit"] == edits[0]
    assert hash_tensor(load_file(shard)[NORM]) == repo.manifest()[NORM].hash


def test_write_over_a_hand_modified_tensor_does_not_fail_after_writing(repo: Repository,
                                                                     edits: list[str]) -> None:
    """A command that reports an error must not have changed the history (and vice versa)."""
    mine = _modify_by_hand(repo)
    before = snapshot(repo)
    result = kedit("revert", "HEAD", repo=repo)
    assert "Traceback" not in result.output and "internal error" not in result.stderr
    if result.exit_code == 0:  # allowed: the revert does not touch the hand-modified tensor...
        assert repo.status()["modified"] == {NORM: "modified"}  # ...and leaves it alone
        assert torch.equal(load_file(repo.worktree.folder / shard_name(NORM))[NORM], mine)
    else:  # or refused up front: then nothing may have changed
        assert result.exit_code == 1
        assert "the working model has changes kedit did not make" in result.stderr
        assert snapshot(repo) == before, "revert reported an error, yet it recorded a commit and moved main"
