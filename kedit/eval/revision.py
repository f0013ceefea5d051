"""`kedit eval`: measure a revision on a request suite, or on the edits in effect at it."""

from __future__ import annotations

from pathlib import Path

import torch

from kedit.core import history
from kedit.core.errors import KeditError
from kedit.core.repo import Metric, Repository
from kedit.core.revisions import reachable
from kedit.edit.requests import load_requests
from kedit.eval import metrics
from kedit.eval.measure import as_metrics, locality_pairs, measure, reference_of
from kedit.methods.base import EditRequest
from kedit.model.quantize import quantize_weights

HISTORY_SUITE = "history"


def edited_requests(repo: Repository, commit_id: str) -> list[EditRequest]:
    """The requests of every edit in effect at `commit_id`, oldest first."""
    active = history.edits_in_effect(repo.db, commit_id)
    out = []
    for cid in history.oldest_first(repo.db, reachable(repo.db, [commit_id])):  # both sides of a merge
        if cid in active:
            out += [EditRequest.from_dict(r) for r in repo.get_commit(cid).requests]
    return out


def load_quantized(repo: Repository, rev: str, quant: str | None, **kwargs) -> tuple:
    """(model, tokenizer) at `rev`, its weights through a GGUF `quant` round trip when one is given."""
    from kedit.model.load import load_revision  # looked up at call time, as tests count the loads

    model, tok = load_revision(repo, rev, **kwargs)
    if quant:
        quantize_weights(model, quant)
    return model, tok


def evaluate_revision(repo: Repository, rev: str, *, suite: Path | None = None, fluency: bool = False,
                      dtype: torch.dtype | None = None, device: str = "cpu", chat: bool = False,
                      quant: str | None = None) -> list[Metric]:
    """Score `rev` and store the scores with it (stage 'eval'); locality is measured against the base.

    `chat`: instead, the chat-template scores (`metrics.generation_scores(chat=True)`): what a chat
    user who sends the prompt as a message reads in the reply. `quant`: the revision (and the base
    it is compared with) as a GGUF file of that type would run it; the suite is recorded as
    `SUITE@QUANT`, beside the unquantised scores."""
    commit_id = repo.resolve(rev)
    requests = load_requests([suite]) if suite else edited_requests(repo, commit_id)
    if not requests:
        raise KeditError(f"nothing to evaluate at {rev}: no edits in effect", hint="pass --suite FILE")
    name = (suite.name if suite else HISTORY_SUITE) + (f"@{quant}" if quant else "")
    pairs = [p for r in requests for p in locality_pairs(r)]
    reference = None
    if pairs:
        base = history.ancestors(repo.db, commit_id)[-1]
        base_model, base_tok = load_quantized(repo, base, quant, dtype=dtype, device=device)
        if chat:  # the unedited model's replies, which chat_gen_locality holds each reply to
            reference = metrics.greedy_continuations(base_model, base_tok, [p for p, _ in pairs],
                                                      metrics.CHAT_GEN_TOKENS, chat=True)
        else:
            reference = reference_of(base_model, base_tok, pairs)
        del base_model
    model, tok = load_quantized(repo, commit_id, quant, dtype=dtype, device=device)
    if chat:
        scores = metrics.generation_scores(model, tok, requests, pairs, reference, metrics.CHAT_GEN_TOKENS,
                                            chat=True)
    else:
        scores = measure(model, tok, requests, reference, fluency=fluency)
    recorded = as_metrics(scores, "eval", name)
    repo.record_metrics(commit_id, recorded)
    return recorded
