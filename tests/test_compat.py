"""Formats last (issue #17): a repository written by kedit 0.1 still works, locally and on the Hub.

tests/fixtures/compat_v0_1 was built once by tests/fixtures/make_compat_repo.py with kedit 0.1 and
is never regenerated: `repo/` is the kedit repository (ROME, MEMIT, AlphaEdit with memory and
covariance statistics, FT, a GRACE adapter, a revert, a branch, a tag, probes, metrics, config, a
remote), `hub/` the local Hub server's storage after both branches were pushed, `expected.json`
what kedit 0.1 said about them. This test copies the fixture and drives today's `kedit` command
line over it, as a subprocess, and asks for the same ids, refs and tensor hashes. A later format
change keeps it green, or migrates the copy here, in a tested migration step, before these checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.make_compat_repo import folder_digests
from tests.hubserver import HubServer
from tests.jsondoc import doc
from tests.linechild import LineChild

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "compat_v0_1"
TOKEN = "hf_compat_fixture_token_0123456789abcdef"  # the fake token the fixture was pushed with
# The parts of a commit that its id and history pin down; later versions may add fields.
COMMIT_KEYS = ("id", "kind", "method", "message", "author", "created", "requests", "hparams")


def kedit_command() -> list[str]:
    """The `kedit` console script beside this Python, else its entry point through `python -c`."""
    script = Path(sys.executable).with_name("kedit")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from kedit.cli import main; sys.exit(main())"]


# Each command is its own process, forked from a helper that imported the heavy third-party libraries
# once (torch alone is ~2 s a process). The child runs the `kedit` console script itself (or, without
# one, its entry point), so kedit is imported afresh by every command and only through that door.
# KEDIT_COMPAT_SUBPROCESS=1 runs every command as a plain subprocess instead (slower, same checks).
_ZYGOTE = r"""
import json, os, runpy, sys, traceback
import torch, transformers, safetensors.torch, huggingface_hub  # third-party only: never kedit here
print("READY", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(job["cwd"])
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            for fd, name in ((1, job["out"]), (2, job["err"])):
                os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            sys.argv = job["argv"]
            if job["script"]:
                runpy.run_path(job["script"], run_name="__main__")
            else:
                from kedit.cli import main
                main()
            code = 0
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


class Kedit:
    """`kedit --repo REPO ARGS...` in a process of its own, with `env` as its environment."""

    def __init__(self, env: dict[str, str], scratch: Path) -> None:
        self.env, self.scratch, self.runs = env, scratch, 0
        scratch.mkdir(parents=True, exist_ok=True)
        self.zygote = None
        if hasattr(os, "fork") and os.environ.get("KEDIT_COMPAT_SUBPROCESS") != "1":
            self.zygote = LineChild(_ZYGOTE, env, "kedit helper process", ready_timeout=300)

    def run(self, repo: Path, *args: str) -> tuple[int, str, str]:
        command = [*kedit_command(), "--repo", str(repo), *args]
        if self.zygote is None:
            r = subprocess.run(command, env=self.env, cwd=repo.parent, capture_output=True, text=True, timeout=300)
            return r.returncode, r.stdout, r.stderr
        self.runs += 1
        out, err = self.scratch / f"{self.runs}.out", self.scratch / f"{self.runs}.err"
        script = command[0] if Path(command[0]).name == "kedit" else None
        job = {"argv": ["kedit", "--repo", str(repo), *args], "script": script, "cwd": str(repo.parent),
               "out": str(out), "err": str(err)}
        self.zygote.send(json.dumps(job))
        code = int(self.zygote.readline(300))
        return code, out.read_text(), err.read_text()

    def __call__(self, repo: Path, *args: str, code: int = 0) -> str:
        returncode, stdout, stderr = self.run(repo, *args)
        assert returncode == code, f"kedit {' '.join(args)}: exit {returncode}\n{stdout}{stderr}"
        assert "Traceback" not in stdout + stderr and TOKEN not in stdout + stderr
        return stdout

    def json(self, repo: Path, *args: str) -> Any:
        return doc(self(repo, *args, "--json"))

    def close(self) -> None:
        if self.zygote is not None:
            self.zygote.close()




@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture
def start_kedit(tmp_path: Path):
    """start_kedit(**env) -> a Kedit runner with the test's environment plus `env`."""
    runners: list[Kedit] = []

    def start(**extra: str) -> Kedit:
        env = dict(os.environ) | {"NO_COLOR": "1", "KEDIT_DISABLE_PROGRESS_BARS": "1",
                                  "HF_HUB_DISABLE_PROGRESS_BARS": "1"} | extra
        env.pop("KEDIT_AUTHOR", None)  # new commits take their author from the fixture's config
        runners.append(Kedit(env, tmp_path / f"runs-{len(runners)}"))
        return runners[-1]

    yield start
    for runner in runners:
        runner.close()


def commits(log: list[dict]) -> list[dict]:
    """The commits' records, comparable across JSON formats: 0.1 printed `parent`, today's `parents`."""
    return [{k: c[k] for k in COMMIT_KEYS} | {"parent": parent_of(c), "metrics": sorted(json.dumps(
        {k: v for k, v in request_column(m).items() if k != "source"}, sort_keys=True) for m in c["metrics"])}
            for c in log]


def request_column(metric: dict) -> dict:
    """A metric as today's kedit shows it: 0.1 stored a batch edit's score of request i under the suite
    "request i"; migration 0009 moved i to the `request` column (suite ''), None for whole-commit scores."""
    suite, request = metric["suite"], metric.get("request")
    if request is None and suite.startswith("request ") and suite.removeprefix("request ").isdigit():
        suite, request = "", int(suite.removeprefix("request "))
    return metric | {"suite": suite, "request": request}


def parent_of(commit: dict) -> str | None:
    return commit["parent"] if "parent" in commit else (commit["parents"] or [None])[0]


def copy_fixture(tmp_path: Path, expected: dict) -> tuple[Path, Path]:
    """The fixture's repository and Hub storage, copied; with the empty folders git does not keep."""
    shutil.copytree(FIXTURE / "repo", tmp_path / "repo")
    shutil.copytree(FIXTURE / "hub", tmp_path / "hub")
    for folder in expected["empty_dirs"]:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    migrate(tmp_path / "repo", tmp_path / "hub")
    return tmp_path / "repo", tmp_path / "hub"


def migrate(repo: Path, hub: Path) -> None:
    """Where a later format change migrates the 0.1 copy, through kedit's own migration (tested on its
    own), before the checks below. None is needed yet: the database's migrations (0009 moves the
    "request i" suites to the request column, tests/test_metric_request.py) run when kedit opens it,
    and a fetch translates the Hub documents' old form (`commits` compares through `request_column`)."""


def assert_fsck_clean(kedit: Kedit, repo: Path) -> dict:
    report = kedit.json(repo, "fsck")
    assert report["ok"] and report["errors"] == [], report
    return report


def new_commit(kedit: Kedit, repo: Path) -> dict:
    kedit(repo, "edit", "--method", "ft", "--prompt", "The language of Japan is", "--subject", "Japan",
          "--target", "Paris", "--no-eval", "--set", "lr=0.05", "--set", "num_steps=2", "-m", "after 0.1")
    return kedit.json(repo, "log", "main", "experiment")["commits"]


def test_a_copy_without_its_empty_folders_takes_a_new_commit(tmp_path: Path, start_kedit, expected: dict) -> None:
    shutil.copytree(FIXTURE / "repo", tmp_path / "repo")
    for folder in expected["empty_dirs"]:  # as git checks it out (the fixture's folder may still have them)
        if (tmp_path / folder).is_dir():
            (tmp_path / folder).rmdir()
    kedit = start_kedit(HF_HUB_OFFLINE="1")
    assert_fsck_clean(kedit, tmp_path / "repo")
    new_commit(kedit, tmp_path / "repo")


def test_the_fixture_is_small_and_holds_no_pickles() -> None:
    files = [p for p in FIXTURE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 4 * 1024 * 1024
    assert not [p for p in files if p.suffix in (".pkl", ".pickle", ".pt", ".bin")]


def test_a_v0_1_repository_opens_checks_out_and_takes_new_commits(tmp_path: Path, start_kedit, expected: dict) -> None:
    repo, _ = copy_fixture(tmp_path, expected)
    kedit = start_kedit(HF_HUB_OFFLINE="1")
    log_all, head = expected["log"]["all"], expected["status"]["head"]
    experiment = expected["branches"]["branches"]["experiment"]

    status = kedit.json(repo, "status")
    assert (status["branch"], status["head"], status["worktree_commit"]) == ("main", head, head)
    assert not status["modified"]
    worktree = Path(status["worktree"])
    assert folder_digests(worktree) == expected["exports"][head]["tensors"]
    assert commits(kedit.json(repo, "log", "main", "experiment")["commits"]) == commits(log_all)
    assert kedit.json(repo, "branch") == expected["branches"]
    assert kedit.json(repo, "tag")["tags"] == expected["tags"]
    shown, recorded = kedit.json(repo, "show", experiment), expected["show"][experiment]  # a GRACE adapter
    assert commits([shown["commit"]]) == commits([recorded])
    assert shown["tensors"] == recorded["tensors"] and shown["adapters"] == recorded["adapters"]
    assert kedit(repo, "probe", "list") == expected["probes"]
    assert kedit(repo, "config", "--list") == expected["config"]
    assert kedit(repo, "remote") == expected["remotes"]
    report = assert_fsck_clean(kedit, repo)
    for key in ("commits", "objects", "tensors", "worktree_shards"):
        assert report[key] == expected["fsck"][key], key

    # Every revision, checked out, is the tensors kedit 0.1 exported for it; main last, so HEAD is main again.
    for commit in sorted(log_all, key=lambda c: c["id"] == head):
        rev = "main" if commit["id"] == head else commit["id"]
        kedit(repo, "checkout", rev)
        assert folder_digests(worktree) == expected["exports"][commit["id"]]["tensors"], rev
    status = kedit.json(repo, "status")
    assert (status["branch"], status["worktree_commit"], status["modified"]) == ("main", head, {})

    for rev in (head, experiment):
        out = tmp_path / f"export-{rev}"
        kedit(repo, "export", rev, str(out))
        recorded = expected["exports"][rev]
        meta = json.loads((out / "kedit.json").read_text())
        assert meta["tensors"] == recorded["kedit_tensors"] and meta["adapters"] == recorded["adapters"]
        assert folder_digests(out) == recorded["tensors"]
        assert sorted(p.name for p in out.iterdir()) == recorded["files"]
        adapters = {p.name: folder_digests(p.parent, p.name) for p in sorted(out.glob("kedit_adapters/*.safetensors"))}
        assert adapters == recorded["adapter_tensors"]

    # A new commit on top of the old history, by the author the old config names.
    log = new_commit(kedit, repo)
    assert parent_of(log[0]) == head and log[0]["message"] == "after 0.1"
    assert log[0]["author"] == expected["log"]["main"][0]["author"]
    assert commits(log[1:]) == commits(log_all)
    assert_fsck_clean(kedit, repo)


@pytest.fixture
def old_hub(tmp_path: Path, expected: dict, start_kedit):
    """(fixture repository copy, kedit runner) with the local Hub serving a copy of what kedit 0.1 pushed."""
    repo, hub_root = copy_fixture(tmp_path, expected)
    server = HubServer(hub_root, {TOKEN: expected["token_owner"]}).start()
    kedit = start_kedit(HF_ENDPOINT=server.url, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1")
    yield repo, kedit
    server.stop()


def test_a_v0_1_hub_repository_pulls_and_takes_pushes(old_hub, tmp_path: Path, expected: dict) -> None:
    repo, kedit = old_hub
    owner, head = expected["token_owner"], expected["status"]["head"]
    experiment = expected["branches"]["branches"]["experiment"]
    fresh = tmp_path / "fresh"

    # The fixture's copy is up to date with its 0.1 origin, which takes a new commit on top.
    assert "up to date" in kedit(repo, "pull")
    log = new_commit(kedit, repo)
    new, main_log = log[0]["id"], kedit.json(repo, "log", "main")["commits"]
    assert parent_of(log[0]) == head and commits(main_log[1:]) == commits(expected["log"]["main"])
    assert not kedit.json(repo, "push")["up_to_date"]
    assert kedit.json(repo, "push")["up_to_date"]

    # main alone to a new Hub repository, cloned back: the same history, the same weights.
    kedit(repo, "remote", "add", "fresh", f"hf://{owner}/fresh")
    kedit(repo, "push", "fresh", "--create")
    kedit(tmp_path, "clone", f"hf://{owner}/fresh", str(fresh))
    assert commits(kedit.json(fresh, "log")["commits"]) == commits(main_log)
    status = kedit.json(fresh, "status")
    assert (status["branch"], status["worktree_commit"], status["modified"]) == ("main", new, {})
    assert folder_digests(Path(status["worktree"])) == folder_digests(Path(kedit.json(repo, "status")["worktree"]))

    # The clone pulls from the Hub repository kedit 0.1 pushed: its main (now the new commit) and
    # its experiment branch, whose FT tensors and GRACE adapter come down from the 0.1 storage.
    kedit(fresh, "remote", "add", "old", f"hf://{expected['hub_repo']}")
    assert "up to date" in kedit(fresh, "pull", "old", "main")
    kedit(fresh, "fetch", "old")
    kedit(fresh, "branch", "experiment", "refs/remotes/old/experiment")
    kedit(fresh, "checkout", "experiment")
    assert commits(kedit.json(fresh, "log")["commits"]) == commits(expected["log"]["experiment"])
    status = kedit.json(fresh, "status")
    assert (status["branch"], status["worktree_commit"], status["modified"]) == ("experiment", experiment, {})
    assert folder_digests(Path(status["worktree"])) == expected["exports"][experiment]["tensors"]
    out = tmp_path / "export-experiment"
    kedit(fresh, "export", "experiment", str(out))
    assert json.loads((out / "kedit.json").read_text())["adapters"] == expected["exports"][experiment]["adapters"]
    assert_fsck_clean(kedit, fresh)


def test_a_v0_1_hub_repository_clones(old_hub, tmp_path: Path, expected: dict) -> None:
    _, kedit = old_hub
    head, clone = expected["status"]["head"], tmp_path / "clone"
    kedit(tmp_path, "clone", f"hf://{expected['hub_repo']}", str(clone))
    assert commits(kedit.json(clone, "log", "main", "experiment")["commits"]) == commits(expected["log"]["all"])
    assert kedit.json(clone, "branch")["branches"] == expected["branches"]["branches"]
    status = kedit.json(clone, "status")
    assert (status["branch"], status["worktree_commit"], status["modified"]) == ("main", head, {})
    assert folder_digests(Path(status["worktree"])) == expected["exports"][head]["tensors"]
    assert_fsck_clean(kedit, clone)
