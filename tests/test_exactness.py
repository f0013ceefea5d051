"""Checkout, export and revert reproduce recorded hashes bit for bit, in fp32, fp16 and bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kedit.core.delta import Dense, LowRank, apply_step, encode_delta
from kedit.core.maintenance import fsck
from kedit.core.repo import Repository
from kedit.core.tensors import hash_tensor
from kedit.model.export import export
from tests.conftest import build_tiny_model


def random_delta(shape: tuple[int, ...], gen: torch.Generator) -> LowRank | Dense:
    if len(shape) == 2 and torch.rand(1, generator=gen).item() < 0.6:
        rank = int(torch.randint(1, 4, (1,), generator=gen))
        return LowRank(torch.randn(shape[0], rank, generator=gen) * 0.05, torch.randn(rank, shape[1], generator=gen))
    return Dense(torch.randn(shape, generator=gen) * 0.01)


def expected_state(base: dict[str, torch.Tensor], edits: list[dict]) -> dict[str, str]:
    """An independent oracle: fold the (normalised) deltas of `edits`, in order, over the base."""
    state = {n: t.clone() for n, t in base.items()}
    for edit in edits:
        for name, delta in edit.items():
            step, _ = encode_delta(delta, state[name])
            state[name] = apply_step(state[name], step)
    return {n: hash_tensor(t) for n, t in state.items()}


def hashes(state: dict[str, torch.Tensor]) -> dict[str, str]:
    return {n: hash_tensor(t) for n, t in state.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_random_history_checkout_revert_exact(tmp_path: Path, arch: str, dtype: torch.dtype) -> None:
    folder = build_tiny_model(arch, tmp_path / "src", dtype=dtype)
    repo = Repository.init(tmp_path / "repo", str(folder), progress=False)
    base = repo.materialize()
    base_hashes = hashes(base)
    matrices = sorted(n for n, t in base.items() if t.dim() == 2 and "embed" not in n and "wte" not in n)
    gen = torch.Generator().manual_seed(hash((arch, str(dtype))) % 2**31)

    edits: list[dict] = []
    commits = []
    for i in range(10):
        picks = torch.randperm(len(matrices), generator=gen)[: 1 + i % 3].tolist()
        edit = {matrices[p]: random_delta(tuple(base[matrices[p]].shape), gen) for p in picks}
        commits.append(repo.commit(edit, message=f"edit {i}"))
        edits.append(edit)
        recorded = {n: e.hash for n, e in repo.manifest().items()}
        assert recorded == expected_state(base, edits)

    # Every commit checks out to exactly its recorded hashes, in the working model too.
    for commit in [commits[3], commits[0], commits[9], commits[6]]:
        repo.checkout(commit.id)
        recorded = {n: e.hash for n, e in repo.manifest(commit.id).items()}
        assert hashes(repo.materialize(commit.id)) == recorded
        shards = {}
        for shard in repo.worktree.folder.glob("*.safetensors"):
            shards.update(load_file(shard))
        assert hashes(shards) == recorded
    repo.checkout("main")

    # Revert in the middle: the state is the history without that edit, recomputed.
    repo.revert(commits[4].id)
    without_4 = edits[:4] + edits[5:]
    assert {n: e.hash for n, e in repo.manifest().items()} == expected_state(base, without_4)
    assert hashes(repo.materialize()) == expected_state(base, without_4)

    # Reverting every remaining edit, in a scrambled order, gives the base bit for bit.
    for i in [7, 0, 9, 2, 5, 1, 8, 3, 6]:
        repo.revert(commits[i].id)
    assert {n: e.hash for n, e in repo.manifest().items()} == base_hashes
    assert hashes(repo.materialize()) == base_hashes
    assert repo.status()["modified"] == {}
    report = fsck(repo)
    assert report.ok, report.errors


def test_revert_of_a_revert_restores_the_edit(repo: Repository) -> None:
    name = "model.layers.0.mlp.down_proj.weight"
    edit = repo.commit({name: LowRank(torch.randn(32, 1), torch.randn(1, 64))})
    edited = repo.manifest()[name].hash
    undo = repo.revert(edit.id)
    assert repo.manifest()[name].hash == repo.manifest(edit.parent)[name].hash
    repo.revert(undo.id)
    assert repo.manifest()[name].hash == edited


def test_export_loads_with_plain_transformers(repo: Repository, tmp_path: Path) -> None:
    name = "model.layers.1.mlp.down_proj.weight"
    repo.commit({name: LowRank(torch.randn(32, 2), torch.randn(2, 64))})
    recorded = {n: e.hash for n, e in repo.manifest().items()}
    for max_shard in (10**9, 20_000):  # one file, then many shards with an index
        out = tmp_path / f"export-{max_shard}"
        result = export(repo, "HEAD", out, max_shard_bytes=max_shard)
        assert (len(result["shards"]) > 1) == (max_shard == 20_000)
        model = AutoModelForCausalLM.from_pretrained(out)
        state = model.state_dict()
        assert {n: hash_tensor(state[n]) for n in recorded} == recorded


def test_working_model_loads_with_plain_transformers(repo: Repository) -> None:
    repo.commit({"model.layers.0.self_attn.q_proj.weight": Dense(torch.randn(32, 32) * 0.1)})
    model = AutoModelForCausalLM.from_pretrained(repo.worktree.folder)
    state = model.state_dict()
    assert {n: hash_tensor(state[n]) for n in repo.manifest()} == {n: e.hash for n, e in repo.manifest().items()}


def test_no_copy_base_is_referenced_and_verified(tmp_path: Path, tiny_llama_dir: Path) -> None:
    repo = Repository.init(tmp_path / "ref", str(tiny_llama_dir), copy=False, progress=False)
    kinds = {kind for _, kind, _ in repo.store.iter_objects()}
    assert kinds == {"ref", "blob"}  # no tensor bytes were copied
    copied = Repository.init(tmp_path / "copy", str(tiny_llama_dir), progress=False)
    # A reference and a copy name the same objects, so their histories stay compatible.
    objects = lambda r: sorted(s.object_id for c in r.changes("HEAD") for s in c.steps)  # noqa: E731
    assert objects(repo) == objects(copied)
    assert hashes(repo.materialize()) == hashes(copied.materialize())


def test_low_rank_commit_stores_factors_only(repo: Repository) -> None:
    name = "model.layers.0.mlp.down_proj.weight"  # 32 x 64
    commit = repo.commit({name: LowRank(torch.randn(32, 1), torch.randn(1, 64))})
    (change,) = repo.changes(commit.id)
    assert change.encoding == "lowrank" and change.rank == 1
    assert change.stored_bytes < 32 * 64 * 4 / 2  # factors, not a dense matrix
    # A rank too high for factors to pay off is stored dense, in the tensor's dtype.
    commit = repo.commit({name: LowRank(torch.randn(32, 30), torch.randn(30, 64))})
    (change,) = repo.changes(commit.id)
    assert change.encoding == "dense"


def test_init_from_a_model_id_in_the_local_hub_cache(tmp_path: Path, tiny_llama_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache layout huggingface_hub documents: hub/models--ORG--NAME/{refs/main, snapshots/REV/}."""
    import shutil

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo_dir = tmp_path / "hub" / "models--acme--tiny-llama"
    snapshot = repo_dir / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_llama_dir, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("a" * 40)
    repo = Repository.init(tmp_path / "from-cache", "acme/tiny-llama", progress=False)
    assert repo.log()[0].info["origin"]["model_id"] == "acme/tiny-llama"
    direct = Repository.init(tmp_path / "from-folder", str(tiny_llama_dir), progress=False)
    assert {n: e.hash for n, e in repo.manifest().items()} == {n: e.hash for n, e in direct.manifest().items()}
