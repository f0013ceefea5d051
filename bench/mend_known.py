"""MEND and InstructEdit on SmolLM2-135M, trained and tested on disjoint facts of known_dev.json.

Usage:
    python bench/mend_known.py single --minutes 60 --out bench/results/mend_known.json
    python bench/mend_known.py multi --minutes 15 --out bench/results/instructedit_multitask.json

single: MEND trained through the engine (`kedit.edit.trained.train_editor`, stored in a repository) on
  CounterFact-style edits of the facts whose known_id is not divisible by 5, then evaluated on the
  facts whose known_id is (never seen in training): reliability, generalization (the subject in the
  relation's other templates), locality (two unrelated facts, argmax agreement with the unedited
  model), all EasyEdit's teacher-forced protocols, and edit latency (the method's call: one forward
  and backward pass plus the editor). Each edit is applied to the base alone.
multi: three task families built from the same split: counterfact (as above), sentiment (a topic's
  opinion becomes "wonderful" or "terrible"), zsre (the facts as questions, in the zsRE MEND file
  format). InstructEdit and MEND are both trained on counterfact + sentiment for the same time;
  zsre is held out of training entirely. Reliability etc. on each family's test facts; InstructEdit
  edits with each task's unseen instruction.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import CACHE_DIR, DATA, load_smollm2
from kedit.methods.base import EditRequest, get_method

from kedit.core.repo import Repository
from kedit.core.sources import default_model_folder
from kedit.edit.trained import TrainOptions, editor_loader, train_editor
from kedit.eval import metrics

log = logging.getLogger("bench")

# zsRE-style questions per relation (the facts of known_dev.json asked as questions)
QUESTIONS = {
    "P108": "Who is the employer of {}?", "P178": "Which company developed {}?",
    "P36": "What is the capital of {}?", "P449": "On which network did {} originally air?",
    "P20": "In which city did {} die?", "P159": "Where is the headquarters of {}?",
    "P937": "In which city did {} work?", "P101": "What is the field of work of {}?",
    "P30": "On which continent is {}?", "P407": "In which language is {} written?",
    "P17": "In which country is {}?", "P127": "Which company owns {}?",
    "P103": "What is the native language of {}?", "P27": "Of which country is {} a citizen?",
    "P176": "Which company manufactures {}?", "P37": "What is the official language of {}?",
    "P19": "In which city was {} born?", "P140": "What is the religion of {}?",
    "P39": "What position did {} hold?", "P495": "In which country was {} created?",
    "P364": "What is the original language of {}?", "P641": "Which sport does {} play?",
    "P740": "In which city was {} founded?", "P276": "Where is {} located?",
    "P131": "In which region is {} located?", "P413": "Which position does {} play?",
    "P136": "What genre of music does {} play?", "P1303": "Which instrument does {} play?",
    "P463": "Which organization is {} a member of?", "P1412": "Which language does {} speak?",
    "P106": "What is the occupation of {}?", "P138": "Who is {} named after?",
    "P190": "Which city is twinned with {}?",
}
OPINIONS = ("My opinion of {} is that it is", "I think that {} is", "In my view, {} is", "People say that {} is")
SENTIMENTS = ("wonderful", "terrible")


def split_facts() -> tuple[list[dict], list[dict], list[dict]]:
    facts = json.loads(DATA.read_text())
    train = [f for f in facts if f["known_id"] % 5]
    test = [f for f in facts if f["known_id"] % 5 == 0]
    return facts, train, test


def _others(facts: list[dict]) -> dict[str, list[dict]]:
    by_rel: dict[str, list[dict]] = defaultdict(list)
    for f in facts:
        by_rel[f["relation_id"]].append(f)
    return by_rel


def counterfact_records(chosen: list[dict], facts: list[dict], seed: int) -> list[dict]:
    """kedit records: a counterfactual target of the same relation, paraphrases from the relation's
    other templates, two unrelated facts (other relations) for locality."""
    rng = random.Random(seed)
    by_rel = _others(facts)
    unrelated = [f for f in chosen]
    out = []
    for f in chosen:
        rel = by_rel[f["relation_id"]]
        targets = sorted({g["attribute"] for g in rel if g["attribute"] != f["attribute"]})
        templates = sorted({g["template"] for g in rel if g["template"] != f["template"]})
        if not targets:
            continue
        paraphrases = [t.replace("{}", f["subject"]) for t in rng.sample(templates, min(2, len(templates)))]
        loc = [g for g in rng.sample(unrelated, 6) if g["relation_id"] != f["relation_id"]][:2]
        out.append({"task": "counterfact", "prompt": f["template"], "subject": f["subject"],
                    "target_new": rng.choice(targets), "ground_truth": f["attribute"],
                    "rephrase_prompt": paraphrases,
                    "locality": {"Relation_Specificity": [{"prompt": g["prompt"], "ground_truth": g["attribute"]}
                                                          for g in loc]}})
    return out


def sentiment_records(chosen: list[dict], seed: int) -> list[dict]:
    rng = random.Random(seed + 1)
    out = []
    for f in chosen:
        first, *rest = OPINIONS
        loc = [g for g in rng.sample(chosen, 6) if g["subject"] != f["subject"]][:2]
        out.append({"task": "sentiment", "prompt": first, "subject": f["subject"],
                    "target_new": rng.choice(SENTIMENTS), "rephrase_prompt": [t.replace("{}", f["subject"])
                                                                              for t in rest[:2]],
                    "locality": {"Relation_Specificity": [{"prompt": g["prompt"], "ground_truth": g["attribute"]}
                                                          for g in loc]}})
    return out


def zsre_records(chosen: list[dict], facts: list[dict], seed: int) -> list[dict]:
    """The zsRE MEND file format: src, rephrase, alt, answers, loc, loc_ans."""
    rng = random.Random(seed + 2)
    by_rel = _others(facts)
    out = []
    for f in chosen:
        q = QUESTIONS.get(f["relation_id"])
        targets = sorted({g["attribute"] for g in by_rel[f["relation_id"]] if g["attribute"] != f["attribute"]})
        if q is None or not targets:
            continue
        other = rng.choice([g for g in chosen if g["relation_id"] != f["relation_id"]])
        out.append({"subject": f["subject"], "src": q.format(f["subject"]),
                    "rephrase": "Question: " + q.format(f["subject"]) + " Answer:",
                    "alt": rng.choice(targets), "answers": [f["attribute"]],
                    "loc": other["prompt"], "loc_ans": other["attribute"]})
    return out


def write(folder: Path, name: str, records: list[dict]) -> Path:
    path = folder / name
    path.write_text(json.dumps(records))
    return path


# ---------------------------------------------------------------------------------------------


def evaluate_editor(model: Any, tok: Any, repo: Repository, method: str, editor_id: str,
                    requests: list[EditRequest], task: str | None) -> dict[str, Any]:
    """Each edit on the base alone: scores after the edit, the unedited scores, and latencies."""
    m = get_method(method)
    fields = {"editor": editor_id, **({"task": task} if task and method == "instructedit" else {})}
    hp = m.hparams_cls(**fields)
    load = editor_loader(repo)
    pairs = [list(r.locality) for r in requests]
    reference = metrics.locality_reference(model, tok, [p for ps in pairs for p in ps])
    # The user's view: greedy continuations of tokenizer(prompt), the unedited ones as locality reference.
    said = metrics.greedy_continuations(model, tok, [p for ps in pairs for p, _ in ps])
    # the unedited model's gen_locality is 1 by construction (its continuations are the reference)
    unedited_gen = {**_pooled([metrics.generation_scores(model, tok, [r]) for r in requests]), "gen_locality": 1.0}
    before_rel = metrics.reliability(model, tok, requests).value
    before_gen = metrics.generalization(model, tok, requests).value
    params = dict(model.named_parameters())
    rel, gen, loc, latency, ranks, rel_wrapped, by_generation = [], [], [], [], [], [], []
    k = 0
    for r, ps in zip(requests, pairs, strict=True):
        t0 = time.perf_counter()
        result = m.apply(model, tok, [r], hp, load_editor_fn=load)
        latency.append(time.perf_counter() - t0)
        saved = {n: params[n].detach().clone() for n in result.deltas}
        with torch.no_grad():
            for n, d in result.deltas.items():
                params[n].add_((d.a @ d.b).to(params[n].dtype))
                ranks.append(d.rank)
        rel.append(metrics.reliability(model, tok, [r]).value)
        if method == "instructedit":  # EasyEdit's protocol: the query carries the instruction too
            wrapped = dataclasses.replace(r, prompt=result.info["wrapped_prompts"][0])
            rel_wrapped.append(metrics.reliability(model, tok, [wrapped]).value)
        if r.paraphrases:
            gen.append(metrics.generalization(model, tok, [r]).value)
        if ps:
            loc.append(metrics.locality(model, tok, ps, reference[k:k + len(ps)]).value)
        by_generation.append(metrics.generation_scores(model, tok, [r], ps, said[k:k + len(ps)]))
        k += len(ps)
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)
    mean = lambda xs: round(float(sum(xs) / len(xs)), 4) if xs else None  # noqa: E731
    return {"n": len(requests), "reliability": mean(rel), "generalization": mean(gen), "locality": mean(loc),
            "unedited_reliability": round(before_rel, 4), "unedited_generalization": round(before_gen, 4),
            **_pooled(by_generation), **{f"unedited_{k}": v for k, v in unedited_gen.items()},
            "latency_median_s": round(statistics.median(latency), 3),
            "latency_p90_s": round(sorted(latency)[int(0.9 * (len(latency) - 1))], 3),
            "rank_median": statistics.median(ranks) if ranks else 0,
            **({"reliability_instruction_in_query": mean(rel_wrapped)} if rel_wrapped else {})}


def _pooled(per_request: list[list[Any]]) -> dict[str, float]:
    """Each gen_* metric averaged over its prompts (a request with no paraphrase adds none)."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for scores in per_request:
        for m in scores:
            sums[m.name][0] += m.value * m.n
            sums[m.name][1] += m.n
    return {name: round(total / n, 4) for name, (total, n) in sums.items() if n}


def requests_of(records: list[dict]) -> list[EditRequest]:
    from kedit.edit.requests import record_to_request

    return [record_to_request(r) for r in records]


def make_repo(folder: Path) -> Repository:
    """The repository in `folder` (kept with --workdir: a second run re-uses its finished editors)."""
    if (folder / "work" / ".kedit").exists():
        return Repository.open(folder / "work")
    default_model_folder(CACHE_DIR)
    return Repository.init(folder / "work", str(CACHE_DIR), copy=False, progress=False)


def train(repo: Repository, method: str, data: list[Path], minutes: float, sets: dict[str, str]) -> Any:
    overrides = {"max_minutes": str(minutes), **sets}
    t0 = time.perf_counter()
    info = train_editor(repo, TrainOptions(method=method, data=data, overrides=overrides, device="cpu",
                                           progress=False))
    log.info("%s editor %s trained in %.0f s: %s", method, info.short, time.perf_counter() - t0,
             {k: v for k, v in info.metrics.items() if k != "history"})
    return info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["single", "multi"])
    ap.add_argument("--minutes", type=float, default=60.0, help="training time per editor")
    ap.add_argument("--n-test", type=int, default=0, help="test edits per task (0: all)")
    ap.add_argument("--set", action="append", default=[], help="training hyper-parameter key=value")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep the repository here (default: a temp folder)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    sets = dict(s.split("=", 1) for s in args.set)
    facts, train_facts, test_facts = split_facts()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kedit-mend-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    repo = make_repo(work)
    model, tok = load_smollm2()
    started = time.time()
    out: dict[str, Any] = {"mode": args.mode, "minutes_per_editor": args.minutes, "settings": sets,
                           "n_train_facts": len(train_facts), "n_test_facts": len(test_facts),
                           "torch_threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()}
    cut = (lambda xs: xs[: args.n_test]) if args.n_test else (lambda xs: xs)
    cf_test = cut(counterfact_records(test_facts, facts, args.seed))
    if args.mode == "single":
        data = write(work, "counterfact_train.json", counterfact_records(train_facts, facts, args.seed))
        info = train(repo, "mend", [data], args.minutes, sets)
        out["editor"] = {"id": info.id, "metrics": info.metrics, "hparams": info.hparams, "bytes": info.size}
        out["test"] = {"counterfact": evaluate_editor(model, tok, repo, "mend", info.id, requests_of(cf_test), None)}
    else:
        data = [write(work, "counterfact_train.json", counterfact_records(train_facts, facts, args.seed)),
                write(work, "sentiment_train.json", sentiment_records(train_facts, args.seed))]
        tests = {"counterfact": requests_of(cf_test),
                 "sentiment": requests_of(cut(sentiment_records(test_facts, args.seed))),
                 "zsre (held out)": requests_of(cut(zsre_records(test_facts, facts, args.seed)))}
        out["test"] = {}
        for method in ("instructedit", "mend"):
            info = train(repo, method, data, args.minutes, sets)
            out[f"editor_{method}"] = {"id": info.id, "metrics": info.metrics, "bytes": info.size}
            out["test"][method] = {
                task: evaluate_editor(model, tok, repo, method, info.id, reqs, task.split()[0])
                for task, reqs in tests.items()}
    out["wall_s"] = round(time.time() - started, 1)
    out["load_avg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    Path(args.out).with_suffix(".md").write_text(report(out, " ".join(sys.argv[1:])))
    print(json.dumps(out["test"], indent=2))


def report(out: dict[str, Any], argv: str) -> str:
    """The markdown table of a run."""
    lines = [f"# bench/mend_known.py {argv}", "",
             f"SmolLM2-135M-Instruct, {out['torch_threads']} torch threads, load average "
             f"{out['load_avg_start'][0]:.1f} at start, {out['load_avg_end'][0]:.1f} at the end; "
             f"{out['n_train_facts']} training facts (known_id % 5 != 0), {out['n_test_facts']} test facts "
             "(known_id % 5 == 0). gen_*: greedy 10-token continuation of `tokenizer(prompt)` contains the new "
             "target (locality: holds the true answer or the unedited continuation); the others: EasyEdit's "
             "teacher-forced protocols on the same encoding. Each edit applied to the base alone.", "",
             "| editor | test set | n | gen efficacy (unedited) | gen paraphrase | gen locality "
             "| reliability | generalization | locality | unedited rel. "
             "| latency median / p90 | reliability, instruction in the query |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tests = out["test"]
    rows = [("mend", t, r) for t, r in tests.items()] if out["mode"] == "single" else \
        [(m, t, r) for m, per in tests.items() for t, r in per.items()]
    for method, task, r in rows:
        in_query = f"{r['reliability_instruction_in_query']:.3f}" if "reliability_instruction_in_query" in r else ""
        gen = (f"{r['gen_efficacy']:.3f} ({r['unedited_gen_efficacy']:.3f}) | {r.get('gen_paraphrase', 0):.3f} | "
               f"{r.get('gen_locality', 0):.3f}") if "gen_efficacy" in r else " | | "
        lines.append(f"| {method} | {task} | {r['n']} | {gen} | {r['reliability']:.3f} | {r['generalization']:.3f} | "
                     f"{r['locality']:.3f} | {r['unedited_reliability']:.3f} | "
                     f"{r['latency_median_s']:.3f} s / {r['latency_p90_s']:.3f} s | {in_query} |")
    lines += ["", "Training (validation on held-out training records, single edits):", ""]
    for key in [k for k in out if k.startswith("editor")]:
        m = out[key]["metrics"]
        lines.append(f"- {key}: {m['steps']} steps in {m['train_seconds']} s, stopped by {m['stopped']}, best at "
                     f"step {m['best_step']}: val reliability {m['val_reliability']:.3f}, generalization "
                     f"{m['val_generalization']:.3f}, locality {m['val_locality']:.3f}; "
                     f"{out[key]['bytes'] / 1e6:.1f} MB stored")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
