"""GRACE on SmolLM2-135M: a stream of sequential counterfactual edits, one commit each, scored at the end.

Usage:
    python bench/grace_sequential.py --n 1000 --out bench/results/grace_sequential.json

The stream (from ../shared/data/known_dev.json, 907 facts): `--holdout` facts are kept out as
locality probes; each other fact is edited to another attribute of its relation (its `prompt`
field, e.g. "Beats Music is owned by" -> "Google"), and, when --n exceeds the number of edited facts,
facts already edited are edited again with a second new target, inserted at a random later point
(the superseding case of a lifelong stream). Every edit is a `kedit` commit through the product path
(`run_edits`, the method sees the codebook at HEAD); no metric is taken while editing.

At the end, HEAD is loaded as any user loads it (`kedit.model.load.load_revision`, the codebook replayed
from the commits' records) and scored against the base model:
- reliability: each edited fact's current target, by greedy generation (exact match, GRACE's
  protocol; read from a teacher-forced pass, the same event, and checked with model.generate on a
  sample) and teacher forcing (EasyEdit's token accuracy); earlier targets of re-edited facts
  count as superseded, not as failures;
- generalization: the same facts in their relation's other templates (GRACE is known to be weak here);
- locality: held-out facts and fixed general prompts: teacher-forced argmax agreement with the base
  model, and greedy generations identical to the base model's;
- cost: per-edit time (the method's, and the whole commit), codebook entries and bytes, the
  split/expand/supersede counts, the adapter objects' bytes in the store.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import CACHE_DIR, load_exported, shuffled_facts, user_continuations
from kedit.methods import grace
from kedit.methods.base import EditRequest

from kedit.core.repo import Repository
from kedit.core.sources import default_model_folder
from kedit.edit.run import EditOptions, run_edits
from kedit.eval import metrics
from kedit.model.export import export
from kedit.model.load import load_revision

log = logging.getLogger("bench")

GENERAL = [
    ("The capital of Japan is", "Tokyo"),
    ("The capital of Germany is", "Berlin"),
    ("The Statue of Liberty is located in", "New York"),
    ("The currency of the United Kingdom is the", "pound"),
    ("Water is made of hydrogen and", "oxygen"),
    ("The largest planet in the solar system is", "Jupiter"),
    ("The author of Romeo and Juliet is William", "Shakespeare"),
    ("The first president of the United States was George", "Washington"),
]


def build_stream(n: int, holdout: int, seed: int) -> tuple[list[EditRequest], list[tuple[str, str]]]:
    """(edit requests in stream order, held-out (prompt, true attribute) pairs)."""
    by_rel, order, rng = shuffled_facts(seed)
    usable = [f for f in order if len({g["attribute"] for g in by_rel[f["relation_id"]]}) >= 3]
    held, edited = usable[:holdout], usable[holdout:]
    if not edited:
        raise SystemExit("no facts left to edit")

    def request(f: dict, avoid: set[str]) -> EditRequest:
        rel = by_rel[f["relation_id"]]
        targets = sorted({g["attribute"] for g in rel} - avoid - {f["attribute"]})
        templates = sorted({g["template"] for g in rel if g["template"] != f["template"]})
        return EditRequest(prompt=f["prompt"], subject=f["subject"], target_new=rng.choice(targets),
                           target_true=f["attribute"],
                           paraphrases=tuple(t.replace("{}", f["subject"])
                                             for t in rng.sample(templates, min(2, len(templates)))))

    stream = [request(f, set()) for f in edited[:n]]
    i = 0
    while len(stream) < n:  # second targets for facts already edited, each after its first edit
        f = edited[i % len(edited)]
        first = next(j for j, r in enumerate(stream) if r.prompt == f["prompt"])
        earlier = {r.target_new for r in stream if r.prompt == f["prompt"]}
        stream.insert(rng.randint(first + 1, len(stream)), request(f, earlier))
        i += 1
    return stream, [(f["prompt"], f["attribute"]) for f in held]


def exact(model: Any, tok: Any, prompts: list[str], answers: list[str]) -> list[float]:
    """Greedy generation's exact match, from one teacher-forced pass: greedy decoding reproduces the
    target iff every target token is the argmax after the prompt and the target tokens before it,
    which is what teacher forcing reads (batched, so 1,000 prompts take seconds, not minutes)."""
    return [float(a == 1.0) for a in metrics.token_accuracy(model, tok, prompts, answers)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="edits in the stream")
    ap.add_argument("--holdout", type=int, default=100, help="facts kept out of the stream as locality probes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="GRACE hyper-parameter, key=value")
    ap.add_argument("--work", default=None, help="repository folder (default: a temp folder)")
    ap.add_argument("--out", default="bench/results/grace_sequential.json")
    ap.add_argument("--chunk", type=int, default=100, help="edits per run_edits call")
    ap.add_argument("--gen-sample", type=int, default=100, help="prompts also scored by model.generate")
    ap.add_argument("--budget-s", type=float, default=0, help="stop the stream after a chunk past this (0: none)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.manual_seed(args.seed)
    stream, held = build_stream(args.n, args.holdout, args.seed)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    tmp = tempfile.TemporaryDirectory(prefix="kedit-grace-bench-")
    work = Path(args.work or tmp.name) / "repo"
    load_before = os.getloadavg()

    folder = default_model_folder(CACHE_DIR)
    repo = Repository.init(work, str(folder), copy=False, progress=False)
    base_model, tok = load_revision(repo, "HEAD", dtype=torch.float32)
    locality_pairs = held + GENERAL
    log.info("base: %d locality prompts", len(locality_pairs))
    base = {
        "reference": metrics.locality_reference(base_model, tok, locality_pairs),
        "generations": metrics.greedy_continuations(base_model, tok, [p for p, _ in locality_pairs], 8),
        "user": user_continuations(base_model, tok, [p for p, _ in locality_pairs]),
    }

    options = EditOptions(method="grace", overrides=overrides, dtype=torch.float32, measure=False)
    logging.getLogger("kedit.edit.run").setLevel(logging.INFO)  # one line per commit: progress
    t0 = time.perf_counter()
    commits: list = []
    while len(commits) < len(stream):  # chunks, so a time budget can stop the stream between them
        commits += run_edits(repo, stream[len(commits):len(commits) + args.chunk], options)
        log.info("%d/%d edits in %.0f s", len(commits), len(stream), time.perf_counter() - t0)
        if args.budget_s and time.perf_counter() - t0 > args.budget_s:
            log.warning("time budget spent: scoring the first %d edits of %d", len(commits), len(stream))
            break
    stream_s = time.perf_counter() - t0
    planned, stream = len(stream), stream[:len(commits)]

    final: dict[str, EditRequest] = {}
    for r in stream:
        final[r.text] = r  # the last edit of each prompt is the one in effect
    facts = list(final.values())
    base_rel = exact(base_model, tok, [r.text for r in facts], [r.target_new for r in facts])
    base_shows = metrics.shows_in_generation(base_model, tok, [r.text for r in facts], [r.target_new for r in facts])
    del base_model
    model, tok = load_revision(repo, "HEAD", dtype=torch.float32)
    hp_module = commits[-1].hparams["module_tmp"].format(commits[-1].hparams["layer"])
    book = grace.codebook_of(model, hp_module)
    log.info("scoring HEAD (%d codebook entries)", len(book))
    t1 = time.perf_counter()
    rel_tf = metrics.token_accuracy(model, tok, [r.text for r in facts], [r.target_new for r in facts])
    rel_gen = [float(a == 1.0) for a in rel_tf]  # = greedy exact match (see `exact`)
    para = [(p, r.target_new) for r in facts for p in r.paraphrases]
    gen_tf = metrics.token_accuracy(model, tok, [p for p, _ in para], [a for _, a in para])
    gen_gen = [float(a == 1.0) for a in gen_tf]
    # The equivalence checked with real greedy generation (model.generate, KV cache) on a sample.
    rng = random.Random(args.seed)
    sample = rng.sample(range(len(facts)), min(args.gen_sample, len(facts)))
    psample = rng.sample(range(len(para)), min(args.gen_sample, len(para)))
    real = [float(s) for s in metrics.shows_in_generation(model, tok, [facts[i].text for i in sample],
                                                             [facts[i].target_new for i in sample])]
    real_para = [float(s) for s in metrics.shows_in_generation(model, tok, [para[i][0] for i in psample],
                                                                  [para[i][1] for i in psample])]
    agree = [float(a == rel_gen[i]) for a, i in zip(real, sample, strict=True)]
    agree += [float(a == gen_gen[i]) for a, i in zip(real_para, psample, strict=True)]
    loc_tf = metrics.locality(model, tok, locality_pairs, base["reference"])
    loc_gen = metrics.greedy_continuations(model, tok, [p for p, _ in locality_pairs], 8)
    score_s = time.perf_counter() - t1
    del model
    user = score_exported(repo, work.parent / "export", facts, para, locality_pairs, base["user"])

    edit_s = [c.info["edit_seconds"] for c in commits]
    actions = Counter(a for c in commits for a in c.info["actions"].split(","))
    adapter_bytes = sum(repo.store.path(ref.object_id, "st").stat().st_size for ref, _ in repo.adapters("HEAD"))
    entry_bytes = (book.keys.shape[1] * 4 + book.values.shape[1] * 4 + 8) * len(book)
    mean = statistics.fmean
    result = {
        "model": "SmolLM2-135M-Instruct (fp32)", "module": hp_module, "hparams": commits[-1].hparams,
        "edits": len(stream), "distinct_prompts": len(facts), "superseded_edits": len(stream) - len(facts),
        "holdout_facts": len(held), "general_prompts": len(GENERAL),
        "reliability_gen": mean(rel_gen), "reliability_teacher_forced": mean(rel_tf),
        "reliability_gen_base": mean(base_rel), "planned_edits": planned,
        "generation_check": {"prompts": len(agree), "agreement": mean(agree), "reliability_gen_sample": mean(real),
                             "generalization_gen_sample": mean(real_para)},
        "generalization_gen": mean(gen_gen), "generalization_teacher_forced": mean(gen_tf), "paraphrases": len(para),
        "locality_teacher_forced": loc_tf.value,
        "exported": user, "gen_reliability_base": mean([float(s) for s in base_shows]),
        "locality_gen_identical": mean([float(a == b) for a, b in zip(loc_gen, base["generations"], strict=True)]),
        "edit_seconds_median": statistics.median(edit_s), "edit_seconds_mean": mean(edit_s),
        "edit_seconds_p90": sorted(edit_s)[int(0.9 * (len(edit_s) - 1))],
        "stream_seconds": stream_s, "per_commit_seconds": stream_s / len(stream), "score_seconds": score_s,
        "actions": dict(actions), "codebook_entries": len(book), "codebook_bytes_fp32": entry_bytes,
        "adapter_objects_bytes": adapter_bytes,
        "value_steps_mean": mean([c.info["value_steps"] for c in commits]),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "torch_threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    Path(args.out).with_suffix(".md").write_text(report(result))
    print(report(result))


def score_exported(repo: Repository, folder: Path, facts: list[EditRequest], para: list[tuple[str, str]],
                   locality_pairs: list[tuple[str, str]], base_said: list[str]) -> dict[str, Any]:
    """The user's view: HEAD exported, loaded with `kedit.load_model`, each edit prompt and locality
    prompt sent alone as `tokenizer(prompt)` + `generate(max_new_tokens=10)` (no kedit code on the
    query path); paraphrases batched through kedit.eval.metrics.greedy_continuations (the same encoding)."""
    t0 = time.perf_counter()
    export(repo, "HEAD", folder)
    model, tok = load_exported(folder, adapters=True)
    said = user_continuations(model, tok, [r.text for r in facts])
    said_para = metrics.greedy_continuations(model, tok, [p for p, _ in para])
    said_loc = user_continuations(model, tok, [p for p, _ in locality_pairs])
    mean = statistics.fmean
    return {
        "gen_reliability": mean([float(metrics.shows(s, r.target_new)) for s, r in zip(said, facts, strict=True)]),
        "gen_generalization": mean([float(metrics.shows(s, a)) for s, (_, a) in zip(said_para, para, strict=True)]),
        "gen_locality": mean([float(metrics.holds(s, a, ref))
                              for s, (_, a), ref in zip(said_loc, locality_pairs, base_said, strict=True)]),
        "locality_identical": mean([float(s == ref) for s, ref in zip(said_loc, base_said, strict=True)]),
        "not_shown": [(r.text, r.target_new, s) for s, r in zip(said, facts, strict=True)
                      if not metrics.shows(s, r.target_new)][:20],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def report(r: dict) -> str:
    def pct(key: str) -> str:
        return f"{100 * r[key]:.1f}%"

    load = f"{r['loadavg_before'][0]:.1f} -> {r['loadavg_after'][0]:.1f}"
    times = " / ".join(f"{r[k]:.2f}" for k in ("edit_seconds_median", "edit_seconds_mean", "edit_seconds_p90"))
    placements = ", ".join(f"{k}: {v}" for k, v in sorted(r["actions"].items()))
    return "\n".join([
        f"# GRACE, {r['edits']} sequential edits on {r['model']}"
        + (f" (of {r['planned_edits']} planned: the time budget ran out)" if r["planned_edits"] > r["edits"] else ""),
        "",
        f"Command: `{r['command']}`; codebook on `{r['module']}`; load average {load}.",
        f"{r['edits']} edits = {r['distinct_prompts']} facts + {r['superseded_edits']} re-edits of facts with a "
        f"second new target; {r['holdout_facts']} held-out facts and {r['general_prompts']} general prompts for "
        "locality. Scored once, after the last edit, on HEAD loaded as a user loads it.",
        "",
        "| metric | value | protocol |",
        "|---|---|---|",
        f"| gen reliability | {100 * r['exported']['gen_reliability']:.1f}% | **exported folder**, "
        f"`kedit.load_model` + `tokenizer(prompt)` + greedy 10 tokens contain the target "
        f"(base model: {pct('gen_reliability_base')}) |",
        f"| gen generalization | {100 * r['exported']['gen_generalization']:.1f}% | exported folder, paraphrases, "
        "the same rule |",
        f"| gen locality | {100 * r['exported']['gen_locality']:.1f}% | exported folder: the true answer or the "
        f"base model's 10-token continuation ({100 * r['exported']['locality_identical']:.1f}% identical) |",
        f"| reliability | {pct('reliability_gen')} | greedy generation, exact match "
        f"(base model: {pct('reliability_gen_base')}) |",
        f"| reliability | {pct('reliability_teacher_forced')} | teacher-forced token accuracy |",
        f"| generalization | {pct('generalization_gen')} | greedy generation, exact match, "
        f"{r['paraphrases']} paraphrases |",
        f"| generalization | {pct('generalization_teacher_forced')} | teacher-forced token accuracy |",
        f"| locality | {pct('locality_teacher_forced')} | teacher-forced argmax agreement with the base model |",
        f"| locality | {pct('locality_gen_identical')} | 8 greedy tokens identical to the base model's |",
        "",
        f"Greedy exact match is read from one teacher-forced pass (all target tokens argmax: the same "
        f"event); `model.generate` on {r['generation_check']['prompts']} sampled prompts agreed on "
        f"{100 * r['generation_check']['agreement']:.1f}% of them "
        f"(reliability {100 * r['generation_check']['reliability_gen_sample']:.1f}%, generalization "
        f"{100 * r['generation_check']['generalization_gen_sample']:.1f}% on the sample).",
        "",
        "| cost | value |",
        "|---|---|",
        f"| edit time (the method), median / mean / p90 | {times} s |",
        f"| whole stream (edits + commits) | {r['stream_seconds']:.0f} s ({r['per_commit_seconds']:.2f} s per edit) |",
        f"| value training steps, mean | {r['value_steps_mean']:.1f} |",
        f"| codebook entries | {r['codebook_entries']} ({r['codebook_bytes_fp32'] / 1e6:.1f} MB in fp32) |",
        f"| adapter objects in the store | {r['adapter_objects_bytes'] / 1e6:.1f} MB |",
        f"| placements | {placements} |",
        "",
    ])


if __name__ == "__main__":
    main()
