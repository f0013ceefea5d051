"""Commits land only where meant: an edit commits onto the commit its model was loaded from.

Written as the race happens: a second process switches branch (or a second writer commits)
after `kedit edit` has loaded its model and before it commits. The hook is `_apply_method`,
the call that runs the method on the loaded model. Also: `checkout --force HEAD` keeps the
branch, and leaving commits behind a detached HEAD warns.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kedit.cli import cli
from kedit.core.delta import Dense
from kedit.core.errors import HeadMovedError
from kedit.core.repo import HeadState, Repository
from kedit.edit import run as editing
from tests import test_cli_edit
from tests.test_cli_edit import EDIT

tiny_repo = test_cli_edit.tiny_repo

NO_EVAL = ["--set", "mom2_adjustment=false", "--no-eval"]


def kedit(repo: Repository, *args: str, code: int = 0) -> tuple[str, str]:
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), *args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout, result.stderr


def kedit_process(repo: Repository, *args: str) -> None:
    """The CLI in another process, as a second terminal would run it."""
    script = Path(sys.executable).with_name("kedit")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "kedit.cli"]
    subprocess.run([*command, "--repo", str(repo.root), *args], check=True, capture_output=True, timeout=120)


def commit_count(repo: Repository) -> int:
    conn = sqlite3.connect(repo.path / "kedit.db")
    try:
        return conn.execute("SELECT COUNT(*) FROM commits").fetchone()[0]
    finally:
        conn.close()


def while_the_edit_runs(monkeypatch: pytest.MonkeyPatch, action) -> None:
    """Run `action` once, after the edit loaded its model and before its method runs."""
    apply_method = editing._apply_method

    def racing(*args, **kwargs):
        action()
        return apply_method(*args, **kwargs)

    monkeypatch.setattr(editing, "_apply_method", racing)


def test_switching_branch_during_an_edit_commits_nothing(tiny_repo: Repository,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_repo.head()
    kedit(tiny_repo, "branch", "side")
    kedit(tiny_repo, "checkout", "side")
    side = tiny_repo.commit({"model.norm.weight": Dense(torch.full((32,), 1e-3))}, message="side moves on").id
    kedit(tiny_repo, "checkout", "main")
    before = commit_count(tiny_repo)
    while_the_edit_runs(monkeypatch, lambda: kedit_process(tiny_repo, "checkout", "side"))

    _, err = kedit(tiny_repo, *EDIT, *NO_EVAL, code=1)

    assert err.splitlines() == [err.strip()], f"not one line: {err!r}"
    assert err.startswith(f"kedit: error: HEAD moved from main at {base[:12]} to side at {side[:12]}"), err
    assert "nothing was committed" in err and "run the edit again" in err
    assert commit_count(tiny_repo) == before  # no commit row at all
    assert tiny_repo.refs.branches()["main"] == base and tiny_repo.refs.branches()["side"] == side
    assert tiny_repo.head_branch() == "side" and tiny_repo.status()["modified"] == {}


def test_switching_to_a_branch_at_the_same_commit_is_refused_too(tiny_repo: Repository,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_repo.head()
    kedit(tiny_repo, "branch", "side")
    while_the_edit_runs(monkeypatch, lambda: kedit_process(tiny_repo, "checkout", "side"))

    _, err = kedit(tiny_repo, *EDIT, *NO_EVAL, code=1)

    assert "HEAD moved from main at" in err and f"to side at {base[:12]}" in err
    assert tiny_repo.refs.branches() == {"main": base, "side": base}
    assert len(tiny_repo.log()) == 1


def test_a_second_simultaneous_edit_is_refused(tiny_repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_repo.head()

    def other_writer() -> None:  # a second Repository on the same path commits first
        Repository.open(tiny_repo.root).commit({"model.norm.weight": Dense(torch.full((32,), 1e-3))},
                                               message="the other edit")

    while_the_edit_runs(monkeypatch, other_writer)
    _, err = kedit(tiny_repo, *EDIT, *NO_EVAL, code=1)

    first = tiny_repo.head()
    assert f"HEAD moved from main at {base[:12]} to main at {first[:12]}" in err
    assert [c.message for c in tiny_repo.log()] == ["the other edit", tiny_repo.log()[-1].message]
    assert tiny_repo.get_commit(first).parent == base


def test_edits_of_one_run_chain_and_the_branch_stays(tiny_repo: Repository) -> None:
    edits = tiny_repo.root.parent / "edits.jsonl"
    edits.write_text(edits.read_text() * 2)
    out, _ = kedit(tiny_repo, "edit", "--requests", str(edits), *NO_EVAL)
    assert out.count("[main ") == 2 and len(tiny_repo.log()) == 3


def test_commit_with_a_stale_expected_parent_writes_nothing(repo: Repository) -> None:
    at = repo.head_state()
    assert at == HeadState("main", repo.head())
    repo.commit({"model.norm.weight": Dense(torch.full((32,), 1e-3))}, expected_parent=at)
    moved = repo.head_state()
    before = commit_count(repo)
    with pytest.raises(HeadMovedError, match="nothing was committed"):
        repo.commit({"model.norm.weight": Dense(torch.full((32,), 2e-3))}, expected_parent=at)
    assert commit_count(repo) == before and repo.head_state() == moved
    with pytest.raises(HeadMovedError, match="nothing was changed"):
        repo.reset(at.commit, expected=at)
    assert repo.head_state() == moved


def test_checkout_force_head_keeps_the_branch_and_the_next_edit_lands_on_it(tiny_repo: Repository) -> None:
    from safetensors.torch import save_file

    name = "model.norm.weight"
    save_file({name: torch.zeros(tiny_repo.manifest()[name].shape)},
              str(tiny_repo.worktree.folder / f"{name}.safetensors"))
    status, _ = kedit(tiny_repo, "status")
    assert "kedit checkout --force HEAD" in status  # the hint the user follows
    _, err = kedit(tiny_repo, "checkout", "--force", "HEAD")
    assert "Switched to branch 'main'" in err
    assert tiny_repo.head_branch() == "main" and tiny_repo.status()["modified"] == {}
    out, _ = kedit(tiny_repo, *EDIT, *NO_EVAL)
    assert out.startswith("[main ") and tiny_repo.refs.branches()["main"] == tiny_repo.head()
    assert [r["message"] for r in tiny_repo.reflog()][-1] == "init"  # no checkout entry: HEAD never moved
    assert not any(r["message"].startswith("checkout") for r in tiny_repo.reflog())


def test_leaving_commits_behind_a_detached_head_warns(repo: Repository, caplog: pytest.LogCaptureFixture) -> None:
    def warnings() -> list[str]:
        found = [r.getMessage() for r in caplog.records if "leaving" in r.getMessage()]
        caplog.clear()
        return found

    base = repo.head()
    _, err = kedit(repo, "checkout", base)
    assert "detached" in err and warnings() == []
    lost = repo.commit({"model.norm.weight": Dense(torch.full((32,), 1e-3))}, message="made while detached")
    kedit(repo, "checkout", "main")
    (warning,) = warnings()
    assert warning.startswith("warning: you are leaving 1 commit behind, not connected to any branch: "
                              f"{lost.short} 'made while detached'")
    assert warning.endswith(f"kedit branch NAME {lost.short}")
    assert repo.head_branch() == "main" and repo.head() == base
    # Kept by a branch: no warning.
    kedit(repo, "checkout", lost.id)
    kedit(repo, "branch", "keep")
    kedit(repo, "checkout", "main")
    assert warnings() == []


def test_a_checkout_while_the_model_is_read_makes_the_load_start_again(tiny_repo: Repository,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkout there and back (ABA) while the working model is read could mix two commits' shards."""
    from kedit.core.tensors import hash_tensor
    from kedit.model import load as model_module

    main = tiny_repo.head()
    kedit(tiny_repo, "branch", "side")
    kedit(tiny_repo, "checkout", "side")
    tiny_repo.commit({"model.norm.weight": Dense(torch.full((32,), 0.5))}, message="side differs")
    kedit(tiny_repo, "checkout", "main")
    folders: list[Path] = []
    read_folder = model_module._from_folder

    def reading(folder, *args, **kwargs):
        folders.append(Path(folder))
        loaded = read_folder(folder, *args, **kwargs)
        if len(folders) == 1:  # another process switches there and back meanwhile
            other = Repository.open(tiny_repo.root)
            other.checkout("side")
            other.checkout("main")
        return loaded

    monkeypatch.setattr(model_module, "_from_folder", reading)
    model, _ = model_module.load_revision(tiny_repo, main)
    assert folders[0] == tiny_repo.worktree.folder and len(folders) == 2 and folders[1] != folders[0]
    norm = dict(model.named_parameters())["model.norm.weight"].detach()
    assert hash_tensor(norm) == tiny_repo.manifest(main)["model.norm.weight"].hash
