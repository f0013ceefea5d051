"""Export a revision as a normal Hugging Face checkpoint folder.

A revision with adapters (e.g. GRACE codebooks) is exported as its weights plus the adapters, with
a config.json that plain transformers refuses to load (kedit/model/adapters.py): `kedit.load_model(path)`
loads it with the adapters in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kedit.core import history
from kedit.core.errors import KeditError
from kedit.core.names import check_file_set, check_tensor_name
from kedit.core.progress import progress_bar
from kedit.core.repo import Repository
from kedit.core.store import atomic_write_bytes, fsync_dir, stream_tensors_atomic
from kedit.core.stwriter import TensorSpec
from kedit.model.adapters import mark_config, write_adapters

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' own default ("5GB")


def _shards(manifest: dict[str, history.ManifestEntry], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, entry in manifest.items():
        nbytes = entry.nbytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def check_destination(out_dir: Path, *, force: bool) -> None:
    """Refuse a non-empty destination unless forced: before any work, so a refusal costs nothing."""
    if out_dir.exists() and any(out_dir.iterdir()) and not force:  # a file here: iterdir says "Not a directory"
        raise KeditError(f"{out_dir} exists and is not empty", hint="choose another folder or pass --force")


@contextlib.contextmanager
def staged_dir(out_dir: Path, *, force: bool) -> Iterator[Path]:
    """A folder built beside `out_dir` and renamed into place when the block ends without error.

    A failed export leaves nothing behind, and a reader of `out_dir` sees the old or the new
    folder, never a half-written one.
    """
    check_destination(out_dir, force=force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.kedit-", dir=out_dir.parent))
    try:
        yield staging
        fsync_dir(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def export(repo: Repository, rev: str, out_dir: Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
           force: bool = False, progress: bool = False) -> dict:
    """Write `rev` as a plain Hugging Face folder; returns what was written.

    The folder is built beside its destination and renamed into place, so a failed export
    leaves nothing half-written. Each shard is written as its tensors are materialised, one at a
    time (`stwriter`): a 5 GB shard costs the memory of its largest tensor.
    """
    commit_id = repo.resolve(rev)
    manifest = history.manifest(repo.db, commit_id)
    with staged_dir(out_dir, force=force) as staging:
        shards = _shards(manifest, max_shard_bytes)
        names = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map: dict[str, str] = {}
        bar = progress_bar(total=len(manifest), desc="export", disable=not progress)
        with bar:
            def value_of(name: str) -> torch.Tensor:
                bar.update(1)
                return repo.materializer.value_of(history.change(repo.db, manifest[name].commit_id, name))

            for shard_names, file_name in zip(shards, names, strict=True):
                for name in shard_names:
                    check_tensor_name(name)
                    weight_map[name] = file_name
                stream_tensors_atomic(staging / file_name, [TensorSpec(n, manifest[n].dtype, manifest[n].shape)
                                                            for n in shard_names], value_of, {"format": "pt"})
        if len(shards) > 1:
            total = sum(e.nbytes for e in manifest.values())
            body = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write_bytes(staging / "model.safetensors.index.json", json.dumps(body, indent=2).encode())
        adapters = repo.adapters(commit_id)
        adapter_files = write_adapters(staging, [a for _, a in adapters])
        files = repo.files(commit_id)
        check_file_set(files)
        for path, data in files.items():
            if path == "config.json" and adapters:  # plain from_pretrained must not load it without them
                data = mark_config(data, adapter_files)
            atomic_write_bytes(path, data, root=staging)
        provenance = {"commit": commit_id, "tensors": {n: e.hash for n, e in manifest.items()},
                      "adapters": [ref.object_id for ref, _ in adapters], "adapter_files": adapter_files}
        atomic_write_bytes(staging / "kedit.json", json.dumps(provenance, indent=1, sort_keys=True).encode())
    return {"commit": commit_id, "path": str(out_dir), "shards": names, "tensors": len(manifest),
            "adapters": len(adapter_files)}

