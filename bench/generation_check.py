"""The per-commit generation check of GRACE edits on SmolLM2-135M: its time with and without early stop.

Usage:
    python bench/generation_check.py --n 20 --out bench/results/generation_check.json

`kedit edit` checks each edit in greedy generation before committing it (kedit.edit.run's
`_generation_check`, through `kedit.eval.metrics.shows_in_generation`), which stops a continuation
as soon as the target shows. This runs `--n` GRACE edits (the stream of grace_sequential.py) through
the product path, one commit each (one `run_edits` call, its time over `--n`: one model load
included, as in grace_sequential.py); then, on the edited model, times the check of
each edit's prompt alone (as at commit time) both ways: stopping once the target shows, and the full
10 tokens (`greedy_continuations` without `until_shown`, then `shows`: what the check did before),
and asserts that both give the same verdict for every prompt.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import CACHE_DIR
from grace_sequential import build_stream

from kedit.core.repo import Repository
from kedit.core.sources import default_model_folder
from kedit.edit.run import EditOptions, run_edits
from kedit.eval import metrics
from kedit.model.load import load_revision

log = logging.getLogger("bench")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20, help="GRACE edits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/generation_check.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    stream, _ = build_stream(args.n, 100, args.seed)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kedit-gencheck-") as tmp:
        repo = Repository.init(Path(tmp) / "repo", str(default_model_folder(CACHE_DIR)), copy=False, progress=False)
        options = EditOptions(method="grace", dtype=torch.float32, measure=False)
        t0 = time.perf_counter()
        commits = run_edits(repo, stream, options)
        per_commit = (time.perf_counter() - t0) / len(commits)
        method_s = [c.info["edit_seconds"] for c in commits]
        model, tok = load_revision(repo, "HEAD", dtype=torch.float32)
        early_s, full_s, verdicts = [], [], []
        for r in stream:
            t0 = time.perf_counter()
            early = metrics.shows_in_generation(model, tok, [r.text], [r.target_new])[0]
            early_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            full = metrics.shows(metrics.greedy_continuations(model, tok, [r.text])[0], r.target_new)
            full_s.append(time.perf_counter() - t0)
            if early != full:
                raise SystemExit(f"the verdicts differ on {r.text!r}: early stop {early}, full {full}")
            verdicts.append(early)
    mean = statistics.fmean
    result = {
        "model": "SmolLM2-135M-Instruct (fp32)", "edits": len(stream), "shown": sum(verdicts),
        "verdicts_identical": True, "per_commit_seconds": per_commit, "method_seconds_mean": mean(method_s),
        "check_seconds_early_stop_mean": mean(early_s), "check_seconds_full_mean": mean(full_s),
        "per_commit_seconds_with_full_check": per_commit - mean(early_s) + mean(full_s),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "torch_threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
