"""Per-tensor weight differences between two revisions."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kedit.core import history
from kedit.core.repo import Repository


@dataclass(frozen=True)
class TensorDiff:
    name: str
    status: str  # modified | added | removed
    shape: tuple[int, ...]
    dtype: str
    hash_a: str | None
    hash_b: str | None
    delta_norm: float | None = None
    max_abs: float | None = None
    rel_change: float | None = None
    changed: int | None = None  # elements whose bits differ
    numel: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def diff(repo: Repository, rev_a: str, rev_b: str) -> list[TensorDiff]:
    """Tensors that differ between two revisions, with the size of each difference."""
    a, b = repo.resolve(rev_a), repo.resolve(rev_b)
    ma, mb = history.manifest(repo.db, a), history.manifest(repo.db, b)
    out: list[TensorDiff] = []
    for name in sorted(set(ma) | set(mb)):
        ea, eb = ma.get(name), mb.get(name)
        if ea is not None and eb is not None and ea.hash == eb.hash:
            continue
        if ea is None or eb is None:
            e = ea or eb
            assert e is not None
            out.append(TensorDiff(name, "added" if ea is None else "removed", e.shape, e.dtype,
                                  ea.hash if ea else None, eb.hash if eb else None))
            continue
        va = repo.materializer.value_of(history.change(repo.db, ea.commit_id, name))
        vb = repo.materializer.value_of(history.change(repo.db, eb.commit_id, name))
        if va.shape != vb.shape:
            out.append(TensorDiff(name, "modified", eb.shape, eb.dtype, ea.hash, eb.hash))
            continue
        d = vb.to(torch.float64) - va.to(torch.float64)
        base = float(va.to(torch.float64).norm())
        norm = float(d.norm())
        changed = int((va.view(-1).view(torch.uint8).view(va.numel(), -1)
                       != vb.view(-1).view(torch.uint8).view(vb.numel(), -1)).any(dim=1).sum())
        out.append(TensorDiff(name, "modified", eb.shape, eb.dtype, ea.hash, eb.hash, norm,
                              float(d.abs().max()) if d.numel() else 0.0, norm / base if base else None,
                              changed, va.numel()))
    return out


def adapter_diff(repo: Repository, rev_a: str, rev_b: str) -> dict[str, list[str]]:
    a = {r.object_id for r in history.adapters(repo.db, repo.resolve(rev_a))}
    b = {r.object_id for r in history.adapters(repo.db, repo.resolve(rev_b))}
    return {"added": sorted(b - a), "removed": sorted(a - b)}
