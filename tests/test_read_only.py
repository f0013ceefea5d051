"""A repository the user may only read: read commands work, writing commands say so in one line.

CI runs as root, who may write anything, so the commands run as another user: `nobody`, through
`setpriv`, in a real process, over a repository (and a venv) that user can read but not write.
Run by a user other than root, the test makes the repository read-only with chmod instead. The
commands of a test run one after another in one process (through the CLI), and the repository's
snapshot and every file under `.kedit` (size and mtime) are compared before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kedit.core.delta import Dense
from kedit.core.repo import Repository
from kedit.core.tensors import hash_tensor
from tests.tiny import make_model, make_tokenizer

from .helpers_engine import snapshot

NOBODY = 65534
NORM = "model.norm.weight"
SETPRIV = shutil.which("setpriv")
KEDIT = Path(sys.executable).with_name("kedit")  # the installed entry point, as a user runs it
AS_ROOT = os.geteuid() == 0

pytestmark = pytest.mark.skipif(AS_ROOT and SETPRIV is None,
                                reason="setpriv (util-linux) is absent: cannot run a command as another user")


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time: what a reader must not change."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith("-shm")}  # shared memory


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    """A folder every user may enter (pytest's own temp folders are private to their owner)."""
    folder = Path(tempfile.mkdtemp(prefix="kedit-read-only-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def repo(shared: Path) -> Iterator[Repository]:
    """Two commits (base, an edit), a branch and a tag, owned by this user, readable by all, writable by none
    but root (or, run as another user, by nobody at all)."""
    model_dir = shared / "model"
    tok = make_tokenizer()
    make_model("llama", len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    repo = Repository.init(shared / "work", str(model_dir), progress=False)
    repo.commit({NORM: Dense(torch.full((32,), 1e-3))}, message="nudge the norm")
    repo.create_tag("v1")
    repo.create_branch("side", "HEAD~1")
    repo.db.conn.close()  # checkpoints the WAL: the database file alone holds the history
    (shared / "out").mkdir()
    for path in (shared, *shared.rglob("*")):
        mode = path.stat().st_mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
        if path.is_dir():
            mode |= stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
        path.chmod(mode if AS_ROOT else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    out = shared / "out"
    if AS_ROOT:
        os.chown(out, NOBODY, NOBODY)  # where the reader may write: its export, its HOME
    else:
        out.chmod(0o755)
    yield Repository.open(shared / "work")
    if not AS_ROOT:
        for path in (shared, *shared.rglob("*")):
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def _as_reader(command: list[str], home: Path) -> subprocess.CompletedProcess:
    """`command` in a real process, as a user who cannot write the repository (HOME: a folder it can)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "HF_HOME": str(home / "hf"),
           "HF_HUB_OFFLINE": "1", "KEDIT_DISABLE_PROGRESS_BARS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    user = [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if AS_ROOT else []
    return subprocess.run([*user, *command], env=env, capture_output=True, text=True, timeout=600, cwd=home)


# Many commands, one process as the reader (starting Python with torch costs seconds): each through the
# CLI, its exit status and output collected.
_RUN_ALL = """
import json, sys
from click.testing import CliRunner
from kedit.cli import cli
results = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(cli, args)
    escaped = None if r.exception is None or isinstance(r.exception, SystemExit) else repr(r.exception)
    results.append({"code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr, "escaped": escaped})
print(json.dumps(results))
"""


def run_as_reader(repo: Repository, commands: list[list[str]]) -> list[dict]:
    """Each of `commands` as `kedit --repo REPO ...`, run by the reader; with the repository shown unchanged."""
    before, files = snapshot(repo), _tree(repo.path)
    argv = [["--repo", str(repo.root), *args] for args in commands]
    done = _as_reader([sys.executable, "-c", _RUN_ALL, json.dumps(argv)], repo.root.parent / "out")
    assert done.returncode == 0, done.stderr
    assert snapshot(repo) == before and _tree(repo.path) == files, "a command as the reader changed the repository"
    return json.loads(done.stdout)


def test_the_reader_cannot_write_the_repository(repo: Repository) -> None:
    done = _as_reader(["touch", str(repo.path / "probe-file")], repo.root.parent / "out")
    assert done.returncode != 0 and not (repo.path / "probe-file").exists(), "the test user can write .kedit"


READS = [
    (["log"], 0, "nudge the norm"),
    (["log", "--oneline", "side"], 0, "[init]"),
    (["log", "--graph"], 0, "nudge the norm"),
    (["show"], 0, "Tensors (1)"),
    (["show", "--json", "v1"], 0, '"message": "nudge the norm"'),
    (["status"], 0, "Nothing changed: the working model is exactly HEAD"),
    (["diff", "HEAD~1"], 1, "modified  model.norm.weight"),  # 1: the models differ
    (["diff", "--stat", "side", "main"], 1, "model.norm.weight"),
    (["branch"], 0, "* main"),
    (["tag"], 0, "v1"),
    (["reflog"], 0, "HEAD@{1}: init"),
    (["reflog", "side"], 0, "branch: created"),
    (["fsck"], 0, ": ok"),
    (["export", "HEAD~1", "{out}/exported"], 0, "exported"),
]

WRITES = [
    ["branch", "x"], ["branch", "-d", "side"], ["tag", "v2"], ["tag", "-d", "v1"], ["checkout", "side"],
    ["reset", "HEAD~1"], ["revert", "HEAD"], ["gc"], ["probe", "rm", "1"],
    ["probe", "add", "--prompt", "Berlin is the capital of", "--answer", "Germany"],
    ["edit", "--prompt", "The capital city is France", "--subject", "France", "--target", "Japan", "--no-eval"],
]


def test_read_commands_work_on_a_read_only_repository(repo: Repository) -> None:
    out = repo.root.parent / "out"
    results = run_as_reader(repo, [[a.replace("{out}", str(out)) for a in args] for args, _, _ in READS])
    for (args, code, shows), result in zip(READS, results, strict=True):
        assert result["escaped"] is None and result["code"] == code, (args, result)
        assert shows in result["stdout"], (args, result["stdout"])
        assert "error" not in result["stderr"], (args, result["stderr"])
    exported = load_file(out / "exported" / "model.safetensors")
    manifest = repo.manifest("HEAD~1")
    assert {name: hash_tensor(t) for name, t in exported.items()} == {n: e.hash for n, e in manifest.items()}


def test_writing_commands_are_refused_in_one_line(repo: Repository) -> None:
    for args, result in zip(WRITES, run_as_reader(repo, WRITES), strict=True):
        assert result["escaped"] is None and result["code"] == 1, (args, result)
        assert result["stderr"].splitlines() == [result["stderr"].strip()], (args, result["stderr"])
        assert result["stderr"].startswith("kedit: error: ") and "read-only for this user" in result["stderr"], args


def test_the_installed_command_reads_a_read_only_repository(repo: Repository) -> None:
    done = _as_reader([str(KEDIT), "--repo", str(repo.root), "log", "--oneline"], repo.root.parent / "out")
    assert done.returncode == 0 and "nudge the norm" in done.stdout and done.stderr == "", done.stderr


def test_a_migration_a_reader_cannot_run_is_named_in_one_line(repo: Repository) -> None:
    if not AS_ROOT:
        pytest.skip("changing the schema needs a user who can write the repository")
    (name,) = repo.db.execute("SELECT name FROM _kedit_migrations ORDER BY name DESC LIMIT 1").fetchone()
    repo.db.execute("DELETE FROM _kedit_migrations WHERE name = ?", [name])
    try:
        done = _as_reader([str(KEDIT), "--repo", str(repo.root), "log"], repo.root.parent / "out")
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr
        assert "needs a schema upgrade that a read-only repository cannot be given" in done.stderr
    finally:
        repo.db.execute("INSERT INTO _kedit_migrations VALUES (?, datetime('now'))", [name])
