"""kedit stats --nproc and under torchrun: two gloo processes on 127.0.0.1 give one process's statistics, in
its cache entry, and a rerun after a killed process continues from the checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from kedit.cli import cli
from kedit.core.repo import Repository
from tests.tiny import SENTENCES

# 48 texts are 6 batches of 8: three for each of two processes.
SAMPLES = "48"
EDIT = ["edit", "--prompt", "The capital city is France", "--subject", "France", "--target", "Japan",
        "--no-eval", "--set", "v_num_grad_steps=2"]

# Installed through PYTHONPATH in the processes of one test only: checkpoints every batch, records
# every checkpoint a process resumes from, and SIGKILLs the process of rank KEDIT_TEST_KILL_RANK
# right after its first checkpoint.
HOOK = '''
import os
if os.environ.get("KEDIT_TEST_SHARD_LOG"):
    import signal
    from kedit.edit import parallel
    from kedit.methods.stats import StatsCache

    parallel.CHECKPOINT_EVERY = 8
    save, load = StatsCache.save_shard, StatsCache.load_shard

    def save_shard(self, key, shard, state):
        save(self, key, shard, state)
        if shard.startswith(os.environ.get("KEDIT_TEST_KILL_RANK", "-") + "of"):
            os.kill(os.getpid(), signal.SIGKILL)

    def load_shard(self, key, shard):
        state = load(self, key, shard)
        with open(os.environ["KEDIT_TEST_SHARD_LOG"], "a") as f:
            f.write(f"{shard} {state.n_texts if state is not None else 0}\\n")
        return state

    StatsCache.save_shard, StatsCache.load_shard = save_shard, load_shard
'''


@pytest.fixture
def repo(tmp_path: Path, tiny_folder: Path, monkeypatch: pytest.MonkeyPatch) -> Repository:
    monkeypatch.setenv("KEDIT_DISABLE_PROGRESS_BARS", "1")
    (tmp_path / "corpus.txt").write_text("\n".join(f"{i} {s}" for i in range(8) for s in SENTENCES))
    return Repository.init(tmp_path / "work", str(tiny_folder), progress=False)


def kedit(repo: Repository, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), *args])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def stats_args(repo: Repository) -> list[str]:
    return ["stats", "--corpus", str(repo.root.parent / "corpus.txt"), "--samples", SAMPLES]


def cached(repo: Repository) -> dict[Path, dict[str, object]]:
    """Every finished statistics file: its float64 sum, E[kkᵀ] and counts."""
    out: dict[Path, dict[str, object]] = {}
    for path in (repo.path / "stats").rglob("*.mom2.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            out[path.relative_to(repo.path)] = {"sum": f.get_tensor("sum"), "mom2": f.get_tensor("mom2"),
                                                **f.metadata()}
    return out


def single_process_reference(repo: Repository) -> dict[Path, dict[str, object]]:
    """The statistics one process computes; the cache is emptied again for the run under test."""
    kedit(repo, *stats_args(repo))
    reference = cached(repo)
    for path in (repo.path / "stats").rglob("*.safetensors"):
        path.unlink()
    return reference


def assert_same_statistics(got: dict[Path, dict[str, object]], want: dict[Path, dict[str, object]]) -> None:
    assert got.keys() == want.keys() and len(got) == 1  # the same cache entry
    for name, w in want.items():
        g = got[name]
        assert (g["count"], g["n_texts"]) == (w["count"], w["n_texts"]) and w["n_texts"] == SAMPLES
        # Only the order of the float64 additions differs: equal to float64 rounding, and E[kkᵀ]
        # (float32) equal to its last bit.
        torch.testing.assert_close(g["sum"], w["sum"], rtol=1e-13, atol=0)
        torch.testing.assert_close(g["mom2"], w["mom2"], rtol=2 ** -23, atol=0)


def test_two_processes_equal_one_and_serve_the_edit(repo: Repository) -> None:
    reference = single_process_reference(repo)
    out = kedit(repo, *stats_args(repo), "--nproc", "2")
    assert "cached" in out
    parallel = cached(repo)
    assert_same_statistics(parallel, reference)
    assert not list((repo.path / "stats").rglob("*.shard-*")), "checkpoints are removed once the result is written"
    stamps = {p: (repo.path / p).stat().st_mtime_ns for p in parallel}
    kedit(repo, *EDIT, "--corpus", str(repo.root.parent / "corpus.txt"), "--stats-samples", SAMPLES)
    assert repo.log()[0].hparams["mom2_adjustment"] is True
    assert {p: (repo.path / p).stat().st_mtime_ns for p in cached(repo)} == stamps  # the edit computed nothing


def test_under_torchrun_the_same_statistics(repo: Repository) -> None:
    reference = single_process_reference(repo)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "kedit.cli", "--repo", str(repo.root), *stats_args(repo), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert '"nproc": 2' in done.stdout and done.stdout.count('"kedit_json"') == 1  # rank 0 alone reports
    assert_same_statistics(cached(repo), reference)


def test_rerun_after_a_killed_process_continues_and_agrees(repo: Repository, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    reference = single_process_reference(repo)
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(HOOK)
    shard_log = tmp_path / "shards.log"
    # The spawned processes inherit the environment: the hook is installed in them, not here.
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "hook"))
    monkeypatch.setenv("KEDIT_TEST_SHARD_LOG", str(shard_log))
    monkeypatch.setenv("KEDIT_TEST_KILL_RANK", "1")

    killed = CliRunner().invoke(cli, ["--repo", str(repo.root), *stats_args(repo), "--nproc", "2"])
    assert killed.exit_code != 0
    assert killed.stderr.startswith("kedit: error: statistics process 1 was killed by SIGKILL"), killed.stderr
    assert "Traceback" not in killed.stderr
    assert cached(repo) == {}
    assert [p.name.split(".")[-2] for p in (repo.path / "stats").rglob("*.shard-1of2-*")] == ["shard-1of2-from0-b8"]

    shard_log.unlink()
    monkeypatch.delenv("KEDIT_TEST_KILL_RANK")
    kedit(repo, *stats_args(repo), "--nproc", "2")
    resumed = dict(line.split() for line in shard_log.read_text().splitlines())
    assert resumed["1of2-from0-b8"] == "8"  # the killed process went on after its first batch
    assert_same_statistics(cached(repo), reference)
    assert not list((repo.path / "stats").rglob("*.shard-*"))


def test_bad_layer_fails_before_any_process_starts(repo: Repository) -> None:
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), *stats_args(repo), "--layer", "99", "--nproc", "2"])
    assert result.exit_code != 0
    assert result.stderr.startswith("kedit: error: --layer 99 is past the model's last layer"), result.stderr
    assert not (repo.path / "stats").exists() or not list((repo.path / "stats").rglob("*"))
