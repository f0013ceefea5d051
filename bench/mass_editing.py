"""MEMIT, AlphaEdit, FT-L and ROME on SmolLM2-135M with CounterFact-style edits from known_dev.json.

Three experiments (issue 4), each written to bench/results/<name>.json and .md:

  batch       N facts in one edit (memit | alphaedit | ft), or ROME applied one fact after another
              to the same facts; efficacy / paraphrase / neighbourhood (ROME's NLL-margin
              protocol), fluency, wall time and peak memory, next to the unedited model.
              Run one method per process so that peak memory is the method's own.
  speedup     MEMIT's value optimisation with all requests in one batch per step against one
              request at a time (the peers' way), same requests and settings.
  sequential  N facts in batches of B through the product path (a kedit repository, one branch
              per method, `kedit.edit.run.run_edits`, so AlphaEdit's earlier keys come from the
              repository's history); after each batch every fact edited so far is scored. Then the
              batch in the middle is reverted: the state must equal the history without it, hash
              for hash, and `kedit check` reports what the revert did to the other edits.
  plot        the curves of `sequential` as a PNG (needs the `bench` extra: matplotlib).

    python bench/mass_editing.py batch --method memit --n 100
    python bench/mass_editing.py sequential --methods memit,alphaedit --n 500 --batch 50
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kedit.methods import memit
from kedit.methods.base import EditRequest, get_method
from kedit.methods.stats import GeneratedSource, StatsCache, cached_second_moment

from bench._common import (
    CACHE_DIR,
    counterfact_requests,
    drop_edited_neighbours,
    load_smollm2,
    split_neighbourhood,
)
from kedit.core import history
from kedit.core.delta import apply_step
from kedit.core.materialize import load_step
from kedit.core.repo import Repository
from kedit.core.tensors import hash_tensor
from kedit.edit.run import EditOptions, run_edits
from kedit.eval import metrics
from kedit.eval.probes import check
from kedit.model.load import load_revision

log = logging.getLogger("bench.mass_editing")
RESULTS = Path("bench/results")
STATS_DIR = Path("/tmp/kedit-work/stats")
BASE_HASH = "smollm2-135m-instruct-q4_1"
STATS_TEXTS = 256
SCORED_NEIGHBOURS = "about subjects that no edit of the run touches"


def rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def edits_and_scored(n: int, edit_neighbours: int) -> tuple[list[EditRequest], list[EditRequest]]:
    """(the edits as made, the same facts as scored): neighbours split off for the edits, and only
    neighbours about subjects that no edit of the run touches scored (bench._common explains why)."""
    given, scored = split_neighbourhood(counterfact_requests(n), edit_neighbours)
    return given, drop_edited_neighbours(scored, {r.subject for r in scored})


def chunks(requests: list[EditRequest], size: int) -> list[list[EditRequest]]:
    return [requests[i : i + size] for i in range(0, len(requests), size)]


def score(model: Any, tok: Any, requests: list[EditRequest], fluency_n: int = 0) -> dict[str, float]:
    cf = metrics.counterfact_scores(model, tok, requests)
    out = {k: round(m.value, 4) for k, m in cf.items()}
    if fluency_n:
        out["fluency"] = fluency(model, tok, requests, fluency_n)
    return out


def neighbour_pairs(requests: list[EditRequest]) -> list[tuple[str, str]]:
    return [(p, r.target_true) for r in requests for p in r.neighbourhood]


def gen_score(model: Any, tok: Any, requests: list[EditRequest], reference: list[str] | None) -> dict[str, float]:
    """What a user reads: gen_efficacy / gen_paraphrase / gen_locality (kedit.eval.metrics.generation_scores,
    greedy continuations of `tokenizer(prompt)`), against the unedited model's continuations (`reference`;
    None for the unedited model itself, whose locality is 1 by construction)."""
    if reference is None:
        scores = metrics.generation_scores(model, tok, requests)
        return {**{m.name: round(m.value, 4) for m in scores}, "gen_locality": 1.0}
    scores = metrics.generation_scores(model, tok, requests, neighbour_pairs(requests), reference)
    return {m.name: round(m.value, 4) for m in scores}


def fluency(model: Any, tok: Any, requests: list[EditRequest], n: int) -> float:
    return round(metrics.fluency(model, tok, [r.text for r in requests[:n]], 20).value, 4)


def stats_for(model: Any, tok: Any, modules: dict[int, str]) -> dict[int, torch.Tensor]:
    """C for each {layer: module name}, from one set of self-generated texts, cached on disk."""
    source = GeneratedSource(model, tok, n_texts=STATS_TEXTS, max_new_tokens=32, batch_size=128)
    return {layer: cached_second_moment(model, tok, layer, name, source, n_samples=STATS_TEXTS,
                                        cache=StatsCache(STATS_DIR), base_hash=BASE_HASH)
            for layer, name in modules.items()}


def layer_modules(hp: Any) -> dict[int, str]:
    return {layer: hp.module_name(layer) for layer in hp.layers}


def hparams_for(method: str, model: Any, overrides: dict[str, Any]) -> Any:
    hp = get_method(method).hparams_cls.for_model(model)
    return dataclasses.replace(hp, **overrides) if overrides else hp


def apply_deltas(model: Any, deltas: dict[str, Any]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].copy_(apply_step(params[name].detach(), delta))


# ------------------------------------------------------------------------------------------- batch


def run_batch(args: argparse.Namespace) -> dict[str, Any]:
    model, tok = load_smollm2()
    given, requests = edits_and_scored(args.n, args.edit_neighbours)
    unedited = score(model, tok, requests, fluency_n=args.fluency_n)
    reference = metrics.greedy_continuations(model, tok, [p for p, _ in neighbour_pairs(requests)])
    unedited |= gen_score(model, tok, requests, None)
    overrides = json.loads(args.hp) if args.hp else {}
    hp = hparams_for(args.method, model, overrides)
    kwargs: dict[str, Any] = {}
    if args.method in ("memit", "alphaedit"):
        kwargs["second_moments_by_layer"] = stats_for(model, tok, layer_modules(hp))
    rss_before = rss_mb()
    t0 = time.perf_counter()
    infos = []
    if args.method == "rome":  # one fact after another, each on top of the last
        from kedit.methods import rome

        c = stats_for(model, tok, {hp.layer: hp.module_name})
        for r in given:
            result = rome.apply(model, tok, [r], hp, second_moment=c[hp.layer])
            apply_deltas(model, result.deltas)
            infos.append(result.info["requests"][0]["update_norm"])
    else:
        result = get_method(args.method).apply(model, tok, given, hp, **kwargs)
        apply_deltas(model, result.deltas)
        infos.append(result.info)
    wall = time.perf_counter() - t0
    edited = score(model, tok, requests, fluency_n=args.fluency_n) | gen_score(model, tok, requests, reference)
    return {
        "experiment": "batch", "method": args.method, "n": len(requests), "edit_neighbours": args.edit_neighbours,
        "scored_neighbours": SCORED_NEIGHBOURS,
        "hparams": dataclasses.asdict(hp),
        "unedited": unedited, "edited": edited, "wall_s": round(wall, 1),
        "peak_rss_mb": round(rss_mb(), 1), "rss_before_edit_mb": round(rss_before, 1),
        "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "info": infos[0] if args.method != "rome" else {"update_norms": infos},
    }


# ----------------------------------------------------------------------------------------- speedup


def run_speedup(args: argparse.Namespace) -> dict[str, Any]:
    model, tok = load_smollm2()
    requests = counterfact_requests(args.n)
    hp = hparams_for("memit", model, {})
    cs = stats_for(model, tok, layer_modules(hp))
    rows = {}
    for label, chunk in (("one at a time (v_batch_size=1)", 1), (f"batched (v_batch_size={args.n})", args.n)):
        t0 = time.perf_counter()
        result = memit.apply(model, tok, requests, dataclasses.replace(hp, v_batch_size=chunk),
                             second_moments_by_layer=cs)
        rows[label] = {"total_s": round(time.perf_counter() - t0, 1), "values_s": result.info["timings"]["values_s"],
                       "mean_steps": statistics.mean(r["steps"] for r in result.info["requests"])}
        log.info("%s: %s", label, rows[label])
    return {"experiment": "speedup", "n": len(requests), "rows": rows, "load_average": os.getloadavg()}


# -------------------------------------------------------------------------------------- sequential


def run_sequential(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.workdir)
    repo_dir = work / "repo"
    if not (repo_dir / ".kedit").exists():
        work.mkdir(parents=True, exist_ok=True)
        Repository.init(repo_dir, str(CACHE_DIR), progress=False)
    repo = Repository.open(repo_dir)
    base = history.ancestors(repo.db, repo.head())[-1]
    given, requests = edits_and_scored(args.n, args.edit_neighbours)
    batches, given_batches = chunks(requests, args.batch), chunks(given, args.batch)
    unedited_model = model, tok = load_revision(repo, base)
    out: dict[str, Any] = {"experiment": "sequential", "n": len(requests), "batch": args.batch,
                           "edit_neighbours": args.edit_neighbours, "scored_neighbours": SCORED_NEIGHBOURS,
                           "methods": {}}
    path = RESULTS / f"{args.name}.json"
    partial: dict[str, Any] = {}
    previous = json.loads(path.read_text()) if path.exists() else {}
    if all(previous.get(k) == out[k] for k in ("n", "batch", "edit_neighbours")):
        # resume: keep the methods measured in full, the curves of those stopped early, the unedited scores
        out["methods"] = {k: m for k, m in previous["methods"].items() if "final" in m}
        partial = {k: m for k, m in previous["methods"].items() if "final" not in m}
        out["unedited"] = previous["unedited"]
    else:
        out["unedited"] = score(model, tok, requests, fluency_n=args.fluency_n)
    for method in args.methods.split(","):
        if method in out["methods"]:
            continue
        branch = f"seq-{method}"
        if branch not in repo.refs.branches():
            repo.create_branch(branch, base)
        repo.checkout(branch)
        commits_per_batch = commits_so_far(repo, base, given_batches)
        curve = list(partial.get(method, {}).get("curve", []))[: len(commits_per_batch)]
        if commits_per_batch:
            log.info("%s: resuming after %d batches already on %s", method, len(commits_per_batch), branch)
        t_start = time.perf_counter()
        for b, batch in enumerate(given_batches):
            if b < len(commits_per_batch) and len(curve) > b:
                continue  # committed and scored by an earlier run
            t0 = time.perf_counter()
            if b < len(commits_per_batch):  # committed (perhaps in part) by an earlier run
                rest = batch[sum(len(repo.get_commit(c).requests) for c in commits_per_batch[b]):]
            else:
                commits_per_batch.append([])
                rest = batch
            made = run_edits(repo, rest, EditOptions(method=method, measure=False, stats_samples=STATS_TEXTS)) \
                if rest else []
            edit_s = time.perf_counter() - t0
            commits_per_batch[b] += [c.id for c in made]
            model, tok = load_revision(repo, commits_per_batch[b][-1])
            done = [r for bt in batches[: b + 1] for r in bt]
            point = {"batch": b + 1, "facts": len(done), "edit_s": round(edit_s, 1) if rest else None,
                     **score(model, tok, done)}
            point["neighbourhood_unedited"], point["neighbourhood_prompts"] = neighbourhood_of(*unedited_model, done)
            if len(rest) < len(batch):
                point["resumed"] = f"{len(batch) - len(rest)} of its edits were made by an earlier run"
            curve.append(point)
            log.info("%s batch %d: %s", method, b + 1, point)
            _save_method(out, path, args.name, method, {"curve": curve, "stopped_after_batch": b + 1})
        model, tok = load_revision(repo, "HEAD")
        final = {k: curve[-1][k] for k in ("efficacy", "paraphrase", "neighbourhood")}  # the last batch: all facts
        if args.fluency_n:
            final["fluency"] = fluency(model, tok, requests, args.fluency_n)
        result: dict[str, Any] = {"curve": curve, "final": final,
                                  "total_edit_s": total_edit_s(curve),
                                  "wall_s": round(time.perf_counter() - t_start, 1)}
        if len(commits_per_batch[0]) == 1 and len(batches) > 2:
            result["revert"] = revert_middle(repo, commits_per_batch, batches, requests)
        _save_method(out, path, args.name, method, result)
    return out


def commits_so_far(repo: Repository, base: str, given_batches: list[list[EditRequest]]) -> list[list[str]]:
    """The commits an earlier run made on the checked-out branch, grouped by batch (the last may be partial).

    The repository is the run's state, so a run stopped by the clock goes on from its history; each
    commit's recorded requests must be the next ones of the sequence, or the branch is not this run's.
    """
    ids = list(reversed(history.ancestors(repo.db, repo.head())))
    ids = [c for c in ids[ids.index(base) + 1:] if repo.get_commit(c).kind == "edit"]  # not a revert at the end
    expected = iter(r.to_dict() for batch in given_batches for r in batch)
    grouped: list[list[str]] = []
    sizes = iter(len(batch) for batch in given_batches)
    room = 0
    for cid in ids:
        requests = repo.get_commit(cid).requests
        for recorded in requests:
            want = next(expected)
            if (recorded["subject"], recorded["target_new"]) != (want["subject"], want["target_new"]):
                raise SystemExit(f"branch {repo.head_branch()} holds {recorded['subject']!r} where this run "
                                 f"edits {want['subject']!r}: use a fresh --workdir")
        if room == 0:
            grouped.append([])
            room = next(sizes)
        grouped[-1].append(cid)
        room -= len(requests)
    return grouped


def run_rescore(args: argparse.Namespace) -> None:
    """Score a sequential run's neighbourhood again from its repository, where every batch is a commit.

    For runs made before the bench scored only neighbours about unedited subjects; efficacy and
    paraphrase do not depend on that and are kept.
    """
    repo = Repository.open(Path(args.workdir) / "repo")
    path = RESULTS / f"{args.name}.json"
    out = json.loads(path.read_text())
    given, requests = edits_and_scored(out["n"], out["edit_neighbours"])
    batches, given_batches = chunks(requests, out["batch"]), chunks(given, out["batch"])
    repo.checkout(f"seq-{args.method}")
    base = history.ancestors(repo.db, repo.head())[-1]
    commits = commits_so_far(repo, base, given_batches)
    m = out["methods"][args.method]
    unedited_model = load_revision(repo, base)

    def neighbourhood(rev: str, facts: list[EditRequest]) -> float:
        return neighbourhood_of(*load_revision(repo, rev), facts)[0]

    unedited = neighbourhood_of(*unedited_model, requests)[0]
    for point in m["curve"]:
        done = [r for bt in batches[: point["batch"]] for r in bt]
        point["neighbourhood"] = neighbourhood(commits[point["batch"] - 1][-1], done)
        point["neighbourhood_unedited"], point["neighbourhood_prompts"] = neighbourhood_of(*unedited_model, done)
        log.info("%s batch %d: neighbourhood %.4f", args.method, point["batch"], point["neighbourhood"])
    if "final" in m:
        m["final"]["neighbourhood"] = m["curve"][-1]["neighbourhood"]
    if "revert" in m:
        rv = m["revert"]
        middle = rv["reverted_batch"] - 1
        kept = [r for i, bt in enumerate(batches) if i != middle for r in bt]
        rv["after_revert_on_remaining"]["neighbourhood"] = neighbourhood(rv["revert_commit"], kept)
        rv["after_revert_on_reverted"]["neighbourhood"] = neighbourhood(rv["revert_commit"], batches[middle])
        first_s = rv["check"].get("first_run_seconds", rv["check"]["seconds"])  # scoring the probes, not reading them
        rv["check"] = check_summary(repo, rv["revert_commit"]) | {"first_run_seconds": first_s}
    m["rescored"] = "neighbourhood again from the repository's commits, on prompts about unedited subjects"
    out = json.loads(path.read_text()) | {"unedited": {**out["unedited"], "neighbourhood": unedited},
                                          "scored_neighbours": SCORED_NEIGHBOURS}
    out["methods"][args.method] = m
    write(out, args.name, markdown_sequential(out))


def neighbourhood_of(model: Any, tok: Any, facts: list[EditRequest]) -> tuple[float, int]:
    """(neighbourhood score, number of neighbour prompts scored)."""
    m = metrics.counterfact_scores(model, tok, facts, which=("neighbourhood",))["neighbourhood"]
    return round(m.value, 4), m.n


def total_edit_s(curve: list[dict[str, Any]]) -> float:
    """Edit time summed over the batches whose time is known (a batch an earlier run made has none)."""
    return round(sum(p["edit_s"] or 0 for p in curve), 1)


def _save_method(out: dict[str, Any], path: Path, name: str, method: str, result: dict[str, Any]) -> None:
    """Write `method`'s result (partial while it runs), keeping what other processes wrote meanwhile."""
    out["methods"][method] = result
    out["load_average"] = os.getloadavg()
    if path.exists():  # another process may have added its methods (--workdir apart)
        out["methods"] = {**json.loads(path.read_text()).get("methods", {}), method: result}
    write(out, name, markdown_sequential(out))


def revert_middle(repo: Repository, commits_per_batch: list[list[str]], batches: list[list[EditRequest]],
                  requests: list[EditRequest]) -> dict[str, Any]:
    """Revert the middle batch; compare with an independent fold of the other batches' deltas."""
    middle = len(commits_per_batch) // 2
    target = commits_per_batch[middle][0]
    head_before = repo.head()
    reverted = repo.revert(target)
    # the oracle: the base, plus every other batch's stored steps in order, folded afresh
    base = history.ancestors(repo.db, head_before)[-1]
    names = sorted({c.name for ids in commits_per_batch for cid in ids for c in history.changes(repo.db, cid)})
    expected = {}
    for name in names:
        value = repo.materialize(base, names=[name])[name]
        for ids in commits_per_batch:
            if ids[0] == target:
                continue
            for step in history.change(repo.db, ids[0], name).steps if _changed(repo, ids[0], name) else ():
                value = apply_step(value, load_step(repo.store, step))
        expected[name] = hash_tensor(value)
    manifest = history.manifest(repo.db, reverted.id)
    equal = all(manifest[n].hash == expected[n] for n in names)
    model, tok = load_revision(repo, "HEAD")
    kept = [r for i, bt in enumerate(batches) if i != middle for r in bt]
    return {
        "reverted_batch": middle + 1, "reverted_commit": target, "revert_commit": reverted.id,
        "hashes_equal_to_history_without_it": equal, "tensors_compared": len(names),
        "check": check_summary(repo, reverted.id),
        "after_revert_on_remaining": score(model, tok, kept),
        "after_revert_on_reverted": score(model, tok, batches[middle]),
    }


def check_summary(repo: Repository, rev: str) -> dict[str, Any]:
    """`kedit check` at `rev`, in figures (probe outputs are kept per commit, so a second call is quick)."""
    t0 = time.perf_counter()
    report = check(repo, rev, lambda c: load_revision(repo, c))
    return {"broken": len(report.broken), "results": len(report.results), "summary": report.summary(),
            "broken_kinds": _count(p.probe.kind for p in report.broken),
            "locality_changed_with_their_subject": len(report.changed_by_edits),
            "seconds": round(time.perf_counter() - t0, 1)}


def _changed(repo: Repository, commit_id: str, name: str) -> bool:
    return repo.db.execute("SELECT 1 FROM tensor_changes WHERE commit_id = ? AND name = ?",
                           [commit_id, name]).fetchone() is not None


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


# ------------------------------------------------------------------------------------------ output


def write(result: dict[str, Any], name: str, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=1, default=str)), (".md", markdown)):
        path = RESULTS / f"{name}{suffix}"
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def _row(label: str, s: dict[str, float]) -> str:
    flu = f"{s['fluency']:.3f}" if "fluency" in s else ""
    return f"| {label} | {s['efficacy']:.1%} | {s['paraphrase']:.1%} | {s['neighbourhood']:.1%} | {flu} |"


def _gen_row(label: str, s: dict[str, float]) -> str:
    return f"| {label} | {s['gen_efficacy']:.1%} | {s['gen_paraphrase']:.1%} | {s['gen_locality']:.1%} |"


def markdown_batch(r: dict[str, Any]) -> str:
    head = "| | efficacy | paraphrase | neighbourhood | fluency (bits) |\n|---|---|---|---|---|"
    gen = []
    if "gen_efficacy" in r["edited"]:
        gen = ["The user's view: greedy continuation (10 tokens) of `tokenizer(prompt)` contains the new target; "
               "locality: holds the true answer or the unedited continuation.", "",
               "| | gen efficacy | gen paraphrase | gen locality |\n|---|---|---|---|",
               _gen_row("unedited", r["unedited"]), _gen_row(r["method"], r["edited"]), "",
               "CounterFact NLL margin (diagnostic), on `tokenizer(prompt)`:", ""]
    return "\n".join([
        f"# {r['method']} on SmolLM2-135M: {r['n']} CounterFact-style facts "
        + ("one after another" if r["method"] == "rome" else "in one edit"), "", *gen, head,
        _row("unedited", r["unedited"]), _row(r["method"], r["edited"]), "",
        f"Neighbourhood on the neighbours {r.get('scored_neighbours', 'given in the data')}.", "",
        f"wall time {r['wall_s']} s; peak RSS {r['peak_rss_mb']} MB (model loaded and statistics ready: "
        f"{r['rss_before_edit_mb']} MB); {r['threads']} threads; load average {r['load_average']}", ""])


def markdown_sequential(r: dict[str, Any]) -> str:
    lines = [f"# Sequential editing on SmolLM2-135M: {r['n']} facts in batches of {r['batch']}", "",
             "Scored after each batch on every fact edited so far (ROME's NLL-margin protocol); neighbourhood on "
             f"the neighbours {r.get('scored_neighbours', 'given in the data')}.", ""]
    u = r["unedited"]
    lines += ["| | efficacy | paraphrase | neighbourhood | fluency (bits) |", "|---|---|---|---|---|",
              _row("unedited (all facts)", u)]
    for method, m in r["methods"].items():
        if "final" in m:
            lines.append(_row(f"{method}, after all batches", m["final"]))
        else:
            lines.append(_row(f"{method}, stopped after batch {m['stopped_after_batch']}", m["curve"][-1]))
    for method, m in r["methods"].items():
        total = m.get("total_edit_s", total_edit_s(m["curve"]))
        lines += ["", f"## {method}: total edit time {total} s", "",
                  "| batch | facts | efficacy | paraphrase | neighbourhood (unedited, prompts) | edit s |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['batch']} | {p['facts']} | {p['efficacy']:.1%} | {p['paraphrase']:.1%} "
                  f"| {p['neighbourhood']:.1%}{_unedited_note(p)} | {p['edit_s'] or '(earlier run)'} |"
                  for p in m["curve"]]
        if "revert" in m:
            rv = m["revert"]
            lines += ["", f"Revert of batch {rv['reverted_batch']} ({rv['reverted_commit'][:12]}): state equal to the "
                      f"history without it, hash for hash, over {rv['tensors_compared']} tensors: "
                      f"**{rv['hashes_equal_to_history_without_it']}**. `kedit check` afterwards: "
                      f"{rv['check']['broken']} of {rv['check']['results']} probes flagged "
                      f"{rv['check']['broken_kinds']}, summary {rv['check']['summary']} "
                      f"({rv['check'].get('first_run_seconds', rv['check']['seconds'])} s); "
                      f"{rv['check'].get('locality_changed_with_their_subject', 0)} locality probes changed with an "
                      "edit of their own subject (not counted). "
                      f"Remaining facts: {rv['after_revert_on_remaining']}; reverted facts: "
                      f"{rv['after_revert_on_reverted']}."]
    return "\n".join(lines) + "\n"


def _unedited_note(point: dict[str, Any]) -> str:
    if "neighbourhood_unedited" not in point:
        return ""
    return f" ({point['neighbourhood_unedited']:.1%}, {point['neighbourhood_prompts']})"


def run_plot(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.loads((RESULTS / f"{args.name}.json").read_text())
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key in zip(axes, ("efficacy", "paraphrase", "neighbourhood"), strict=True):
        for method, m in r["methods"].items():
            ax.plot([p["facts"] for p in m["curve"]], [100 * p[key] for p in m["curve"]], marker="o", label=method)
        curve = next(iter(r["methods"].values()))["curve"]
        if key == "neighbourhood" and "neighbourhood_unedited" in curve[0]:  # the same prompts at each point
            ax.plot([p["facts"] for p in curve], [100 * p["neighbourhood_unedited"] for p in curve], color="grey",
                    linestyle="--", label="unedited")
        else:
            ax.axhline(100 * r["unedited"][key], color="grey", linestyle="--", label="unedited")
        ax.set_title(key)
        ax.set_xlabel("facts edited")
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("% of facts edited so far")
    axes[0].legend()
    fig.suptitle(f"SmolLM2-135M, {r['n']} CounterFact-style facts in batches of {r['batch']}")
    fig.tight_layout()
    out = RESULTS / f"{args.name}.png"
    fig.savefig(out, dpi=110)
    print(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="experiment", required=True)
    b = sub.add_parser("batch")
    b.add_argument("--method", choices=["memit", "alphaedit", "ft", "rome"], required=True)
    b.add_argument("--n", type=int, default=100)
    b.add_argument("--hp", default=None, help="hyper-parameter overrides as JSON")
    b.add_argument("--fluency-n", type=int, default=50)
    b.add_argument("--name", default=None)
    s = sub.add_parser("speedup")
    s.add_argument("--n", type=int, default=20)
    q = sub.add_parser("sequential")
    q.add_argument("--methods", default="memit,alphaedit,rome")
    q.add_argument("--n", type=int, default=500)
    q.add_argument("--batch", type=int, default=50)
    q.add_argument("--fluency-n", type=int, default=50)
    q.add_argument("--workdir", default="/tmp/kedit-work/sequential")
    q.add_argument("--name", default="sequential_500")
    for sp in (b, q):
        sp.add_argument("--edit-neighbours", type=int, default=5,
                        help="neighbourhood prompts given with each edit and not scored (0: none given, all scored)")
    r = sub.add_parser("rescore")
    r.add_argument("--method", required=True)
    r.add_argument("--workdir", required=True)
    r.add_argument("--name", default="sequential_500")
    p = sub.add_parser("plot")
    p.add_argument("--name", default="sequential_500")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(int(os.environ.get("KEDIT_BENCH_THREADS", "2")))
    if args.experiment == "batch":
        r = run_batch(args)
        write(r, args.name or f"{args.method}_batch_{args.n}", markdown_batch(r))
        print(markdown_batch(r))
    elif args.experiment == "speedup":
        r = run_speedup(args)
        md = "# MEMIT value optimisation: batched vs one request at a time\n\n" + "\n".join(
            f"- {k}: {v}" for k, v in r["rows"].items()) + f"\n\nload average {r['load_average']}\n"
        write(r, f"memit_speedup_{args.n}", md)
        print(md)
    elif args.experiment == "sequential":
        run_sequential(args)
    elif args.experiment == "rescore":
        run_rescore(args)
    else:
        run_plot(args)


if __name__ == "__main__":
    main()
