"""No data lost: SIGKILL a committing process anywhere, and the repository stays whole.

A helper process ("zygote", started with `sys.executable -c`) imports torch and kedit once,
then forks one worker per run, so each kill costs milliseconds instead of a 2 s import. A
worker loops over commits (low-rank and dense deltas), reverts, branch creations and
checkouts on one repository, appending `OK <id> <branch>` to its report file (flushed to the
kernel, which keeps it when the process dies) after each commit that returned. Every run
ends in SIGKILL:
  - timed runs: the parent kills the worker after a random delay (0.05 to 1.5 s);
  - targeted runs: the worker kills itself at a chosen point (inside an object write,
    inside the SQLite transaction, after it, between worktree shard writes, ...).
After each kill the parent checks that every reported commit is on its branch, that the
working model shows no spurious changes, and periodically that a write command brings the
working model exactly to HEAD. Halfway and at the end, fsck must be clean (unreferenced
objects are only warnings); at the end every branch tip must materialise to its recorded hashes.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kedit.cli import cli
from kedit.core import history
from kedit.core.maintenance import fsck
from kedit.core.repo import Repository
from kedit.core.tensors import hash_tensor
from tests.crashkit import assert_worktree_is_head
from tests.linechild import LineChild

# Where a targeted run kills itself, as "hook@operation" (the hooks are installed by _WORKER;
# a hook counts only while the worker is inside that Repository operation).
KILL_POINTS = (
    "object-tmp-written@commit",  # a delta's safetensors temp file written, not yet renamed into objects/
    "object-placed@commit",  # the object renamed into place; nothing refers to it yet
    "db-inserts-done@commit",  # inside BEGIN IMMEDIATE, every row inserted, no COMMIT yet
    "db-committed@commit",  # transaction committed, working model not yet updated, success not reported
    "db-committed@revert",
    "worktree-pending@commit",  # the worktree index records the pending hashes, no shard written yet
    "worktree-shard-written@commit",  # one shard rewritten (of one or more)
    "worktree-before-index@commit",  # every shard written, the final index not yet
    "worktree-updated@checkout",  # the working model is at the target, HEAD not yet moved
    "db-inserts-done@branch",
)

_WORKER = r'''
import contextlib, os, random, signal, sys, traceback
import torch
import kedit.core.db, kedit.core.store, kedit.core.worktree
from kedit.core.delta import Dense, LowRank
from kedit.core.errors import KeditError
from kedit.core.repo import Repository

TENSORS = {"model.layers.0.mlp.down_proj.weight": (32, 64), "model.layers.1.self_attn.q_proj.weight": (32, 32),
           "model.norm.weight": (32,), "model.embed_tokens.weight": (128, 32)}
OPERATION = [None]  # the Repository operation the worker is in


def install_kill_point(point, nth):
    """Make the worker SIGKILL itself the `nth` time execution reaches `point` ("hook@operation")."""
    hits = [0]

    def reached(hook):
        if f"{hook}@{OPERATION[0]}" == point:
            hits[0] += 1
            if hits[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)

    def track(method, operation):
        def tracked(self, *args, **kwargs):
            OPERATION[0] = operation
            try:
                return method(self, *args, **kwargs)
            finally:
                OPERATION[0] = None
        return tracked

    for name, operation in (("commit", "commit"), ("revert", "revert"), ("checkout", "checkout"),
                            ("create_branch", "branch")):
        setattr(Repository, name, track(getattr(Repository, name), operation))

    write_tensors = kedit.core.store.write_tensors  # what kedit.core.store.save_tensors_atomic writes with
    def store_write_tensors(out, tensors, metadata=None):
        write_tensors(out, tensors, metadata)
        out.flush()
        if "/objects/" in str(out.name):
            reached("object-tmp-written")
    kedit.core.store.write_tensors = store_write_tensors

    store_save = kedit.core.store.save_tensors_atomic
    def store_save_atomic(path, tensors, metadata, tmp_dir=None, **kwargs):
        store_save(path, tensors, metadata, tmp_dir=tmp_dir, **kwargs)
        reached("object-placed")
    kedit.core.store.save_tensors_atomic = store_save_atomic

    write = kedit.core.db.write
    @contextlib.contextmanager
    def db_write(db):
        with write(db) as d:
            yield d
            reached("db-inserts-done")
        reached("db-committed")
    kedit.core.db.write = db_write

    wt_save = kedit.core.worktree.save_tensors_atomic
    def worktree_save(path, tensors, metadata, tmp_dir=None, **kwargs):
        wt_save(path, tensors, metadata, tmp_dir=tmp_dir, **kwargs)
        reached("worktree-shard-written")
    kedit.core.worktree.save_tensors_atomic = worktree_save

    write_index = kedit.core.worktree.Worktree._write_index
    def worktree_write_index(self, index):
        if not index.get("pending"):
            reached("worktree-before-index")
        write_index(self, index)
        if index.get("pending"):
            reached("worktree-pending")
    kedit.core.worktree.Worktree._write_index = worktree_write_index

    update = Repository._update_worktree
    def update_worktree(self, commit_id, **kwargs):
        out = update(self, commit_id, **kwargs)
        reached("worktree-updated")
        return out
    Repository._update_worktree = update_worktree


def work(repo_dir, seed, report_path, point, nth):
    report = open(report_path, "a", buffering=1)
    def say(line):
        report.write(line + "\n")
        report.flush()
    if point != "-":
        install_kill_point(point, nth)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    focus = point.partition("@")[2]  # a targeted run does its operation more often, to get there sooner
    repo = Repository.open(repo_dir)
    say("START")
    for step in range(100000):
        roll = rng.random()
        if rng.random() < 0.4:
            roll = {"revert": 0.8, "branch": 0.9, "checkout": 0.95}.get(focus, roll)
        branch = repo.head_branch()
        if roll < 0.72:
            deltas = {}
            for name in rng.sample(sorted(TENSORS), rng.choice((1, 1, 2, 3))):
                shape = TENSORS[name]
                if len(shape) == 2 and rng.random() < 0.6:
                    rank = rng.choice((1, 2))
                    deltas[name] = LowRank(torch.randn(shape[0], rank, generator=gen) * 0.05,
                                           torch.randn(rank, shape[1], generator=gen) * 0.05)
                else:
                    deltas[name] = Dense(torch.randn(*shape, generator=gen) * 0.01)
            info = repo.commit(deltas, method="test", message=f"run {seed} step {step}")
            say(f"OK {info.id} {branch}")
        elif roll < 0.84:
            candidates = [c.id for c in repo.log(limit=6) if c.parent is not None]
            if not candidates:
                continue
            try:
                info = repo.revert(rng.choice(candidates))
            except KeditError as e:  # a revert of a revert, or of an already reverted commit
                if "no effect left" not in str(e):
                    raise
                say(f"SKIP {e}")
                continue
            say(f"OK {info.id} {branch}")
        elif roll < 0.91:
            name = f"b{seed}-{step}"
            say(f"BRANCH {name} {repo.create_branch(name)}")
        else:
            name = rng.choice(sorted(repo.refs.branches()))
            repo.checkout(name)
            say(f"CHECKOUT {name}")


print("READY", flush=True)
for line in sys.stdin:
    repo_dir, seed, report_path, point, nth = line.split()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            work(repo_dir, int(seed), report_path, point, int(nth))
        except BaseException:
            with open(report_path, "a") as f:
                f.write("ERROR " + traceback.format_exc().replace("\n", " | ") + "\n")
            code = 1
        os._exit(code)
    print(f"PID {pid}", flush=True)
    _, status = os.waitpid(pid, 0)
    print(f"EXIT {status}", flush=True)
'''


class Zygote(LineChild):
    """The helper process that forks workers; speaks one line per message on stdin/stdout."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(_WORKER, env, "zygote", ready_timeout=60)

    def start(self, repo_dir: Path, seed: int, report: Path, point: str = "-", nth: int = 0) -> int:
        self.send(f"{repo_dir} {seed} {report} {point} {nth}")
        tag, pid = self.readline(10).split()
        assert tag == "PID"
        return int(pid)

    def wait_exit(self, timeout: float) -> int:
        tag, status = self.readline(timeout).split()
        assert tag == "EXIT"
        return int(status)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEDIT_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("KEDIT_DEBUG", raising=False)


@pytest.fixture
def repo_dir(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    """A repository over the tiny Llama (conftest), with a working model."""
    return Repository.init(tmp_path / "work", str(tiny_llama_dir), progress=False).path


def _read_report(path: Path, label: str) -> list[list[str]]:
    lines = [line.split(" ", 3) for line in path.read_text().splitlines()] if path.exists() else []
    errors = [" ".join(line) for line in lines if line[0] == "ERROR"]
    assert not errors, f"the worker of {label} failed:\n" + "\n".join(errors)
    return lines


def _check_after_kill(repo_dir: Path, reported: dict[str, str], branches: dict[str, str],
                      label: str) -> Repository:
    """Every reported commit is on the branch it was made on; no spurious worktree changes."""
    repo = Repository.open(repo_dir)
    tips = repo.refs.branches()
    assert set(branches) <= set(tips), f"after {label}: reported branches lost: {set(branches) - set(tips)}"
    on_branch = {name: set(history.ancestors(repo.db, tip)) for name, tip in tips.items()}
    for cid, branch in reported.items():
        assert cid in on_branch[branch], f"after {label}: commit {cid[:12]} reported on {branch} is not in its log"
    for name, target in branches.items():
        assert target in on_branch[name], f"after {label}: branch {name} no longer contains {target[:12]}"
    assert repo.head() is not None
    assert repo.status()["modified"] == {}, f"after {label}: a killed kedit write looks like a change made by hand"
    return repo


def _check_worktree_at_head(repo: Repository, label: str) -> None:
    """A write command (checkout of the current branch) brings the working model exactly to HEAD."""
    branch = repo.head_branch()
    repo.checkout(branch or repo.head())
    status = repo.status()
    assert status["worktree_commit"] == status["head"]
    assert status["modified"] == {}, f"after {label}: the worktree reports changes nobody made"
    assert_worktree_is_head(repo, f"after {label}")


def test_sigkill_during_commits_loses_nothing(repo_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(20240607)
    plan: list[tuple[str, float | int]] = [("timed", round(0.05 * 30 ** rng.random(), 3)) for _ in range(16)]
    plan += [(point, rng.randint(1, 4)) for point in KILL_POINTS for _ in range(2)]  # (point, nth time)
    rng.shuffle(plan)

    reported: dict[str, str] = {}  # commit id -> the branch it was made on
    branches: dict[str, str] = {}  # branch created by a worker -> the commit it was created at
    stats = {"unreported_commits": 0, "pending_worktree": 0}
    zygote = Zygote(dict(os.environ))
    started = time.monotonic()
    pid = None
    try:
        for run, (kind, arg) in enumerate(plan):
            report = tmp_path / f"run-{run}.txt"
            commits_before = _commit_count(repo_dir)
            if kind == "timed":
                pid = zygote.start(repo_dir, run, report)
                time.sleep(float(arg))
                with contextlib.suppress(ProcessLookupError):  # it died on its own: the report says why
                    os.kill(pid, signal.SIGKILL)
            else:
                pid = zygote.start(repo_dir, run, report, kind, int(arg))
            status = zygote.wait_exit(timeout=30)
            pid = None
            label = f"run {run} ({kind} {arg})"
            lines = _read_report(report, label)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                f"{label} ended with status {status}, not SIGKILL: {lines[-3:]}")
            oks = [line for line in lines if line[0] == "OK"]
            reported.update((cid, branch) for _, cid, branch in oks)
            branches.update((line[1], line[2]) for line in lines if line[0] == "BRANCH")
            repo = _check_after_kill(repo_dir, reported, branches, label)
            stats["unreported_commits"] += _commit_count(repo_dir) - commits_before - len(oks)
            stats["pending_worktree"] += bool(repo.worktree.read_index().get("pending"))
            if run % 6 == 5:
                _check_worktree_at_head(repo, label)
            if run == len(plan) // 2:
                halfway = fsck(repo)
                assert halfway.ok, f"after {label}: {halfway.errors}"
            repo.db.conn.close()
    finally:
        if pid is not None:  # a run that never ended (the assertion above failed): do not leave it running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        zygote.close()
    elapsed = time.monotonic() - started

    repo = Repository.open(repo_dir)
    assert len(reported) > 20, f"too few commits to mean anything ({len(reported)})"
    assert stats["unreported_commits"] > 0 and stats["pending_worktree"] > 0, (
        f"no kill landed between the database commit and the worktree update: {stats}")
    _check_worktree_at_head(repo, "the last run")
    report = fsck(repo)
    assert report.ok, report.errors
    for name, tip in repo.refs.branches().items():
        manifest = repo.manifest(tip)
        values = repo.materialize(tip)
        assert {n: hash_tensor(v) for n, v in values.items()} == {n: e.hash for n, e in manifest.items()}, name
    print(f"{len(plan)} kills, {len(reported)} reported commits, {stats}, {elapsed:.1f} s")


def _commit_count(repo_dir: Path) -> int:
    conn = sqlite3.connect(repo_dir / "kedit.db")
    try:
        return conn.execute("SELECT COUNT(*) FROM commits").fetchone()[0]
    finally:
        conn.close()


def kedit_command() -> list[str]:
    script = Path(sys.executable).with_name("kedit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kedit.cli"]


def test_second_writer_gets_locked_error_and_readers_do_not_block(repo_dir: Path) -> None:
    repo = Repository.open(repo_dir)
    head = repo.head()
    env = {**os.environ, "KEDIT_LOCK_TIMEOUT": "0.5"}
    base = [*kedit_command(), "--repo", str(repo.root)]
    with repo.lock():
        # Both start together (each spends ~2 s importing torch); the lock is held throughout.
        writer = subprocess.Popen([*base, "branch", "x"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        reader = subprocess.Popen([*base, "log", "--oneline"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        w_out, w_err = writer.communicate(timeout=60)
        r_out, r_err = reader.communicate(timeout=60)  # a reader waiting for the lock would hang here
    assert writer.returncode == 1, (w_out, w_err)
    assert "Traceback" not in w_err
    assert w_err.splitlines() == [w_err.strip()], f"not one line: {w_err!r}"
    assert w_err.startswith(f"kedit: error: another kedit command is writing to {repo_dir}"), w_err
    assert "waited 0.5 s" in w_err and "KEDIT_LOCK_TIMEOUT" in w_err
    assert w_out == ""
    assert reader.returncode == 0, (r_out, r_err)
    assert r_out.startswith(head[:12])
    assert "x" not in repo.refs.branches() and repo.head() == head


# Where `kedit init` is killed: (the function whose call kills it, what the repository then holds).
INIT_KILLS = {
    "lock-taken": ("create", "an empty .kedit (the lock file only)"),
    "objects-stored": ("write_commits", "the database and every object, no commit"),
    "base-recorded": ("finish_init", "the base commit, no branch and no HEAD"),
}

_KILLED_INIT = r'''
import os, signal, sys
from kedit.core.repo import Repository
where, source, method = sys.argv[1:]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
setattr(Repository, method, die)
Repository.init(where, source, progress=False)
'''


@pytest.mark.parametrize("point", sorted(INIT_KILLS))
def test_an_init_killed_midway_is_reported_then_finished(point: str, tmp_path: Path, tiny_llama_dir: Path) -> None:
    where = tmp_path / "work"
    method, holds = INIT_KILLS[point]
    killed = subprocess.run([sys.executable, "-c", _KILLED_INIT, str(where), str(tiny_llama_dir), method],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (where / ".kedit").is_dir()

    expected = (f"kedit: error: the repository at {where / '.kedit'} was not completely initialised "
                "(interrupted init?); run 'kedit init' again to finish or clear it\n")
    for command in (["status"], ["log"], ["fsck"], ["branch", "x"]):
        done = CliRunner().invoke(cli, ["--repo", str(where), *command])
        assert (done.exit_code, done.stdout, done.stderr) == (1, "", expected), (command, holds)

    again = CliRunner().invoke(cli, ["--repo", str(where), "init", str(tiny_llama_dir)])
    assert again.exit_code == 0, again.stderr
    repo = Repository.open(where)
    assert len(repo.log()) == 1 and repo.head_branch() == "main" and repo.status()["modified"] == {}
    report = fsck(repo)
    assert report.ok and not report.warnings, (report.errors, report.warnings)  # nothing of the killed init left
    _check_worktree_at_head(repo, f"init killed at {point}")


@pytest.fixture
def crash_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Repositories over a tiny Llama with a tokenizer, a local Hub, and the forker (tests/crashkit.py)."""
    from huggingface_hub import constants as hf_constants

    from tests import crashkit
    from tests.hubserver import HubServer
    from tests.tiny import make_model, make_tokenizer

    model = tmp_path / "model"
    tok = make_tokenizer()
    make_model("llama", len(tok)).save_pretrained(model)
    tok.save_pretrained(model)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    server = HubServer(tmp_path / "hub", {crashkit.TOKEN: crashkit.HUB_USER}).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", crashkit.TOKEN)
    run = crashkit.CrashRun(tmp_path / "crash", model, server.url, server.store, seed=20261204)
    try:
        run.start(dict(os.environ))
        yield run
    finally:
        run.close()
        server.stop()


def test_sigkill_of_every_writing_command_leaves_a_whole_repository(crash_run) -> None:
    """Each writing command, init, edit and the Hub commands included, run once to completion and
    once killed at random (bench/crash_safety.py does many more)."""
    from tests.crashkit import COMMANDS, Tally

    tallies = {}
    for command in COMMANDS:
        tallies[command] = Tally()
        crash_run.run_command(command, 1, tallies[command])
    failures = [f for t in tallies.values() for f in t.failures]
    assert not failures, "\n".join(failures)
    killed = sum(t.kills for t in tallies.values())
    assert killed >= len(COMMANDS) - 4, {c: t.kills for c, t in tallies.items()}  # a few may finish first
    print(f"{killed} kills, every one survived: {({c: t.kills for c, t in tallies.items()})}")
