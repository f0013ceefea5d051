"""What the model says differently, and which commit did it: diff --behaviour, blame, bisect on a
tiny model with a real tokenizer, with a regression planted in a long history."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kedit.cli import cli
from kedit.core.delta import Dense
from kedit.core.repo import Repository
from kedit.edit.requests import load_requests
from kedit.eval import metrics
from kedit.eval.behaviour import blame
from kedit.eval.bisect import bisect, metric_test, probe_test
from kedit.model.load import load_revision
from tests.jsondoc import doc
from tests.test_cli_edit import EDIT, PROMPT, corpus_args, tiny_repo  # noqa: F401  (fixtures)

QUIET = "model.layers.0.mlp.down_proj.weight"  # where the history's harmless commits go
LOUD = "model.layers.2.mlp.down_proj.weight"  # where the planted one goes
WATCHED = "Berlin is the capital of"
# A fixed suite for --metric: locality is the agreement with the good revision's argmax answers
SUITE = [{"prompt": "The capital of {} is", "subject": "France", "target_new": "Japan", "target_true": "Paris",
          "neighbourhood": ["Berlin is the capital of", "The Eiffel Tower is located in the city of",
                            "Tokyo is in", "Madrid is in", "The language of Japan is",
                            "Danielle Darrieux speaks"]}]


def kedit(repo: Repository, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), *args])
    assert result.exit_code == code, (result.stdout, result.stderr, repr(result.exc_info))
    return result.stdout


class CountingLoader:
    """Loads revisions as the commands do, and counts them."""

    def __init__(self, repo: Repository) -> None:
        self.repo, self.loaded = repo, []

    def __call__(self, commit: str):
        self.loaded.append(commit)
        return load_revision(self.repo, commit)


def plant(repo: Repository, n: int, at: int) -> list[str]:
    """n commits on HEAD: harmless ones (a 1e-7 nudge), and at index `at` one that changes what the model says."""
    gen = torch.Generator().manual_seed(0)
    ids = []
    for i in range(n):
        if i == at:
            delta = {LOUD: Dense(torch.randn(32, 64, generator=gen) * 3.0)}
        else:
            delta = {QUIET: Dense(torch.randn(32, 64, generator=gen) * 1e-7)}
        ids.append(repo.commit(delta, message=f"commit {i}" + (" (planted)" if i == at else "")).id)
    return ids


def continuation(repo: Repository, rev: str, prompt: str = WATCHED) -> str:
    model, tok = load_revision(repo, rev)
    return metrics.greedy_continuations(model, tok, [prompt])[0]


def test_a_revision_compared_with_itself_says_nothing_changed(tiny_repo: Repository) -> None:  # noqa: F811
    body = doc(kedit(tiny_repo, "diff", "--behaviour", "HEAD", "HEAD", "--prompt", f"{WATCHED}=>Germany",
                     "--json"))
    assert body["summary"]["changed"] == 0 and body["summary"]["flipped"] == 0 and body["kl"] == 0.0
    assert body["prompts"][0]["before"] == body["prompts"][0]["after"]


def test_a_rome_edit_shows_in_the_behavioural_diff(tiny_repo: Repository) -> None:  # noqa: F811
    kedit(tiny_repo, *EDIT, *corpus_args(tiny_repo), "--no-eval")
    body = doc(kedit(tiny_repo, "diff", "--behaviour", "HEAD~1", "HEAD", "--json", code=1))  # the probes
    (edited,) = [p for p in body["prompts"] if p["prompt"] == PROMPT]
    assert edited["changed"] and edited["flipped"] and edited["p_after"] > edited["p_before"]
    assert "Japan" in edited["after"] and body["kl"] > 0 and body["kl_tokens"] > 0
    text = kedit(tiny_repo, "diff", "--behaviour", "HEAD~1", "HEAD", code=1)
    assert repr(PROMPT) in text and "FLIPPED" in text and "continuations changed" in text


def test_blame_finds_the_commit_that_changed_a_prompt_materialising_few(tiny_repo: Repository) -> None:  # noqa: F811
    ids = plant(tiny_repo, 30, at=17)
    assert continuation(tiny_repo, ids[16]) != continuation(tiny_repo, ids[17])  # the plant works
    loader = CountingLoader(tiny_repo)
    found = blame(tiny_repo, loader, WATCHED)
    assert [e.commit for e in found.entries] == [ids[17]]
    assert found.commits == 31 and found.materialised == len(set(loader.loaded)) < 12
    body = doc(kedit(tiny_repo, "blame", WATCHED, "--json"))
    assert [e["commit"]["id"] for e in body["entries"]] == [ids[17]]
    assert body["entries"][0]["before"] != body["entries"][0]["after"]


def test_bisect_finds_a_planted_regression_in_64_commits_with_6_revisions(tiny_repo: Repository) -> None:  # noqa: F811
    good = tiny_repo.head()
    answer = continuation(tiny_repo, good).strip()
    ids = plant(tiny_repo, 64, at=41)
    loader = CountingLoader(tiny_repo)
    result = bisect(tiny_repo, good, "HEAD", probe_test(loader, WATCHED, answer))
    assert result.first_bad == ids[41] and result.steps == 64
    between = [c for c, _ in result.tested if c not in (good, ids[-1])]
    assert len(between) <= 6 and len(set(loader.loaded)) <= 8
    body = doc(kedit(tiny_repo, "bisect", "--good", good, "--probe", f"{WATCHED}=>{answer}", "--json"))
    assert body["first_bad"]["id"] == ids[41] and body["steps"] == 64 and len(body["tested"]) <= 8


def test_bisect_by_a_metric_finds_a_planted_regression_in_64_commits_with_6_revisions(
        tiny_repo: Repository, tmp_path: Path) -> None:  # noqa: F811
    good = tiny_repo.head()
    ids = plant(tiny_repo, 64, at=23)
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps(SUITE))
    loader = CountingLoader(tiny_repo)
    result = bisect(tiny_repo, good, "HEAD", metric_test(loader, load_requests([suite]), "locality", 0.05, good))
    assert result.first_bad == ids[23]
    assert len(loader.loaded) == len(set(loader.loaded))  # each revision materialised once
    assert loader.loaded[0] == good and len(set(loader.loaded) - {good, ids[-1]}) <= 6
    body = doc(kedit(tiny_repo, "bisect", "--good", good, "--metric", "locality", "--drop", "0.05",
                     "--suite", str(suite), "--json"))
    assert body["first_bad"]["id"] == ids[23] and body["steps"] == 64
    assert len({t["commit"] for t in body["tested"]} - {good, ids[-1]}) <= 6


def test_bisect_runs_a_users_command_on_each_exported_revision(tiny_repo: Repository, tmp_path: Path) -> None:  # noqa: F811
    """64 commits, the regression planted at 50: the command sees at most 6 revisions between the ends."""
    good = tiny_repo.head()
    ids = plant(tiny_repo, 64, at=50)
    bad, seen = tmp_path / "bad.txt", tmp_path / "seen.txt"
    bad.write_text("\n".join(ids[50:]))
    check = (f"import os, sys; rev = os.environ['KEDIT_BISECT_REV']; "
             f"assert os.path.exists(os.path.join(os.environ['KEDIT_BISECT_MODEL'], 'config.json')); "
             f"open({str(seen)!r}, 'a').write(rev + chr(10)); "
             f"sys.exit(1 if rev in open({str(bad)!r}).read() else 0)")
    out = kedit(tiny_repo, "bisect", "--good", good, "--run", f"{sys.executable} -c \"{check}\"")
    assert f"first bad commit: {ids[50][:12]}" in out
    exported = seen.read_text().split()  # one line per revision exported and run
    assert len(exported) == len(set(exported)) and len(set(exported) - {good, ids[-1]}) <= 6


@pytest.mark.parametrize(("args", "message"), [
    (["bisect", "--good", "HEAD"], "give exactly one of"),
    (["bisect", "--good", "HEAD", "--probe", "no answer"], "PROMPT=>ANSWER"),
    (["bisect", "--good", "HEAD", "--metric", "efficacy"], "--metric needs --suite"),
    (["diff", "--behaviour", "HEAD", "HEAD"], "the probe suite is empty"),
])
def test_bad_requests_are_one_line(tiny_repo: Repository, args: list[str], message: str) -> None:  # noqa: F811
    result = CliRunner().invoke(cli, ["--repo", str(tiny_repo.root), *args])
    assert result.exit_code in (1, 2) and message in result.stderr and result.stderr.count("\n") == 1
