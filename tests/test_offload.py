"""Editing a model that accelerate placed with layers offloaded to disk (`--device auto --max-memory
cpu=... --offload-folder DIR`): each method's committed delta is bit for bit the one it commits
with the model in memory (float32 on both sides), and FT-L, which trains weights in place, refuses.

The tiny Llama is 144 kB in float32; `cpu=60KB` leaves its embedding in memory and sends every
decoder layer, the final norm and the head to disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from kedit.methods.base import EditRequest

import kedit
from kedit.cli import cli
from kedit.edit.run import EditOptions, run_edits
from kedit.model.placement import is_offloaded, read_weight
from tests.jsondoc import doc
from tests.test_cli_editors import TRAIN, records
from tests.test_cli_mass_edit import FACTS, TINY
from tests.tiny import SENTENCES

OFFLOAD = {"cpu": "60KB"}
ONE = FACTS[0]


@pytest.fixture
def repo(tmp_path: Path, tiny_folder: Path) -> kedit.Repository:
    (tmp_path / "corpus.txt").write_text("\n".join(SENTENCES * 8))
    return kedit.Repository.init(tmp_path / "work", str(tiny_folder), progress=False)


def _edit_twice(repo: kedit.Repository, tmp_path: Path, requests: list[dict], method: str,
                overrides: dict[str, str]) -> tuple[list, list]:
    """The changes of the same edit made in memory and then, from the same base, offloaded."""
    base = repo.head()
    kwargs = dict(method=method, overrides=overrides, corpus=tmp_path / "corpus.txt", stats_samples=16,
                  measure=False)
    repo.edit(requests, **kwargs)
    in_memory = repo.changes("HEAD")
    repo.reset(base)
    repo.edit(requests, device="auto", max_memory=OFFLOAD, offload_folder=tmp_path / "offload", **kwargs)
    return in_memory, repo.changes("HEAD")


def _fingerprint(changes: list) -> list[tuple]:
    return sorted((c.name, c.result_hash, tuple(s.object_id for s in c.steps)) for c in changes)


def _overrides(method: str) -> dict[str, str]:
    """The tiny model's value settings (tests/test_cli_mass_edit.py's `--set key=value`)."""
    values = {**dict(item.split("=", 1) for item in TINY[1::2]), "v_dtype": "float32"}
    return {**values, "mom2_update_weight": "0.05"} if method != "rome" else values


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_offloaded_delta_equals_the_in_memory_one(repo: kedit.Repository, tmp_path: Path, method: str) -> None:
    requests = [ONE] if method == "rome" else FACTS[:2]
    in_memory, offloaded = _edit_twice(repo, tmp_path, requests, method, _overrides(method))
    assert in_memory and _fingerprint(offloaded) == _fingerprint(in_memory)


def test_an_offloaded_edit_records_the_v_dtype_it_used(repo: kedit.Repository, tmp_path: Path) -> None:
    """Placed layers are never copied to v_dtype: the commit records the model's own dtype, and
    replaying it in memory with what it records computes the same delta; in memory the setting stands."""
    kwargs = dict(method="rome", overrides={k: v for k, v in _overrides("rome").items() if k != "v_dtype"},
                  corpus=tmp_path / "corpus.txt", stats_samples=16, measure=False)
    base = repo.head()
    repo.edit([ONE], **kwargs)
    assert repo.get_commit(repo.head()).hparams["v_dtype"] == "bfloat16"
    repo.reset(base)
    (offloaded,) = repo.edit([ONE], device="auto", max_memory=OFFLOAD, offload_folder=tmp_path / "offload",
                             **kwargs)
    assert offloaded.hparams["v_dtype"] == "float32"  # the tiny model's dtype
    repo.reset(base)
    (replayed,) = run_edits(repo, [EditRequest.from_dict(ONE)],
                            EditOptions(recorded_hparams=offloaded.hparams, corpus=tmp_path / "corpus.txt",
                                        stats_samples=16, measure=False))
    assert replayed.hparams == offloaded.hparams
    assert _fingerprint(repo.changes(replayed.id)) == _fingerprint(repo.changes(offloaded.id))


def test_offloaded_grace_adapter_equals_the_in_memory_one(repo: kedit.Repository, tmp_path: Path) -> None:
    base = repo.head()
    kwargs = dict(method="grace", overrides={"n_iter": "20"}, measure=False)
    repo.edit([ONE], **kwargs)
    in_memory = repo.adapters("HEAD")
    repo.reset(base)
    repo.edit([ONE], device="auto", max_memory=OFFLOAD, offload_folder=tmp_path / "offload", **kwargs)
    (_, offloaded), (_, reference) = repo.adapters("HEAD")[-1], in_memory[-1]
    assert offloaded.tensors.keys() == reference.tensors.keys()
    assert all(torch.equal(offloaded.tensors[k], reference.tensors[k]) for k in reference.tensors)
    timeless = [{k: v for k, v in e.items() if k != "seconds"} for e in reference.config["entries"]]
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in offloaded.config["entries"]] == timeless


def test_offloaded_mend_delta_equals_the_in_memory_one(repo: kedit.Repository, tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text(json.dumps(records()))
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), "train-editor", "--method", "mend",
                                      "--data", str(tmp_path / "train.json"), *TRAIN, "--set", "max_steps=2"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    in_memory, offloaded = _edit_twice(repo, tmp_path, [ONE], "mend", {})
    assert in_memory and _fingerprint(offloaded) == _fingerprint(in_memory)


def test_the_model_is_offloaded_and_read_from_its_real_weights(repo: kedit.Repository, tmp_path: Path) -> None:
    model, _ = repo.load(device="auto", max_memory=OFFLOAD, offload_folder=tmp_path / "offload")
    module = model.get_submodule("model.layers.1.mlp.down_proj")
    assert is_offloaded(module) and module.weight.device.type == "meta"
    stored = repo.materialize("HEAD", names=["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(read_weight(module), stored["model.layers.1.mlp.down_proj.weight"])


def test_stats_of_an_offloaded_model_equal_the_in_memory_ones(tmp_path: Path, tiny_folder: Path) -> None:
    (tmp_path / "corpus.txt").write_text("\n".join(SENTENCES * 8))
    traces = []
    for name, placement in (("memory", []), ("offloaded", ["--device", "auto", "--max-memory", "cpu=60KB",
                                                           "--offload-folder", str(tmp_path / "offload")])):
        repo = kedit.Repository.init(tmp_path / name, str(tiny_folder), progress=False)
        result = CliRunner().invoke(cli, ["--repo", str(repo.root), "stats", "--layer", "1", "--corpus",
                                          str(tmp_path / "corpus.txt"), "--samples", "16", "--json", *placement])
        assert result.exit_code == 0, result.stderr
        traces.append(doc(result.stdout)["layers"][0]["trace"])
    assert traces[0] == traces[1] and traces[0] > 0


def test_ft_refuses_offloaded_layers_in_one_line(repo: kedit.Repository, tmp_path: Path) -> None:
    before = repo.head()
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), "edit", "--method", "ft", "--prompt",
                                      ONE["prompt"], "--subject", ONE["subject"], "--target", ONE["target_new"],
                                      "--no-eval", "--device", "auto", "--max-memory", "cpu=60KB",
                                      "--offload-folder", str(tmp_path / "offload")])
    assert result.exit_code == 1 and "cannot train layers offloaded to disk" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2 and repo.head() == before


@pytest.mark.parametrize(("args", "message"), [
    (["--max-memory", "cpu"], "expected DEVICE=SIZE"),
    (["--max-memory", "cpu=lots", "--device", "auto"], "is not a size"),
    (["--max-memory", "tpu=1GB", "--device", "auto"], "the device must be"),
    (["--max-memory", "cpu=1GB"], "need --device auto"),
])
def test_bad_placement_options_are_one_line(repo: kedit.Repository, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), "stats", *args])
    assert result.exit_code != 0 and message in result.stderr and len(repo.log()) == 1
