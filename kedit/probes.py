"""The repository's probe suite, and `kedit check`: did this commit break anything?

Two kinds of probe:
  - edit: a fact an edit wrote (its prompt and new target). It is checked wherever that edit
    is in effect, so a later edit that undoes it is caught.
  - locality: a fact no edit should change. Its score is the fraction of answer tokens whose
    argmax equals the base model's (EasyEdit's teacher-forced agreement), or with
    `protocol="generation"` whether its greedy continuation still holds the answer or equals the
    base's (`kedit.evaluate.holds`; an edit probe then scores 1 when its continuation shows the
    target). Prompts are fed as the user sends them. A locality probe whose
    prompt names the subject of an edit in effect is that edit's business, not collateral damage:
    its change is reported with the edit, not counted as a regression.

`check(rev)` scores every probe at `rev`, at its parent and at the base, and reports the
probes whose score at `rev` fell more than `threshold` below the parent's. Outputs are kept
per commit and protocol (a commit's state never changes), so re-running a check is cheap.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kedit import db as dbm
from kedit import history
from kedit.errors import KeditError
from kedit.evaluate import PROBE_PROTOCOLS, ProbeProtocol
from kedit.refs import now_iso
from kedit.repo import Repository

KINDS = ("edit", "locality")
DEFAULT_THRESHOLD = 0.1

ModelLoader = Callable[[str], tuple[Any, Any]]  # commit id -> (model, tokenizer)


@dataclass(frozen=True)
class Probe:
    id: int
    kind: str
    prompt: str
    answer: str
    commit_id: str | None


def add_probes(repo: Repository, probes: Iterable[tuple[str, str, str, str | None]]) -> list[Probe]:
    """Add (kind, prompt, answer, commit_id) probes; existing ones are kept, not duplicated."""
    rows = []
    for kind, prompt, answer, commit_id in probes:
        if kind not in KINDS:
            raise KeditError(f"unknown probe kind {kind!r}; use one of {', '.join(KINDS)}")
        if not prompt.strip() or not answer.strip():
            raise KeditError("a probe needs a non-empty prompt and answer")
        rows.append({"kind": kind, "prompt": prompt, "answer": answer, "commit_id": commit_id, "created": now_iso()})
    with dbm.write(repo.db):
        for row in rows:
            repo.db.execute("""INSERT OR IGNORE INTO probes (kind, prompt, answer, commit_id, created)
                               VALUES (:kind, :prompt, :answer, :commit_id, :created)""", row)
    wanted = {(r["kind"], r["prompt"], r["answer"], r["commit_id"]) for r in rows}
    return [p for p in list_probes(repo) if (p.kind, p.prompt, p.answer, p.commit_id) in wanted]


def list_probes(repo: Repository) -> list[Probe]:
    return dbm.rows(repo.db, "SELECT id, kind, prompt, answer, commit_id FROM probes ORDER BY id", factory=Probe)


def remove_probe(repo: Repository, probe_id: int) -> None:
    with dbm.write(repo.db):
        if repo.db.execute("DELETE FROM probes WHERE id = ?", [probe_id]).rowcount == 0:
            raise KeditError(f"no probe with id {probe_id}", hint="kedit probe list")


def probe_outputs(repo: Repository, commit_id: str, probes: list[Probe], load: ModelLoader,
                  setting: str, protocol: ProbeProtocol = PROBE_PROTOCOLS["teacher-forced"]
                  ) -> dict[int, tuple[Any, float]]:
    """Each probe's output (`protocol`'s: argmax ids, or a continuation) and score at `commit_id`,
    computed once and kept under the protocol's name and the setting."""
    key = f"{protocol.name}:{setting}"
    known = {pid: (json.loads(pred), acc) for pid, pred, acc in repo.db.execute(
        "SELECT probe_id, predicted, accuracy FROM probe_outputs WHERE commit_id = ? AND setting = ?",
        [commit_id, key])}
    missing = [p for p in probes if p.id not in known]
    if missing:
        model, tok = load(commit_id)
        results = protocol.outputs(model, tok, [p.prompt for p in missing], [p.answer for p in missing])
        with dbm.write(repo.db):
            for p, (output, score) in zip(missing, results, strict=True):
                known[p.id] = (output, score)
                repo.db.execute("INSERT OR REPLACE INTO probe_outputs VALUES (?, ?, ?, ?, ?)",
                                [p.id, commit_id, key, json.dumps(output), score])
    return {p.id: known[p.id] for p in probes}


@dataclass
class ProbeResult:
    probe: Probe
    base: float | None  # locality: agreement with the base is 1 by definition; edit: accuracy
    parent: float | None
    now: float
    broke: bool
    edited_by: str | None = None  # locality: the edit in effect whose subject the prompt names


@dataclass
class CheckReport:
    commit_id: str
    parent_id: str | None
    threshold: float
    results: list[ProbeResult] = field(default_factory=list)

    @property
    def broken(self) -> list[ProbeResult]:
        return [r for r in self.results if r.broke]

    @property
    def changed_by_edits(self) -> list[ProbeResult]:
        """Locality probes that fell as much as a regression, about a subject an edit in effect changed."""
        return [r for r in self.results if r.edited_by and r.parent is not None and r.now < r.parent - self.threshold]

    def summary(self) -> dict[str, float]:
        out = {}
        for kind in KINDS:
            scores = [r.now for r in self.results if r.probe.kind == kind]
            if scores:
                out[kind] = sum(scores) / len(scores)
        return out


def edited_subjects(repo: Repository, edit_ids: Iterable[str]) -> dict[str, str]:
    """{subject: edit commit} for the given edits (the later edit wins when two share a subject)."""
    subjects: dict[str, str] = {}
    for commit in sorted((repo.get_commit(c) for c in edit_ids), key=lambda c: c.depth):
        subjects.update({r["subject"]: commit.id for r in commit.requests if r.get("subject")})
    return subjects


def subject_finder(subjects: Mapping[str, str]) -> Callable[[str], str | None]:
    """prompt -> subjects[s] for a subject s the prompt names as a whole word or phrase, else None.

    One compiled alternation (longest subjects first), as a check may match thousands of probes
    against hundreds of subjects."""
    if not subjects:
        return lambda prompt: None
    alternatives = "|".join(re.escape(s) for s in sorted(subjects, key=len, reverse=True))
    pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")

    def find(prompt: str) -> str | None:
        match = pattern.search(prompt)
        return subjects[match.group(0)] if match else None

    return find


def check(repo: Repository, rev: str, load: ModelLoader, *, threshold: float = DEFAULT_THRESHOLD,
          setting: str = "cpu/auto", protocol: str = "teacher-forced") -> CheckReport:
    """Score the probe suite at `rev`, its parent and the base under `protocol` (a PROBE_PROTOCOLS
    name); flag what regressed."""
    scoring = PROBE_PROTOCOLS[protocol]
    commit_id = repo.resolve(rev)
    parent = repo.get_commit(commit_id).parent
    base = history.ancestors(repo.db, commit_id)[-1]
    probes = list_probes(repo)
    report = CheckReport(commit_id, parent, threshold)
    if not probes:
        return report
    in_effect = history.edits_in_effect(repo.db, commit_id)
    locality = [p for p in probes if p.kind == "locality"]
    edits_now = [p for p in probes if p.kind == "edit" and p.commit_id in in_effect]
    before = history.edits_in_effect(repo.db, parent) if parent else set()
    edits_before = [p for p in edits_now if p.commit_id in before]
    now = probe_outputs(repo, commit_id, locality + edits_now, load, setting, scoring)
    base_out = probe_outputs(repo, base, locality, load, setting, scoring)
    parent_out = probe_outputs(repo, parent, locality + edits_before, load, setting, scoring) if parent else {}
    edit_naming = subject_finder(edited_subjects(repo, in_effect))
    for p in locality:
        score = scoring.agreement(now[p.id][0], base_out[p.id][0], p.answer)
        previous = scoring.agreement(parent_out[p.id][0], base_out[p.id][0], p.answer) if parent else 1.0
        by = edit_naming(p.prompt)
        report.results.append(ProbeResult(p, 1.0, previous, score, score < previous - threshold and not by, by))
    for p in edits_now:
        previous = parent_out[p.id][1] if p.id in parent_out else None
        broke = previous is not None and now[p.id][1] < previous - threshold
        report.results.append(ProbeResult(p, None, previous, now[p.id][1], broke))
    return report
