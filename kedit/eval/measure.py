"""Measuring requests on a model: every score a request's data allows (reliability, generalization,
portability, locality against the unedited model's reference, CounterFact scores, generation
scores), and those scores as the metrics a commit records.

Used by `kedit edit` (before and after each edit) and `kedit eval` (a revision).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kedit.core.repo import Metric
from kedit.eval import metrics
from kedit.methods.base import EditRequest


def locality_pairs(request: EditRequest) -> list[tuple[str, str]]:
    """Unrelated facts to keep: explicit locality pairs, and neighbourhood prompts with the true answer."""
    pairs = list(request.locality)
    if request.target_true:
        pairs += [(p, request.target_true) for p in request.neighbourhood]
    return pairs


@dataclass(frozen=True)
class Reference:
    """The unedited model on the locality pairs: its argmax at each answer position (teacher-forced
    locality) and its greedy continuation of each prompt (gen_locality)."""

    argmax: list[list[int]]
    continuations: list[str]

    def rows(self, start: int, stop: int) -> Reference:
        return Reference(self.argmax[start:stop], self.continuations[start:stop])


def reference_of(model: Any, tok: Any, pairs: Sequence[tuple[str, str]]) -> Reference:
    return Reference(metrics.locality_reference(model, tok, pairs),
                     metrics.greedy_continuations(model, tok, [p for p, _ in pairs]))


def measure(model: Any, tok: Any, requests: Sequence[EditRequest], reference: Reference | None,
            *, fluency: bool = False, generation: bool = True) -> list[metrics.Score]:
    """Every metric the requests carry data for; `generation`: also greedy-generation scores (gen_*)."""
    scores = [metrics.reliability(model, tok, requests)]
    pairs = [p for r in requests for p in locality_pairs(r)]
    if generation:
        scores += metrics.generation_scores(model, tok, requests, pairs,
                                            reference.continuations if reference is not None else None)
    for fn in (metrics.generalization, metrics.portability):
        m = fn(model, tok, requests)
        if m.n:
            scores.append(m)
    if pairs and reference is not None:
        scores.append(metrics.locality(model, tok, pairs, reference.argmax))
    if all(r.target_true for r in requests):
        scores += [m for m in metrics.counterfact_scores(model, tok, requests).values() if m.n]
    if fluency:
        scores.append(metrics.fluency(model, tok, [r.text for r in requests]))
    return scores


def as_metrics(scores: list[metrics.Score], stage: str, suite: str = "", request: int | None = None) -> list[Metric]:
    """Scores as the metrics a commit records (stage: pre | post | eval; `request`: the index of the
    one request of a batch they score, None for the whole commit); a NaN score is dropped."""
    return [Metric(s.name, s.value, s.protocol, stage, suite, request=request)
            for s in scores if not math.isnan(s.value)]
