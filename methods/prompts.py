"""Prompts as token ids: the tokenisation helpers and context templates the editing methods share.

Every method that reads a key at a subject or optimises a value for a target encodes its prompts
here, so that ROME, MEMIT, AlphaEdit and GRACE read the same positions the metrics score:

- `encode_with_subject`: a template with the subject written in, and the index of the subject's
  last token (the position ROME and MEMIT edit), with the position-0 guard (methods/rome.py);
- `target_ids`: a target tokenised exactly as kedit.eval.metrics scores it;
- `pad_right`, `pad_id`, `input_device`: batches of such rows;
- `context_templates`: ROME's "{}" plus short prefixes the model writes itself, generated once
  per model and settings (kept in a weak per-model cache: a model that is dropped takes its
  templates with it, and another model object never sees them).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from kedit.eval.metrics import answer_ids, start_token_id
from kedit.model.placement import execution_device

__all__ = [
    "TemplateSettings",
    "context_templates",
    "encode_with_subject",
    "input_device",
    "pad_id",
    "pad_right",
    "target_ids",
]


class TemplateSettings(Protocol):
    """The hyper-parameters `context_templates` reads (ROME's and MEMIT's have them)."""

    context_template_length_params: tuple[tuple[int, int], ...]
    context_template_seeds: tuple[str, ...]
    seed: int


# ---------------------------------------------------------------------------------------------
# tokenisation


def input_device(model: Any) -> torch.device:
    return execution_device(model.get_input_embeddings())


def pad_id(tok: Any) -> int:
    for tid in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
        if tid is not None:
            return int(tid)
    return 0


# Targets are tokenised exactly as the metrics read them, so an edit optimises what is scored.
target_ids = answer_ids


def encode_with_subject(tok: Any, template: str, subject: str, guard: bool,
                        as_sent: bool = False) -> tuple[list[int], int, bool]:
    """Ids of template with the subject, the index of the subject's last token, and whether guarded.

    `guard`: a start token goes in front (away from the attention sink). `as_sent`: the text is
    encoded as the user sends it (`tokenizer(text)`), the start token only where the subject's last
    token would otherwise sit at position 0, the sink, whose key no edit can use."""
    start = template.index("{}")
    text = template[:start] + subject + template[start + 2 :]
    end = start + len(subject)  # subject occupies chars [start, end)
    try:
        enc = tok(text, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        last = max(i for i, (s, e) in enumerate(offsets) if e > s and s < end)
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizer: no offsets
        ids = list(tok(text)["input_ids"])
        last = len(tok(text[:end])["input_ids"]) - 1
    guarded = guard and last == 0
    start = start_token_id(tok) if guard and (guarded or not as_sent) else None
    if start is not None:
        ids, last = [start, *ids], last + 1
    elif guarded:
        raise ValueError("the tokenizer has no BOS or EOS token to guard position 0; set guard_position0=false")
    return ids, last, guarded


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)



# ---------------------------------------------------------------------------------------------
# context templates, cached per model object (not per process)

_TEMPLATE_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple, list[str]]] = weakref.WeakKeyDictionary()


@torch.no_grad()
def _generate(model: Any, tok: Any, seeds: Sequence[str], n_tokens: int, seed: int) -> list[str]:
    """Sampled continuations of the seeds (top-k 5 as in ROME), left-padded with an attention mask."""
    # Without BOS a lone seed word sits at the attention sink and the model writes junk
    # ("The-the-world-is"); a separator token in front gives ordinary prose.
    start = start_token_id(tok)
    encoded = [([] if start is None else [start]) + list(tok(s)["input_ids"]) for s in seeds]
    width = max(len(e) for e in encoded)
    pad = pad_id(tok)
    ids = torch.tensor([[pad] * (width - len(e)) + list(e) for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids.to(input_device(model)),
            attention_mask=mask.to(input_device(model)),
            do_sample=True,
            top_k=5,
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,
            pad_token_id=pad,
        )
    return [tok.decode(row, skip_special_tokens=True) for row in out[:, width:]]


def context_templates(model: Any, tok: Any, hparams: TemplateSettings) -> list[str]:
    """["{}", "<generated>. {}", ...]: the model's own prefixes, generated once per model and settings."""
    key = (
        getattr(tok, "name_or_path", ""),
        len(tok),
        hparams.context_template_length_params,
        hparams.context_template_seeds,
        hparams.seed,
    )
    per_model = _TEMPLATE_CACHE.setdefault(model, {})
    if key not in per_model:
        templates = ["{}"]
        seeds = list(hparams.context_template_seeds)
        for i, (n_tokens, count) in enumerate(hparams.context_template_length_params):
            if count == 0:
                continue
            prompts = [seeds[j % len(seeds)] for j in range(count)]
            texts = _generate(model, tok, prompts, n_tokens, hparams.seed + i)
            for seed_text, gen in zip(prompts, texts, strict=True):
                prefix = (seed_text + gen).replace("{", " ").replace("}", " ").strip()
                templates.append(prefix + ". {}")
        per_model[key] = templates
    return list(per_model[key])

