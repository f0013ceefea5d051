"""`kedit bisect`: the first commit where a probe, a metric or a command of the user's goes bad,
found by halving the first-parent history between a good and a bad revision (about log2(n)
revisions materialised), and the tests a bisection can run on a revision.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kedit.core.errors import KeditError
from kedit.core.repo import Repository
from kedit.eval import metrics
from kedit.eval.behaviour import Continuations, first_parent_line
from kedit.eval.measure import locality_pairs, measure, reference_of
from kedit.eval.probes import ModelLoader
from kedit.methods.base import EditRequest

SKIP_STATUS = 125  # git bisect run's "cannot test this commit"


@dataclass
class Bisection:
    first_bad: str
    tested: list[tuple[str, bool]] = field(default_factory=list)  # (commit, bad?) in the order tried
    steps: int = 0  # commits between good and bad (exclusive of good)


def bisect(repo: Repository, good: str, bad: str, is_bad: Callable[[str], bool]) -> Bisection:
    """The first commit on `bad`'s first-parent history after `good` for which `is_bad` holds,
    assuming it stays bad from there on: about log2(n) commits between the two are tried."""
    good_id, bad_id = repo.resolve(good), repo.resolve(bad)
    line = first_parent_line(repo, bad_id)
    if good_id not in line:
        raise KeditError(f"{good} is not on the first-parent history of {bad}",
                         hint="give a --good revision that BAD descends from")
    line = line[line.index(good_id):]
    if len(line) < 2:
        raise KeditError(f"{good} and {bad} are the same commit: nothing to bisect")
    result = Bisection(first_bad=bad_id, steps=len(line) - 1)

    def test(commit: str) -> bool:
        verdict = is_bad(commit)
        result.tested.append((commit, verdict))
        return verdict

    if test(good_id):
        raise KeditError(f"the --good revision {good} is already bad", hint="choose an earlier --good")
    if not test(bad_id):
        raise KeditError(f"the --bad revision {bad} is not bad", hint="check the probe or metric, or a later --bad")
    lo, hi = 0, len(line) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if test(line[mid]) else (mid, hi)
    result.first_bad = line[hi]
    return result


def probe_test(load: ModelLoader, prompt: str, answer: str,
               n_tokens: int = metrics.GEN_TOKENS) -> Callable[[str], bool]:
    """Bad when the greedy continuation of `prompt` no longer shows `answer`."""
    at = Continuations(load, prompt, n_tokens)
    return lambda commit: not metrics.shows(at(commit), answer)


def metric_test(load: ModelLoader, requests: Sequence[EditRequest], name: str, drop: float,
                good: str) -> Callable[[str], bool]:
    """Bad when metric `name` on the fixed suite `requests` is more than `drop` below its value at `good`
    (locality is measured against the good revision's answers). `good` is loaded once, here."""
    pairs = [p for r in requests for p in locality_pairs(r)]
    generation = name.startswith("gen_")  # the greedy-generation scores cost most: only when asked for

    def score(model: Any, tok: Any) -> float:
        scores = {s.name: s.value for s in measure(model, tok, requests, reference, generation=generation)}
        if name not in scores:
            raise KeditError(f"the suite gives no metric {name!r}", hint=f"choose one of {', '.join(sorted(scores))}")
        return scores[name]

    model, tok = load(good)
    reference = reference_of(model, tok, pairs) if pairs else None
    baseline = score(model, tok)
    del model

    def is_bad(commit: str) -> bool:
        return commit != good and score(*load(commit)) < baseline - drop

    return is_bad


def command_test(repo: Repository, command: str) -> Callable[[str], bool]:
    """Bad when `command` (a shell line, as `git bisect run`) exits 1-127 on the revision exported to
    a folder: $KEDIT_BISECT_MODEL names the folder, $KEDIT_BISECT_REV the commit."""
    from kedit.model.export import export

    def is_bad(commit: str) -> bool:
        with tempfile.TemporaryDirectory(prefix="kedit-bisect-") as tmp:
            folder = Path(tmp) / "model"
            export(repo, commit, folder)
            env = {**os.environ, "KEDIT_BISECT_REV": commit, "KEDIT_BISECT_MODEL": str(folder)}
            code = subprocess.run(command, shell=True, env=env, check=False).returncode
        if code == SKIP_STATUS:
            raise KeditError(f"the command exited {SKIP_STATUS} (skip) at {commit[:12]}; kedit bisect tests every "
                             "revision it picks and cannot skip one")
        if code < 0 or code > 127:
            raise KeditError(f"the command was stopped (exit status {code}) at {commit[:12]}; bisect stops too")
        return code != 0

    return is_bad
