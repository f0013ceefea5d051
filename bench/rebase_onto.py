"""ROME edits on SmolLM2-135M carried onto a second base (the base after a small fine-tune) with `rebase --onto`.

Usage: python bench/rebase_onto.py --n 20 --out bench/results/rebase_onto.json

n counterfactual facts (known_dev.json, CounterFact-style requests, 5 neighbourhood prompts each as
locality probes) are edited with ROME through the repository on the embedded SmolLM2, one commit
each (covariance statistics from --stats-texts self-generated texts). A second base is made here:
the same model after --steps AdamW steps at --lr on text it generated itself (seeded sampling),
saved as a Hugging Face folder and added with `Repository.add_base`. Then `kedit rebase --onto`
re-runs every edit on it (statistics recomputed for the new base) and reports per edit whether
greedy generation on its prompt, sent as `tokenizer(prompt)`, contains the target on the old tip
and on the new one, and what `kedit check` says at the new tip.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import CACHE_DIR, counterfact_requests, load_smollm2

from kedit.core.sources import default_model_folder
from kedit.edit.rebase import rebase
from kedit.edit.run import EditOptions, run_edits
from kedit.repository import Repository

log = logging.getLogger("bench")


def fine_tune(folder: Path, steps: int, lr: float, seed: int) -> dict:
    """The base after `steps` AdamW steps on 8 texts of 64 tokens it generated itself; saved in `folder`."""
    model, tok = load_smollm2()
    torch.manual_seed(seed)
    prompts = ["The history of", "In the morning, the", "Scientists have found that", "The city of",
               "My favourite book is", "The river flows", "A new study shows", "The company announced"]
    with torch.no_grad():
        batch = [model.generate(**tok(p, return_tensors="pt"), max_new_tokens=64, do_sample=True, top_k=50,
                                pad_token_id=tok.eos_token_id)[0] for p in prompts]
    t0 = time.perf_counter()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        ids = batch[step % len(batch)].unsqueeze(0)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(loss.item(), 4))
    model.eval()
    model.save_pretrained(folder)
    for f in CACHE_DIR.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not (folder / f.name).exists():
            shutil.copy(f, folder / f.name)
    return {"steps": steps, "lr": lr, "seconds": round(time.perf_counter() - t0, 1), "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats-texts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--out", default="bench/results/rebase_onto.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    tmp = Path(tempfile.mkdtemp(prefix="kedit-rebase-"))
    default_model_folder(CACHE_DIR)
    repo = Repository.init(tmp / "work", str(CACHE_DIR), progress=False)
    requests = counterfact_requests(args.n, seed=args.seed, n_neighbours=5)
    options = EditOptions(method="rome", measure=False, stats_samples=args.stats_texts)
    t0 = time.perf_counter()
    run_edits(repo, requests, options)
    edit_s = round(time.perf_counter() - t0, 1)
    tuned = fine_tune(tmp / "v1.1", args.steps, args.lr, args.seed)
    t0 = time.perf_counter()
    _, root = repo.add_base(str(tmp / "v1.1"), branch="v1.1")
    add_base_s = round(time.perf_counter() - t0, 1)
    first = {c.name: c.steps[0].object_id for c in repo.changes(repo.log("main")[-1].id)}
    shared = sum(first.get(c.name) == c.steps[0].object_id for c in repo.changes(root.id))
    t0 = time.perf_counter()
    report = rebase(repo, "v1.1", options=options)
    rebase_s = round(time.perf_counter() - t0, 1)
    edits = [e.to_dict() for e in report.edits]
    result = {
        "n": args.n, "stats_texts": args.stats_texts, "threads": os.environ.get("OMP_NUM_THREADS"),
        "fine_tune": tuned, "edit_s": edit_s, "add_base_s": add_base_s, "shared_tensors": shared,
        "tensors": len(repo.manifest(root.id)), "rebase_s": rebase_s, "rebase_edit_s": report.edit_seconds,
        "shown_old": sum(all(e["shown_old"]) for e in edits), "shown_new": sum(all(e["shown_new"]) for e in edits),
        "check_ok": sum(e["check"] == "ok" for e in edits), "check": report.check,
        "not_carried": len(report.not_carried), "edits": edits,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    lines = [f"# rebase --onto: {args.n} ROME edits of SmolLM2-135M onto the base after a small fine-tune", "",
             f"Fine-tune: {args.steps} AdamW steps at lr {args.lr} on 8 self-generated texts "
             f"(loss {tuned['losses'][0]} -> {tuned['losses'][-1]}), {tuned['seconds']} s. add_base {add_base_s} s, "
             f"{shared} of {result['tensors']} tensors shared by hash with the first base.", "",
             f"Edits on the embedded base: {edit_s} s (with C from {args.stats_texts} texts). Rebase: {rebase_s} s "
             f"in all, {report.edit_seconds} s of it re-running the edits (C recomputed for the new base).", "",
             f"Shown in greedy generation (tokenizer(prompt) + generate, 10 tokens): old base "
             f"{result['shown_old']}/{args.n}, new base {result['shown_new']}/{args.n}; kedit check at the new tip: "
             f"{result['check_ok']}/{args.n} edits ok, {report.check}.", "",
             "| edit | old base | new base | check |", "|---|---|---|---|"]
    lines += [f"| {e['prompts'][0]} -> {e['targets'][0]} | {'yes' if all(e['shown_old']) else 'no'} | "
              f"{'yes' if all(e['shown_new']) else 'no'} | {e['check']} |" for e in edits]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:7]))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
