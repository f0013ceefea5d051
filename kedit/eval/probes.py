"""The repository's probe suite, and `kedit check`: did this commit break anything?

Two kinds of probe:
  - edit: a fact an edit wrote (its prompt and new target). It is checked wherever that edit
    is in effect, so a later edit that undoes it is caught.
  - locality: a fact no edit should change. Its score is the fraction of answer tokens whose
    argmax equals the base model's (EasyEdit's teacher-forced agreement), or with
    `protocol="generation"` whether its greedy continuation still holds the answer or equals the
    base's (`kedit.eval.metrics.holds`; an edit probe then scores 1 when its continuation shows the
    target). Prompts are fed as the user sends them. A locality probe whose
    prompt names the subject of an edit in effect is that edit's business, not collateral damage:
    its change is reported with the edit, not counted as a regression.

`check(rev)` scores every probe at `rev`, at its parent and at a reference (the base, or a
chosen revision), under a protocol (teacher-forced argmax, or greedy generation), and reports
the probes whose score at `rev` fell more than `threshold` below either: a probe that one edit
broke stays broken at every later commit, and one that drifted a little at each of many commits
fails too. Each broken probe names the first commit where it fell, found by binary search over
the first-parent history. Outputs are kept per commit, protocol and prompt form (a commit's
state never changes), so re-running a check, or searching the same history again, is cheap.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kedit.core import db as dbm
from kedit.core import history, tables
from kedit.core.errors import KeditError
from kedit.core.refs import now_iso, short_id
from kedit.core.repo import Repository
from kedit.core.revisions import reachable
from kedit.eval.metrics import CHAT_PROTOCOL, PROBE_PROTOCOLS, PROMPT_PROTOCOL, ProbeProtocol

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
        tables.insert_probes(repo.db, rows)
    wanted = {(r["kind"], r["prompt"], r["answer"], r["commit_id"]) for r in rows}
    return [p for p in list_probes(repo) if (p.kind, p.prompt, p.answer, p.commit_id) in wanted]


def list_probes(repo: Repository) -> list[Probe]:
    return [Probe(*row) for row in tables.probe_rows(repo.db)]


def remove_probe(repo: Repository, probe_id: int) -> None:
    with dbm.write(repo.db):
        if not tables.delete_probe(repo.db, probe_id):
            raise KeditError(f"no probe with id {probe_id}", hint="kedit probe list")


def output_key(setting: str, protocol: ProbeProtocol, chat: bool) -> str:
    """What kept outputs are keyed by: the scoring protocol and prompt form, then the device and
    dtype (outputs kept by an older kedit, under its private start token, are keyed without a
    protocol and never reused)."""
    name = protocol.name.replace(PROMPT_PROTOCOL, CHAT_PROTOCOL, 1) if chat else protocol.name
    return f"{name}:{setting}"


def probe_outputs(repo: Repository, commit_id: str, probes: list[Probe], load: ModelLoader,
                  setting: str, protocol: ProbeProtocol = PROBE_PROTOCOLS["teacher-forced"], *,
                  chat: bool = False) -> dict[int, tuple[Any, float]]:
    """Each probe's output (`protocol`'s: argmax ids, or a continuation) and score at `commit_id`,
    computed once and kept under the protocol's name, the prompt form and the setting (`chat`: the
    prompt sent through the chat template, kept apart)."""
    key = output_key(setting, protocol, chat)
    known = {pid: (json.loads(pred), acc) for pid, pred, acc in tables.probe_outputs_at(repo.db, commit_id, key)}
    missing = [p for p in probes if p.id not in known]
    if missing:
        model, tok = load(commit_id)
        results = protocol.outputs(model, tok, [p.prompt for p in missing], [p.answer for p in missing], chat=chat)
        for p, output in zip(missing, results, strict=True):
            known[p.id] = output
        with dbm.write(repo.db):
            tables.put_probe_outputs(repo.db, [(p.id, commit_id, key, json.dumps(known[p.id][0]), known[p.id][1])
                                               for p in missing])
    return {p.id: known[p.id] for p in probes}


@dataclass(frozen=True)
class KeptOutput:
    """A probe's output kept at a commit by an earlier `kedit check`: read without loading a model."""

    probe: Probe
    setting: str  # output_key's: protocol (and prompt form), then device/dtype
    output: Any  # the protocol's output: argmax ids, or a continuation
    score: float  # as a fact: token accuracy, or 1.0 when the continuation shows the answer


def kept_outputs(repo: Repository, commit_ids: Iterable[str]) -> dict[str, list[KeptOutput]]:
    """{commit: its kept probe outputs} for the given commits, in probe order."""
    ids = list(dict.fromkeys(commit_ids))
    probes = {p.id: p for p in list_probes(repo)}
    out: dict[str, list[KeptOutput]] = {cid: [] for cid in ids}
    if not ids or not probes:
        return out
    for cid, pid, setting, pred, acc in tables.probe_outputs_of_commits(repo.db, ids):
        if pid in probes:
            out[cid].append(KeptOutput(probes[pid], setting, json.loads(pred), acc))
    return out


def setting_protocol(setting: str) -> ProbeProtocol | None:
    """The probe protocol a kept output's setting names (None for outputs an older kedit kept)."""
    name = setting.partition(":")[0].replace(CHAT_PROTOCOL, PROMPT_PROTOCOL, 1)
    return next((p for p in PROBE_PROTOCOLS.values() if p.name == name), None)


@dataclass
class ProbeResult:
    probe: Probe
    base: float | None  # locality: agreement with the base is 1 by definition; edit: accuracy
    parent: float | None
    now: float
    broke: bool
    edited_by: str | None = None  # locality: the edit in effect whose subject the prompt names
    against: float | None = None  # the score at the reference (`--against`, or the edit's own commit;
    #                               None for an edit probe so near 1 now that it cannot have fallen)
    first_broke: str | None = None  # a broken probe: the first commit where it fell


@dataclass
class CheckReport:
    commit_id: str
    parent_id: str | None
    threshold: float
    against: str  # the reference commit every probe is also held against
    protocol: str  # how probes were scored: a PROBE_PROTOCOLS name
    prompts: str  # how prompts were sent: evaluate.PROMPT_PROTOCOL, or CHAT_PROTOCOL
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


class _Scores:
    """Probe scores at any commit, from kept outputs where there are any, else by running the model.

    A locality probe's score is its agreement with the base's outputs; an edit probe's, its accuracy."""

    def __init__(self, repo: Repository, load: ModelLoader, setting: str, protocol: ProbeProtocol, chat: bool,
                 base: str, locality: list[Probe]) -> None:
        self.repo, self.load, self.setting, self.protocol, self.chat = repo, load, setting, protocol, chat
        self.base_out = probe_outputs(repo, base, locality, load, setting, protocol, chat=chat)

    def _score(self, probe: Probe, output: tuple[Any, float]) -> float:
        if probe.kind == "locality":
            return self.protocol.agreement(output[0], self.base_out[probe.id][0], probe.answer)
        return output[1]

    def at(self, commit_id: str, probes: list[Probe]) -> dict[int, float]:
        outputs = probe_outputs(self.repo, commit_id, probes, self.load, self.setting, self.protocol, chat=self.chat)
        return {p.id: self._score(p, outputs[p.id]) for p in probes}

    def kept(self, commit_ids: list[str], probe: Probe) -> dict[str, float]:
        """{commit: score} where outputs of `probe` are kept; loads no model."""
        key = output_key(self.setting, self.protocol, self.chat)
        return {cid: self._score(probe, (json.loads(pred), acc))
                for cid, pred, acc in tables.probe_outputs_of_probe(self.repo.db, probe.id, key, commit_ids)}


def first_fall(scores: _Scores, line: list[str], falls: dict[int, tuple[Probe, int, float]]) -> dict[int, str]:
    """The commit of `line` (oldest first) where each probe first fell below its floor.

    `falls` maps a probe to (probe, index of a commit where it was at or above the floor, floor);
    the last commit of `line` is below it. Kept outputs narrow each range first; then a binary
    search, in rounds, scores every probe whose range has the same midpoint in one model load, so
    a check after n commits materialises about log2(n) revisions, not n. Scores that fall and rise
    again make this find *a* commit where the probe fell, not necessarily the first."""
    position = {cid: i for i, cid in enumerate(line)}
    ranges: dict[int, list[int]] = {}  # probe -> [last index at or above the floor, first index below]
    for pid, (probe, good, floor) in falls.items():
        bad = len(line) - 1
        for cid, score in sorted(scores.kept(line[good + 1:bad], probe).items(), key=lambda kv: position[kv[0]]):
            if score < floor:
                bad = position[cid]
                break
            good = position[cid]
        ranges[pid] = [good, bad]
    while open_ := [pid for pid, (good, bad) in ranges.items() if bad - good > 1]:
        by_mid: dict[int, list[Probe]] = {}
        for pid in open_:
            by_mid.setdefault(sum(ranges[pid]) // 2, []).append(falls[pid][0])
        for mid, probes in by_mid.items():
            for pid, score in scores.at(line[mid], probes).items():
                ranges[pid][1 if score < falls[pid][2] else 0] = mid
    return {pid: line[bad] for pid, (_, bad) in ranges.items()}


def _position(repo: Repository, line: list[str], commit_id: str) -> int:
    """Where `commit_id` is on the first-parent `line`; an edit a merge brought in from another
    branch sits at the merge (the first commit of `line` whose history holds it)."""
    if commit_id in line:
        return line.index(commit_id)
    return next(i for i, cid in enumerate(line) if commit_id in reachable(repo.db, [cid]))


def check(repo: Repository, rev: str, load: ModelLoader, *, threshold: float = DEFAULT_THRESHOLD,
          setting: str = "cpu/auto", protocol: str = "teacher-forced", against: str | None = None,
          chat: bool = False) -> CheckReport:
    """Score the probe suite at `rev` under `protocol` (a PROBE_PROTOCOLS name) and flag what
    regressed: a probe falls more than `threshold` below its score at the parent, or at `against`
    (default: the base), so drift over many commits fails too; each broken probe names the commit
    where it first fell (see `first_fall`).

    An edit probe is held against `against` where its edit is in effect there, else against the
    commit of the edit itself. `chat`: every prompt is sent as a user message through the chat
    template (see `evaluate.prompt_ids`), a check of its own with its own kept outputs."""
    commit_id = repo.resolve(rev)
    parent = repo.get_commit(commit_id).parent
    line = history.ancestors(repo.db, commit_id)[::-1]  # first-parent history, base first
    reference = repo.resolve(against) if against else line[0]
    if reference not in line:
        raise KeditError(f"{against} ({short_id(reference)}) is not in the first-parent history of {rev}",
                         hint=f"kedit log {rev}")
    probes = list_probes(repo)
    report = CheckReport(commit_id, parent, threshold, reference, protocol, CHAT_PROTOCOL if chat else PROMPT_PROTOCOL)
    if not probes:
        return report
    in_effect = history.edits_in_effect(repo.db, commit_id)
    locality = [p for p in probes if p.kind == "locality"]
    edits_now = [p for p in probes if p.kind == "edit" and p.commit_id in in_effect]
    before = history.edits_in_effect(repo.db, parent) if parent else set()
    at_reference = history.edits_in_effect(repo.db, reference)
    held_at = {p.id: reference if p.kind == "locality" or p.commit_id in at_reference else p.commit_id
               for p in locality + edits_now}
    scores = _Scores(repo, load, setting, PROBE_PROTOCOLS[protocol], chat, line[0], locality)
    now = scores.at(commit_id, locality + edits_now)
    previous = scores.at(parent, locality + [p for p in edits_now if p.commit_id in before]) if parent else {}
    # Scores are at most 1: a probe within `threshold` of 1 now cannot have drifted, so an edit's own
    # commit is materialised only for the edit probes that might have (and the reference once).
    held: dict[int, float] = {}
    for cid in set(held_at.values()):
        held.update(scores.at(cid, [p for p in locality + edits_now if held_at[p.id] == cid
                                    and (cid == reference or now[p.id] < 1.0 - threshold)]))
    edit_naming = subject_finder(edited_subjects(repo, in_effect))
    falls: dict[int, tuple[Probe, int, float]] = {}
    for p in locality + edits_now:
        by = edit_naming(p.prompt) if p.kind == "locality" else None
        before_score = previous.get(p.id, 1.0 if p.kind == "locality" and not parent else None)
        drifted = p.id in held and now[p.id] < held[p.id] - threshold
        fell = before_score is not None and now[p.id] < before_score - threshold
        report.results.append(ProbeResult(p, 1.0 if p.kind == "locality" else None, before_score, now[p.id],
                                          (drifted or fell) and not by, edited_by=by, against=held.get(p.id)))
        if drifted and not by:
            falls[p.id] = (p, _position(repo, line, held_at[p.id]), held[p.id] - threshold)
    first = first_fall(scores, line, falls)
    for r in report.broken:
        r.first_broke = first.get(r.probe.id, commit_id)
    return report
