"""What the model says differently, and which commit made it so: the behavioural diff of two
revisions and the blame of a prompt along the history (bisection: kedit/eval/bisect.py).

Everything reads what a user reads: the greedy continuation of the prompt as `tokenizer(prompt)`
encodes it, compared with the one rule the metrics use (`metrics.shows`). Revisions come from a
`ModelLoader` (commit id -> model, tokenizer), so a caller decides how they are loaded and can
count how many were materialised.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kedit.core import history
from kedit.core.errors import KeditError
from kedit.core.repo import CommitInfo, Repository
from kedit.eval import metrics
from kedit.eval.probes import ModelLoader, list_probes
from kedit.model.placement import execution_device

REFERENCE_TOKENS = 128  # tokens of each reference text the KL divergence reads
REFERENCE_TEXTS = 4  # texts the base writes for the KL divergence when no reference file is given


@dataclass(frozen=True)
class Watched:
    """A prompt to compare, with the answer to watch in it when there is one (a fact, a probe)."""

    prompt: str
    answer: str | None = None

    @classmethod
    def parse(cls, text: str) -> Watched:
        """'PROMPT=>ANSWER', or just PROMPT (no answer to watch)."""
        prompt, sep, answer = text.partition("=>")
        return cls(prompt.strip(), answer.strip() if sep else None)


@dataclass(frozen=True)
class PromptChange:
    prompt: str
    answer: str | None
    before: str  # greedy continuation at A
    after: str  # at B
    p_before: float | None  # probability of the answer's tokens after the prompt, at A
    p_after: float | None

    @property
    def changed(self) -> bool:
        return " ".join(self.before.split()) != " ".join(self.after.split())

    @property
    def flipped(self) -> bool:
        """The answer shows in one continuation and not in the other."""
        return self.answer is not None and metrics.shows(self.before, self.answer) != metrics.shows(
            self.after, self.answer)

    @property
    def shift(self) -> float:
        return 0.0 if self.p_before is None or self.p_after is None else self.p_after - self.p_before

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer, "before": self.before, "after": self.after,
                "changed": self.changed, "flipped": self.flipped, "p_before": self.p_before,
                "p_after": self.p_after}


@dataclass
class BehaviourDiff:
    a: str
    b: str
    prompts: list[PromptChange]
    kl: float | None  # mean KL(P_a || P_b) of the next-token distributions over the reference texts
    kl_tokens: int
    n_tokens: int = metrics.GEN_TOKENS  # greedy tokens of each continuation

    @property
    def changed(self) -> list[PromptChange]:
        return [p for p in self.prompts if p.changed]

    def summary(self, largest: int = 5) -> dict[str, Any]:
        shifts = sorted((p for p in self.prompts if p.answer is not None), key=lambda p: -abs(p.shift))
        return {"prompts": len(self.prompts), "changed": len(self.changed),
                "flipped": sum(p.flipped for p in self.prompts), "kl": self.kl,
                "largest_shifts": [{"prompt": p.prompt, "answer": p.answer, "shift": p.shift}
                                   for p in shifts[:largest] if p.shift]}


def answer_probabilities(model: Any, tok: Any, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
    """P(answer | prompt): the product over the answer's tokens, teacher-forced after the user's prompt."""
    return [math.exp(-r.nll * len(r.target)) for r in metrics.teacher_forced(model, tok, prompts, answers)]


@torch.no_grad()
def next_token_logprobs(model: Any, tok: Any, texts: Sequence[str]) -> list[torch.Tensor]:
    """Per text, the log-distribution over the next token at each of its first REFERENCE_TOKENS positions."""
    device = execution_device(model.get_input_embeddings())
    out = []
    for text in texts:
        ids = metrics.prompt_ids(tok, text)[:REFERENCE_TOKENS]
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0]
        out.append(logits.float().log_softmax(-1).cpu())
    return out


def mean_kl(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> tuple[float, int]:
    """Mean KL(P_before || P_after) per position, and the number of positions."""
    total, count = 0.0, 0
    for p, q in zip(before, after, strict=True):
        total += float((p.exp() * (p - q)).sum())
        count += p.shape[0]
    return (total / count if count else math.nan), count


def behaviour_diff(load: ModelLoader, a: str, b: str, watched: Sequence[Watched], *,
                   reference: Sequence[str] = (), n_tokens: int = metrics.GEN_TOKENS) -> BehaviourDiff:
    """Both revisions' continuations of every watched prompt, the answers' probabilities, and the
    KL divergence of their next-token distributions on the reference texts."""
    prompts = [w.prompt for w in watched]
    with_answer = [i for i, w in enumerate(watched) if w.answer]
    sides = {}
    for commit in dict.fromkeys((a, b)):  # one model in memory at a time; the same revision loaded once
        model, tok = load(commit)
        probabilities = answer_probabilities(model, tok, [prompts[i] for i in with_answer],
                                             [watched[i].answer or "" for i in with_answer])
        sides[commit] = (metrics.greedy_continuations(model, tok, prompts, n_tokens),
                         dict(zip(with_answer, probabilities, strict=True)),
                         next_token_logprobs(model, tok, reference))
        del model
    (cont_a, prob_a, logp_a), (cont_b, prob_b, logp_b) = sides[a], sides[b]
    kl, positions = mean_kl(logp_a, logp_b) if reference else (None, 0)
    changes = [PromptChange(w.prompt, w.answer, cont_a[i], cont_b[i], prob_a.get(i), prob_b.get(i))
               for i, w in enumerate(watched)]
    return BehaviourDiff(a, b, changes, kl, positions, n_tokens)


def reference_texts(model: Any, tok: Any, n_texts: int) -> list[str]:
    """Text the model writes itself from short seeds, as the covariance statistics use when there is no corpus."""
    from kedit.methods.stats import GeneratedSource

    return list(GeneratedSource(model, tok, n_texts, batch_size=n_texts).iter_from(0))[:n_texts]


def watched_prompts(repo: Repository, suite: Path | None = None, prompts: Sequence[str] = ()) -> list[Watched]:
    """What a behavioural diff compares: `prompts` ('P' or 'P=>ANSWER'); else a request file's prompts,
    paraphrases and neighbours with the answers they expect; else the probe suite."""
    if any(p.strip() for p in prompts):
        return list(dict.fromkeys(Watched.parse(p) for p in prompts if p.strip()))
    if suite is not None:
        from kedit.edit.requests import load_requests
        from kedit.eval.measure import locality_pairs

        out = []
        for r in load_requests([suite]):
            out += [Watched(r.text, r.target_new), *(Watched(p, r.target_new) for p in r.paraphrases)]
            out += [Watched(p, a) for p, a in locality_pairs(r)]
        return out
    probes = list_probes(repo)
    if not probes:
        raise KeditError("no prompts to compare: the probe suite is empty",
                         hint="give prompts ('PROMPT' or 'PROMPT=>ANSWER') or a request file, or add probes "
                              "(kedit probe add)")
    return list(dict.fromkeys(Watched(p.prompt, p.answer) for p in probes))


class _LastLoaded:
    """A loader that keeps the last revision it loaded, so the base that writes the reference texts
    is not loaded again when it is also one of the two sides."""

    def __init__(self, load: ModelLoader) -> None:
        self.load, self.commit, self.loaded = load, "", None

    def __call__(self, commit: str) -> Any:
        if commit != self.commit:
            self.loaded = None  # one model in memory at a time
            self.loaded, self.commit = self.load(commit), commit
        return self.loaded


def compare(repo: Repository, load: ModelLoader, rev_a: str, rev_b: str, watched: Sequence[Watched], *,
            reference: Path | None = None, n_reference: int = REFERENCE_TEXTS,
            n_tokens: int = metrics.GEN_TOKENS) -> BehaviourDiff:
    """`kedit diff --behaviour`, the web view's behaviour page and `kedit report --behaviour`: the
    diff of two revisions with the KL divergence read on `reference` (a text file or folder; at most
    `n_reference` of its texts), or else on `n_reference` texts that B's base model writes (0: no KL)."""
    a, b = repo.resolve(rev_a), repo.resolve(rev_b)
    cached = _LastLoaded(load)
    if reference is not None:
        from kedit.methods.stats import corpus_source

        texts = list(corpus_source(reference).iter_from(0))[: n_reference or None]
    elif n_reference:
        base = history.ancestors(repo.db, b)[-1]
        texts = reference_texts(*cached(base), n_reference)  # the base writes them, as for the statistics
    else:
        texts = []
    return behaviour_diff(cached, a, b, watched, reference=texts, n_tokens=n_tokens)


# -- blame and bisect: along the first-parent history ---------------------------------------------

def first_parent_line(repo: Repository, rev: str) -> list[str]:
    """The commits from the root to `rev`, oldest first, following first parents."""
    return list(reversed(history.ancestors(repo.db, repo.resolve(rev))))


class Continuations:
    """The continuation of one prompt at any commit, each commit loaded at most once."""

    def __init__(self, load: ModelLoader, prompt: str, n_tokens: int) -> None:
        self.load, self.prompt, self.n_tokens = load, prompt, n_tokens
        self.seen: dict[str, str] = {}

    def __call__(self, commit: str) -> str:
        if commit not in self.seen:
            model, tok = self.load(commit)
            self.seen[commit] = metrics.greedy_continuations(model, tok, [self.prompt], self.n_tokens)[0]
        return self.seen[commit]


@dataclass(frozen=True)
class BlameEntry:
    commit: str
    before: str  # the continuation at its parent
    after: str
    names_subject: bool  # its requests name a subject the prompt holds


@dataclass
class Blame:
    prompt: str
    entries: list[BlameEntry]  # newest first
    materialised: int
    commits: int


def _same(x: str, y: str) -> bool:
    return " ".join(x.split()) == " ".join(y.split())


def _names_subject(commit: CommitInfo, prompt: str) -> bool:
    return any(r.get("subject") and re.search(rf"(?<!\w){re.escape(r['subject'])}(?!\w)", prompt)
               for r in commit.requests)


def blame(repo: Repository, load: ModelLoader, prompt: str, rev: str = "HEAD", *,
          n_tokens: int = metrics.GEN_TOKENS) -> Blame:
    """The commits on `rev`'s first-parent history after which the prompt's continuation changed.

    The commits whose requests name a subject in the prompt are looked at first (each with its
    parent); between two looked-at commits whose continuations agree nothing is searched, and
    where they differ the range is halved until the changing commit is found. So a change that
    a later commit undid inside an unsearched range is not reported: blame answers "what made
    it say this", not every flicker in between.
    """
    line = first_parent_line(repo, rev)
    at = Continuations(load, prompt, n_tokens)
    naming = {i for i, c in enumerate(line) if i and _names_subject(repo.get_commit(c), prompt)}
    looked = sorted({0, len(line) - 1} | naming | {i - 1 for i in naming})
    found: list[int] = []

    def search(lo: int, hi: int) -> None:
        if _same(at(line[lo]), at(line[hi])):
            return
        if hi - lo == 1:
            found.append(hi)
            return
        mid = (lo + hi) // 2
        search(lo, mid)
        search(mid, hi)

    for lo, hi in itertools.pairwise(looked):
        search(lo, hi)
    entries = [BlameEntry(line[i], at(line[i - 1]), at(line[i]), i in naming) for i in sorted(found, reverse=True)]
    return Blame(prompt, entries, len(at.seen), len(line))
