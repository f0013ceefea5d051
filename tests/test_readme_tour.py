"""The README's tour and Python API, run as written on a fresh repository: a new user's first
minutes. Only the model differs (a tiny Llama with a tokenizer instead of the embedded SmolLM2)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from kedit.cli import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _blocks(section: str, language: str) -> list[str]:
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", body, flags=re.S)


def tour_commands() -> list[tuple[list[str], int]]:
    """(argv after `kedit`, the exit status its comment promises: `# exit N: ...`, else 0)."""
    text = _blocks("A tour", "sh")[0].replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        command, _, comment = line.partition("  #")
        promised = re.match(r"\s*exit (\d):", comment)
        argv = shlex.split(command)
        assert argv[0] == "kedit", line
        out.append((argv[1:], int(promised.group(1)) if promised else 0))
    return out


def test_the_tour_runs_top_to_bottom(tmp_path: Path, tiny_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEDIT_DIR", raising=False)
    commands = tour_commands()
    assert len(commands) >= 10 and commands[0][0] == ["init"]
    for argv, promised in commands:
        if argv == ["init"]:
            argv = ["init", str(tiny_folder)]
        result = CliRunner().invoke(cli, argv)
        assert result.exit_code == promised, (argv, result.stdout, result.stderr)
        assert "Traceback" not in result.stdout + result.stderr
    assert (tmp_path / "edited" / "config.json").exists()


def test_the_python_api_example_runs(tmp_path: Path, tiny_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    porcelain, engine = _blocks("Python API", "python")
    source = porcelain.replace('kedit.Repository.init("work")', f'kedit.Repository.init("work", {str(tiny_folder)!r})')
    source += engine.replace("model.layers.5.", "model.layers.1.")  # the tiny model has 3 layers
    assert source.count(str(tiny_folder)) == 1
    scope: dict = {}
    exec(compile(source, "README.md", "exec"), scope)  # the README's own code, nothing of ours
    repo = scope["repo"]
    assert [c.kind for c in repo.log()][:3] == ["edit", "revert", "edit"]
    assert scope["state"]  # materialised and verified
