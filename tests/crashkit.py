"""Kill any writing kedit command at a random moment, then prove the repository is whole.

Used by tests/test_crash_safety.py (a few kills per command) and bench/crash_safety.py (many).

A helper process imports kedit, torch and transformers once, then forks one child per
command, which runs the real CLI (`kedit.cli.cli`) with its output in files. Each command is
first run to completion once (its duration T), then run again and again and SIGKILLed after a
random delay in [0, T] (a run that finishes first counts as finished, not killed). After every
run, `check_repository` proves:
  - every acknowledged commit (the command exited 0, or printed `[branch id]`) is on its branch,
    and an acknowledged ref move (checkout, reset, pull, branch, tag, push) happened;
  - `fsck` finds no error (unreferenced objects from a killed write are only warnings);
  - no half-written state is visible: `status` shows no change made by hand, an interrupted
    `init` or `clone` is refused in one line by other commands and finished by the next run;
  - after the next write (a checkout of the current branch), every working-model shard hashes
    to HEAD's recorded hash and no temporary file is left.
Hub commands talk to the local test server (tests/hubserver.py) over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kedit.core import history
from kedit.core.delta import Dense
from kedit.core.errors import IncompleteRepositoryError
from kedit.core.maintenance import fsck
from kedit.core.repo import Repository
from kedit.core.store import read_safetensors
from kedit.core.tensors import hash_tensor
from kedit.core.worktree import INDEX_FILE, shard_name
from kedit.hub import fetch as hubfetch
from kedit.hub import layout as hub
from kedit.hub import remotes
from tests.linechild import LineChild

COMMANDS = ("init", "edit", "revert", "merge", "cherry_pick",
            "checkout", "branch", "tag", "reset", "gc", "push", "fetch", "pull", "clone")
TOKEN = "hf_kedit_crash_token_0123456789abcdef"
HUB_USER = "alice"
EDIT_ARGS = ["edit", "--prompt", "The capital city is France", "--subject", "France", "--target", "Japan",
             "--set", "mom2_adjustment=false", "--set", "v_num_grad_steps=8", "--no-eval"]
NORM = "model.norm.weight"

_FORKER = r'''
import json, os, sys, traceback
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
import kedit.edit.run, kedit.hub.layout, kedit.hub.fetch, kedit.core.maintenance, kedit.methods.rome
from kedit.cli import cli

print("READY", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(job["cwd"])
            for fd, name in ((1, job["out"]), (2, job["err"])):
                target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(target, fd)
            cli.main(job["args"], prog_name="kedit")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    print(f"PID {pid}", flush=True)
    _, status = os.waitpid(pid, 0)
    print(f"EXIT {status}", flush=True)
'''


@dataclass
class Outcome:
    killed: bool
    code: int | None  # exit status when it was not killed
    stdout: str
    stderr: str

    @property
    def acknowledged(self) -> bool:
        return not self.killed and self.code == 0


class Forker(LineChild):
    """The helper process that forks one CLI run per request (one line per message)."""

    def __init__(self, env: dict[str, str], scratch: Path) -> None:
        self.scratch = scratch
        self.runs = 0
        super().__init__(_FORKER, env, "forker", ready_timeout=120)

    def run(self, args: list[str], cwd: Path, kill_after: float | None = None, timeout: float = 300) -> Outcome:
        """Run `kedit ARGS` in `cwd`; SIGKILL it after `kill_after` seconds unless it ended first."""
        self.runs += 1
        out, err = self.scratch / f"run-{self.runs}.out", self.scratch / f"run-{self.runs}.err"
        job = {"args": args, "cwd": str(cwd), "out": str(out), "err": str(err)}
        self.send(json.dumps(job))
        tag, pid = self.readline(30).split()
        assert tag == "PID"
        if kill_after is not None:
            if self.selector.select(kill_after):  # it ended before the kill
                kill_after = None
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        tag, status = self.readline(timeout).split()
        assert tag == "EXIT"
        status = int(status)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        code = None if killed else os.waitstatus_to_exitcode(status)
        return Outcome(killed, code, out.read_text() if out.exists() else "", err.read_text() if err.exists() else "")


def assert_worktree_is_head(repo: Repository, label: str) -> None:
    """Every working-model shard holds HEAD's value by hash, and nothing else lies in the folder."""
    manifest = repo.manifest()
    folder = repo.worktree.folder
    for name, entry in manifest.items():
        value = read_safetensors(folder / shard_name(name))[0][name]
        assert hash_tensor(value) == entry.hash, f"{label}: working-model shard {name} is not HEAD's value"
    expected = {shard_name(n) for n in manifest} | {INDEX_FILE} | set(repo.files())
    leftovers = sorted(p.name for p in folder.iterdir() if p.name not in expected)
    assert not leftovers, f"{label}: files left in the working model: {leftovers}"


def check_repository(root: Path, label: str, acked: dict[str, str] | None = None) -> None:
    """The checks after every run (module docstring); `acked` maps commit ids to their branch."""
    repo = Repository.open(root)
    try:
        tips = repo.refs.branches()
        for cid, branch in (acked or {}).items():
            assert branch in tips and cid in history.ancestors(repo.db, tips[branch]), (
                f"{label}: acknowledged commit {cid[:12]} is not on {branch}")
        assert repo.status()["modified"] == {}, f"{label}: a killed kedit write looks like a change made by hand"
        report = fsck(repo)
        assert report.ok, f"{label}: fsck: {report.errors}"
        repo.checkout(repo.head_branch() or repo.head())  # the next write heals the working model
        assert_worktree_is_head(repo, label)
    finally:
        repo.db.conn.close()


def committed(outcome: Outcome, repo_root: Path) -> dict[str, str]:
    """The commits a run printed as made (`[branch shortid] message`), by full id."""
    found = re.findall(r"^\[(\S+) ([0-9a-f]{12})\]", outcome.stdout, re.MULTILINE)
    if not found:
        return {}
    repo = Repository.open(repo_root)
    try:
        return {repo.resolve(short): branch for branch, short in found}
    finally:
        repo.db.conn.close()


def small_edit(root: Path, seed: int, message: str) -> str:
    """A commit made through the library (the state a command under test then acts on)."""
    repo = Repository.open(root)
    try:
        gen = torch.Generator().manual_seed(seed)
        shape = repo.manifest()[NORM].shape
        return repo.commit({NORM: Dense(torch.randn(*shape, generator=gen) * 1e-3)}, message=message).id
    finally:
        repo.db.conn.close()


def with_repo(root: Path, action: Callable[[Repository], object]) -> object:
    repo = Repository.open(root)
    try:
        return action(repo)
    finally:
        repo.db.conn.close()


@dataclass
class Tally:
    kills: int = 0
    finished: int = 0  # runs that ended before their kill
    survived: int = 0  # killed runs after which every check passed
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


class CrashRun:
    """One repository per kind of command, the forker, and the local Hub (started by the caller)."""

    def __init__(self, workdir: Path, model: Path, hub_url: str, hub_store, *, seed: int = 0) -> None:
        self.work, self.model, self.hub_url, self.hub_store = workdir, model, hub_url, hub_store
        self.rng = random.Random(seed)
        self.forker: Forker | None = None
        self.local = workdir / "local"
        self.acked: dict[str, str] = {}
        self.duration = 0.0  # of the last run of a command under test

    def start(self, env: dict[str, str]) -> None:
        scratch = self.work / "runs"
        scratch.mkdir(parents=True)
        self.forker = Forker({**env, "HF_ENDPOINT": self.hub_url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
                              "HF_HUB_DISABLE_XET": "1", "KEDIT_DISABLE_PROGRESS_BARS": "1",
                              "OMP_NUM_THREADS": "1", "KEDIT_LOCK_TIMEOUT": "30"}, scratch)
        Repository.init(self.local, str(self.model), progress=False)
        with_repo(self.local, lambda r: r.create_branch("side"))
        with_repo(self.local, lambda r: r.create_branch("resets"))
        with_repo(self.local, lambda r: r.checkout("side"))
        small_edit(self.local, 1, "side differs from main")
        with_repo(self.local, lambda r: r.checkout("main"))
        for name in ("pushed", "shared"):
            self.hub_store.create_repo(f"{HUB_USER}/{name}")
        self.pusher = self.work / "pusher"
        Repository.init(self.pusher, str(self.model), progress=False)
        self.kedit(["--repo", str(self.pusher), "remote", "add", "origin", f"hf://{HUB_USER}/pushed"])
        self.upstream = self.work / "upstream"
        Repository.init(self.upstream, str(self.model), progress=False)
        self.kedit(["--repo", str(self.upstream), "remote", "add", "origin", f"hf://{HUB_USER}/shared"])
        self.kedit(["--repo", str(self.upstream), "push"])
        self.downstream = self.work / "downstream"
        self.kedit(["clone", f"hf://{HUB_USER}/shared", str(self.downstream)])

    def close(self) -> None:
        if self.forker is not None:
            self.forker.close()

    def kedit(self, args: list[str], kill_after: float | None = None) -> Outcome:
        assert self.forker is not None
        outcome = self.forker.run(args, self.work, kill_after)
        if kill_after is None:
            assert outcome.code == 0, f"kedit {' '.join(args)} failed: {outcome.stderr[-2000:]}"
        return outcome

    def target(self, args: list[str], kill_after: float | None) -> Outcome:
        """Run the command under test; its duration when not killed sets the range of kill delays."""
        started = time.monotonic()
        outcome = self.kedit(args, kill_after)
        self.duration = time.monotonic() - started
        return outcome

    # -- each command: what it acts on, its arguments, and what must hold after it ----------

    def run_command(self, command: str, runs: int, tally: Tally) -> None:
        """Run `command` once to completion (its duration), then `runs` times with a kill.

        The kill delay is drawn up to the fastest complete run seen so far (the first one is
        slowed by cold caches), so that most runs are killed rather than finish first.
        """
        started = time.monotonic()
        getattr(self, f"_{command}")(0, None)
        duration = self.duration
        for i in range(1, runs + 1):
            delay = self.rng.uniform(0.0, duration)
            label = f"{command} run {i} (kill after {delay:.2f} s)"
            try:
                killed = getattr(self, f"_{command}")(i, delay)
            except Exception as e:  # a failed check, or a repository the library cannot use any more
                tally.kills += 1
                tally.failures.append(f"{label}: {type(e).__name__}: {e}")
                continue
            if killed:
                tally.kills += 1
                tally.survived += 1
            else:
                tally.finished += 1
                duration = min(duration, self.duration)
        tally.seconds += time.monotonic() - started

    def _local_command(self, i: int, delay: float | None, args: list[str], label: str,
                       then: Callable[[Outcome], None] | None = None) -> bool:
        outcome = self.target(["--repo", str(self.local), *args], delay)
        self.acked.update(committed(outcome, self.local))
        if outcome.acknowledged and then is not None:
            then(outcome)
        check_repository(self.local, f"{label} {i}", self.acked)
        return outcome.killed

    def _on(self, branch: str) -> None:
        with_repo(self.local, lambda r: r.checkout(branch))

    def _edit(self, i: int, delay: float | None) -> bool:
        self._on("main")
        return self._local_command(i, delay, [*EDIT_ARGS, "-m", f"edit {i}"], "edit")

    def _revert(self, i: int, delay: float | None) -> bool:
        self._on("main")
        self.acked[small_edit(self.local, 100 + i, f"to revert {i}")] = "main"
        return self._local_command(i, delay, ["revert", "HEAD"], "revert")

    def _merge(self, i: int, delay: float | None) -> bool:
        self._on("side")
        self.acked[small_edit(self.local, 300 + i, f"to merge {i}")] = "side"
        self._on("main")  # both sides change one norm: --take ours resolves that conflict
        return self._local_command(i, delay, ["merge", "side", "--no-ff", "--take", "ours"], "merge")

    def _cherry_pick(self, i: int, delay: float | None) -> bool:
        self._on("side")
        picked = small_edit(self.local, 400 + i, f"to pick {i}")
        self.acked[picked] = "side"
        self._on("main")
        return self._local_command(i, delay, ["cherry-pick", picked], "cherry-pick")

    def _checkout(self, i: int, delay: float | None) -> bool:
        target = "side" if with_repo(self.local, lambda r: r.head_branch()) == "main" else "main"

        def moved(_: Outcome) -> None:
            assert with_repo(self.local, lambda r: r.head_branch()) == target, f"checkout {target} acknowledged"

        return self._local_command(i, delay, ["checkout", target], "checkout", moved)

    def _ref(self, i: int, delay: float | None, kind: str) -> bool:
        name = f"{kind[0]}{i}"

        def made(_: Outcome) -> None:
            refs = with_repo(self.local, lambda r: r.refs.branches() if kind == "branch" else r.refs.tags())
            assert name in refs, f"{kind} {name} acknowledged but missing"

        return self._local_command(i, delay, [kind, name], kind, made)

    def _branch(self, i: int, delay: float | None) -> bool:
        return self._ref(i, delay, "branch")

    def _tag(self, i: int, delay: float | None) -> bool:
        return self._ref(i, delay, "tag")

    def _reset(self, i: int, delay: float | None) -> bool:
        self._on("resets")
        before = with_repo(self.local, lambda r: r.head())
        small_edit(self.local, 200 + i, f"to reset away {i}")

        def moved(_: Outcome) -> None:
            assert with_repo(self.local, lambda r: r.head()) == before, "reset acknowledged, HEAD not moved"

        return self._local_command(i, delay, ["reset", "--force", "HEAD~1"], "reset", moved)

    def _gc(self, i: int, delay: float | None) -> bool:
        self._on("resets")
        for k in range(3):  # commits only the reflog holds, which gc --reflog-expire now removes
            small_edit(self.local, 300 + 10 * i + k, f"garbage {i}.{k}")
        with_repo(self.local, lambda r: r.reset("HEAD~3"))
        return self._local_command(i, delay, ["gc", "--prune", "now", "--reflog-expire", "now"], "gc")

    def _init(self, i: int, delay: float | None) -> bool:
        where = self.work / f"init-{i}"
        outcome = self.target(["--repo", str(where), "init", str(self.model)], delay)
        self._finish_interrupted(where, outcome, ["--repo", str(where), "init", str(self.model)], f"init {i}")
        return outcome.killed

    def _clone(self, i: int, delay: float | None) -> bool:
        where = self.work / f"clone-{i}"
        outcome = self.target(["clone", f"hf://{HUB_USER}/shared", str(where)], delay)
        self._finish_interrupted(where, outcome, ["clone", f"hf://{HUB_USER}/shared", str(where)], f"clone {i}")
        return outcome.killed

    def _finish_interrupted(self, where: Path, outcome: Outcome, again: list[str], label: str) -> None:
        """After init or clone: complete, or refused in one line and finished by running it again."""
        if not (where / ".kedit").exists():
            assert not outcome.acknowledged, f"{label} acknowledged but made nothing"
            self.kedit(again)
        else:
            try:
                with_repo(where, lambda r: None)
            except IncompleteRepositoryError:
                assert not outcome.acknowledged, f"{label} acknowledged but incomplete"
                status = self.forker.run(["--repo", str(where), "status"], self.work)
                assert status.code == 1 and status.stdout == "", f"{label}: status on a half-made repository"
                assert status.stderr.count("\n") == 1 and "not completely initialised" in status.stderr, status.stderr
                self.kedit(again)
        check_repository(where, label)

    def _push(self, i: int, delay: float | None) -> bool:
        head = small_edit(self.pusher, 400 + i, f"to push {i}")
        outcome = self.target(["--repo", str(self.pusher), "push"], delay)
        check_repository(self.pusher, f"push {i}")
        if outcome.acknowledged:
            assert self._remote_tip(self.pusher) == head, f"push {i} acknowledged, remote not at {head[:12]}"
        self.kedit(["--repo", str(self.pusher), "push"])  # a killed push does not wedge the remote
        assert self._remote_tip(self.pusher) == head, f"push {i}: the push after the kill did not land"
        return outcome.killed

    def _remote_tip(self, root: Path) -> str:
        return with_repo(root, lambda r: hubfetch.fetch(r, "origin", ["main"])["main"].tip)

    def _upstream_moves(self, i: int) -> str:
        head = small_edit(self.upstream, 500 + i, f"upstream {i}")
        with_repo(self.upstream, lambda r: hub.push(r, "origin"))
        return head

    def _fetch(self, i: int, delay: float | None) -> bool:
        head = self._upstream_moves(i)
        outcome = self.target(["--repo", str(self.downstream), "fetch"], delay)
        check_repository(self.downstream, f"fetch {i}")
        tracking = with_repo(self.downstream, lambda r: remotes.tracking(r.db, "origin", "main"))
        if outcome.acknowledged:
            assert tracking is not None and tracking.kedit_commit == head, f"fetch {i} acknowledged, origin/main stale"
        self.kedit(["--repo", str(self.downstream), "fetch"])
        return outcome.killed

    def _pull(self, i: int, delay: float | None) -> bool:
        head = self._upstream_moves(1000 + i)
        outcome = self.target(["--repo", str(self.downstream), "pull"], delay)
        check_repository(self.downstream, f"pull {i}")
        if outcome.acknowledged:
            assert with_repo(self.downstream, lambda r: r.head()) == head, f"pull {i} acknowledged, HEAD stale"
        self.kedit(["--repo", str(self.downstream), "pull"])
        assert with_repo(self.downstream, lambda r: r.head()) == head, f"pull {i}: the pull after the kill failed"
        return outcome.killed


def hub_environment() -> None:
    """Let this process's huggingface_hub talk to the local server (tests run offline otherwise)."""
    from huggingface_hub import constants as hf_constants

    hf_constants.HF_HUB_OFFLINE = False
    hf_constants.HF_HUB_DISABLE_XET = True
