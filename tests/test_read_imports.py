"""The everyday commands that only read (log, show, status, branch, tag, reflog, remote list,
probe list, editors, config) import neither torch, transformers, sqlite-utils, the Hugging Face
client nor the methods: they read SQLite and files, at near git speed (issue #17).

Each command runs through the CLI in a fresh interpreter, which then reports what it imported.
How fast they are is measured by `bench/read_latency.py`, not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kedit.core import config
from kedit.core.delta import Adapter, LowRank
from kedit.core.repo import Metric, Repository
from kedit.edit.trained import store_editor
from kedit.eval.metrics import PROMPT_PROTOCOL
from kedit.eval.probes import add_probes
from kedit.hub import remotes

HEAVY = ("torch", "transformers", "sqlite_utils", "huggingface_hub", "kedit.methods", "methods")
DOWN0 = "model.layers.0.mlp.down_proj.weight"

# Runs the command line as `kedit` does, then writes the heavy modules loaded to argv[1], whatever the exit status.
CHILD = """
import atexit, json, sys
from pathlib import Path
report, heavy = Path(sys.argv[1]), tuple(json.loads(sys.argv[2]))
atexit.register(lambda: report.write_text(json.dumps(sorted({
    "kedit.methods" if m.startswith("kedit.methods.") else m.split(".")[0] for m in sys.modules
    if m.split(".")[0] in heavy or m.startswith("kedit.methods")}))))
sys.argv = ["kedit", *json.loads(sys.argv[3])]
from kedit.cli import main
main()
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Repository:
    """Edits with requests and metrics, an adapter, a branch, a tag, a probe, a stored editor, a
    remote and a setting: something for every read command to show."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEDIT_AUTHOR", "tester")
        mp.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))
        repo = Repository.init(tmp_path_factory.mktemp("reads") / "work", str(tiny_llama_dir), progress=False)
        request = {"prompt": "The capital of {} is", "subject": "France", "target_new": "Rome"}
        first = repo.commit({DOWN0: LowRank(torch.randn(32, 1), torch.randn(1, 64))}, method="rome",
                            requests=[request], hparams={"layer": 0}, message="France -> Rome",
                            metrics=[Metric("efficacy", 1.0, "user_prompt_counterfact_nll_margin")])
        repo.create_branch("experiment")
        repo.create_tag("v1")
        repo.commit({}, adapters=[Adapter("grace", {"keys": torch.randn(2, 32)}, {"module": "m", "entries": []})],
                    message="a codebook")
        add_probes(repo, [("edit", "The capital of France is", "Rome", first.id)])
        store_editor(repo, "mend", {"w": torch.zeros(2)}, {}, repo.log()[-1].id, "d" * 32, {},
                     {"steps": 1, "prompt_protocol": PROMPT_PROTOCOL})
        remotes.add(repo.db, "origin", "hf://me/model")
        config.set_value(config.repo_path(repo.path), "edit.method", "memit")
        return repo


def run_child(repo: Repository, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`kedit --repo ROOT --no-pager ARGS` in a fresh interpreter, and the heavy modules it imported."""
    report = tmp_path / "loaded.json"
    argv = ["--repo", str(repo.root), "--no-pager", *args]
    done = subprocess.run([sys.executable, "-c", CHILD, str(report), json.dumps(HEAVY), json.dumps(argv)],
                          capture_output=True, text=True, timeout=120)
    return done, json.loads(report.read_text())


READS = {  # the command, and what its output must hold
    "log": (["log"], "France -> Rome"),
    "log --oneline": (["log", "--oneline"], "eff=1.00"),
    "log --graph": (["log", "--graph"], "a codebook"),
    "log --json": (["log", "--json"], '"efficacy"'),
    "show": (["show"], "Adapter add: grace"),
    "show --json": (["show", "HEAD~1", "--json"], '"encoding": "lowrank"'),
    "status": (["status"], "Nothing changed"),
    "branch": (["branch"], "experiment"),
    "tag": (["tag"], "v1"),
    "reflog": (["reflog"], "HEAD@{0}"),
    "remote list": (["remote", "list"], "hf://me/model"),
    "probe list": (["probe", "list"], "'Rome'"),
    "editors": (["editors"], "mend"),
    "config --list": (["config", "--list"], "edit.method=memit"),
    "config KEY": (["config", "edit.method"], "memit"),
}


@pytest.mark.parametrize("name", list(READS))
def test_a_read_command_imports_no_heavy_library(repo: Repository, tmp_path: Path, name: str) -> None:
    args, shown = READS[name]
    done, loaded = run_child(repo, tmp_path, *args)
    assert done.returncode == 0, done.stderr
    assert shown in done.stdout
    assert loaded == [], f"kedit {name} imported {loaded}"


def test_the_check_sees_a_command_that_needs_torch(repo: Repository, tmp_path: Path) -> None:
    """diff materialises tensors: the same check reports torch there."""
    done, loaded = run_child(repo, tmp_path, "diff", "HEAD~2", "HEAD~1")
    assert done.returncode == 1, done.stderr  # 1: the models differ
    assert "torch" in loaded
