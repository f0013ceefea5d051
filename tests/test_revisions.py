"""Revisions as git users type them: `@`, reflog entries, ranges, several revisions, log's filters."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
import torch
from click.testing import CliRunner

from kedit.cli import cli
from kedit.core.delta import LowRank
from kedit.core.repo import Repository
from tests.jsondoc import doc
from tests.test_cli_commands import DOWN0, DOWN1, history  # noqa: F401 - fixture


def run(repo: Repository, *args: str, code: int = 0) -> str:
    """stdout, or the one-line stderr when the command fails."""
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), *args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    if code:
        assert result.stderr.startswith("kedit: error:") and result.stderr.count("\n") == 1, result.stderr
        return result.stderr
    return result.stdout


def ids(repo: Repository, *args: str) -> list[str]:
    return [c["id"] for c in doc(run(repo, "log", "--json", *args))["commits"]]


def _edit(repo: Repository, name: str, message: str, **kwargs) -> str:
    return repo.commit({name: LowRank(torch.randn(32, 1), torch.randn(1, 64))}, message=message, **kwargs).id


# -- @ and the reflog --------------------------------------------------------------------------


def test_reset_to_head_at_1_undoes_a_bad_reset(repo: Repository, history: list[str]) -> None:  # noqa: F811
    run(repo, "reset", "HEAD~2")
    assert repo.head() == history[1]
    run(repo, "reset", "HEAD@{1}")  # git's recovery: where HEAD was before the last move
    assert repo.head() == history[3] and repo.refs.branches()["main"] == history[3]
    assert repo.worktree.commit == history[3]
    assert run(repo, "log", "--oneline", "-n", "1").split()[0] == history[3][:12]


def test_reflog_entries_are_named_as_reflog_prints_them(repo: Repository, history: list[str]) -> None:  # noqa: F811
    run(repo, "reset", "HEAD~1")
    for line in run(repo, "reflog").splitlines():  # "<id> HEAD@{n}: message": each name resolves to its id
        short, name = line.split()[:2]
        assert doc(run(repo, "show", "--json", name.rstrip(":")))["commit"]["id"].startswith(short)
    assert doc(run(repo, "show", "--json", "main@{1}"))["commit"]["id"] == history[3]
    assert doc(run(repo, "show", "--json", "@{1}"))["commit"]["id"] == history[3]  # the current branch's
    assert doc(run(repo, "show", "--json", "HEAD@{1}~1"))["commit"]["id"] == history[2]


def test_at_sign_is_head(repo: Repository, history: list[str]) -> None:  # noqa: F811
    assert doc(run(repo, "show", "--json", "@"))["commit"]["id"] == history[3]
    assert doc(run(repo, "show", "--json", "@~2"))["commit"]["id"] == history[1]
    assert ids(repo, "@^") == list(reversed(history[:3]))


def test_a_reflog_entry_that_does_not_exist_is_one_line(repo: Repository, history: list[str]) -> None:  # noqa: F811
    assert "has only" in run(repo, "reset", "HEAD@{99}", code=1)
    assert "no reflog" in run(repo, "show", "nosuch@{0}", code=1)
    assert repo.head() == history[3]


# -- ranges and several revisions on a branched history -----------------------------------------


@pytest.fixture
def branched(repo: Repository, history: list[str]) -> dict[str, list[str]]:  # noqa: F811
    """main: base, e1, e2, e3; exp: from e1, x1, x2 (x1 changes DOWN1 only, x2 DOWN1 too)."""
    repo.create_branch("exp", history[1])
    repo.checkout("exp")
    x = [_edit(repo, DOWN1, "x1"), _edit(repo, DOWN1, "x2")]
    repo.checkout("main")
    return {"main": history, "exp": x}


def test_log_ranges_and_several_revisions(repo: Repository, branched: dict[str, list[str]]) -> None:
    base, e1, e2, e3 = branched["main"]
    x1, x2 = branched["exp"]
    assert ids(repo, "main..exp") == [x2, x1]
    assert ids(repo, "exp..main") == [e3, e2]
    assert ids(repo, "^main", "exp") == [x2, x1]
    assert set(ids(repo, "main...exp")) == {e2, e3, x1, x2}
    assert ids(repo, "exp..") == [e3, e2]  # an empty side is HEAD (main)
    assert set(ids(repo, "main", "exp")) == {base, e1, e2, e3, x1, x2}
    assert ids(repo, "main", "exp")[:2] == [x2, x1]  # newest first
    assert ids(repo, "main..main") == []
    oneline = run(repo, "log", "--oneline", "main..exp").splitlines()
    assert [line.split()[0] for line in oneline] == [x2[:12], x1[:12]]


def test_diff_ranges(repo: Repository, branched: dict[str, list[str]]) -> None:
    def changed(*revs: str) -> set[str]:
        body = doc(CliRunner().invoke(cli, ["--repo", str(repo.root), "diff", "--json", *revs]).stdout)
        return {t["name"] for t in body["tensors"]}

    assert changed("main..exp") == changed("main", "exp") == {DOWN0, DOWN1}
    assert changed("main...exp") == {DOWN1}  # only what exp did since it left main (at e1)
    assert changed("exp...main") == {DOWN0, DOWN1}  # main's e2 (DOWN1) and e3 (DOWN0) since e1
    assert "either a range or two revisions" in run(repo, "diff", "main..exp", "HEAD", code=2)


# -- log's filters ------------------------------------------------------------------------------


def test_log_filters(repo: Repository, history: list[str], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    base, e1, e2, e3 = history
    time.sleep(0.01)
    between = datetime.now(UTC).isoformat()
    time.sleep(0.01)
    monkeypatch.setenv("KEDIT_AUTHOR", "Ada Lovelace <ada@example.org>")
    request = {"prompt": "{} is in", "subject": "Eiffel Tower", "target_new": "Rome", "target_true": "Paris"}
    e4 = _edit(repo, DOWN1, "Eiffel Tower moved", method="memit", requests=[request])
    assert ids(repo, "--grep", "^France") == [e1]
    assert ids(repo, "--grep", "edit|third") == [e3, e2]
    assert ids(repo, "--author", "Ada") == [e4]
    assert ids(repo, "--author", "^tester$") == [e3, e2, e1, base]
    assert ids(repo, "--since", between) == [e4]
    assert ids(repo, "--until", between) == [e3, e2, e1, base]
    assert ids(repo, "--since", "1 hour ago") == [e4, e3, e2, e1, base]
    assert ids(repo, "--until", "2000-01-01") == []
    assert ids(repo, "--subject", "eiffel tower") == [e4]
    assert ids(repo, "--subject", "France") == [e1]
    assert ids(repo, "--method", "ROME") == [e1]
    assert ids(repo, "--method", "memit", "--author", "tester") == []  # every filter must pass
    assert ids(repo, "--grep", ".", "-n", "2") == [e4, e3]
    assert "not a regular expression" in run(repo, "log", "--grep", "(", code=1)
    assert "not a date" in run(repo, "log", "--since", "last tuesday", code=1)
    assert "--graph" in run(repo, "log", "--graph", "--grep", "x", code=1)
