"""Edit metrics as pure functions of (model, tokenizer, requests), each named with its protocol.

The peers use several protocols under one name ("locality_acc" meant different things in
EasyEdit until 2026), so every score carries a `protocol` string to be stored beside it:

- teacher_forced_token_acc: EasyEdit's reliability / generalization / portability: the prompt and
  " target" are fed together, and the score is the fraction of target tokens that are the argmax
  of the preceding position.
- teacher_forced_agreement: EasyEdit's locality: the fraction of answer positions whose argmax
  equals the reference model's (the caller computes the reference once, before any edit).
- greedy_generation_token_acc: greedy-generate len(target) tokens and compare position by position
  (GRACE's protocol; stricter than teacher forcing).
- greedy_generation_exact_match: greedy-generate len(target) tokens; 1 when all equal the target.
- counterfact_nll_margin: ROME's efficacy / paraphrase / neighbourhood: a prompt counts when the
  mean per-token NLL of one target is below the other's.
- ngram_entropy: ROME's fluency: (2/3·H₂ + 4/3·H₃)/2 in bits over words of greedy generations.

Tokenisation: the prompt and " " + target are tokenised separately and their ids concatenated,
so the prompt/target boundary is exact (EasyEdit's re-tokenisation can shift it). A tokenizer that
adds no BOS (GPT-2, SmolLM2) gets a document separator in front of every prompt (`prompt_ids`):
otherwise a prompt's first token sits at the attention sink, whose state is unlike any other, and a
fact about a one-token subject ("Italy's capital is") could be neither edited nor measured. Methods
encode their prompts the same way, so what is edited is what is scored.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Metric",
    "TeacherForced",
    "answer_ids",
    "counterfact_scores",
    "fluency",
    "generalization",
    "generation_accuracy",
    "generation_exact_match",
    "generation_scores",
    "locality",
    "locality_reference",
    "ngram_entropy",
    "portability",
    "prompt_ids",
    "reliability",
    "start_token_id",
    "target_nll",
    "teacher_forced",
]


@dataclass(frozen=True)
class Metric:
    """A score in [0, 1] (fluency: bits), how it was measured, and over how many items."""

    name: str
    value: float
    protocol: str
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "protocol": self.protocol, "n": self.n}


@dataclass(frozen=True)
class TeacherForced:
    """One prompt + answer pass: the answer's ids, the argmax at each answer position, its NLL."""

    target: tuple[int, ...]
    predicted: tuple[int, ...]
    nll: float  # mean per-token negative log-likelihood of the answer

    @property
    def accuracy(self) -> float:
        return sum(p == t for p, t in zip(self.predicted, self.target, strict=True)) / len(self.target)


def answer_ids(tok: Any, answer: str) -> list[int]:
    """Ids of " answer" as it follows a prompt; a lone leading-space token is dropped."""
    if not answer.strip():
        raise ValueError(f"the answer {answer!r} tokenizes to nothing")
    ids = tok(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    if len(ids) > 1 and tok.decode(ids[:1]).strip() == "":
        ids = ids[1:]
    if not ids:
        raise ValueError(f"the answer {answer!r} tokenizes to nothing")
    return list(ids)


def start_token_id(tok: Any) -> int | None:
    """The token put in front of every prompt, or None when the tokenizer adds its own BOS.

    A document separator reads as a fresh start: "<|endoftext|>" where the vocabulary has it
    (GPT-2, SmolLM2, Qwen; SmolLM2's declared BOS is the chat token <|im_start|>), else BOS, else EOS.
    """
    if tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]:
        return None
    tid = tok.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(tid, int) and tid != tok.unk_token_id and tid < len(tok):
        return tid
    return next((int(t) for t in (tok.bos_token_id, tok.eos_token_id) if t is not None), None)


def prompt_ids(tok: Any, text: str) -> list[int]:
    """The ids of a prompt as every metric and method feeds it: after `start_token_id`, if any."""
    start = start_token_id(tok)
    ids = list(tok(text)["input_ids"])
    return ids if start is None else [start, *ids]


def _pad_id(tok: Any) -> int:
    return next(int(t) for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None)


@torch.no_grad()
def teacher_forced(
    model: Any, tok: Any, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16
) -> list[TeacherForced]:
    """Feed prompt + answer ids (right-padded batches) and read every answer position at once."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    device = model.get_input_embeddings().weight.device
    out: list[TeacherForced] = []
    for start in range(0, len(prompts), batch_size):
        rows, spans = [], []
        for p, a in zip(prompts[start : start + batch_size], answers[start : start + batch_size], strict=True):
            p_ids, a_ids = prompt_ids(tok, p), answer_ids(tok, a)
            rows.append(p_ids + a_ids)
            spans.append((len(p_ids), a_ids))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), _pad_id(tok), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for i, (n_prompt, a_ids) in enumerate(spans):
            pos = torch.arange(n_prompt - 1, n_prompt - 1 + len(a_ids), device=logits.device)  # predicts answer
            logp = logits[i, pos].float().log_softmax(-1)  # (len(a), V)
            tgt = torch.tensor(a_ids, device=logits.device)
            nll = float(-logp.gather(1, tgt[:, None]).mean())
            out.append(TeacherForced(tuple(a_ids), tuple(logp.argmax(-1).tolist()), nll))
    return out


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def token_accuracy(model: Any, tok: Any, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
    return [r.accuracy for r in teacher_forced(model, tok, prompts, answers)]


def reliability(model: Any, tok: Any, requests: Sequence[Any]) -> Metric:
    """Does the edit prompt give the new target? Mean teacher-forced token accuracy."""
    accs = token_accuracy(model, tok, [r.text for r in requests], [r.target_new for r in requests])
    return Metric("reliability", _mean(accs), "teacher_forced_token_acc", len(accs))


def generalization(model: Any, tok: Any, requests: Sequence[Any]) -> Metric:
    """The same on every paraphrase of every request."""
    prompts = [p for r in requests for p in r.paraphrases]
    answers = [r.target_new for r in requests for _ in r.paraphrases]
    accs = token_accuracy(model, tok, prompts, answers) if prompts else []
    return Metric("generalization", _mean(accs), "teacher_forced_token_acc", len(accs))


def portability(model: Any, tok: Any, requests: Sequence[Any]) -> Metric:
    """Answers that should follow from the edit (request.portability pairs)."""
    pairs = [p for r in requests for p in r.portability]
    accs = token_accuracy(model, tok, [p for p, _ in pairs], [a for _, a in pairs]) if pairs else []
    return Metric("portability", _mean(accs), "teacher_forced_token_acc", len(accs))


def locality_reference(model: Any, tok: Any, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
    """The reference model's argmax ids at each answer position; compute once on the unedited model."""
    return [list(r.predicted) for r in teacher_forced(model, tok, [p for p, _ in pairs], [a for _, a in pairs])]


def locality(model: Any, tok: Any, pairs: Sequence[tuple[str, str]], reference: Sequence[Sequence[int]]) -> Metric:
    """Fraction of answer positions whose argmax is unchanged from `reference` (per pair, then mean)."""
    if len(pairs) != len(reference):
        raise ValueError(f"{len(pairs)} locality pairs but {len(reference)} reference rows")
    now = locality_reference(model, tok, pairs)
    scores = [sum(a == b for a, b in zip(n, r, strict=True)) / len(r) for n, r in zip(now, reference, strict=True)]
    return Metric("locality", _mean(scores), "teacher_forced_agreement", len(scores))


def target_nll(model: Any, tok: Any, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
    """Mean per-token NLL of each target after its prompt (ROME's CounterFact scoring)."""
    return [r.nll for r in teacher_forced(model, tok, prompts, targets)]


COUNTERFACT_SCORES = ("efficacy", "paraphrase", "neighbourhood")


def counterfact_scores(
    model: Any, tok: Any, requests: Sequence[Any], which: Sequence[str] = COUNTERFACT_SCORES
) -> dict[str, Metric]:
    """Efficacy, paraphrase and neighbourhood scores (ES, PS, NS of Meng et al. 2022), or those in `which`.

    ES/PS: fraction of prompts where NLL(new) < NLL(true); NS: fraction of neighbourhood
    prompts where NLL(true) < NLL(new). Requests need `target_true`.
    """
    groups: dict[str, list[tuple[str, str, str]]] = {"efficacy": [], "paraphrase": [], "neighbourhood": []}
    for r in requests:
        if r.target_true is None:
            raise ValueError(f"CounterFact scores need target_true (request about {r.subject!r})")
        groups["efficacy"].append((r.text, r.target_new, r.target_true))
        groups["paraphrase"] += [(p, r.target_new, r.target_true) for p in r.paraphrases]
        groups["neighbourhood"] += [(p, r.target_true, r.target_new) for p in r.neighbourhood]
    out = {}
    for name, items in ((k, groups[k]) for k in which):
        if not items:
            out[name] = Metric(name, float("nan"), "counterfact_nll_margin", 0)
            continue
        prompts = [p for p, _, _ in items] * 2
        targets = [good for _, good, _ in items] + [bad for _, _, bad in items]
        nll = target_nll(model, tok, prompts, targets)
        n = len(items)
        wins = [nll[i] < nll[n + i] for i in range(n)]
        out[name] = Metric(name, _mean([float(w) for w in wins]), "counterfact_nll_margin", n)
    return out


@torch.no_grad()
def _greedy(model: Any, tok: Any, prompts: Sequence[str], max_new_tokens: Sequence[int]) -> list[list[int]]:
    """Greedy continuations, one prompt at a time (no padding effects), as token ids."""
    device = model.get_input_embeddings().weight.device
    out = []
    for p, n in zip(prompts, max_new_tokens, strict=True):
        ids = torch.tensor([prompt_ids(tok, p)], device=device)
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=_pad_id(tok),
        )
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


def generation_accuracy(model: Any, tok: Any, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
    """Greedy-generate len(answer) tokens and score position-by-position agreement (GRACE protocol)."""
    targets = [answer_ids(tok, a) for a in answers]
    gens = _greedy(model, tok, prompts, [len(t) for t in targets])
    return [
        sum(g == t for g, t in zip(gen, tgt, strict=False)) / len(tgt) for gen, tgt in zip(gens, targets, strict=True)
    ]


def generation_exact_match(model: Any, tok: Any, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
    """1.0 where greedy generation reproduces every token of the answer, else 0.0."""
    targets = [answer_ids(tok, a) for a in answers]
    gens = _greedy(model, tok, prompts, [len(t) for t in targets])
    return [float(list(gen[: len(tgt)]) == list(tgt)) for gen, tgt in zip(gens, targets, strict=True)]


def generation_scores(model: Any, tok: Any, requests: Sequence[Any]) -> list[Metric]:
    """Reliability (and generalization, where there are paraphrases) by greedy generation, exact match:
    what GRACE's authors report, and what a user of the edited model sees."""
    rel = generation_exact_match(model, tok, [r.text for r in requests], [r.target_new for r in requests])
    out = [Metric("reliability_gen", _mean(rel), "greedy_generation_exact_match", len(rel))]
    prompts = [p for r in requests for p in r.paraphrases]
    if prompts:
        answers = [r.target_new for r in requests for _ in r.paraphrases]
        gen = generation_exact_match(model, tok, prompts, answers)
        out.append(Metric("generalization_gen", _mean(gen), "greedy_generation_exact_match", len(gen)))
    return out


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str) -> float:
    """(2/3·H₂ + 4/3·H₃)/2, entropies in bits of the text's word bigrams and trigrams (ROME's GE)."""
    words = _WORD.findall(text)
    total = 0.0
    for n, weight in ((2, 2 / 3), (3, 4 / 3)):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        count = sum(grams.values())
        h = -sum(c / count * math.log2(c / count) for c in grams.values()) if count else 0.0
        total += weight * h
    return total / 2


def fluency(model: Any, tok: Any, prompts: Sequence[str], max_new_tokens: int = 100) -> Metric:
    """Mean n-gram entropy of greedy generations (×100 gives the peers' tables' scale)."""
    gens = _greedy(model, tok, prompts, [max_new_tokens] * len(prompts))
    texts = [tok.decode(g, skip_special_tokens=True) for g in gens]
    scores = [ngram_entropy(p + t) for p, t in zip(prompts, texts, strict=True)]
    return Metric("fluency", _mean(scores), f"ngram_entropy_greedy{max_new_tokens}", len(scores))
