"""git's terminal habits, tried as a user would: through the installed `kedit` in a real process,
with real pipes and a pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from kedit.cli import cli
from kedit.cli.common import KeditGroup
from kedit.core.delta import Dense
from kedit.core.progress import ProgressLines, progress_bar
from kedit.core.repo import Repository
from tests.jsondoc import doc
from tests.test_cli_edit import EDIT, tiny_repo  # noqa: F401  (fixtures: a tiny model with a tokenizer)

KEDIT = str(Path(sys.executable).parent / "kedit")
F_SETPIPE_SZ = 1031  # Linux: shrink a pipe to one page, so a few KB of output fill it
DOWN0 = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture
def long_history(repo: Repository) -> Repository:
    """Enough commits that `kedit log` writes more than a one-page pipe holds."""
    for i in range(40):
        repo.commit({DOWN0: Dense(torch.full((32, 64), 1e-3 * (i + 1)))}, message=f"edit number {i} " + "x" * 60)
    return repo


def kedit(repo: Repository, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([KEDIT, "--repo", str(repo.root), *args], capture_output=True, text=True, timeout=120,
                          **kwargs)


def test_a_pipe_closed_early_exits_141_without_a_word(long_history: Repository) -> None:
    read_end, write_end = os.pipe()
    fcntl.fcntl(read_end, F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen([KEDIT, "--repo", str(long_history.root), "log"], stdout=write_end,
                            stderr=subprocess.PIPE)
    os.close(write_end)
    first = b""
    while not first.endswith(b"\n"):  # `head -1`: one line, then the reader goes away
        first += os.read(read_end, 1)
    os.close(read_end)
    stderr = proc.communicate(timeout=120)[1]
    assert first.startswith(b"commit ")
    assert proc.returncode == 141
    assert stderr == b""


def test_no_color_and_the_color_option(repo: Repository) -> None:
    env = {**os.environ, "NO_COLOR": "1"}
    forced = kedit(repo, "--color", "always", "log", "--oneline", env=env)
    assert "\x1b[" in forced.stdout  # always wins over NO_COLOR, as in git
    assert "\x1b[" not in kedit(repo, "--color", "never", "log", env=env).stdout
    # auto on a terminal: colour, unless NO_COLOR is set to anything
    assert "\x1b[" in on_a_terminal(repo, ["--no-pager", "log", "--oneline"], {})
    assert "\x1b[" not in on_a_terminal(repo, ["--no-pager", "log", "--oneline"], {"NO_COLOR": "1"})


def on_a_terminal(repo: Repository, args: list[str], env: dict[str, str]) -> str:
    """Run kedit with stdout on a pseudo-terminal; what the terminal received."""
    leader, follower = pty.openpty()
    inherited = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    proc = subprocess.Popen([KEDIT, "--repo", str(repo.root), *args], stdout=follower, stderr=subprocess.PIPE,
                            env={**inherited, **env})
    os.close(follower)
    received = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the last writer closed the terminal
            break
        if not chunk:
            break
        received += chunk
    proc.wait(timeout=120)
    os.close(leader)
    assert proc.returncode == 0, proc.stderr.read()
    return received.decode()


def test_the_pager_runs_on_a_terminal_only(repo: Repository, tmp_path: Path) -> None:
    paged = tmp_path / "paged.txt"
    pager = {"KEDIT_PAGER": f"cat > {paged}", "PAGER": "false"}
    on_screen = on_a_terminal(repo, ["log"], pager)
    assert "init from" in paged.read_text()  # the log went through KEDIT_PAGER, not to the terminal
    assert "init from" not in on_screen
    paged.unlink()
    assert "init from" in on_a_terminal(repo, ["--no-pager", "log"], pager)
    assert not paged.exists()
    piped = kedit(repo, "log", env={**os.environ, **pager})  # stdout is a pipe: never paged
    assert "init from" in piped.stdout and not paged.exists()


def test_core_pager_comes_between_kedit_pager_and_pager(repo: Repository, tmp_path: Path) -> None:
    """git's order: GIT_PAGER, core.pager, PAGER (here KEDIT_PAGER for GIT_PAGER)."""
    configured, overriding = tmp_path / "configured.txt", tmp_path / "overriding.txt"
    kedit(repo, "config", "core.pager", f"cat > {configured}")
    on_a_terminal(repo, ["log"], {"PAGER": "false"})
    assert "init from" in configured.read_text()
    configured.unlink()
    on_a_terminal(repo, ["log"], {"PAGER": "false", "KEDIT_PAGER": f"cat > {overriding}"})
    assert "init from" in overriding.read_text() and not configured.exists()


def test_quiet_and_json_after_the_subcommand(repo: Repository) -> None:
    runner = CliRunner()
    after = runner.invoke(cli, ["--repo", str(repo.root), "log", "-q", "--json"])
    before = runner.invoke(cli, ["--repo", str(repo.root), "-q", "--json", "log"])
    assert after.exit_code == before.exit_code == 0
    assert doc(after.stdout) == doc(before.stdout)
    assert doc(after.stdout)["commits"][0]["id"] == repo.head()
    quiet_branch = runner.invoke(cli, ["--repo", str(repo.root), "branch", "exp", "-q"])
    assert quiet_branch.exit_code == 0 and quiet_branch.stderr == ""


def test_a_command_without_json_refuses_the_global_flag() -> None:
    @click.group(cls=KeditGroup)
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def tool(ctx: click.Context, as_json: bool) -> None:
        ctx.ensure_object(dict)["json"] = as_json

    @tool.command()
    def plain() -> None:
        click.echo("text")

    result = CliRunner().invoke(tool, ["--json", "plain"])
    assert result.exit_code == 2 and "has no JSON output" in result.stderr


def test_an_edit_is_announced_once(tiny_repo: Repository) -> None:  # noqa: F811  (the imported fixture)
    result = CliRunner().invoke(cli, ["--repo", str(tiny_repo.root), *EDIT, "--set", "mom2_adjustment=false",
                                      "--no-eval", "-m", "France -> Japan"])
    assert result.exit_code == 0, result.stderr
    commit = tiny_repo.get_commit(tiny_repo.head())
    assert f"[main {commit.short}] France -> Japan" in result.stdout  # git's line, on stdout
    assert commit.short not in result.stderr and "committed" not in result.stderr


def test_shell_completion_offers_branches_without_loading_torch(repo: Repository) -> None:
    runner = CliRunner()
    for name in ("exp", "fix/typo"):
        assert runner.invoke(cli, ["--repo", str(repo.root), "branch", name]).exit_code == 0
    probe = ("import atexit, sys; atexit.register(lambda: print('torch loaded' if 'torch' in sys.modules else '',"
             " file=sys.stderr)); from kedit.cli import main; main()")
    env = {**os.environ, "_KEDIT_COMPLETE": "bash_complete", "COMP_WORDS": f"kedit --repo {repo.root} checkout ",
           "COMP_CWORD": "4"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0
    assert done.stdout.split() == ["plain,HEAD", "plain,exp", "plain,fix/typo", "plain,main"]
    assert "torch loaded" not in done.stderr  # a Tab must answer at once
    env.update(COMP_WORDS=f"kedit --repo {repo.root} lo", COMP_CWORD="3")
    assert subprocess.run([KEDIT], capture_output=True, text=True, env=env, timeout=120).stdout.split() == ["plain,log"]


def test_long_work_off_a_terminal_reports_in_lines_with_the_time_left(caplog, monkeypatch) -> None:
    monkeypatch.delenv("KEDIT_DISABLE_PROGRESS_BARS")
    monkeypatch.setattr("kedit.core.progress._disabled", False)  # an earlier -q in this process switched it off
    clock = iter([100.0, 112.0, 113.0, 125.0])  # start, then three updates
    monkeypatch.setattr("kedit.core.progress.time.monotonic", lambda: next(clock))
    bar = progress_bar(total=8, desc="export", unit="tensor")  # stderr is not a terminal under pytest
    assert isinstance(bar, ProgressLines)
    with caplog.at_level("INFO", logger="kedit.core.progress"), bar:  # used as tqdm is, in a with block
        for _ in range(3):
            bar.update(2)
    # a line only when ten seconds have passed since the last one; 2 tensors in 12 s: 36 s for 6 more
    assert [r.getMessage() for r in caplog.records] == ["export: 2/8 tensor (25%), about 36s left",
                                                        "export: 6/8 tensor (75%), about 8s left"]
    monkeypatch.setenv("KEDIT_DISABLE_PROGRESS_BARS", "1")
    assert not isinstance(progress_bar(total=8), ProgressLines)


def test_the_hub_client_does_not_log_each_http_request() -> None:
    """huggingface_hub's HTTP client logs every request at INFO, kedit's level: it must stay quiet."""
    import logging

    from huggingface_hub import get_session

    from kedit.cli.terminal import silence_libraries

    client_logger = logging.getLogger(type(get_session()).__module__.split(".")[0])
    silence_libraries(progress=False)
    assert client_logger.level > logging.INFO  # its own level: the CLI sets the root logger to INFO
