"""kedit edit --method memit|alphaedit|ft --requests FILE: one commit per batch, per-request metrics,
AlphaEdit's earlier keys from the repository, and a revert in the middle of a sequence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kedit.methods.base import EditRequest

from kedit.core.repo import Repository
from tests import test_cli_edit
from tests.jsondoc import doc
from tests.test_cli_edit import corpus_args, kedit

tiny_repo = test_cli_edit.tiny_repo

# Subjects end their prompts and targets are single tokens of the tiny tokenizer (tests/test_cli_edit.py).
FACTS = [
    {"prompt": "The capital city is France", "subject": "France", "target_new": "Japan", "target_true": "Paris"},
    {"prompt": "The capital of Spain is Tokyo", "subject": "Tokyo", "target_new": "Paris", "target_true": "Japan"},
    {"prompt": "Madrid makes the Apple", "subject": "Apple", "target_new": "capital", "target_true": "Japan"},
    {"prompt": "Berlin is the capital of Germany", "subject": "Germany", "target_new": "Japan", "target_true": "Paris"},
]
# Random tiny models have tiny residuals: weight decay and the norm clamp would pin δ at zero.
TINY = ["--set", "v_weight_decay=0", "--set", "clamp_norm_factor=50", "--set", "v_num_grad_steps=30",
        "--set", "v_lr=0.5", "--set", "early_stop_loss=0", "--set", "context_template_length_params=[[3,2]]"]


@pytest.fixture
def facts_file(tmp_path: Path) -> Path:
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    return path


def test_memit_batch_is_one_commit_with_per_request_metrics(tiny_repo: Repository, facts_file: Path) -> None:
    base = tiny_repo.head()
    kedit(tiny_repo, "edit", "--method", "memit", "--requests", str(facts_file), *TINY,
          "--set", "mom2_adjustment=false", "--set", "mom2_update_weight=0.05")
    (commit,) = tiny_repo.log()[:1]
    assert commit.parent == base and commit.method == "memit" and len(commit.requests) == len(FACTS)
    layers = commit.hparams["layers"]
    changes = tiny_repo.changes("HEAD")
    assert len(changes) == len(layers) and all(c.encoding == "lowrank" and c.rank == len(FACTS) for c in changes)
    per_request = [m for m in commit.metrics if m.request is not None]
    assert {m.request for m in per_request} == set(range(len(FACTS))) and {m.suite for m in per_request} == {""}
    post = {m.name: m.value for m in commit.metrics if m.stage == "post" and m.suite == "" and m.request is None}
    assert post["reliability"] == 1.0  # every fact flipped
    shown = kedit(tiny_repo, "show")
    assert "request 3" in shown and "reliability=1.00" in shown
    listed = doc(kedit(tiny_repo, "show", "--json"))["commit"]["metrics"]
    assert sorted({m["request"] for m in listed} - {None}) == list(range(len(FACTS)))


def test_batch_size_makes_one_commit_per_chunk(tiny_repo: Repository, facts_file: Path) -> None:
    kedit(tiny_repo, "edit", "--method", "ft", "--requests", str(facts_file), "--batch-size", "2", "--no-eval",
          "--set", "lr=0.05", "--set", "num_steps=5")
    commits = tiny_repo.log()[:2]
    assert [c.method for c in commits] == ["ft", "ft"] and [len(c.requests) for c in commits] == [2, 2]
    assert all(ch.encoding == "dense" for c in commits for ch in tiny_repo.changes(c.id))


def test_alphaedit_reads_earlier_keys_from_history_and_forgets_reverted_ones(tiny_repo: Repository,
                                                                          facts_file: Path) -> None:
    args = ["edit", "--method", "alphaedit", "--requests", str(facts_file), "--batch-size", "2", "--no-eval",
            *corpus_args(tiny_repo), *TINY, "--set", "L2=0.001", "--set", "nullspace_threshold=0.1"]
    kedit(tiny_repo, *args)
    first, second = tiny_repo.log()[1], tiny_repo.log()[0]
    assert first.info["prior_keys"] == {str(layer): 0 for layer in first.hparams["layers"]}
    assert set(second.info["prior_keys"].values()) == {2}  # the first batch's keys, from the repository
    assert len(tiny_repo.memory("alphaedit")) == 2
    kedit(tiny_repo, "revert", first.id)
    assert len(tiny_repo.memory("alphaedit")) == 1
    kedit(tiny_repo, "fsck")


def test_memit_bad_hparams_are_one_line(tiny_repo: Repository, facts_file: Path) -> None:
    out = kedit(tiny_repo, "edit", "--method", "memit", "--requests", str(facts_file), "--set", "layers=[2,1]",
                code=1)
    assert out == "" and len(tiny_repo.log()) == 1


def test_requests_round_trip() -> None:
    assert EditRequest.from_dict(FACTS[0] | {"paraphrases": []}).subject == "France"


def test_locality_prompt_about_another_requests_subject_is_warned(
    tiny_repo: Repository, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    facts = [dict(FACTS[0], neighbourhood=["Tokyo is the capital of"]), FACTS[1]]
    path = tmp_path / "clash.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in facts))
    kedit(tiny_repo, "edit", "--method", "ft", "--requests", str(path), "--no-eval",
          "--set", "lr=0.05", "--set", "num_steps=2")
    (warning,) = [r.getMessage() for r in caplog.records if "locality prompts name the subject" in r.getMessage()]
    assert "1 locality prompts" in warning and "'Tokyo'" in warning
