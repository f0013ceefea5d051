"""Every command's `--json`, run on a tiny model and a local Hub: one object, its format version
first, and exactly the keys the README's "JSON output" table lists for it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from kedit.cli import cli
from kedit.cli.jsonout import JSON_VERSION
from tests.test_cli_edit import EDIT
from tests.test_cli_editors import TRAIN, records
from tests.test_hub import REPO_ID, hub  # noqa: F401  (fixture: the local Hub)
from tests.test_ui import ui_json

README = Path(__file__).resolve().parents[1] / "README.md"
COMMIT_KEYS = {"id", "short", "parents", "depth", "kind", "method", "message", "author", "created", "hparams",
               "requests", "info", "metrics", "refs"}


def documented() -> dict[str, set[str]]:
    """The README's table: `| `command` | `key`, `key` |` rows under "JSON output"."""
    section = README.read_text().split("### JSON output", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `kedit ([^`]+)` \| (.+) \|$", section, flags=re.M)
    assert rows, "no JSON output table in the README"
    return {command: set(re.findall(r"`(\w+)`", keys)) for command, keys in rows}


def test_every_command_with_json_is_in_the_table() -> None:
    import click

    def leaves(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
        out = []
        for name, command in group.commands.items():
            nested = isinstance(command, click.Group)
            out += leaves(command, f"{prefix}{name} ") if nested else [(prefix + name, command)]
        return out

    table = {label.split()[0] if not label.startswith(("probe", "remote")) else " ".join(label.split()[:2])
             for label in documented()}
    commands = leaves(cli)
    assert [name for name, c in commands if not any(p.name == "as_json" for p in c.params)] == []
    assert {name for name, _ in commands} <= table


def test_each_command_prints_its_documented_keys(tmp_path: Path, tiny_folder: Path, hub) -> None:  # noqa: F811
    shapes = documented()
    work, corpus = tmp_path / "work", tmp_path / "corpus.txt"
    corpus.write_text("The capital city is France.\nBerlin is the capital of Germany.\n" * 16)
    (tmp_path / "train.json").write_text(json.dumps(records()))
    seen: dict[str, dict] = {}

    def run(label: str, *args: str, code: int = 0, where: Path = work) -> dict:
        result = CliRunner().invoke(cli, ["--repo", str(where), *args, "--json"])
        assert result.exit_code == code, (args, result.stdout, result.stderr)
        body = json.loads(result.stdout)
        assert next(iter(body)) == "kedit_json" and body.pop("kedit_json") == JSON_VERSION
        assert set(body) == shapes[label], (label, sorted(body), sorted(shapes[label]))
        seen[label] = body
        return body

    init = run("init", "init", str(tiny_folder))
    base = init["commit"]["id"]
    edited = run("edit", *EDIT, "--corpus", str(corpus), "--stats-samples", "16")
    for commit in (init["commit"], *edited["commits"]):
        assert set(commit) == COMMIT_KEYS
    run("log", "log")
    run("log", "log", "--graph")
    shown = run("show", "show")
    assert shown["commit"] == edited["commits"][0] | {"refs": ["HEAD -> main"]}
    run("status", "status")
    run("reflog", "reflog")
    run("diff", "diff", base, "HEAD", code=1)
    run("diff --behaviour", "diff", "--behaviour", base, base, "--reference-texts", "1")
    run("blame", "blame", "Berlin is the capital of")
    run("bisect", "bisect", "--good", base, "--run", f'test "$KEDIT_BISECT_REV" = {base}')
    run("branch NAME", "branch", "exp", base)
    run("branch", "branch")
    run("tag NAME", "tag", "v1")
    run("tag", "tag")
    run("checkout", "checkout", "exp")
    run("checkout", "checkout", "main")
    run("reset", "reset", "HEAD")
    run("merge", "merge", "exp")  # exp is behind: up to date
    run("checkout", "checkout", "exp")
    run("cherry-pick", "cherry-pick", "main")
    run("checkout", "checkout", "main")
    run("stats", "stats", "--corpus", str(corpus), "--samples", "16")
    run("eval", "eval")
    run("check", "check", "--threshold", "1.0")
    added = run("probe add", "probe", "add", "--prompt", "Berlin is the capital of", "--answer", "Germany")
    run("probe list", "probe", "list")
    run("probe rm", "probe", "rm", str(added["probes"][0]["id"]))
    run("config KEY [VALUE]", "config", "user.name", "Ada")
    run("config KEY [VALUE]", "config", "user.name")
    run("config --list", "config", "--list")
    run("config --unset KEY", "config", "--unset", "user.name")
    run("editors", "editors")
    run("train-editor", "train-editor", "--method", "mend", "--data", str(tmp_path / "train.json"), *TRAIN,
        "--set", "max_steps=1", "--device", "cpu")
    run("remote add", "remote", "add", "origin", f"hf://{REPO_ID}")
    run("remote list", "remote", "list")
    run("push", "push")
    run("remote add", "remote", "add", "lora", f"hf://{REPO_ID}-lora")
    run("push --as-adapter", "push", "lora", "--as-adapter", "--create", "--to", "main")
    run("fetch", "fetch")
    run("pull", "pull")
    run("clone", "clone", f"hf://{REPO_ID}", str(tmp_path / "copy"), where=tmp_path)
    run("remote remove", "remote", "remove", "origin")
    run("remote remove", "remote", "remove", "lora")
    run("init --add-base", "init", "--add-base", str(tiny_folder), "--branch", "v2")
    run("rebase", "rebase", "--onto", "v2", "--no-check")
    run("revert --reapply", "revert", "HEAD", "--reapply")
    run("revert", "revert", "HEAD")
    run("export", "export", "HEAD", str(tmp_path / "out"))
    run("export --format peft", "export", edited["commits"][0]["id"], str(tmp_path / "lora"), "--format", "peft")
    run("export --format gguf", "export", "HEAD", str(tmp_path / "model.gguf"), "--format", "gguf", "--quant", "q8_0")
    run("report", "report", "HEAD", "--out", str(tmp_path / "report.html"))
    seen["ui"] = ui_json(work, lambda doc: None)
    assert next(iter(seen["ui"])) == "kedit_json" and set(seen["ui"]) - {"kedit_json"} == shapes["ui"]
    run("fsck", "fsck")
    run("gc", "gc")
    assert set(seen) == set(shapes), sorted(set(shapes) - set(seen))
