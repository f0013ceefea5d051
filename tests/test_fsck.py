"""fsck proves every row a hash covers, and `fsck --repair` rebuilds them: tested as the attack.

Each test tampers with a copy of one small repository the way an attacker (or a bad disk, or a
careless script) would: raw sqlite3 on `.kedit/kedit.db` with foreign keys off, or a byte
flipped in a working-model shard with its size and time restored so that `status` still trusts
it. fsck must exit 1 naming the damage; `--repair` must fix it; then `log` and `show` print what
the hashed records say, the working model loads the exact HEAD weights, and fsck is clean.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from transformers import AutoModelForCausalLM

from kedit.cli import cli
from kedit.core.delta import Adapter, Dense, LowRank
from kedit.core.repo import Metric, Repository
from kedit.core.worktree import shard_name
from kedit.edit.trained import store_editor
from kedit.eval.metrics import PROMPT_PROTOCOL
from tests import test_cli_grace
from tests.hubserver import HubServer
from tests.jsondoc import doc
from tests.test_crash_safety import kedit_command
from tests.test_hub import URL as HUB_URL
from tests.test_hub import hub, origin  # noqa: F401  (fixtures: a local Hub, a repository with a remote)
from tests.test_hub import run as hub_run

DOWN0 = "model.layers.0.mlp.down_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"
FORGED = "f" * 32  # an id no commit has
GRACE_FRANCE = test_cli_grace.FRANCE


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEDIT_DEBUG", raising=False)  # it turns error lines into tracebacks


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> tuple[Path, dict[str, str]]:
    """The tiny Llama (conftest) with: a low-rank edit with a request and metrics, a dense edit,
    an adapter commit with method memory, and a revert of the first edit. Built once."""
    root = tmp_path_factory.mktemp("template") / "work"
    repo = Repository.init(root, str(tiny_llama_dir), progress=False)
    gen = torch.Generator().manual_seed(0)
    low_rank = LowRank(torch.randn(32, 1, generator=gen) * 0.1, torch.randn(1, 64, generator=gen) * 0.1)
    first = repo.commit({DOWN0: low_rank}, method="rome", hparams={"layer": 0, "lr": 0.5},
                        requests=[{"prompt": "The capital of {} is", "subject": "France", "target_new": "Rome"}],
                        metrics=[Metric("reliability", 1.0, "teacher_forced_token_acc"),
                                 Metric("locality", 0.9, "teacher_forced_agreement")])
    second = repo.commit({UP1: Dense(torch.randn(64, 32, generator=gen) * 0.01)}, method="ft", message="dense")
    adapter = repo.commit({}, adapters=[Adapter("grace", {"keys": torch.randn(2, 32, generator=gen)},
                                                {"entries": []})], method="grace", message="adapter",
                          memory={"keys": torch.randn(3, 32, generator=gen)})
    revert = repo.revert(first.id)
    store_editor(repo, "mend", {"w": torch.randn(4, 4, generator=gen)}, {}, repo.log()[-1].id, "0" * 32, {},
                 {"prompt_protocol": PROMPT_PROTOCOL})
    ids = {"init": repo.log()[-1].id, "first": first.id, "second": second.id, "adapter": adapter.id,
           "revert": revert.id}
    repo.db.conn.close()  # checkpoints the WAL, so the folder can be copied
    return root, ids


@pytest.fixture
def work(template: tuple[Path, dict[str, str]], tmp_path: Path) -> Path:
    return shutil.copytree(template[0], tmp_path / "work")


@pytest.fixture
def ids(template: tuple[Path, dict[str, str]]) -> dict[str, str]:
    return template[1]


def kedit(work: Path, *args: str) -> Result:
    result = CliRunner().invoke(cli, ["--repo", str(work), *args])
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit | None), result.exception
    return result


def sql(work: Path, statement: str, params: tuple = ()) -> None:
    """Tamper as a script would: plain sqlite3, foreign keys off (SQLite's default)."""
    conn = sqlite3.connect(work / ".kedit" / "kedit.db")
    with conn:
        assert conn.execute(statement, params).rowcount >= 1, statement
    conn.close()


def views(work: Path, ids: dict[str, str]) -> dict[str, object]:
    """What a user reads: the log, `show` of every commit, the trained editors."""
    out: dict[str, object] = {"log": kedit(work, "log", "--json").output,
                              "editors": kedit(work, "editors", "--json").output}
    for name, cid in ids.items():
        out[name] = doc(kedit(work, "show", cid, "--json").output)
    return out


# (case id, tampering statement with {commit ids}, the words fsck must say)
TAMPERING = [
    ("parent", "UPDATE commits SET parent = '{init}' WHERE id = '{second}'", "{second:.12}: column parent is"),
    ("parent-cycle", "UPDATE commits SET parent = '{second}' WHERE id = '{first}'", "the parent columns form a cycle"),
    ("depth", "UPDATE commits SET depth = 7 WHERE id = '{second}'", "{second:.12}: column depth is 7"),
    ("kind", "UPDATE commits SET kind = 'init' WHERE id = '{second}'", "{second:.12}: column kind is"),
    ("method", "UPDATE commits SET method = 'memit' WHERE id = '{first}'", "{first:.12}: column method is 'memit'"),
    ("hparams", "UPDATE commits SET hparams = '{{\"layer\": 5}}' WHERE id = '{first}'", "column hparams is"),
    ("requests", "UPDATE commits SET requests = '[{{\"prompt\": \"{{}} is in\", \"subject\": \"Paris\", "
                 "\"target_new\": \"Berlin\"}}]' WHERE id = '{first}'", "{first:.12}: column requests is"),
    ("revert-requests", "UPDATE commits SET requests = '[]' WHERE id = '{revert}'", "{revert:.12}: column requests"),
    ("message", "UPDATE commits SET message = 'harmless' WHERE id = '{first}'", "column message is 'harmless'"),
    ("author", "UPDATE commits SET author = 'mallory' WHERE id = '{first}'", "column author is 'mallory'"),
    ("time", "UPDATE commits SET created = '2001-01-01T00:00:00+00:00' WHERE id = '{first}'", "column created is"),
    ("reverted-commit", "UPDATE commits SET info = json_set(info, '$.reverts', '{second}') WHERE id = '{revert}'",
     "{revert:.12}: info names"),
    ("result-hash", f"UPDATE tensor_changes SET result_hash = '{FORGED}' WHERE commit_id = '{{first}}'",
     f"tensor {DOWN0}: result_hash is '{FORGED}'"),
    ("source-commit", "UPDATE tensor_changes SET source_commit = '{init}' WHERE commit_id = '{second}'",
     f"tensor {UP1}: source_commit is"),
    ("step-object", f"UPDATE tensor_steps SET object_id = '{FORGED}' WHERE commit_id = '{{first}}'",
     f"tensor {DOWN0}: its delta steps differ"),
    ("shape", "UPDATE tensor_changes SET shape = '[64, 32]' WHERE commit_id = '{first}'",
     f"tensor {DOWN0}: its row says F32 [64, 32], its value (proved by hash) is F32 [32, 64]"),
    ("extra-change", "INSERT INTO tensor_changes SELECT '{second}', name, source_commit, result_hash, dtype, shape, "
                     "encoding, rank, delta_norm, rel_change, stored_bytes FROM tensor_changes "
                     "WHERE commit_id = '{first}'", f"{{second:.12}}: a change row for {DOWN0}"),
    ("adapter-op", "UPDATE adapter_ops SET op = 'remove' WHERE commit_id = '{adapter}'", "its adapter rows differ"),
    ("file-row", f"UPDATE files SET object_id = '{FORGED}' WHERE path = 'config.json'", "its file rows differ"),
    ("method-memory", "UPDATE method_memory SET method = 'alphaedit' WHERE commit_id = '{adapter}'",
     "{adapter:.12}: its method memory row is"),
    ("editor-method", "UPDATE editors SET method = 'instructedit'", "its row says method 'instructedit', its weights"),
    ("branch", f"UPDATE refs SET target = '{FORGED}' WHERE name = 'refs/heads/main'",
     f"refs/heads/main points to {FORGED[:12]}, which is not a commit"),
    ("reflog", f"UPDATE reflog SET new = '{FORGED}' WHERE id = (SELECT MIN(id) FROM reflog WHERE ref = 'HEAD')",
     f"of HEAD names {FORGED[:12]}, which is not a commit"),
]


@pytest.mark.parametrize(("statement", "named"), [c[1:] for c in TAMPERING], ids=[c[0] for c in TAMPERING])
def test_each_tampered_row_is_named_by_fsck_and_rebuilt_by_repair(work: Path, ids: dict[str, str], statement: str,
                                                                  named: str) -> None:
    before = views(work, ids)
    sql(work, statement.format(**ids))

    found = kedit(work, "fsck")
    assert found.exit_code == 1, found.output
    assert named.format(**ids) in found.stdout, found.stdout
    assert all("kedit fsck --repair" in line for line in found.stdout.splitlines() if line.startswith("error:"))

    repaired = kedit(work, "fsck", "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert "repaired: " in repaired.stdout and repaired.stdout.rstrip().endswith(": ok")
    assert views(work, ids) == before  # log and show print what the records say again
    again = kedit(work, "fsck")
    assert again.exit_code == 0 and again.stdout.rstrip().endswith(": ok"), again.output


def test_a_forged_parent_hides_a_commit_from_log_until_repaired(work: Path, ids: dict[str, str]) -> None:
    sql(work, f"UPDATE commits SET parent = '{ids['init']}' WHERE id = '{ids['second']}'")
    sql(work, f"UPDATE commit_parents SET parent_id = '{ids['init']}' WHERE commit_id = '{ids['second']}'")
    assert ids["first"][:12] not in kedit(work, "log", "--oneline").stdout  # the attack works on log...
    assert f"Parent: {ids['init']}" in kedit(work, "show", ids["second"]).stdout
    assert f"commit {ids['second'][:12]}: column parent is '{ids['init']}', its record says '{ids['first']}'" \
        in kedit(work, "fsck").stdout  # ...and fsck names it
    assert f"commit {ids['second'][:12]}: its parent rows name [\"{ids['init']}\"], its record says " \
        f"[\"{ids['first']}\"]" in kedit(work, "fsck").stdout
    kedit(work, "fsck", "--repair")
    assert ids["first"][:12] in kedit(work, "log", "--oneline").stdout
    assert f"Parent: {ids['first']}" in kedit(work, "show", ids["second"]).stdout


def test_forged_requests_are_shown_until_repaired(work: Path, ids: dict[str, str]) -> None:
    forged = '[{"prompt": "{} is in", "subject": "Paris", "target_new": "Berlin"}]'
    sql(work, f"UPDATE commits SET requests = ?, method = 'memit' WHERE id = '{ids['first']}'", (forged,))
    assert "'Paris is in' -> 'Berlin'" in kedit(work, "show", ids["first"]).stdout
    assert kedit(work, "fsck").exit_code == 1
    assert kedit(work, "fsck", "--repair").exit_code == 0
    shown = kedit(work, "show", ids["first"]).stdout
    assert "'The capital of France is' -> 'Rome'" in shown and "Method: rome" in shown and "Berlin" not in shown


def test_a_deleted_change_row_is_reinserted_from_the_record(work: Path, ids: dict[str, str]) -> None:
    sql(work, f"DELETE FROM tensor_changes WHERE commit_id = '{ids['second']}'")
    assert f"{ids['second'][:12]}: no change row for {UP1}" in kedit(work, "fsck").stdout
    assert kedit(work, "fsck", "--repair").exit_code == 0
    repo = Repository.open(work)
    change = repo.changes(ids["second"])[0]
    assert (change.name, change.dtype, change.shape) == (UP1, "F32", (64, 32))
    assert change.delta_norm is None  # a statistic no hash proves is not invented
    assert kedit(work, "fsck").exit_code == 0


def flip_byte_keeping_stat(path: Path) -> None:
    """Change one byte of the tensor data; put size and modification time back as they were."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_a_flipped_byte_in_a_shard_is_found_and_the_shard_restored(work: Path) -> None:
    assert kedit(work, "checkout", "main").exit_code == 0  # the copied folder's index learns the new inodes
    repo = Repository.open(work)
    head = {name: value.clone() for name, value in repo.materialize().items()}  # not views of mapped shards
    shard = repo.worktree.folder / shard_name(DOWN0)
    flip_byte_keeping_stat(shard)
    assert "exactly HEAD" in kedit(work, "status").stdout  # status trusts size and time (fast path)...

    found = kedit(work, "fsck")
    assert found.exit_code == 1
    assert f"working model: {shard.name} does not hold {DOWN0}" in found.stdout  # ...fsck does not

    repaired = kedit(work, "fsck", "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert f"repaired: working model: {shard.name} rewritten from the objects" in repaired.stdout
    model = AutoModelForCausalLM.from_pretrained(repo.worktree.folder, torch_dtype=torch.float32)
    loaded = model.state_dict()
    for name, value in head.items():
        if name in loaded:
            assert torch.equal(loaded[name], value), name
    assert torch.equal(loaded[DOWN0], head[DOWN0])
    assert "exactly HEAD" in kedit(work, "status").stdout


def test_a_damaged_config_file_in_the_working_model_is_restored(work: Path) -> None:
    config = Repository.open(work).worktree.folder / "config.json"
    original = config.read_bytes()
    config.write_bytes(original.replace(b'"llama"', b'"gpt2"'))
    assert "working model: config.json is missing or differs" in kedit(work, "fsck").stdout
    assert kedit(work, "fsck", "--repair").exit_code == 0
    assert config.read_bytes() == original


def test_damage_no_hash_can_undo_is_reported_as_such(work: Path, ids: dict[str, str]) -> None:
    sql(work, f"UPDATE commits SET record = replace(record, 'Rome', 'Oslo') WHERE id = '{ids['first']}'")
    result = kedit(work, "fsck", "--repair")
    assert result.exit_code == 1
    assert f"commit {ids['first'][:12]}: its record does not hash to its id; cannot be repaired" in result.stdout


def test_unproved_rows_are_counted_and_fsck_json_has_every_section(work: Path) -> None:
    result = kedit(work, "fsck")
    assert result.exit_code == 0
    assert "unproved (no hash covers them): 2 metrics measured here" in result.stdout
    report = doc(kedit(work, "fsck", "--json").stdout)
    assert report["ok"] and report["errors"] == [] and report["repaired"] == []
    assert report["unproved"]["metrics measured here"] == 2
    assert report["worktree_shards"] == report["tensors"] - 3 > 0  # every tensor of HEAD, re-hashed
    assert report["commits"] == 5


def test_an_old_repository_gains_the_metric_source_column(work: Path) -> None:
    conn = sqlite3.connect(work / ".kedit" / "kedit.db")  # as the kedit before this column left it
    with conn:
        conn.execute("ALTER TABLE metrics DROP COLUMN source")
        conn.execute("DELETE FROM _kedit_migrations WHERE name = '0006_metric_source'")
    conn.close()
    assert kedit(work, "fsck").exit_code == 0
    assert "2 metrics measured here" in kedit(work, "fsck").stdout


def test_metrics_fetched_from_a_remote_are_labelled_as_the_remotes(origin: Repository, hub: HubServer,  # noqa: F811
                                                                   tmp_path: Path) -> None:
    hub_run(origin.root, "push")
    hub_run(tmp_path, "clone", HUB_URL, str(tmp_path / "copy"))
    copy = tmp_path / "copy"
    result = kedit(copy, "fsck")
    assert result.exit_code == 0, result.output
    assert "4 metrics fetched from origin" in result.stdout and "measured here" not in result.stdout
    assert "(from origin, not verified here)" in kedit(copy, "show").stdout
    assert "not verified here" not in kedit(origin.root, "show").stdout
    # a measurement made here replaces the remote's claim, and says so
    Repository.open(copy).record_metrics("HEAD", [Metric("reliability", 0.5, "teacher_forced_token_acc")])
    assert "1 metrics measured here, 3 metrics fetched from origin" in kedit(copy, "fsck").stdout


def test_repair_waits_for_the_writer_lock_and_changes_nothing_without_it(work: Path, ids: dict[str, str]) -> None:
    sql(work, f"UPDATE commits SET message = 'harmless' WHERE id = '{ids['first']}'")
    env = {**os.environ, "KEDIT_LOCK_TIMEOUT": "0.5"}
    with Repository.open(work).lock():  # another writer (a separate process below) holds it
        proc = subprocess.run([*kedit_command(), "--repo", str(work), "fsck", "--repair"],
                              capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("kedit: error: another kedit command is writing"), proc.stderr
    assert Repository.open(work).get_commit(ids["first"]).message == "harmless"  # nothing was rewritten


def test_a_real_grace_commit_forged_adapter_row_is_repaired(tmp_path: Path, tiny_folder: Path) -> None:
    work = tmp_path / "work"
    Repository.init(work, str(tiny_folder), progress=False)
    assert kedit(work, *GRACE_FRANCE).exit_code == 0
    before = doc(kedit(work, "show", "--json").stdout)
    sql(work, "UPDATE adapter_ops SET kind = 'lora'")
    assert "its adapter rows differ from the record's" in kedit(work, "fsck").stdout
    assert kedit(work, "fsck", "--repair").exit_code == 0
    assert doc(kedit(work, "show", "--json").stdout) == before
