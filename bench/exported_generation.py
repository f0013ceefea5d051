"""Edits as users meet them: counterfactual edits made through the repository, `kedit export`ed,
loaded with plain transformers (`kedit.load_model` for GRACE's adapter) and queried one prompt at a
time with `tokenizer(prompt, return_tensors="pt")` + `generate(max_new_tokens=10, do_sample=False)`.

Per edit: does the continuation contain the new target (case-insensitively: kedit.eval.metrics.shows),
on the prompt and on its paraphrases; do its neighbourhood prompts still hold the true answer or the
unedited model's continuation (kedit.eval.metrics.holds). The unedited model is scored the same way,
beside each figure, and CounterFact's NLL-margin efficacy of the same exported model for comparison.

ROME edits each fact on the base (one export per fact); memit / alphaedit edit all facts in one
commit, grace one commit per fact in sequence (one export). Facts are CounterFact-style requests
from known_dev.json (`--offset` skips the first ones, e.g. those of another benchmark).

    python bench/exported_generation.py --method rome --n 10 --offset 100
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import CACHE_DIR, counterfact_requests, load_exported, user_continuations
from kedit.methods.base import EditRequest
from transformers import AutoModelForCausalLM, AutoTokenizer

from kedit.core.repo import Repository
from kedit.core.sources import default_model_folder
from kedit.edit.run import EditOptions, run_edits
from kedit.eval import metrics
from kedit.model.export import export

log = logging.getLogger("exported_generation")


def score(model: Any, tok: Any, facts: list[EditRequest], base_said: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for f in facts:
        said = user_continuations(model, tok, [f.text, *f.paraphrases, *f.neighbourhood])
        n_par = len(f.paraphrases)
        para, neigh = said[1:1 + n_par], said[1 + n_par:]
        rows.append({
            "subject": f.subject, "prompt": f.text, "target_new": f.target_new, "target_true": f.target_true,
            "continuation": said[0], "shows": metrics.shows(said[0], f.target_new),
            "paraphrases_shown": [metrics.shows(t, f.target_new) for t in para],
            "neighbours_held": [metrics.holds(t, str(f.target_true), base_said[p])
                                for t, p in zip(neigh, f.neighbourhood, strict=True)],
            "counterfact_efficacy": metrics.counterfact_scores(model, tok, [f], ("efficacy",))["efficacy"].value,
        })
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    flat = lambda key: [x for r in rows for x in r[key]]  # noqa: E731
    mean = lambda xs: 100 * statistics.fmean(float(x) for x in xs) if xs else float("nan")  # noqa: E731
    return {"gen_efficacy": mean([r["shows"] for r in rows]), "gen_paraphrase": mean(flat("paraphrases_shown")),
            "gen_locality": mean(flat("neighbours_held")),
            "counterfact_efficacy": mean([r["counterfact_efficacy"] for r in rows]),
            "shown": sum(r["shows"] for r in rows), "n": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="rome", choices=["rome", "memit", "alphaedit", "grace"])
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--offset", type=int, default=100, help="skip the first facts (100: held out of rome_counterfact)")
    ap.add_argument("--stats-samples", type=int, default=None, help="texts behind C (default: the method's)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    facts = counterfact_requests(args.offset + args.n)[args.offset:]
    folder = default_model_folder(CACHE_DIR)
    base_model, tok = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(folder)
    prompts = [p for f in facts for p in (f.text, *f.paraphrases, *f.neighbourhood)]
    base_said = dict(zip(prompts, user_continuations(base_model, tok, prompts), strict=True))
    base_rows = score(base_model, tok, facts, base_said)
    del base_model

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Repository.init(Path(tmp) / "work", str(folder), copy=False, progress=False)
        base = repo.head()
        options = EditOptions(method=args.method, measure=False, stats_samples=args.stats_samples,
                              dtype=torch.float32)
        t0 = time.perf_counter()
        rows, commits = [], []
        groups = [[f] for f in facts] if args.method == "rome" else [facts]
        for group in groups:
            repo.checkout(base)  # ROME: each fact on the base
            commits += run_edits(repo, group, options)
            out = Path(tmp) / "export"
            export(repo, "HEAD", out)
            rows += score(*load_exported(out, adapters=args.method == "grace"), group, base_said)
            shutil.rmtree(out)
        wall = time.perf_counter() - t0
    result = {
        "method": args.method, "n": len(facts), "offset": args.offset, "load_before": load,
        "protocol": "exported folder, tokenizer(prompt) + generate(max_new_tokens=10, do_sample=False); "
                    "kedit.eval.metrics.shows / holds",
        "edited": summary(rows), "unedited": summary(base_rows), "wall_s": round(wall, 1),
        "commits": len(commits),
        "commits_that_passed_their_own_check": sum(bool(c.info.get("shows_in_generation")) for c in commits),
        "rows": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
