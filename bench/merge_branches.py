"""Two branches of ROME edits on SmolLM2-135M merged with each strategy, through the repository.

Usage: python bench/merge_branches.py --n 10 --out bench/results/merge_branches.json

From the base, branch `a` gets n CounterFact-style counterfactual edits and branch `b` n others
(different facts; `kedit edit` one commit per request, covariance statistics from --stats-texts
self-generated texts, computed once beforehand and timed apart). Then `a` is merged with `b`:
  compose  Repository.merge: the merge base plus both sides' stored deltas (no model);
  replay   kedit.edit.replay.merge: b's requests re-run with their recorded method on a's model.
For each branch alone and each merge, on a's facts, b's facts and all 2n: CounterFact efficacy /
paraphrase / neighbourhood (P(new) > P(true), ROME's NLL-margin protocol), teacher-forced
reliability, and gen_efficacy (the new target within 10 greedy tokens after tokenizer(prompt));
the time of each merge; and, before merging, the key overlap ‖Δa·K_b‖/‖Δb·K_b‖ of every cross pair
(the compose merge's conflict test, τ = 0.3). Last, two branches that set one fact to two targets:
the conflict report `kedit merge` prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import CACHE_DIR, counterfact_requests
from kedit.methods.base import get_method
from kedit.methods.hparams import hparams_from_overrides

from kedit.core.conflicts import DEFAULT_THRESHOLD, overlap
from kedit.core.errors import MergeConflictError
from kedit.core.materialize import load_step
from kedit.core.repo import Repository
from kedit.core.sources import default_model_folder
from kedit.edit.replay import merge as merge_with_model
from kedit.edit.run import EditOptions, run_edits
from kedit.edit.stats import StatsProvider
from kedit.eval.measure import measure
from kedit.eval.metrics import shows_in_generation
from kedit.model.arch import arch_for
from kedit.model.load import load_revision

log = logging.getLogger("bench")
KEPT = ("efficacy", "paraphrase", "neighbourhood", "reliability", "gen_efficacy")


def scores(repo: Repository, commit: str, groups: dict[str, list]) -> dict[str, dict]:
    """Each group's scores at `commit`, and under "shown" the subjects whose new target shows in generation."""
    model, tok = load_revision(repo, commit)
    out: dict[str, dict] = {}
    for name, requests in groups.items():
        found = measure(model, tok, requests, None, generation=True)
        out[name] = {s.name: round(s.value, 4) for s in found if s.name in KEPT}
    every = {r.subject: r for requests in groups.values() for r in requests}.values()
    seen = shows_in_generation(model, tok, [r.text for r in every], [r.target_new for r in every])
    out["shown"] = sorted(r.subject for r, ok in zip(every, seen, strict=True) if ok)
    return out


def cli_merge(repo: Repository, *args: str) -> dict:
    """`kedit merge ARGS` as a user runs it: exit status, its report, and whether HEAD stayed where it was."""
    head = repo.head()
    run = subprocess.run([sys.executable, "-m", "kedit.cli", "merge", *args], cwd=repo.root,
                         capture_output=True, text=True)
    after = repo.head()
    return {"command": "kedit merge " + " ".join(args), "exit": run.returncode,
            "output": (run.stdout + run.stderr).strip(), "head_unchanged": head == after}


def cross_overlaps(repo: Repository, side_a: list[str], side_b: list[str]) -> list[float]:
    """max(‖Δa·K_b‖/‖Δb·K_b‖, the reverse) of every pair of edits of one tensor across the sides."""
    def deltas(commits: list[str]) -> list[tuple[str, object]]:
        return [(ch.name, load_step(repo.store, s)) for c in commits for ch in repo.changes(c)
                for s in ch.steps if s.origin == c]

    return [round(max(overlap(da, db), overlap(db, da)), 4)
            for na, da in deltas(side_a) for nb, db in deltas(side_b) if na == nb]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10, help="edits per branch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats-texts", type=int, default=64)
    ap.add_argument("--out", default="bench/results/merge_branches.json")
    ap.add_argument("--work", default=None, help="where the repository goes (default: a temp folder)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    work = Path(args.work or tempfile.mkdtemp(prefix="kedit-merge-bench-"))
    default_model_folder(CACHE_DIR)
    repo = Repository.init(work, str(CACHE_DIR), progress=False)
    base = repo.head()
    requests = counterfact_requests(2 * args.n, seed=args.seed)
    side = {"a": requests[:args.n], "b": requests[args.n:]}
    options = EditOptions(method="rome", measure=False, stats_samples=args.stats_texts)
    report: dict = {"model": "SmolLM2-135M-Instruct (float32, CPU)", "n_per_branch": args.n, "seed": args.seed,
                    "stats_texts": args.stats_texts, "threads": os.environ.get("OMP_NUM_THREADS"),
                    "subjects": {k: [r.subject for r in v] for k, v in side.items()}}

    t0 = time.perf_counter()
    model, tok = load_revision(repo, base)
    hp = hparams_from_overrides(get_method("rome").hparams_cls, model, {"mom2_n_samples": str(args.stats_texts)})
    StatsProvider(repo, hp, (model, tok), base)(arch_for(model).out_proj(hp.layer), hp.layer)
    report["stats_s"] = round(time.perf_counter() - t0, 1)
    del model

    edits: dict[str, list[str]] = {}
    for branch in ("a", "b"):
        repo.create_branch(branch, base)
        repo.checkout(branch)
        t0 = time.perf_counter()
        edits[branch] = [c.id for c in run_edits(repo, side[branch], options)]
        report[f"edit_{branch}_s"] = round(time.perf_counter() - t0, 1)
        report[f"shows_{branch}"] = sum(bool(repo.get_commit(c).info.get("shows_in_generation")) for c in edits[branch])
    pairs = cross_overlaps(repo, edits["a"], edits["b"])
    report["cross_overlap"] = {"pairs": len(pairs), "max": max(pairs), "median": statistics.median(pairs),
                               "above_threshold": sum(p > DEFAULT_THRESHOLD for p in pairs)}
    log.info("cross-pair key overlaps: %s", report["cross_overlap"])

    merged: dict[str, str] = {}
    for strategy in ("compose", "replay"):
        repo.checkout("a")
        repo.create_branch(f"m-{strategy}", "a")
        repo.checkout(f"m-{strategy}")
        t0 = time.perf_counter()
        try:
            outcome = merge_with_model(repo, "b", strategy=strategy, options=options)
        except MergeConflictError as e:
            report[f"merge_{strategy}_conflicts"] = [c.to_dict() for c in e.conflicts]
            log.info("%s merge stopped on %d conflicts; again with --take ours", strategy, len(e.conflicts))
            t0 = time.perf_counter()
            outcome = merge_with_model(repo, "b", strategy=strategy, options=options, take="ours")
        report[f"merge_{strategy}"] = {"seconds": round(time.perf_counter() - t0, 2), "commit": outcome.result.head,
                                       "tensors": outcome.result.tensors,
                                       "replayed": sum(len(v) for v in outcome.replayed.values())}
        merged[strategy] = outcome.result.head

    groups = {"a facts": side["a"], "b facts": side["b"], "all": requests}
    states = {"unedited": base, "branch a alone": repo.resolve("a"), "branch b alone": repo.resolve("b"),
              **{f"merge ({s})": c for s, c in merged.items()}}
    report["scores"] = {label: scores(repo, commit, groups) for label, commit in states.items()}
    Path(args.out).write_text(json.dumps(report, indent=1))  # what was measured so far

    # One fact set to two targets on two branches: the conflict report.
    fact = side["a"][0]
    other = side["b"][0].target_new if side["b"][0].target_new != fact.target_new else side["b"][1].target_new
    for branch, target in (("c1", fact.target_new), ("c2", other)):
        repo.create_branch(branch, base)
        repo.checkout(branch)
        run_edits(repo, [dataclasses.replace(fact, target_new=target)], options)
    same: dict = {"fact": fact.text, "targets": {"c1 (ours)": fact.target_new, "c2 (theirs)": other}}
    repo.checkout("c1")
    same["no_take"] = cli_merge(repo, "c2")
    for take in ("ours", "theirs"):
        repo.create_branch(f"take-{take}", "c1")
        repo.checkout(f"take-{take}")
        same[f"take_{take}"] = cli_merge(repo, "c2", "--take", take)
        model, tok = load_revision(repo, repo.head())
        same[f"take_{take}"]["shows"] = {t: shows_in_generation(model, tok, [fact.text], [t])[0]
                                         for t in (fact.target_new, other)}
        del model
    report["same_fact"] = same
    Path(args.out).write_text(json.dumps(report, indent=1))
    _markdown(report, Path(args.out).with_suffix(".md"))


def _markdown(report: dict, path: Path) -> None:
    lines = [f"Two branches of {report['n_per_branch']} ROME counterfactual edits each on SmolLM2-135M "
             f"(float32, CPU, {report['threads']} thread(s)), C from {report['stats_texts']} self-generated "
             f"texts ({report['stats_s']} s, once); branch a edits {report['edit_a_s']} s, b {report['edit_b_s']} s; "
             f"edits that show in generation: a {report['shows_a']}, b {report['shows_b']}", "",
             f"cross-branch key overlap (compose's conflict test, τ = {DEFAULT_THRESHOLD}): {report['cross_overlap']}",
             ""]
    for strategy in ("compose", "replay"):
        lines.append(f"merge ({strategy}): {report.get(f'merge_{strategy}')}")
    for strategy in ("compose", "replay"):
        if f"merge_{strategy}_conflicts" in report:
            lines.append(f"{strategy} conflicts before --take ours: "
                         + "; ".join(c["what"] for c in report[f"merge_{strategy}_conflicts"]))
    lines += ["", "| state | facts | efficacy | paraphrase | neighbourhood | reliability | gen_efficacy |",
              "|---|---|---|---|---|---|---|"]
    for state, by_group in report["scores"].items():
        for group, s in by_group.items():
            if group == "shown":
                continue
            lines.append(f"| {state} | {group} | " + " | ".join(
                f"{100 * s[k]:.1f}%" if k in s else "-" for k in KEPT) + " |")
    lines += ["", "| state | subjects whose new target shows in generation |", "|---|---|"]
    lines += [f"| {state} | {len(g['shown'])}: {', '.join(g['shown'])} |" for state, g in report["scores"].items()]
    lines += ["", f"same fact, two targets: {json.dumps(report.get('same_fact'), indent=1)}"]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
