"""Shared bench helpers: load SmolLM2-135M (converted once from the packaged GGUF) and build CounterFact-style edits."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from kedit.methods.base import EditRequest
from transformers import AutoModelForCausalLM, AutoTokenizer

import kedit
from kedit.core.sources import default_model_folder

log = logging.getLogger(__name__)

# KEDIT_BENCH_DATA: the same file elsewhere (a machine without ../shared, such as the GPU run of gpu.py)
DATA = Path(os.environ.get("KEDIT_BENCH_DATA", "/work/shared/data/known_dev.json"))
CACHE_DIR = Path("/tmp/kedit-smollm2-135m")


# Unrelated facts whose answers locality probes watch (the unedited SmolLM2 gets each right)
UNRELATED = [
    ("The capital of Japan is", "Tokyo"),
    ("The capital of Germany is", "Berlin"),
    ("The Statue of Liberty is located in", "New York"),
    ("The largest planet in the solar system is", "Jupiter"),
    ("The author of Romeo and Juliet is William", "Shakespeare"),
    ("Water is made of hydrogen and", "oxygen"),
]

def load_smollm2(cache_dir: Path = CACHE_DIR) -> tuple[Any, Any]:
    """The model in float32; the GGUF is de-quantised once into a safetensors folder (17 s -> 4 s)."""
    default_model_folder(cache_dir)
    tok = AutoTokenizer.from_pretrained(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=torch.float32).eval()
    return model, tok


def user_continuations(model: Any, tok: Any, prompts: list[str]) -> list[str]:
    """One prompt at a time, exactly as a user queries the exported folder (no kedit code)."""
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=10, do_sample=False)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def load_exported(folder: Path, adapters: bool) -> tuple[Any, Any]:
    model = kedit.load_model(folder) if adapters else AutoModelForCausalLM.from_pretrained(folder,
                                                                                          dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def shuffled_facts(seed: int) -> tuple[dict[str, list[dict]], list[dict], random.Random]:
    """known_dev.json's facts by relation, the facts in a seeded random order, and the generator."""
    facts = json.loads(DATA.read_text())
    by_rel: dict[str, list[dict]] = defaultdict(list)
    for f in facts:
        by_rel[f["relation_id"]].append(f)
    rng = random.Random(seed)
    order = facts[:]
    rng.shuffle(order)
    return by_rel, order, rng


def counterfact_requests(n: int, seed: int = 0, n_neighbours: int = 10) -> list[EditRequest]:
    """Counterfactual edits from known_dev.json.

    target_new: another fact's attribute of the same relation; paraphrases: the subject in the
    relation's other templates (up to 2); neighbourhood: other subjects of the relation whose true
    attribute is the edited fact's (CounterFact's definition, so P(true) > P(new) is checkable).
    """
    by_rel, order, rng = shuffled_facts(seed)
    out: list[EditRequest] = []
    seen_subjects: set[str] = set()
    for f in order:
        if len(out) == n:
            break
        rel = by_rel[f["relation_id"]]
        if f["subject"] in seen_subjects:
            continue
        others = sorted({g["attribute"] for g in rel if g["attribute"] != f["attribute"]})
        templates = sorted({g["template"] for g in rel if g["template"] != f["template"]})
        neighbours = [g for g in rel if g["attribute"] == f["attribute"] and g["subject"] != f["subject"]]
        if not others or not templates or len(neighbours) < 2:
            continue
        rng.shuffle(neighbours)
        seen_subjects.add(f["subject"])
        out.append(
            EditRequest(
                prompt=f["template"],
                subject=f["subject"],
                target_new=rng.choice(others),
                target_true=f["attribute"],
                paraphrases=tuple(t.replace("{}", f["subject"]) for t in rng.sample(templates, min(2, len(templates)))),
                neighbourhood=tuple(g["template"].replace("{}", g["subject"]) for g in neighbours[:n_neighbours]),
            )
        )
    if len(out) < n:
        log.warning("only %d usable facts for %d edits", len(out), n)
    return out


def split_neighbourhood(requests: list[EditRequest], k: int) -> tuple[list[EditRequest], list[EditRequest]]:
    """(what each edit is given, what it is scored on): the first k neighbourhood prompts (at most
    half) go with the edit, as a user's `--locality`, and are not scored, so a method that protects
    the prompts it is given cannot flatter its neighbourhood score. k = 0: all are scored."""
    cuts = [(r, min(k, len(r.neighbourhood) // 2)) for r in requests]
    given = [dataclasses.replace(r, neighbourhood=r.neighbourhood[:c]) for r, c in cuts]
    scored = [dataclasses.replace(r, neighbourhood=r.neighbourhood[c:]) for r, c in cuts]
    return given, scored


def drop_edited_neighbours(requests: list[EditRequest], edited_subjects: set[str]) -> list[EditRequest]:
    """`requests` with only the neighbourhood prompts about subjects that no edit of the run touches.

    The neighbours come from the same known facts as the edits, so in a run of many edits most of
    them are about a subject that another edit changes on purpose (86% of the scored neighbours at
    500 facts, 22% at 100); such a prompt tests that edit, not whether unrelated knowledge stayed.
    """
    subject_of = {f["template"].replace("{}", f["subject"]): f["subject"] for f in json.loads(DATA.read_text())}
    return [dataclasses.replace(r, neighbourhood=tuple(p for p in r.neighbourhood
                                                       if subject_of[p] not in edited_subjects))
            for r in requests]

