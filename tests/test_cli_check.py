"""kedit check over a history: regressions that creep, and which commit first broke a probe.

The model is the tiny Llama with a real tokenizer (tests/test_cli_edit.py); the damaging edit is
a hand-made delta that scrambles the MLPs, the later commits change a weight by 1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kedit.cli import cli
from kedit.core.delta import Dense
from kedit.core.repo import Repository
from tests.jsondoc import doc
from tests.test_cli_edit import kedit, tiny_repo  # noqa: F401  (fixtures)
from tests.tiny import make_model, make_tokenizer

PROBES = ["probe", "add", "--prompt", "Berlin is the capital of", "--answer", "Germany",
          "--prompt", "The language of Japan is", "--answer", "Japanese"]


def stdout_of(repo: Repository, *args: str) -> str:
    """The report of a command that exits 1 (a check that found something)."""
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), *args])
    assert result.exit_code == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stdout


def _down_projections(repo: Repository) -> list[str]:
    return [n for n in repo.manifest() if n.endswith("mlp.down_proj.weight")]


def harmless(repo: Repository, gen: torch.Generator, n: int) -> list[str]:
    name = _down_projections(repo)[0]
    shape = repo.manifest()[name].shape
    return [repo.commit({name: Dense(torch.randn(shape, generator=gen) * 1e-6)}, message=f"tweak {i}").id
            for i in range(n)]


def damaging_edit(repo: Repository, gen: torch.Generator) -> str:
    """An edit about an unrelated subject whose delta breaks the locality probes."""
    return repo.commit({n: Dense(torch.randn(repo.manifest()[n].shape, generator=gen) * 2.0)
                        for n in _down_projections(repo)},
                       requests=[{"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano"}],
                       method="manual", message="Toko Yasuda plays the piano").id


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The revisions kedit materialises, in order."""
    import kedit.model.load

    seen: list[str] = []
    real = kedit.model.load.load_revision

    def counting(repo, rev, **kwargs):
        seen.append(rev)
        return real(repo, rev, **kwargs)

    monkeypatch.setattr(kedit.model.load, "load_revision", counting)
    return seen


def test_a_probe_broken_long_ago_still_fails_and_names_the_commit(tiny_repo: Repository,  # noqa: F811
                                                                   loads: list[str]) -> None:
    kedit(tiny_repo, *PROBES)
    gen = torch.Generator().manual_seed(0)
    before = harmless(tiny_repo, gen, 5)
    culprit = damaging_edit(tiny_repo, gen)
    after = harmless(tiny_repo, gen, 10)
    # Ten commits later each probe equals its parent's score, but it is held against the base.
    report = doc(kedit(tiny_repo, "check", "--json", code=1))
    assert report["ok"] is False and report["against"] == tiny_repo.log()[-1].id
    for r in report["results"]:
        assert r["parent"] == r["now"] < r["against"] - 0.1 == 1.0 - 0.1 and r["broke"]
        assert r["first_broke"] == culprit
    # Materialised: the tip, its parent and the base, then a binary search over the 16 commits
    # since the base for both probes at once (log2 16 = 4 revisions, not one per commit).
    assert len(loads) == len(set(loads)) <= 3 + 4 and culprit in loads
    # At the damaging commit itself, the parent check catches it too (from the outputs kept).
    loads.clear()
    at_edit = doc(kedit(tiny_repo, "check", culprit, "--json", code=1))
    assert at_edit["results"] and all(r["broke"] and r["first_broke"] == culprit for r in at_edit["results"])
    assert loads == []
    out = kedit(tiny_repo, "check", code=1)
    assert f"first broke at {culprit[:12]}" in out and "2 broken of 2 probes" in out
    # Held against a revision after the damage, the later commits changed nothing.
    assert "0 broken of 2 probes" in kedit(tiny_repo, "check", "--against", after[0])
    assert "0 broken of 2 probes" in kedit(tiny_repo, "check", before[-1], "--against", "HEAD~16")


def test_check_against_a_revision_outside_the_history_is_refused(tiny_repo: Repository) -> None:  # noqa: F811
    kedit(tiny_repo, *PROBES)
    gen = torch.Generator().manual_seed(0)
    harmless(tiny_repo, gen, 1)
    kedit(tiny_repo, "branch", "side")
    kedit(tiny_repo, "checkout", "side")
    side = harmless(tiny_repo, gen, 1)[0]
    kedit(tiny_repo, "checkout", "main")
    result = CliRunner().invoke(cli, ["--repo", str(tiny_repo.root), "check", "--against", side])
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"kedit: error: {side} ({side[:12]}) is not in the first-parent history of HEAD")
    assert tiny_repo.db.execute("SELECT COUNT(*) FROM probe_outputs").fetchone()[0] == 0  # nothing was run


# A plain chat template in the style of ChatML (SmolLM2's), with the tiny tokenizer's one special token.
CHAT_TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-chat-llama")
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    make_model("llama", len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_chat_probes_are_checked_and_scored_under_their_own_protocol(tmp_path: Path, chat_folder: Path) -> None:
    repo = Repository.init(tmp_path / "work", str(chat_folder), progress=False)
    kedit(repo, *PROBES)
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps([{"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano",
                                  "locality_prompt": "Berlin is the capital of", "locality_ground_truth": "Germany"}]))
    gen = torch.Generator().manual_seed(0)
    harmless(repo, gen, 2)
    unchanged = {m["name"]: m for m in doc(kedit(repo, "eval", "--chat", "--suite", str(suite), "--json"))["metrics"]}
    assert set(unchanged) == {"chat_gen_efficacy", "chat_gen_locality"}
    assert unchanged["chat_gen_locality"]["value"] == 1.0  # the reply to the chat message is the base's
    assert unchanged["chat_gen_efficacy"]["protocol"] == "chat_template_greedy24_contains"
    culprit = damaging_edit(repo, gen)
    harmless(repo, gen, 3)
    damaged = {m["name"]: m for m in doc(kedit(repo, "eval", "--chat", "--suite", str(suite), "--json"))["metrics"]}
    assert damaged["chat_gen_locality"]["value"] == 0.0
    # The plain scores of the same revision are stored apart, under their own names.
    kedit(repo, "eval", "--suite", str(suite))
    stored = {m.name: m.protocol for m in repo.get_commit(repo.head()).metrics}
    assert stored["chat_gen_locality"].startswith("chat_template_") and stored["locality"].startswith("user_prompt_")
    # check --chat: the chat replies drifted from the base's since the culprit.
    report = doc(stdout_of(repo, "check", "--chat", "--json"))
    assert report["prompts"] == "chat_template" and not report["ok"]
    assert {r["first_broke"] for r in report["results"] if r["broke"]} == {culprit}
    settings = {s for (s,) in repo.db.execute("SELECT DISTINCT setting FROM probe_outputs")}
    assert settings == {"chat_template_teacher_forced:cpu/auto"}  # kept apart from the plain prompts' outputs


def test_chat_needs_a_chat_template(tiny_repo: Repository) -> None:  # noqa: F811
    kedit(tiny_repo, *PROBES)
    harmless(tiny_repo, torch.Generator().manual_seed(0), 1)
    result = CliRunner().invoke(cli, ["--repo", str(tiny_repo.root), "check", "--chat"])
    assert result.exit_code != 0 and result.stderr.startswith("kedit: error: the tokenizer has no chat template")
    assert "Traceback" not in result.stderr


def test_outputs_kept_under_the_old_prompt_protocol_are_not_reused(tiny_repo: Repository) -> None:  # noqa: F811
    kedit(tiny_repo, *PROBES)
    harmless(tiny_repo, torch.Generator().manual_seed(0), 1)
    # What an older kedit kept for HEAD (setting without a protocol; argmax after its start token).
    for (probe_id,) in tiny_repo.db.execute("SELECT id FROM probes").fetchall():
        tiny_repo.db.execute("INSERT INTO probe_outputs VALUES (?, ?, 'cpu/auto', '[-1]', 0.0)",
                             [probe_id, tiny_repo.head()])
    tiny_repo.db.conn.commit()
    assert "0 broken of 2 probes" in kedit(tiny_repo, "check")
