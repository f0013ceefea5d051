"""The weight edits between two revisions as a PEFT LoRA adapter (`kedit export --format peft`).

A low-rank step is stored as factors `a @ b` in the tensor's layout (kedit/core/delta.py), so a
tensor changed by steps of ranks r_1..r_n from the base is the base plus one product of rank
Σr_i: the factors concatenated, `[a_1 .. a_n] @ [b_1; ..; b_n]`. That is a LoRA with
`lora_B = [a_1 .. a_n]`, `lora_A = [b_1; ..; b_n]` and scale 1 (`lora_alpha = r`), exact, not an
approximation. Tensors of different total ranks get `rank_pattern`/`alpha_pattern` entries.

Caveats: kedit's own value rounds to the tensor's dtype after every step (the canonical
arithmetic), while PEFT adds the whole product at once (or, unmerged, adds `B(Ax)` to the
activations). For one rank-one step on a float32 tensor the merged weight is bit-identical; in
general the two differ by at most one rounding of the tensor's dtype per step. A dense step (FT-L)
has no factors: it is refused unless a rank is given, and then the total delta is truncated by
SVD and its relative error reported. GRACE adapters are not weight deltas and are refused.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from kedit.core import history
from kedit.core.delta import LowRank
from kedit.core.errors import KeditError
from kedit.core.materialize import load_step
from kedit.core.refs import short_id
from kedit.core.repo import Repository
from kedit.core.store import atomic_write_bytes, save_tensors_atomic
from kedit.model.export import check_destination, staged_dir

ADAPTER_PREFIX = "base_model.model."  # how PeftModel names the wrapped model's modules in its state dict


@dataclass(frozen=True)
class LoraFactors:
    """One target module's LoRA: delta = lora_b @ lora_a, in nn.Linear's (out, in) layout."""

    module: str
    lora_a: torch.Tensor  # (r, in)
    lora_b: torch.Tensor  # (out, r)
    steps: int  # kedit steps folded into it
    exact: bool  # False when a dense delta was truncated by SVD
    rel_error: float  # ||delta - lora_b @ lora_a||_F / ||delta||_F (0 when exact)
    fan_in_fan_out: bool  # a Conv1D (GPT-2), whose weight is stored (in, out)

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


def effective_steps(repo: Repository, commit_id: str, name: str) -> list[history.Step]:
    """The steps that compute `name` at `commit_id`, from its last replacement (the base value) on."""
    steps: list[history.Step] = []
    current = history.defining_change(repo.db, commit_id, name)
    while current is not None:
        steps[:0] = current.steps
        exact = [i for i, s in enumerate(current.steps) if s.encoding == "exact"]
        if exact or current.source_commit is None:
            return steps[exact[-1]:] if exact else steps
        current = history.defining_change(repo.db, current.source_commit, name)
    return steps


def _module_kinds(repo: Repository, commit_id: str) -> tuple[object, dict[str, str]]:
    """The model's config and, per module name, "linear", "conv1d" (GPT-2's transposed Linear) or
    another class name, from the model built on the meta device (no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    raw = repo.files(commit_id).get("config.json")
    if raw is None:
        raise KeditError("this repository's base has no config.json: PEFT needs the model's architecture",
                         hint="init from a Hugging Face folder")
    fields = json.loads(raw)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    kinds = {}
    for module_name, module in model.named_modules():
        kinds[module_name] = ("conv1d" if isinstance(module, Conv1D) else
                              "linear" if isinstance(module, torch.nn.Linear) else type(module).__name__)
    return config, kinds


def _svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of `delta` (Eckart–Young) and the relative Frobenius error left."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    k = min(rank, s.numel())
    total = float(s.square().sum())
    rel = (float(s[k:].square().sum()) / total) ** 0.5 if total else 0.0
    return (u[:, :k] * s[:k]).to(torch.float32), vh[:k].to(torch.float32), rel


def plan_adapter(repo: Repository, rev: str, base: str | None = None,
                 rank: int | None = None) -> tuple[str, str, object, list[LoraFactors]]:
    """(commit, base commit, model config, factors per target module) for the adapter from base to rev.

    Raises KeditError, before anything is written, for what a LoRA cannot carry: adapters
    (GRACE), dense deltas without `rank`, changes to tensors that are not a Linear's weight.
    """
    commit_id = repo.resolve(rev)
    chain = history.ancestors(repo.db, commit_id)
    base_id = chain[-1] if base is None else repo.resolve(base)
    if base_id not in chain:
        raise KeditError(f"{base} is not in the history of {rev}: an adapter holds the edits from a base to a "
                         "revision that descends from it")
    base_adapters = {r.object_id for r in history.adapters(repo.db, base_id)}
    added = [r for r in history.adapters(repo.db, commit_id) if r.object_id not in base_adapters]
    if added:
        raise KeditError(f"{rev} holds {len(added)} {added[0].kind} adapter(s), which are not weight deltas and have "
                         "no LoRA form; export a full folder instead: kedit export REV DIR")
    if rank is not None and rank < 1:
        raise KeditError(f"--rank must be at least 1, got {rank}")
    new, old = history.manifest(repo.db, commit_id), history.manifest(repo.db, base_id)
    changed = sorted(n for n, e in new.items() if n not in old or old[n].hash != e.hash)
    if not changed:
        raise KeditError(f"{rev} has the same weights as {short_id(base_id)}: there is nothing to export")
    config, kinds = _module_kinds(repo, commit_id)
    factors = []
    for name in changed:
        module = name.removesuffix(".weight")
        kind = kinds.get(module) if name.endswith(".weight") else None
        if name not in old or kind not in ("linear", "conv1d"):
            what = "new tensor" if name not in old else f"a {kind} weight" if kind else "not a module's weight"
            raise KeditError(f"{name} changed but is {what}: a LoRA adapter carries only Linear weights; "
                             "export a full folder instead: kedit export REV DIR")
        factors.append(_tensor_factors(repo, commit_id, base_id, name, kind == "conv1d", rank))
    return commit_id, base_id, config, factors


def _tensor_factors(repo: Repository, commit_id: str, base_id: str, name: str, transposed: bool,
                    rank: int | None) -> LoraFactors:
    rev_steps, base_steps = effective_steps(repo, commit_id, name), effective_steps(repo, base_id, name)
    extra = rev_steps[len(base_steps):]
    from_base = rev_steps[:len(base_steps)] == base_steps and all(s.encoding == "lowrank" for s in extra)
    if from_base:
        lowrank = [load_step(repo.store, s) for s in extra]
        assert all(isinstance(d, LowRank) for d in lowrank), f"{name}: a lowrank step that is not LowRank"
        a = torch.cat([d.a for d in lowrank], dim=1).to(torch.float32)  # (rows, Σr)
        b = torch.cat([d.b for d in lowrank], dim=0).to(torch.float32)  # (Σr, cols)
        exact, rel = True, 0.0
    else:
        why = ("is changed by a dense delta (e.g. FT-L)" if any(s.encoding == "dense" for s in extra)
               else "is not the base's value plus low-rank steps (a revert of an edit older than the base?)")
        if rank is None:
            raise KeditError(f"{name} {why}, which has no exact LoRA form; pass --rank K to truncate it by SVD "
                             "(the error is reported), or export a full folder: kedit export REV DIR")
        after = repo.materializer.value(commit_id, name).to(torch.float64)
        before = repo.materializer.value(base_id, name).to(torch.float64)
        a, b, rel = _svd_factors(after - before, rank)
        exact = False
    if transposed:  # Conv1D stores (in, out): PEFT's fan_in_fan_out wants B @ A = delta^T
        a, b = b.T, a.T
    return LoraFactors(name.removesuffix(".weight"), lora_a=b.contiguous(), lora_b=a.contiguous(),
                       steps=len(extra), exact=exact, rel_error=rel, fan_in_fan_out=transposed)


def base_model_name(repo: Repository, base_id: str) -> str:
    """How the adapter names its base: the model the repository was made from when the base is the
    initial commit (a model id, or the path kedit read), otherwise the kedit commit."""
    root = history.ancestors(repo.db, base_id)[-1]
    origin = repo.get_commit(root).info.get("origin", {}) if root == base_id else {}
    return origin.get("model_id") or origin.get("path") or f"kedit:{base_id}"


def export_peft(repo: Repository, rev: str, out_dir: Path, *, base: str | None = None, rank: int | None = None,
                base_name: str | None = None, force: bool = False) -> dict:
    """Write the adapter from `base` (default: the initial commit) to `rev`; returns what was written."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise KeditError("--format peft needs the peft package", hint="pip install 'kedit[peft]'") from None
    check_destination(out_dir, force=force)
    commit_id, base_id, config, factors = plan_adapter(repo, rev, base, rank)
    ranks = Counter(f.rank for f in factors)
    common = ranks.most_common(1)[0][0]
    pattern = {re.escape(f.module): f.rank for f in factors if f.rank != common}  # keys are regexes in PEFT
    fan_in_fan_out = all(f.fan_in_fan_out for f in factors)  # PEFT corrects a mixed model module by module
    lora = LoraConfig(r=common, lora_alpha=common, rank_pattern=pattern, alpha_pattern=dict(pattern),
                      target_modules=sorted(f.module for f in factors), lora_dropout=0.0, bias="none",
                      fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM", inference_mode=True,
                      base_model_name_or_path=base_name or base_model_name(repo, base_id))
    tensors = {}
    for f in factors:
        tensors[f"{ADAPTER_PREFIX}{f.module}.lora_A.weight"] = f.lora_a
        tensors[f"{ADAPTER_PREFIX}{f.module}.lora_B.weight"] = f.lora_b
    provenance = {"commit": commit_id, "base": base_id, "model_type": config.model_type,
                  "modules": {f.module: {"rank": f.rank, "steps": f.steps, "exact": f.exact,
                                         "rel_error": f.rel_error} for f in factors}}
    with staged_dir(out_dir, force=force) as staging:
        lora.save_pretrained(str(staging))
        save_tensors_atomic(staging / "adapter_model.safetensors", tensors, {"format": "pt"})
        atomic_write_bytes(staging / "kedit.json", json.dumps(provenance, indent=1, sort_keys=True).encode())
    files = sorted(p.name for p in out_dir.iterdir())
    return {"commit": commit_id, "base": base_id, "path": str(out_dir), "format": "peft", "files": files,
            "bytes": sum((out_dir / n).stat().st_size for n in files), "rank": sum(f.rank for f in factors),
            "exact": all(f.exact for f in factors), "max_rel_error": max(f.rel_error for f in factors),
            "modules": provenance["modules"]}
