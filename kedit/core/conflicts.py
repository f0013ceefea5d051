"""What two lines of edits disagree on, found from the stored commits alone (no model).

`kedit merge` stops on these before it changes anything (`Repository.merge`):
  - request: an edit on each side sets the same subject, through the same prompt template
    (the relation), to different targets;
  - key overlap: edits a and b (one per side) change the same weight matrix and a moves what b
    reads: ‖Δa·K_b‖ > τ‖Δb·K_b‖ (τ = 0.3 by default), checked both ways;
  - replaced: one side replaced a tensor outright (an exact value) that the other side changed;
  - adapter: the adapter kind's own check found entries that disagree (GRACE: balls that overlap
    with different targets); the check is given by the caller (kedit.model.adapters), since the
    engine never reads an adapter's tensors.

The key K_b: no method stores the key of each edit with its delta (ROME records its norm only,
AlphaEdit keeps keys per layer in its method memory, whose tensor names the engine cannot map),
so the key is read off the delta itself: its row space, the directions Δb responds to, each
weighted by its singular value (K_b = V S over the singular directions that hold 99% of Δb's
energy, at most 64). For a rank-one ROME update Δb = u vᵀ this is v, and the test is exactly
ROME's neighbour overlap (u·k)/(u·k*) turned around: the share of b's change that a gives at
b's key direction. For a dense delta (FT, MEMIT stored dense) it weighs b's main directions.
The row space is the key side in the (out, in) layout of torch's Linear (Llama, Qwen, Mistral,
SmolLM2); a GPT-2 Conv1D weight is stored (in, out), and there the test reads the output side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kedit.core.delta import Adapter, Dense, LowRank, Replace, WeightDelta

if TYPE_CHECKING:
    import torch

DEFAULT_THRESHOLD = 0.3
ENERGY = 0.99
MAX_KEY_DIRECTIONS = 64


@dataclass(frozen=True)
class Conflict:
    """Two commits, one per side, that disagree; `what` is the reason, in words."""

    kind: str  # request | key_overlap | replaced | adapter
    ours: str
    theirs: str
    what: str
    tensor: str | None = None
    overlap: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "ours": self.ours, "theirs": self.theirs, "what": self.what,
                "tensor": self.tensor, "overlap": self.overlap}


# (our adapters, their adapters) of one kind -> [(our index, their index, what)]
AdapterCheck = Callable[[str, list[Adapter], list[Adapter]], list[tuple[int, int, str]]]


def request_conflicts(ours: Mapping[str, list[dict]], theirs: Mapping[str, list[dict]]) -> list[Conflict]:
    """Same subject and prompt template, different targets: commit id -> its requests, per side."""
    def facts(side: Mapping[str, list[dict]]) -> dict[tuple[str, str], list[tuple[str, str, str]]]:
        out: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
        for cid, requests in side.items():
            for r in requests:
                if isinstance(r, dict) and r.get("subject") and r.get("prompt") and r.get("target_new") is not None:
                    subject, template = str(r["subject"]).strip(), str(r["prompt"]).strip()
                    out.setdefault((subject.casefold(), template), []).append(
                        (cid, str(r["target_new"]).strip(), template.replace("{}", subject)))
        return out

    mine, other = facts(ours), facts(theirs)
    found = []
    for key in sorted(set(mine) & set(other)):
        for a, target_a, text in mine[key]:
            for b, target_b, _ in other[key]:
                if target_a != target_b:
                    found.append(Conflict("request", a, b, f"{text!r}: {target_a!r} here, {target_b!r} on the "
                                          "merged side"))
    return found


def key_matrix(delta: WeightDelta) -> torch.Tensor:
    """(in, r) float64: the delta's row-space directions, each scaled by its singular value."""
    import torch  # here: `kedit merge`'s options are read by commands that never run this

    if isinstance(delta, LowRank):
        _, r = torch.linalg.qr(delta.a.to(torch.float64))  # Δ = q (r b): same singular values as r b
        m = r @ delta.b.to(torch.float64)
    else:
        m = delta.delta.to(torch.float64)
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return vh.new_zeros(vh.shape[1], 0)
    energy = torch.cumsum(s * s, 0) / float((s * s).sum())
    keep = min(int((energy < ENERGY).sum()) + 1, MAX_KEY_DIRECTIONS)
    return vh[:keep].T * s[:keep]


def _times(delta: WeightDelta, keys: torch.Tensor) -> torch.Tensor:
    import torch

    if isinstance(delta, LowRank):
        return delta.a.to(torch.float64) @ (delta.b.to(torch.float64) @ keys)
    return delta.delta.to(torch.float64) @ keys


def overlap(a: WeightDelta, b: WeightDelta) -> float:
    """‖Δa·K_b‖ / ‖Δb·K_b‖: how much of what b does at its own key a does there too."""
    keys = key_matrix(b)
    own = float(_times(b, keys).norm())
    return float(_times(a, keys).norm()) / own if own > 0 else 0.0


def delta_conflict(name: str, a_id: str, a: WeightDelta, b_id: str, b: WeightDelta,
                   threshold: float) -> Conflict | None:
    """The conflict between our step `a` and their step `b` on tensor `name`, if any."""
    if isinstance(a, Replace) or isinstance(b, Replace):
        return Conflict("replaced", a_id, b_id, f"{name} is replaced outright on one side and changed on the other",
                        tensor=name)
    if len(a.shape) != 2:  # a vector (a norm, a bias): any change on both sides is a clash
        both = (a.delta != 0) & (b.delta != 0) if isinstance(a, Dense) and isinstance(b, Dense) else None
        if both is not None and not bool(both.any()):
            return None
        return Conflict("key_overlap", a_id, b_id, f"both sides change the same entries of {name}", tensor=name)
    worst = max(overlap(a, b), overlap(b, a))
    if worst <= threshold:
        return None
    return Conflict("key_overlap", a_id, b_id, f"{name}: each edit moves the other's key ({worst:.2f} of its own "
                    f"change there, more than {threshold:g})", tensor=name, overlap=round(worst, 4))


def adapter_conflicts(check: AdapterCheck | None, ours: Iterable[tuple[str, Adapter]],
                      theirs: Iterable[tuple[str, Adapter]]) -> list[Conflict]:
    """The adapter kind's own check over (origin commit, adapter) pairs of each side, kind by kind."""
    if check is None:
        return []
    ours, theirs = list(ours), list(theirs)
    found = []
    for kind in sorted({a.kind for _, a in ours} & {a.kind for _, a in theirs}):
        mine = [(cid, a) for cid, a in ours if a.kind == kind]
        other = [(cid, a) for cid, a in theirs if a.kind == kind]
        for i, j, what in check(kind, [a for _, a in mine], [a for _, a in other]):
            found.append(Conflict("adapter", mine[i][0], other[j][0], what))
    return found
