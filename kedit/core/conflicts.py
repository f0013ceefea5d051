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
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from kedit.core.delta import Adapter, Dense, LowRank, Replace, WeightDelta
from kedit.core.errors import KeditError, MergeConflictError
from kedit.core.refs import short_id

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
    # what `--take SUBJECT=side` matches: a request conflict's subject (each side's spelling), or
    # for the other kinds the subjects of both commits' requests (empty for commits without any)
    subjects: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "ours": self.ours, "theirs": self.theirs, "what": self.what,
                "tensor": self.tensor, "overlap": self.overlap, "subjects": list(self.subjects)}


# (our adapters, their adapters) of one kind -> [(our index, their index, what)]
AdapterCheck = Callable[[str, list[Adapter], list[Adapter]], list[tuple[int, int, str]]]


def request_conflicts(ours: Mapping[str, list[dict]], theirs: Mapping[str, list[dict]]) -> list[Conflict]:
    """Same subject and prompt template, different targets: commit id -> its requests, per side."""
    def facts(side: Mapping[str, list[dict]]) -> dict[tuple[str, str], list[tuple[str, str, str, str]]]:
        out: dict[tuple[str, str], list[tuple[str, str, str, str]]] = {}
        for cid, requests in side.items():
            for r in requests:
                if isinstance(r, dict) and r.get("subject") and r.get("prompt") and r.get("target_new") is not None:
                    subject, template = str(r["subject"]).strip(), str(r["prompt"]).strip()
                    out.setdefault((subject.casefold(), template), []).append(
                        (cid, str(r["target_new"]).strip(), template.replace("{}", subject), subject))
        return out

    mine, other = facts(ours), facts(theirs)
    found = []
    for key in sorted(set(mine) & set(other)):
        for a, target_a, text, subject_a in mine[key]:
            for b, target_b, _, subject_b in other[key]:
                if target_a != target_b:
                    found.append(Conflict("request", a, b, f"{text!r}: {target_a!r} here, {target_b!r} on the "
                                          "merged side", subjects=tuple(dict.fromkeys((subject_a, subject_b)))))
    return found


def subjects_of(requests: Iterable[dict]) -> list[str]:
    """The subjects of a commit's requests, as written (stripped), each once."""
    return list(dict.fromkeys(str(r["subject"]).strip() for r in requests
                              if isinstance(r, dict) and r.get("subject")))


def with_subjects(conflict: Conflict, requests: Mapping[str, list[dict]]) -> Conflict:
    """`conflict` with the subjects of both its commits' requests, unless it has its own (a request conflict)."""
    if conflict.subjects:
        return conflict
    both = subjects_of(requests.get(conflict.ours, [])) + subjects_of(requests.get(conflict.theirs, []))
    return replace(conflict, subjects=tuple(dict.fromkeys(both)))


@dataclass(frozen=True)
class Resolution:
    """Which side each conflict took (`took[i]` for `conflicts[i]`, with the `--take` that said so:
    a subject, or None for a plain ours/theirs) and the commits left out of the merge."""

    conflicts: list[Conflict]
    took: list[tuple[str, str | None]]
    left_out: set[str]

    def to_dicts(self) -> list[dict[str, Any]]:
        return [{**c.to_dict(), "took": side, "by": by}
                for c, (side, by) in zip(self.conflicts, self.took, strict=True)]


def resolve(conflicts: list[Conflict], take: str | None = None,
            take_subjects: Mapping[str, str] | None = None) -> Resolution:
    """Say which side each conflict takes: by its subject (`take_subjects`, exact and case-sensitive,
    subject -> "ours" | "theirs"), else `take` for all the rest.

    Raises (before anything is changed) KeditError for a side that is not ours or theirs, a
    subject no conflict names, or choices that contradict each other (two subjects that pick
    different sides of one conflict, or a commit kept by one choice and left out by another);
    MergeConflictError listing the conflicts nothing covers.
    """
    by_subject = dict(take_subjects or {})
    if take not in (None, "ours", "theirs"):
        raise KeditError(f"--take {take}: the side is ours or theirs")
    for subject, side in by_subject.items():
        if not isinstance(subject, str) or not subject.strip():
            raise KeditError(f"--take {subject!r}=...: name a subject (or give a plain --take ours|theirs)")
        if side not in ("ours", "theirs"):
            raise KeditError(f"--take {subject}={side}: the side is ours or theirs")
    named = {s for c in conflicts for s in c.subjects}
    unknown = [s for s in by_subject if s not in named]
    if unknown:
        known = ", ".join(repr(s) for s in sorted(named)) or "none"
        raise KeditError(f"--take {unknown[0]}=...: no conflict of this merge has the subject {unknown[0]!r} "
                         f"(matched exactly, case-sensitive; the conflicts' subjects: {known}); nothing was changed")
    took: list[tuple[str, str | None]] = []
    uncovered = []
    for c in conflicts:
        chosen = {(by_subject[s], s) for s in c.subjects if s in by_subject}
        if len({side for side, _ in chosen}) > 1:
            names = " and ".join(f"{s}={side}" for side, s in sorted(chosen, key=lambda x: x[1]))
            raise KeditError(f"--take {names} pick different sides of the conflict of {short_id(c.ours)} and "
                             f"{short_id(c.theirs)} ({c.what}); nothing was changed")
        if chosen:
            side, subject = min(chosen, key=lambda x: x[1])
            took.append((side, subject))
        elif take is not None:
            took.append((take, None))
        else:
            uncovered.append(c)
    if uncovered:
        raise MergeConflictError(f"{len(uncovered)} of {len(conflicts)} conflict(s) of the merge are not covered "
                                 "by --take; nothing was changed", uncovered, total=len(conflicts))
    kept = {c.ours if side == "ours" else c.theirs for c, (side, _) in zip(conflicts, took, strict=True)}
    left_out = {c.theirs if side == "ours" else c.ours for c, (side, _) in zip(conflicts, took, strict=True)}
    both = sorted(kept & left_out)
    if both:
        raise KeditError(f"the --take choices keep commit {short_id(both[0])} for one conflict and leave it out for "
                         "another; nothing was changed")
    return Resolution(conflicts, took, left_out)


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
