"""The probe suite on the Hub, `.kedit/probes.json`, so that `kedit check` runs in a job that only cloned.

    {"probes": [{"kind": "locality" | "edit", "prompt", "answer", "commit": the edit's id or null}]}

`push` writes the probes of the pushed history: every locality probe, and the edit probes of its
commits. `fetch` (so `clone` and `pull`) adds each fetched branch's probes to the local suite, a
union: a probe removed here comes back with a fetch of a branch that still has it, and a push
after the removal takes it off the branch. A branch without the file (pushed before kedit carried
probes) has none. Kept probe outputs do not travel: they depend on the device and dtype.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kedit.core.errors import HubError
from kedit.core.hashing import canonical_json
from kedit.core.repo import Repository
from kedit.eval.probes import KINDS, list_probes
from kedit.hub.api import KEDIT_DIR, Hub
from kedit.hub.layout import ID_RE, add_file

PROBES_FILE = f"{KEDIT_DIR}/probes.json"

ProbeRow = tuple[str, str, str, str | None]  # kind, prompt, answer, commit id: what probes.add_probes takes


def probes_ops(repo: Repository, ancestors: Iterable[str], remote_tree: dict[str, str]) -> list:
    """The upload of PROBES_FILE for a push of `ancestors`, or nothing when the Hub already has it
    (or neither side has any probes)."""
    from huggingface_hub.utils.sha import git_hash

    history = set(ancestors)
    rows = [{"kind": p.kind, "prompt": p.prompt, "answer": p.answer, "commit": p.commit_id}
            for p in list_probes(repo) if p.commit_id is None or p.commit_id in history]
    data = canonical_json({"probes": rows})
    remote = remote_tree.get(PROBES_FILE)
    if remote == git_hash(data) or (remote is None and not rows):
        return []
    return [add_file(PROBES_FILE, data)]


def read_probes(hub: Hub, tree: dict[str, str], sha: str, tmp: Path) -> list[ProbeRow]:
    """The probes of the branch at Hub commit `sha`, checked before anything is written."""
    if PROBES_FILE not in tree:
        return []
    doc = hub.read_json(PROBES_FILE, sha, tmp)
    rows = doc.get("probes") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not all(_is_probe(r) for r in rows):
        raise HubError(f"{PROBES_FILE} in {hub.where} is damaged; nothing was fetched")
    return [(r["kind"], r["prompt"], r["answer"], r["commit"]) for r in rows]


def _is_probe(row: Any) -> bool:
    return (isinstance(row, dict) and row.get("kind") in KINDS
            and all(isinstance(row.get(k), str) and row[k].strip() for k in ("prompt", "answer"))
            and (row.get("commit") is None or (isinstance(row["commit"], str) and bool(ID_RE.match(row["commit"])))))
