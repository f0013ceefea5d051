"""`kedit config` as git users use it: per repository and global, the repository's first, and
the settings that matter: who commits are by, and the defaults of `kedit edit`/`kedit stats`.

Every test has its own XDG_CONFIG_HOME (tests/conftest.py), so the global file is a temp file.
"""

from __future__ import annotations

import getpass
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from kedit.cli import cli
from kedit.core.config import global_path
from kedit.core.repo import Repository
from tests.jsondoc import doc
from tests.test_cli_commands import history  # noqa: F401 - fixture
from tests.test_cli_edit import PROMPT, tiny_repo  # noqa: F401 - fixtures


def run(where: Path, *args: str, code: int = 0) -> str:
    """stdout, or the one-line stderr when the command fails."""
    result = CliRunner().invoke(cli, ["--repo", str(where), *args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    if code == 1 and result.stderr:
        assert result.stderr.startswith("kedit: error:") and result.stderr.count("\n") == 1, result.stderr
        return result.stderr
    return result.stdout


def _last_author(repo: Repository) -> str:
    return doc(run(repo.root, "log", "--json", "-n", "1"))["commits"][0]["author"]


@pytest.fixture
def no_author_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEDIT_AUTHOR", raising=False)  # conftest sets it for every other test


def test_repository_settings_win_over_global_ones(repo: Repository, tmp_path: Path) -> None:
    run(repo.root, "config", "--global", "user.name", "Grace Hopper")
    assert run(repo.root, "config", "user.name") == "Grace Hopper\n"
    assert run(tmp_path, "config", "user.name") == "Grace Hopper\n"  # outside any repository too
    run(repo.root, "config", "user.name", "Ada Lovelace")
    assert run(repo.root, "config", "user.name") == "Ada Lovelace\n"
    assert run(repo.root, "config", "--global", "user.name") == "Grace Hopper\n"
    assert "[user]" in global_path().read_text() and "Ada" in (repo.path / "config").read_text()
    assert doc(run(repo.root, "config", "--list", "--json")) == {"settings": {"user.name": "Ada Lovelace"}}
    run(repo.root, "config", "--unset", "user.name")
    assert run(repo.root, "config", "--list") == "user.name=Grace Hopper\n"
    run(repo.root, "config", "user.email", code=1)  # not set: exit 1, as git
    assert "not set" in run(repo.root, "config", "--unset", "user.name", code=1)


def test_commit_authors_come_from_kedit_author_then_config_then_login(
        repo: Repository, history: list[str], monkeypatch: pytest.MonkeyPatch, no_author_env: None) -> None:  # noqa: F811
    run(repo.root, "revert", "HEAD")  # each revert is a commit (a revert of a revert re-applies)
    assert _last_author(repo) == getpass.getuser()
    run(repo.root, "config", "--global", "user.name", "Grace Hopper")
    run(repo.root, "config", "--global", "user.email", "grace@example.org")
    run(repo.root, "revert", "HEAD")
    assert _last_author(repo) == "Grace Hopper <grace@example.org>"
    run(repo.root, "config", "user.name", "Ada Lovelace")  # this repository's, with the global e-mail
    run(repo.root, "revert", "HEAD")
    assert _last_author(repo) == "Ada Lovelace <grace@example.org>"
    assert repo.get_commit(repo.head()).author == "Ada Lovelace <grace@example.org>"
    monkeypatch.setenv("KEDIT_AUTHOR", "CI bot")
    run(repo.root, "revert", "HEAD")
    assert _last_author(repo) == "CI bot"


@pytest.mark.parametrize(("args", "message"), [
    (["core.editor", "vim"], "unknown config key 'core.editor'"),
    (["user.email", "not an address"], "not an e-mail address"),
    (["user.name", "two\nlines"], "on one line"),
    (["stats.samples", "0"], "positive whole number"),
    (["edit.method", "nope"], "unknown method 'nope'"),
    (["--unset", "nosuch.key"], "unknown config key"),
])
def test_bad_keys_and_values_are_refused_and_nothing_is_written(repo: Repository, args: list[str],
                                                                message: str) -> None:
    run(repo.root, "config", "user.name", "Ada")
    before = (repo.path / "config").read_bytes()
    for scope in ([], ["--global"]):
        assert message in run(repo.root, "config", *scope, *args, code=1)
    assert (repo.path / "config").read_bytes() == before and not global_path().exists()


def test_writing_outside_a_repository_needs_global(tmp_path: Path) -> None:
    assert "--global" in run(tmp_path, "config", "user.name", "Ada", code=1)
    run(tmp_path, "config", "--global", "user.name", "Ada")
    assert global_path() == Path(os.environ["XDG_CONFIG_HOME"]) / "kedit" / "config"
    assert not list(global_path().parent.glob(".tmp-*"))  # written through a temp file, renamed


def test_a_damaged_config_file_is_one_error_line(repo: Repository) -> None:
    (repo.path / "config").write_text("[user\nname = x\n")
    assert "cannot read the config file" in run(repo.root, "config", "user.name", code=1)


def test_edit_method_and_stats_samples_are_defaults(tiny_repo: Repository) -> None:  # noqa: F811
    corpus = str(tiny_repo.root.parent / "corpus.txt")
    run(tiny_repo.root, "config", "stats.samples", "16")
    run(tiny_repo.root, "stats", "--layer", "1", "--corpus", corpus)
    cached = [p.name for p in (tiny_repo.path / "stats").rglob("*") if p.is_file()]
    assert cached and all("__n16" in name for name in cached), cached
    run(tiny_repo.root, "config", "--global", "edit.method", "ft")
    request = ["--prompt", PROMPT, "--subject", "France", "--target", "Japan", "--no-eval"]
    run(tiny_repo.root, "edit", *request)
    assert tiny_repo.log()[0].method == "ft"
    run(tiny_repo.root, "edit", "--method", "rome", "--set", "mom2_adjustment=false", *request)
    assert tiny_repo.log()[0].method == "rome"  # the command line wins
