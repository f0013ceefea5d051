"""kedit edit / eval / check / probe / stats on a tiny model with a real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from kedit.methods.base import EditRequest
from kedit.methods.forward import partial_unsupported

from kedit.cli import cli
from kedit.core.delta import Dense
from kedit.core.repo import Repository
from kedit.edit.run import EditOptions, run_edits
from tests.jsondoc import doc
from tests.tiny import SENTENCES, make_model, make_tokenizer

# The subject ends the prompt: in a random 3-layer model, attention does not carry a fact from an
# earlier subject token to the last position, so only there can an MLP edit show (real models: see
# tests/integration).
PROMPT = "The capital city is France"
# " Japan" and " Paris" are single tokens of the tiny tokenizer: a tiny model can learn those.
EDIT = ["edit", "--prompt", PROMPT, "--subject", "France", "--target", "Japan", "--target-true", "Paris",
        "--paraphrase", "Its capital is France", "--locality", "Berlin is the capital of=>Germany",
        # Random tiny models have tiny MLP outputs: weight decay and the norm clamp would pin the edit.
        "--set", "v_weight_decay=0", "--set", "clamp_norm_factor=50", "--set", "v_num_grad_steps=40"]


@pytest.fixture
def tiny_repo(tmp_path: Path, tiny_folder: Path) -> Repository:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 8))
    (tmp_path / "edits.jsonl").write_text(json.dumps(
        {"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano"}) + "\n")
    return Repository.init(tmp_path / "work", str(tiny_folder), progress=False)


def kedit(repo: Repository, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), *args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout


def corpus_args(repo: Repository) -> list[str]:
    return ["--corpus", str(repo.root.parent / "corpus.txt"), "--stats-samples", "32"]


def test_edit_commits_a_measured_rome_edit(tiny_repo: Repository) -> None:
    base = tiny_repo.head()
    out = kedit(tiny_repo, *EDIT, "--set", "mom2_adjustment=false", "-m", "France -> Japan")
    assert "reliability 0.00->1.00" in out
    commit = tiny_repo.log()[0]
    assert commit.parent == base and commit.method == "rome" and commit.message == "France -> Japan"
    assert commit.requests[0]["target_new"] == "Japan" and commit.hparams["layer"] >= 0
    stages = {(m.name, m.stage) for m in commit.metrics}
    assert {("reliability", "pre"), ("reliability", "post"), ("locality", "post"), ("efficacy", "post")} <= stages
    post = {m.name: m.value for m in commit.metrics if m.stage == "post"}
    assert post["reliability"] == 1.0 and "generalization" in post  # the fact flipped
    (change,) = tiny_repo.changes("HEAD")
    assert change.encoding == "lowrank" and change.rank == 1 and "mlp.down_proj" in change.name
    # The edit and its locality prompt joined the probe suite.
    kinds = sorted(p["kind"] for p in doc(kedit(tiny_repo, "probe", "list", "--json"))["probes"])
    assert kinds == ["edit", "locality"]


def test_edit_with_covariance_statistics_caches_them(tiny_repo: Repository) -> None:
    base = tiny_repo.head()
    kedit(tiny_repo, *EDIT, *corpus_args(tiny_repo), "--no-eval")
    assert tiny_repo.log()[0].hparams["mom2_adjustment"] is True
    cached = list((tiny_repo.path / "stats" / base).iterdir())
    assert len(cached) == 1 and "__n32" in cached[0].name  # keyed by base, layer, corpus and samples
    mtime = cached[0].stat().st_mtime_ns
    kedit(tiny_repo, *EDIT, *corpus_args(tiny_repo), "--no-eval")  # the second edit reuses them
    assert cached[0].stat().st_mtime_ns == mtime


@pytest.mark.parametrize("method", ["rome", "memit"])
@pytest.mark.parametrize(("arch", "recorded"), [("llama", "bfloat16"), ("gpt2", "float32")])
def test_a_commit_records_the_v_dtype_its_upper_layers_ran_in(tmp_path: Path, method: str, arch: str,
                                                               recorded: str) -> None:
    """The Llama's layers above the edit run as bfloat16 copies (the default `v_dtype`); GPT-2 has
    no suffix-only forward (`partial_unsupported`) and runs the full forward in its own float32:
    each commit records what ran, so that a replay computes the same."""
    tok = make_tokenizer()
    model = make_model(arch, len(tok))
    assert (partial_unsupported(model, 16) is None) == (arch == "llama")
    model.save_pretrained(tmp_path / arch)
    tok.save_pretrained(tmp_path / arch)
    repo = Repository.init(tmp_path / "work", str(tmp_path / arch), progress=False)
    overrides = {"mom2_adjustment": "false", "v_num_grad_steps": "3", "v_weight_decay": "0",
                 "clamp_norm_factor": "50", "context_template_length_params": "[[3,2]]"}
    request = EditRequest(prompt=PROMPT, subject="France", target_new="Japan")
    (commit,) = run_edits(repo, [request], EditOptions(method=method, overrides=overrides, measure=False))
    assert commit.hparams["v_dtype"] == recorded and commit.info["v_dtype_used"] == [recorded]


def test_requests_file_makes_one_commit_per_request(tiny_repo: Repository) -> None:
    edits = tiny_repo.root.parent / "edits.jsonl"
    kedit(tiny_repo, "edit", "--requests", str(edits), "--set", "mom2_adjustment=false", "--no-eval")
    assert tiny_repo.log()[0].requests[0]["subject"] == "Toko Yasuda"
    assert len(tiny_repo.log()) == 2


def test_check_flags_a_commit_that_breaks_probes(tiny_repo: Repository) -> None:
    kedit(tiny_repo, "probe", "add", "--prompt", "Tokyo is in", "--answer", "Japan",
          "--prompt", "The language of Japan is", "--answer", "Japanese")
    kedit(tiny_repo, *EDIT, "--set", "mom2_adjustment=false")
    report = doc(kedit(tiny_repo, "check", "--json", "--threshold", "1.0"))
    (edit_probe,) = [r for r in report["results"] if r["probe"]["kind"] == "edit"]
    assert edit_probe["now"] == 1.0 and edit_probe["parent"] is None  # the new fact, not a regression
    edit = tiny_repo.head()
    # A harmless change passes against the edit's state (what the tiny ROME edit did to the
    # neighbours stays its own doing: held against the base, they name it)...
    gen = torch.Generator().manual_seed(0)
    down = [n for n in tiny_repo.manifest() if n.endswith("mlp.down_proj.weight")]
    tiny_repo.commit({down[0]: Dense(torch.randn(tiny_repo.manifest()[down[0]].shape, generator=gen) * 1e-6)})
    assert "0 broken of 4 probes" in kedit(tiny_repo, "check", "--against", edit)
    drifted = doc(kedit(tiny_repo, "check", "--json", code=1))["results"]
    assert {r["first_broke"] for r in drifted if r["broke"]} == {edit}
    # ...a careless edit that scrambles every MLP fails, naming the earlier edit and the neighbours it broke.
    tiny_repo.commit({n: Dense(torch.randn(tiny_repo.manifest()[n].shape, generator=gen) * 2.0) for n in down},
                     message="careless")
    report = doc(kedit(tiny_repo, "check", "--json", code=1))
    broken = {r["probe"]["kind"] for r in report["results"] if r["broke"]}
    assert "edit" in broken and report["ok"] is False
    # Reverting the damage passes again, and the model is the one before it, bit for bit.
    kedit(tiny_repo, "revert", "HEAD")
    assert "0 broken" in kedit(tiny_repo, "check", "--against", edit)
    assert {n: e.hash for n, e in tiny_repo.manifest().items()} == {
        n: e.hash for n, e in tiny_repo.manifest("HEAD~2").items()}


def test_check_by_generation_gates_on_what_users_read(tiny_repo: Repository) -> None:
    """--protocol generation: an edit's fact must show in the greedy continuation, a locality probe
    must still hold its answer or the base's continuation; outputs are kept apart per protocol."""
    kedit(tiny_repo, "probe", "add", "--prompt", "Tokyo is in", "--answer", "Japan")
    kedit(tiny_repo, *EDIT, "--set", "mom2_adjustment=false", "--no-eval")
    assert tiny_repo.log()[0].info["shows_in_generation"] is True  # the edit's own check, at commit time
    report = doc(kedit(tiny_repo, "check", "--protocol", "generation", "--json"))
    assert report["ok"] and report["protocol"] == "generation"
    by_kind = {r["probe"]["kind"]: r for r in report["results"] if r["probe"]["prompt"] != "Tokyo is in"}
    assert by_kind["edit"]["now"] == 1.0 and by_kind["locality"]["now"] == 1.0
    gen = torch.Generator().manual_seed(0)
    down = [n for n in tiny_repo.manifest() if n.endswith("mlp.down_proj.weight")]
    tiny_repo.commit({n: Dense(torch.randn(tiny_repo.manifest()[n].shape, generator=gen) * 2.0) for n in down},
                     message="careless")
    report = doc(kedit(tiny_repo, "check", "--protocol", "generation", "--json", code=1))
    (edit_probe,) = [r for r in report["results"] if r["probe"]["kind"] == "edit"]
    assert edit_probe["broke"] and edit_probe["parent"] == 1.0 and edit_probe["now"] == 0.0
    assert "[generation]" in kedit(tiny_repo, "check", "--protocol", "generation", code=1)
    kept = dict(tiny_repo.db.execute("SELECT setting, predicted FROM probe_outputs WHERE commit_id = ?",
                                     [tiny_repo.head()]).fetchall())
    assert set(kept) == {"user_prompt_greedy10:cpu/auto"} and isinstance(json.loads(kept.popitem()[1]), str)
    kedit(tiny_repo, "check", "--json", code=1)  # teacher-forced: measured anew, not read from the above
    settings = {s for (s,) in tiny_repo.db.execute("SELECT DISTINCT setting FROM probe_outputs")}
    assert settings == {"user_prompt_greedy10:cpu/auto", "user_prompt_teacher_forced:cpu/auto"}


def test_check_counts_a_probe_about_an_edited_subject_with_the_edit(tiny_repo: Repository) -> None:
    kedit(tiny_repo, "probe", "add", "--prompt", "Tokyo is in", "--answer", "Japan",
          "--prompt", "The language of Japan is", "--answer", "Japanese")
    gen = torch.Generator().manual_seed(0)
    down = [n for n in tiny_repo.manifest() if n.endswith("mlp.down_proj.weight")]
    edit = tiny_repo.commit({n: Dense(torch.randn(tiny_repo.manifest()[n].shape, generator=gen) * 2.0) for n in down},
                            requests=[{"prompt": "{} is in", "subject": "Tokyo", "target_new": "France"}],
                            method="manual")
    report = doc(kedit(tiny_repo, "check", "--json", "--threshold", "0", code=1))
    by_prompt = {r["probe"]["prompt"]: r for r in report["results"]}
    tokyo, japan = by_prompt["Tokyo is in"], by_prompt["The language of Japan is"]
    assert tokyo["now"] < tokyo["parent"] and not tokyo["broke"] and tokyo["edited_by"] == edit.id
    assert japan["broke"] and japan["edited_by"] is None  # no edit names Japan: a regression
    out = kedit(tiny_repo, "check", "--threshold", "0", code=1)
    assert f"names the subject of {edit.short}" in out and "1 broken of 2 probes" in out
    assert "1 locality probes changed with an edit of their own subject" in out


def test_eval_stores_metrics_and_log_shows_them(tiny_repo: Repository) -> None:
    kedit(tiny_repo, *EDIT, "--set", "mom2_adjustment=false", "--no-eval")
    metrics = doc(kedit(tiny_repo, "eval", "--json"))["metrics"]
    protocols = {m["name"]: m["protocol"] for m in metrics}
    assert {"reliability", "generalization", "locality", "efficacy"} <= set(protocols)
    # generation scores for every method (ROME here), each named with its user-prompt protocol
    assert protocols["gen_efficacy"] == protocols["gen_paraphrase"] == "user_prompt_greedy10_contains"
    assert protocols["gen_locality"] == "user_prompt_greedy10_holds_or_unchanged"
    assert all(p.startswith("user_prompt_") for p in protocols.values())
    stored = {(m.name, m.stage, m.suite) for m in tiny_repo.log()[0].metrics}
    assert ("reliability", "eval", "history") in stored and ("gen_efficacy", "eval", "history") in stored
    assert "rel=" in kedit(tiny_repo, "log", "--oneline") and "geff=" in kedit(tiny_repo, "log", "--oneline")


def test_stats_command_caches_second_moment(tiny_repo: Repository) -> None:
    out = kedit(tiny_repo, "stats", "--layer", "1", *corpus_args(tiny_repo)[:2], "--samples", "16")
    assert "layer 1" in out and "cached" in out
    again = kedit(tiny_repo, "stats", "--layer", "1", *corpus_args(tiny_repo)[:2], "--samples", "16")
    assert again == out


@pytest.mark.parametrize(("args", "message"), [
    (["--prompt", "The capital city is Spain", "--subject", "France", "--target", "Rome"], "is not in the prompt"),
    (["--prompt", PROMPT, "--subject", "France", "--target", " "], "the target is empty"),
    (["--method", "nope", "--prompt", PROMPT, "--subject", "France", "--target", "Rome"], "unknown method 'nope'"),
    (["--prompt", PROMPT, "--subject", "France", "--target", "Rome", "--set", "nonsense=1"], "unknown"),
    (["--prompt", PROMPT, "--subject", "France", "--target", "Rome", "--set", "layer=99",
      "--set", "mom2_adjustment=false"], "layer"),
])
def test_bad_requests_change_nothing(tiny_repo: Repository, args: list[str], message: str) -> None:
    before = ({n: e.hash for n, e in tiny_repo.manifest().items()}, tiny_repo.head())
    result = CliRunner().invoke(cli, ["--repo", str(tiny_repo.root), "edit", *args])
    assert result.exit_code != 0
    assert result.stderr.startswith("kedit: error:") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert ({n: e.hash for n, e in tiny_repo.manifest().items()}, tiny_repo.head()) == before
    assert tiny_repo.status()["modified"] == {}
