"""Behavioural diff, blame, bisect, `kedit ui` and `kedit report` on a real SmolLM2 history of
counterfactual facts (known_dev.json) committed in MEMIT batches through the repository API.

Each command is run as a user runs it (its own process) and timed. The bisection by metric is
checked against the metric measured at every commit of the history.

    python bench/behaviour_history.py --facts 100 --batch 10 --out bench/results/behaviour_history.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench._common import UNRELATED, counterfact_requests, drop_edited_neighbours
from kedit.core.sources import default_model_folder
from kedit.eval import metrics
from kedit.eval.measure import measure
from kedit.eval.probes import add_probes
from kedit.repository import Repository
from kedit.ui.server import make_server


def kedit(root: Path, *args: str, codes: tuple[int, ...] = (0,)) -> tuple[float, str]:
    """Run one kedit command as a user does; (its wall time in seconds, its stdout)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kedit.cli", "--repo", str(root), *args],
                          capture_output=True, text=True)
    if done.returncode not in codes:
        raise SystemExit(f"kedit {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return round(time.perf_counter() - start, 2), done.stdout


def request_record(r: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(r).items() if v}


def build(root: Path, requests: list[Any], batch: int, stats_samples: int, result: dict, save: Any) -> Repository:
    """The base, the probe suite, then one MEMIT commit per batch (each measured on its batch)."""
    start = time.perf_counter()
    repo = Repository.init(root, str(default_model_folder(Path("/tmp/kedit-smollm2-135m"))), copy=False,
                           progress=False)
    result["building_s"] = {"init": round(time.perf_counter() - start, 2)}
    add_probes(repo, [("locality", p, a, None) for p, a in UNRELATED])
    for i in range(0, len(requests), batch):
        start = time.perf_counter()
        repo.edit(requests[i:i + batch], method="memit", stats_samples=stats_samples,
                  message=f"MEMIT batch {i // batch + 1}: facts {i + 1}-{min(i + batch, len(requests))}")
        result["building_s"][f"batch {i // batch + 1}"] = round(time.perf_counter() - start, 2)
        save()
    return repo


def suite_value(repo: Repository, commit: str, suite: list[Any], name: str) -> float:
    model, tok = repo.load(commit)
    return next(s.value for s in measure(model, tok, suite, None, generation=False) if s.name == name)


def fetch(url: str) -> tuple[float, int]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=900) as response:
        body = response.read()
    return round(time.perf_counter() - start, 3), len(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/kedit-behaviour-history"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/behaviour_history.json"))
    parser.add_argument("--facts", type=int, default=100)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--stats-samples", type=int, default=64)
    parser.add_argument("--suite-every", type=int, default=5, help="Every k-th edited fact goes into the fixed suite.")
    parser.add_argument("--reuse", action="store_true", help="Keep the history already at --work.")
    args = parser.parse_args()

    requests = counterfact_requests(args.facts, seed=0)
    result: dict[str, Any] = {"facts": len(requests), "batch": args.batch, "stats_samples": args.stats_samples}

    def save() -> None:
        result["load_average"] = os.getloadavg()
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    if args.reuse and (args.work / ".kedit").exists():
        repo = Repository.open(args.work)
        result["building_s"] = json.loads(args.out.read_text()).get("building_s", {}) if args.out.exists() else {}
    else:
        shutil.rmtree(args.work, ignore_errors=True)
        args.work.mkdir(parents=True)
        repo = build(args.work, requests, args.batch, args.stats_samples, result, save)
    line = list(reversed([c.id for c in repo.log()]))  # oldest first: the base, then one commit per batch
    base, head = line[0], line[-1]
    result["commits"] = len(line)
    save()

    # the fixed suite: every k-th edited fact, scored on neighbours about subjects no edit touches
    edited = {r.subject for r in requests}
    suite = drop_edited_neighbours(requests[:: args.suite_every], edited)
    suite = [r for r in suite if r.neighbourhood]
    suite_file = args.work / "suite.json"
    suite_file.write_text(json.dumps([request_record(r) for r in suite]))
    last = requests[(len(line) - 2) * args.batch:]
    last_file = args.work / "last_batch.json"
    last_file.write_text(json.dumps([request_record(r) for r in last]))

    t: dict[str, Any] = {}
    result["commands_s"] = t
    # behavioural diff of the last batch's commit, on its own facts (prompts, paraphrases, neighbours)
    t["diff --behaviour HEAD~1 HEAD --suite last_batch.json"], out = kedit(
        args.work, "diff", "--behaviour", "HEAD~1", "HEAD", "--suite", str(last_file), "--json", codes=(0, 1))
    result["diff_last_batch"] = {**json.loads(out)["summary"], "kl_tokens": json.loads(out)["kl_tokens"]}
    t["diff --behaviour base HEAD (probe suite)"], out = kedit(
        args.work, "diff", "--behaviour", base, "HEAD", "--json", codes=(0, 1))
    result["diff_base_head_probes"] = json.loads(out)["summary"]
    save()

    # blame: a fact of a middle batch whose continuation its batch changed
    k = (len(line) - 1) // 2  # the batch whose facts are blamed and probed
    batch_facts = requests[(k - 1) * args.batch: k * args.batch]
    prompts = [r.text for r in batch_facts]
    before = metrics.greedy_continuations(*repo.load(line[k - 1]), prompts)
    after = metrics.greedy_continuations(*repo.load(line[k]), prompts)
    at_head = metrics.greedy_continuations(*repo.load(head), prompts)
    at_base = metrics.greedy_continuations(*repo.load(base), prompts)
    lost = [i for i, r in enumerate(batch_facts)  # true at the base, gone at HEAD, changed by the batch
            if metrics.shows(at_base[i], r.target_true) and not metrics.shows(at_head[i], r.target_true)]
    changed = [i for i in range(len(batch_facts)) if before[i] != after[i]]
    fact = batch_facts[next((i for i in lost if i in changed), changed[0])]
    t["blame"], out = kedit(args.work, "blame", fact.text, "--json")
    found = json.loads(out)
    result["blame"] = {"prompt": fact.text, "fact_batch": k,
                       "found_batches": [line.index(e["commit"]["id"]) for e in found["entries"]],
                       "materialised": found["materialised"], "commits": found["commits"]}
    save()

    # bisect by a probe: the fact's true answer, gone after its batch
    if not lost:
        raise SystemExit(f"no fact of batch {k} shows its true answer at the base and not at HEAD")
    fact = batch_facts[next((i for i in lost if i in changed), lost[0])]
    t["bisect --probe"], out = kedit(args.work, "bisect", "--good", base, "--probe",
                                     f"{fact.text}=>{fact.target_true}", "--json")
    found = json.loads(out)
    first = line.index(found["first_bad"]["id"])  # checked: the answer shows at its parent, not there
    shown = [metrics.shows(metrics.greedy_continuations(*repo.load(line[i]), [fact.text])[0], fact.target_true)
             for i in (first - 1, first)]
    result["bisect_probe"] = {"probe": f"{fact.text}=>{fact.target_true}", "fact_batch": k,
                              "first_bad_batch": first, "answer_at_parent_and_first_bad": shown,
                              "tested": len(found["tested"])}
    save()

    # bisect by a metric: neighbourhood on the fixed suite, at every commit (the truth) and by bisection
    start = time.perf_counter()
    values = [suite_value(repo, c, suite, "neighbourhood") for c in line]
    t["neighbourhood at every commit (in-process)"] = round(time.perf_counter() - start, 2)
    drop = round((values[0] - min(values[1:])) / 2, 3)
    if drop <= 0:
        raise SystemExit(f"neighbourhood on the suite never falls: {values}")
    expected = next(i for i, v in enumerate(values) if v < values[0] - drop)
    result["neighbourhood"] = {"suite_requests": len(suite),
                               "suite_neighbours": sum(len(r.neighbourhood) for r in suite),
                               "per_commit": [round(v, 4) for v in values], "drop": drop}
    # HEAD itself may have recovered above the threshold: bisect up to the first commit found bad
    bad = line[max(i for i, v in enumerate(values) if v < values[0] - drop)]
    t["bisect --metric neighbourhood"], out = kedit(
        args.work, "bisect", "--good", base, "--bad", bad, "--metric", "neighbourhood", "--drop", str(drop),
        "--suite", str(suite_file), "--json")
    found = json.loads(out)
    first = line.index(found["first_bad"]["id"])
    result["bisect_metric"] = {"drop": drop, "bad": bad, "first_bad_batch": first, "first_drop_batch": expected,
                               "tested": len(found["tested"]),
                               "first_bad_is_a_drop": values[first] < values[0] - drop
                               and values[first - 1] >= values[0] - drop}
    save()

    # the web view and the report
    server = make_server(args.work, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        pages = {"log": "", "commit (HEAD)": f"commit/{head}", "trends": "trends", "probes": "probes",
                 "behaviour diff HEAD~1..HEAD (probe suite, KL on 4 texts)": "diff?a=HEAD~1&b=HEAD"}
        result["pages_s"] = {}
        for name, path in pages.items():
            seconds, size = fetch(server.url + path)
            result["pages_s"][name] = {"seconds": seconds, "bytes": size}
    finally:
        server.shutdown()
        server.server_close()
    report = args.work / "report.html"
    t["report base..HEAD"], _ = kedit(args.work, "report", f"{base}..HEAD", "--out", str(report))
    result["report_bytes"] = report.stat().st_size
    t["report base..HEAD --behaviour"], _ = kedit(args.work, "report", f"{base}..HEAD", "--out", str(report),
                                                   "--behaviour")
    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
