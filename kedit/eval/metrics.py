"""Edit metrics as pure functions of (model, tokenizer, requests), each named with its protocol.

The peers use several protocols under one name ("locality_acc" meant different things in
EasyEdit until 2026), so every score carries a `protocol` string to be stored beside it. Every
protocol starts with `user_prompt_`: the prompt is fed exactly as `tokenizer(prompt)` encodes it
(the tokenizer's own special tokens, as transformers' pipelines send it), because that is what a
user of the exported model gets. Scores of an older kedit, measured after a private start token,
carry names without that prefix and are never mixed with these.

- user_prompt_teacher_forced_token_acc: EasyEdit's reliability / generalization / portability: the
  prompt and " target" are fed together, and the score is the fraction of target tokens that are
  the argmax of the preceding position.
- user_prompt_teacher_forced_agreement: EasyEdit's locality: the fraction of answer positions whose
  argmax equals the reference model's (the caller computes the reference once, before any edit).
- user_prompt_greedy{N}_contains: greedy-generate N tokens (default 10) after the prompt; 1 when the
  continuation contains the target, case-insensitively (`shows`). What a user reading the model's
  output sees; much harsher than teacher forcing ("The Mirage of Model Editing", arXiv 2502.11177).
- user_prompt_greedy{N}_holds_or_unchanged: locality by generation: 1 when the continuation still
  contains the true answer or equals the unedited model's continuation (`holds`).
- user_prompt_counterfact_nll_margin: ROME's efficacy / paraphrase / neighbourhood: a prompt counts
  when the mean per-token NLL of one target is below the other's.
- user_prompt_ngram_entropy_greedy{N}: ROME's fluency: (2/3·H₂ + 4/3·H₃)/2 in bits over words of
  greedy generations.
- chat_template_*: the prompt sent as one user message through the tokenizer's chat template, the
  assistant's turn opened (`prompt_ids(chat=True)`), the answer opening the reply: how a chat model
  is used (`kedit eval --chat`: chat_gen_* over CHAT_GEN_TOKENS; `kedit check --chat`).

Tokenisation: the prompt and " " + target are tokenised separately and their ids concatenated,
so the prompt/target boundary is exact (EasyEdit's re-tokenisation can shift it). Methods may read
keys or train values in more contexts (`start_token_id` puts a document separator before a prompt,
away from the position-0 attention sink), but what they check and what is scored is the prompt as sent.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kedit.core.errors import KeditError

if TYPE_CHECKING:
    import torch

__all__ = [
    "GEN_TOKENS",
    "PROBE_PROTOCOLS",
    "PROMPT_PROTOCOL",
    "ProbeProtocol",
    "Score",
    "TeacherForced",
    "answer_ids",
    "counterfact_scores",
    "fluency",
    "generalization",
    "generation_scores",
    "greedy_continuations",
    "holds",
    "locality",
    "locality_reference",
    "ngram_entropy",
    "portability",
    "prompt_ids",
    "reliability",
    "shows",
    "shows_in_generation",
    "start_token_id",
    "target_nll",
    "teacher_forced",
]


@dataclass(frozen=True)
class Score:
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


def answer_ids(tok: Any, answer: str, *, chat: bool = False) -> list[int]:
    """Ids of " answer" as it follows a prompt (`chat`: of "answer", as it opens the assistant's
    reply); a lone leading-space token is dropped."""
    if not answer.strip():
        raise ValueError(f"the answer {answer!r} tokenizes to nothing")
    ids = tok(("" if chat else " ") + answer.strip(), add_special_tokens=False)["input_ids"]
    if len(ids) > 1 and tok.decode(ids[:1]).strip() == "":
        ids = ids[1:]
    if not ids:
        raise ValueError(f"the answer {answer!r} tokenizes to nothing")
    return list(ids)


def start_token_id(tok: Any) -> int | None:
    """The token a method may put in front of a prompt it reads keys from, or None when the
    tokenizer adds its own BOS. Never used for scoring (see the module docstring).

    A document separator reads as a fresh start: "<|endoftext|>" where the vocabulary has it as a
    token of its own (GPT-2, Qwen), else BOS (SmolLM2: <|im_start|>, as its <|endoftext|> shares
    the unknown token's id), else EOS.
    """
    if tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]:
        return None
    tid = tok.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(tid, int) and tid != tok.unk_token_id and tid < len(tok):
        return tid
    return next((int(t) for t in (tok.bos_token_id, tok.eos_token_id) if t is not None), None)


PROMPT_PROTOCOL = "user_prompt"  # the prefix of every protocol name: prompts as `tokenizer(prompt)` encodes them
GEN_TOKENS = 10  # greedy tokens a generation metric reads after the prompt
CHAT_PROTOCOL = "chat_template"  # its `chat` counterpart: the prompt sent as a user message
CHAT_GEN_TOKENS = 24  # a chat reply tends to restate the question before it answers


def prompt_ids(tok: Any, text: str, *, chat: bool = False) -> list[int]:
    """The ids of a prompt as the user sends it: `tokenizer(text)`, with the tokenizer's own special tokens.

    `chat`: as a chat user sends it, one user message through the tokenizer's chat template with
    the assistant's turn opened (`apply_chat_template(..., add_generation_prompt=True)`)."""
    if not chat:
        return list(tok(text)["input_ids"])
    if not getattr(tok, "chat_template", None):
        raise KeditError("the tokenizer has no chat template: chat-template scores need a chat model's tokenizer")
    return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"])


def _pad_id(tok: Any) -> int:
    return next(int(t) for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None)


def teacher_forced(
    model: Any, tok: Any, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16, *, chat: bool = False
) -> list[TeacherForced]:
    """Feed prompt + answer ids (right-padded batches) and read every answer position at once
    (`chat`: the prompts through the chat template, see `prompt_ids`)."""
    import torch  # here, not at the top: the protocol names are read without running a model

    from kedit.model.placement import execution_device

    with torch.no_grad():
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        device = execution_device(model.get_input_embeddings())
        out: list[TeacherForced] = []
        for start in range(0, len(prompts), batch_size):
            rows, spans = [], []
            for p, a in zip(prompts[start : start + batch_size], answers[start : start + batch_size], strict=True):
                p_ids, a_ids = prompt_ids(tok, p, chat=chat), answer_ids(tok, a, chat=chat)
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


def reliability(model: Any, tok: Any, requests: Sequence[Any]) -> Score:
    """Does the edit prompt give the new target? Mean teacher-forced token accuracy."""
    accs = token_accuracy(model, tok, [r.text for r in requests], [r.target_new for r in requests])
    return Score("reliability", _mean(accs), f"{PROMPT_PROTOCOL}_teacher_forced_token_acc", len(accs))


def generalization(model: Any, tok: Any, requests: Sequence[Any]) -> Score:
    """The same on every paraphrase of every request."""
    prompts = [p for r in requests for p in r.paraphrases]
    answers = [r.target_new for r in requests for _ in r.paraphrases]
    accs = token_accuracy(model, tok, prompts, answers) if prompts else []
    return Score("generalization", _mean(accs), f"{PROMPT_PROTOCOL}_teacher_forced_token_acc", len(accs))


def portability(model: Any, tok: Any, requests: Sequence[Any]) -> Score:
    """Answers that should follow from the edit (request.portability pairs)."""
    pairs = [p for r in requests for p in r.portability]
    accs = token_accuracy(model, tok, [p for p, _ in pairs], [a for _, a in pairs]) if pairs else []
    return Score("portability", _mean(accs), f"{PROMPT_PROTOCOL}_teacher_forced_token_acc", len(accs))


def locality_reference(model: Any, tok: Any, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
    """The reference model's argmax ids at each answer position; compute once on the unedited model."""
    return [list(r.predicted) for r in teacher_forced(model, tok, [p for p, _ in pairs], [a for _, a in pairs])]


def locality(model: Any, tok: Any, pairs: Sequence[tuple[str, str]], reference: Sequence[Sequence[int]]) -> Score:
    """Fraction of answer positions whose argmax is unchanged from `reference` (per pair, then mean)."""
    if len(pairs) != len(reference):
        raise ValueError(f"{len(pairs)} locality pairs but {len(reference)} reference rows")
    now = locality_reference(model, tok, pairs)
    scores = [sum(a == b for a, b in zip(n, r, strict=True)) / len(r) for n, r in zip(now, reference, strict=True)]
    return Score("locality", _mean(scores), f"{PROMPT_PROTOCOL}_teacher_forced_agreement", len(scores))


def target_nll(model: Any, tok: Any, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
    """Mean per-token NLL of each target after its prompt (ROME's CounterFact scoring)."""
    return [r.nll for r in teacher_forced(model, tok, prompts, targets)]


COUNTERFACT_SCORES = ("efficacy", "paraphrase", "neighbourhood")


def counterfact_scores(
    model: Any, tok: Any, requests: Sequence[Any], which: Sequence[str] = COUNTERFACT_SCORES
) -> dict[str, Score]:
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
            out[name] = Score(name, float("nan"), f"{PROMPT_PROTOCOL}_counterfact_nll_margin", 0)
            continue
        prompts = [p for p, _, _ in items] * 2
        targets = [good for _, good, _ in items] + [bad for _, _, bad in items]
        nll = target_nll(model, tok, prompts, targets)
        n = len(items)
        wins = [nll[i] < nll[n + i] for i in range(n)]
        out[name] = Score(name, _mean([float(w) for w in wins]), f"{PROMPT_PROTOCOL}_counterfact_nll_margin", n)
    return out


def greedy_continuations(model: Any, tok: Any, prompts: Sequence[str], max_new_tokens: int = GEN_TOKENS,
                         batch_size: int = 16, *, chat: bool = False,
                         until_shown: Sequence[str] | None = None) -> list[str]:
    """The text a user gets from `generate(**tokenizer(prompt), max_new_tokens=N, do_sample=False)`, per prompt
    (`chat`: the assistant's reply to the prompt sent through the chat template, see `prompt_ids`).

    Batched with left padding and an attention mask, so each row continues from its own last
    token; generation stops at EOS, and special tokens are left out of the text. Works with
    adapter hooks installed (GRACE reads every position, padding included, and pads match no key).

    `until_shown` (an answer per prompt): a row stops as soon as its answer `shows` in its text, which
    is then cut short. Only for callers that ask whether the answer shows: text only grows, so that
    verdict is the same as on the full N tokens, and a check of one edit ends after the few tokens
    the target takes instead of N.
    """
    import torch  # here, not at the top: the protocol names are read without running a model
    from transformers import StoppingCriteriaList

    if until_shown is not None and len(until_shown) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(until_shown)} answers")
    from kedit.model.placement import execution_device

    with torch.no_grad():
        device = execution_device(model.get_input_embeddings())
        pad = _pad_id(tok)
        out: list[str] = []
        for start in range(0, len(prompts), batch_size):
            rows = [prompt_ids(tok, p, chat=chat) for p in prompts[start : start + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, width - len(r) :] = torch.tensor(r)
                mask[i, width - len(r) :] = 1
            stop = StoppingCriteriaList() if until_shown is None else \
                StoppingCriteriaList([_Shown(tok, until_shown[start : start + batch_size], width)])
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, stopping_criteria=stop)
            out += tok.batch_decode(gen[:, width:].tolist(), skip_special_tokens=True)
        return out


class _Shown:
    """A transformers stopping criterion (the protocol of `StoppingCriteria`, without importing it at
    module load): per row of a batch, done once the row's answer shows in the text generated after `width`."""

    def __init__(self, tok: Any, answers: Sequence[str], width: int) -> None:
        self.tok, self.answers, self.width = tok, list(answers), width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        import torch  # as in greedy_continuations, which builds this only when it runs a model

        texts = self.tok.batch_decode(input_ids[:, self.width :].tolist(), skip_special_tokens=True)
        return torch.tensor([shows(t, a) for t, a in zip(texts, self.answers, strict=True)],
                            dtype=torch.bool, device=input_ids.device)


def _words(text: str) -> str:
    return " ".join(text.casefold().split())


def shows(continuation: str, answer: str) -> bool:
    """The comparison rule for generated text: the answer appears in it, case- and spacing-insensitively."""
    return bool(_words(answer)) and _words(answer) in _words(continuation)


def holds(continuation: str, answer: str, reference: str) -> bool:
    """Locality by generation: the continuation still gives the true answer, or is the unedited model's."""
    return shows(continuation, answer) or _words(continuation) == _words(reference)


def shows_in_generation(model: Any, tok: Any, prompts: Sequence[str], answers: Sequence[str],
                        max_new_tokens: int = GEN_TOKENS, *, chat: bool = False) -> list[bool]:
    """Per prompt: does the greedy continuation contain its answer? (a method's own check of an edit)"""
    gens = greedy_continuations(model, tok, prompts, max_new_tokens, chat=chat, until_shown=answers)
    return [shows(g, a) for g, a in zip(gens, answers, strict=True)]


def generation_scores(model: Any, tok: Any, requests: Sequence[Any], pairs: Sequence[tuple[str, str]] = (),
                      reference: Sequence[str] | None = None, max_new_tokens: int = GEN_TOKENS, *,
                      chat: bool = False) -> list[Score]:
    """gen_efficacy and gen_paraphrase (the continuation contains the new target), and gen_locality
    on `pairs` (prompt, true answer) against `reference`, the unedited model's continuations of them.

    `chat`: the chat-template scores, named chat_gen_* under their own protocol (the prompts sent
    as a user message; `reference` then holds the unedited model's chat replies)."""
    name, protocol = ("chat_", CHAT_PROTOCOL) if chat else ("", PROMPT_PROTOCOL)
    contains = f"{protocol}_greedy{max_new_tokens}_contains"
    groups = [(f"{name}gen_efficacy", [(r.text, r.target_new) for r in requests]),
              (f"{name}gen_paraphrase", [(p, r.target_new) for r in requests for p in r.paraphrases])]
    out = []
    for metric, items in groups:
        if items:
            hits = shows_in_generation(model, tok, [p for p, _ in items], [a for _, a in items], max_new_tokens,
                                       chat=chat)
            out.append(Score(metric, _mean([float(h) for h in hits]), contains, len(hits)))
    if pairs and reference is not None:
        if len(pairs) != len(reference):
            raise ValueError(f"{len(pairs)} locality pairs but {len(reference)} reference continuations")
        now = greedy_continuations(model, tok, [p for p, _ in pairs], max_new_tokens, chat=chat)
        kept = [float(holds(n, a, ref)) for n, (_, a), ref in zip(now, pairs, reference, strict=True)]
        out.append(Score(f"{name}gen_locality", _mean(kept), f"{protocol}_greedy{max_new_tokens}_holds_or_unchanged",
                          len(kept)))
    return out


def _teacher_forced_outputs(model: Any, tok: Any, prompts: Sequence[str], answers: Sequence[str], *,
                            chat: bool = False) -> list[tuple[Any, float]]:
    return [(list(r.predicted), r.accuracy) for r in teacher_forced(model, tok, prompts, answers, chat=chat)]


def _generation_outputs(model: Any, tok: Any, prompts: Sequence[str], answers: Sequence[str], *,
                        chat: bool = False) -> list[tuple[Any, float]]:
    texts = greedy_continuations(model, tok, prompts, CHAT_GEN_TOKENS if chat else GEN_TOKENS, chat=chat)
    return [(text, float(shows(text, a))) for text, a in zip(texts, answers, strict=True)]


def _argmax_agreement(now: Any, reference: Any, answer: str) -> float:
    return sum(x == y for x, y in zip(now, reference, strict=True)) / len(reference)


def _continuation_holds(now: Any, reference: Any, answer: str) -> float:
    return float(holds(now, answer, reference))


@dataclass(frozen=True)
class ProbeProtocol:
    """How a probe is scored (`kedit check --protocol`): `outputs` gives each probe's output at a
    commit (kept, JSON) and its score as a fact; `agreement` scores a locality probe's output
    against the base's. `name` keys the kept outputs, so protocols never share them."""

    name: str
    outputs: Callable[..., list[tuple[Any, float]]]  # (model, tok, prompts, answers, *, chat) -> [(output, score)]
    agreement: Callable[[Any, Any, str], float]


PROBE_PROTOCOLS = {
    # the argmax at each answer position; a fact's score is its token accuracy
    "teacher-forced": ProbeProtocol(f"{PROMPT_PROTOCOL}_teacher_forced", _teacher_forced_outputs, _argmax_agreement),
    # the greedy continuation; a fact scores 1 when it shows, a locality probe when it `holds`
    "generation": ProbeProtocol(f"{PROMPT_PROTOCOL}_greedy{GEN_TOKENS}", _generation_outputs, _continuation_holds),
}


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


def fluency(model: Any, tok: Any, prompts: Sequence[str], max_new_tokens: int = 100) -> Score:
    """Mean n-gram entropy of greedy generations (×100 gives the peers' tables' scale)."""
    texts = greedy_continuations(model, tok, prompts, max_new_tokens)
    scores = [ngram_entropy(p + t) for p, t in zip(prompts, texts, strict=True)]
    return Score("fluency", _mean(scores), f"{PROMPT_PROTOCOL}_ngram_entropy_greedy{max_new_tokens}", len(scores))
