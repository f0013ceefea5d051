"""What two revisions say differently: each prompt's greedy continuation at both, marked where
they differ. The prompts are the repository's probe suite unless others are given.

The prompt is fed as a user sends it (`tokenizer(prompt)`, the user prompt protocol), so a
difference here is one a user of either exported model would read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kedit.core.errors import KeditError
from kedit.core.repo import Repository as CoreRepository
from kedit.eval.metrics import GEN_TOKENS
from kedit.eval.probes import list_probes

if TYPE_CHECKING:
    from kedit.repository import Repository


@dataclass(frozen=True)
class PromptDiff:
    prompt: str
    a: str  # the continuation at revision A
    b: str  # ... and at revision B

    @property
    def changed(self) -> bool:
        return self.a != self.b


@dataclass
class BehaviourDiff:
    a: str  # commit ids
    b: str
    n_tokens: int
    rows: list[PromptDiff] = field(default_factory=list)

    @property
    def changed(self) -> list[PromptDiff]:
        return [r for r in self.rows if r.changed]


def suite_prompts(repo: CoreRepository) -> list[str]:
    """The probe suite's prompts, each once, in the order they were added."""
    return list(dict.fromkeys(p.prompt for p in list_probes(repo)))


def behaviour_diff(repo: Repository, rev_a: str, rev_b: str, prompts: Sequence[str] | None = None, *,
                   n_tokens: int = GEN_TOKENS, dtype: Any = None, device: str = "cpu") -> BehaviourDiff:
    """Both revisions' greedy continuations of `prompts` (default: the probe suite's).

    Loads one model at a time (the same revision twice is loaded once), so the peak memory is one
    model's."""
    a, b = repo.resolve(rev_a), repo.resolve(rev_b)
    prompts = list(dict.fromkeys(p for p in (suite_prompts(repo) if prompts is None else prompts) if p.strip()))
    if not prompts:
        raise KeditError("no prompts to compare: the probe suite is empty",
                         hint="kedit probe add --prompt P --answer A, or give prompts")
    from kedit.eval.behaviour import Watched
    from kedit.eval.behaviour import behaviour_diff as compare  # the mechanism `kedit diff --behaviour` uses

    result = compare(lambda c: repo.load(c, dtype=dtype, device=device), a, b, [Watched(p) for p in prompts],
                     n_tokens=n_tokens)
    return BehaviourDiff(a, b, n_tokens, [PromptDiff(r.prompt, r.before, r.after) for r in result.prompts])
