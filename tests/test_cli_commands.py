"""Each command through the CLI, with the result checked through the library."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kedit.cli import cli
from kedit.core.delta import Dense, LowRank
from kedit.core.repo import Repository
from kedit.core.tensors import hash_tensor
from tests.jsondoc import doc

DOWN0 = "model.layers.0.mlp.down_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"


def run(repo: Repository, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), *args])
    assert result.exit_code == code, (result.output, result.stderr)
    assert "Traceback" not in result.output + result.stderr
    return result.stdout


@pytest.fixture
def history(repo: Repository) -> list[str]:
    """Three edits on main: rank-one, dense, rank-two."""
    ids = [repo.head()]
    request = {"prompt": "The capital of {} is", "subject": "France", "target_new": "Rome", "target_true": "Paris"}
    ids.append(repo.commit({DOWN0: LowRank(torch.randn(32, 1), torch.randn(1, 64))}, method="rome",
                           requests=[request], hparams={"layer": 0}, message="France -> Rome").id)
    ids.append(repo.commit({DOWN1: Dense(torch.randn(32, 64) * 0.01)}, message="dense edit").id)
    ids.append(repo.commit({DOWN0: LowRank(torch.randn(32, 2), torch.randn(2, 64))}, message="third").id)
    return ids


def test_init_reports_and_records_the_base(tmp_path: Path, tiny_llama_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["--repo", str(tmp_path), "init", str(tiny_llama_dir), "-m", "base"])
    assert result.exit_code == 0, result.stderr
    assert "[main " in result.stdout and "30 tensors" in result.stdout
    repo = Repository.open(tmp_path)
    assert repo.log()[0].message == "base"
    assert (repo.worktree.folder / "config.json").exists()


def test_init_at_a_relative_path(tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["--repo", "work", "init", str(tiny_llama_dir)])
    assert result.exit_code == 0, result.stderr
    repo = Repository.init("other", str(tiny_llama_dir), progress=False)
    assert repo.path == tmp_path / "other" / ".kedit" and Repository.open("work").count_commits() == 1


def test_log_oneline_json_and_graph(repo: Repository, history: list[str]) -> None:
    lines = run(repo, "log", "--oneline").splitlines()
    assert [line.split()[0] for line in lines] == [c[:12] for c in reversed(history)]
    assert "(HEAD -> main)" in lines[0]
    records = doc(run(repo, "log", "--json", "-n", "2"))["commits"]
    assert [r["id"] for r in records] == [history[3], history[2]]
    repo.create_branch("exp", history[1])
    repo.checkout("exp")
    repo.commit({DOWN1: LowRank(torch.randn(32, 1), torch.randn(1, 64))}, message="on exp")
    graph = run(repo, "log", "--graph")
    assert "on exp" in graph and "third" in graph and graph.count("*") == 5
    drawn = doc(run(repo, "log", "--graph", "--json"))["commits"]  # the joining line is drawn, not listed
    assert sorted(r["id"] for r in drawn) == sorted([*history, repo.head()])
    assert {r["id"]: r["refs"] for r in drawn if r["refs"]} == {history[3]: ["main"], repo.head(): ["HEAD -> exp"]}
    assert [r["graph"] for r in drawn].count("*") + [r["graph"] for r in drawn].count("| *") >= 2
    assert doc(run(repo, "log", "--json", "-n", "1"))["commits"][0]["refs"] == ["HEAD -> exp"]


def test_checkout_reset_and_revert_answer_in_json(repo: Repository, history: list[str]) -> None:
    assert doc(run(repo, "checkout", history[1], "--json")) == {"head": history[1], "branch": None}
    assert doc(run(repo, "checkout", "main", "--json")) == {"head": history[3], "branch": "main"}
    reverted = doc(run(repo, "revert", history[2], "--json"))
    assert reverted["commit"]["id"] == repo.head() and reverted["commit"]["kind"] == "revert"
    assert reverted["branch"] == "main" and reverted["later_commits"] == [history[3]]
    assert doc(run(repo, "reset", history[3], "--json")) == {"head": history[3], "branch": "main"}


def test_show_lists_request_hparams_and_tensors(repo: Repository, history: list[str]) -> None:
    text = run(repo, "show", history[1][:8])
    assert "'The capital of France is' -> 'Rome' (was 'Paris')" in text
    assert "layer=0" in text and DOWN0 in text and "lowrank" in text
    body = doc(run(repo, "show", "HEAD~2", "--json"))
    (tensor,) = body["tensors"]
    assert tensor["encoding"] == "lowrank" and tensor["rank"] == 1 and tensor["stored_bytes"] < 2000
    assert tensor["delta_norm"] > 0 and tensor["rel_change"] > 0


def test_checkout_switches_branch_and_working_model(repo: Repository, history: list[str]) -> None:
    run(repo, "branch", "old", history[1])
    assert repo.refs.branches()["old"] == history[1]
    run(repo, "checkout", "old")
    assert repo.head_branch() == "old" and repo.head() == history[1]
    assert repo.worktree.commit == history[1]
    run(repo, "checkout", "HEAD~1")
    assert repo.head_branch() is None and repo.head() == history[0]
    status = run(repo, "status")
    assert "detached" in status and "exactly HEAD" in status
    run(repo, "checkout", "main")
    assert repo.head() == history[3]


def test_branch_and_tag_listing_and_deletion(repo: Repository, history: list[str]) -> None:
    run(repo, "branch", "exp", "HEAD~2")
    run(repo, "tag", "v1", "HEAD~1")
    assert "exp" in run(repo, "branch") and "v1" in run(repo, "tag")
    assert doc(run(repo, "tag", "--json")) == {"tags": {"v1": history[2]}}
    assert repo.resolve("v1") == history[2] and repo.resolve("exp~1") == history[0]
    run(repo, "branch", "-d", "exp")
    run(repo, "tag", "-d", "v1")
    assert "exp" not in repo.refs.branches() and repo.refs.tags() == {}


def test_revert_makes_a_new_commit_with_the_edit_gone(repo: Repository, history: list[str]) -> None:
    before = repo.manifest(history[0])[DOWN1].hash
    out = run(repo, "revert", history[2][:10])
    assert 'Revert "dense edit"' in out
    assert repo.manifest()[DOWN1].hash == before
    assert repo.log()[0].kind == "revert" and len(repo.log()) == 5


def test_reset_moves_branch_and_reflog_remembers(repo: Repository, history: list[str]) -> None:
    run(repo, "reset", "HEAD~2")
    assert repo.head() == history[1]
    reflog = doc(run(repo, "reflog", "main", "--json"))["entries"]
    assert reflog[0]["old"] == history[3] and reflog[0]["new"] == history[1]
    run(repo, "reset", history[3])  # the reflog is how you get back
    assert repo.head() == history[3]
    assert "reset: moving to HEAD~2" in run(repo, "reflog")


def test_diff_exit_codes_and_figures(repo: Repository, history: list[str]) -> None:
    out = run(repo, "diff", "HEAD~1", "HEAD", code=1)
    assert DOWN0 in out and "|delta|=" in out
    body = doc(run(repo, "diff", history[0], history[3], "--json", code=1))
    assert {t["name"] for t in body["tensors"]} == {DOWN0, DOWN1}
    a, b = repo.materialize(history[0], [DOWN1])[DOWN1], repo.materialize(history[3], [DOWN1])[DOWN1]
    (d1,) = [t for t in body["tensors"] if t["name"] == DOWN1]
    assert d1["delta_norm"] == pytest.approx(float((b.double() - a.double()).norm()))
    assert run(repo, "diff", "HEAD", "main", code=0) == ""
    run(repo, "diff", "HEAD~1", "HEAD", "--quiet", code=1)


def test_export_then_fsck_and_gc(repo: Repository, history: list[str], tmp_path: Path) -> None:
    out = tmp_path / "exported"
    assert "exported" in run(repo, "export", "HEAD~1", str(out))
    provenance = json.loads((out / "kedit.json").read_text())
    assert provenance["commit"] == history[2]
    assert "ok" in run(repo, "fsck")
    # Drop the last two edits; gc --prune now removes their objects once the reflog expires.
    repo.reset(history[1])
    objects_before = sum(1 for _ in repo.store.iter_objects())
    kept = doc(run(repo, "gc", "--prune", "now", "--json"))
    assert kept["objects_removed"] == 0  # the reflog still reaches them
    removed = doc(run(repo, "gc", "--prune", "now", "--reflog-expire", "now", "--json"))
    assert removed["commits_removed"] == 2 and removed["objects_removed"] == 2
    assert sum(1 for _ in repo.store.iter_objects()) == objects_before - 2
    assert "ok" in run(repo, "fsck")


def test_status_reports_hand_changes(repo: Repository, history: list[str]) -> None:
    from safetensors.torch import save_file

    shard = repo.worktree.folder / f"{DOWN1}.safetensors"
    save_file({DOWN1: torch.zeros(32, 64)}, str(shard))
    assert f"modified: {DOWN1}" in run(repo, "status")
    run(repo, "checkout", "--force", "HEAD")
    assert repo.status()["modified"] == {}
    assert hash_tensor(repo.materialize()[DOWN1]) == repo.manifest()[DOWN1].hash


def test_every_command_has_help_and_is_in_the_readme() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name, command in cli.commands.items():
        assert command.help, f"kedit {name} has no help"
        assert f"kedit {name}" in readme, f"kedit {name} is not documented in README.md"
