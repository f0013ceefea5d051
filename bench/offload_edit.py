"""Editing SmolLM2 with most of its layers offloaded to disk (`--device auto --max-memory cpu=...
--offload-folder DIR`) against the same edit with the model in memory.

ROME edits one fact, MEMIT three, each from the same base commit of one repository, with the model
(a) in memory, (b) with about half and (c) about 90% of its decoder layers offloaded to disk
(accelerate's `device_map="auto"`, `max_memory` sized from the model's own module sizes). Both
sides compute in float32 (`v_dtype=float32`). Per run: wall time of `run_edits` (loading included)
and the method's own `edit_seconds`, which decoder layers were on disk (the edited ones named),
whether the committed tensors and delta objects are bit for bit those of the in-memory run, and
whether each edit shows where a user sees it: the commit exported, loaded with plain transformers,
`tokenizer(prompt)` + greedy `generate(max_new_tokens=10)` containing the new target. The covariance
statistics are computed by an untimed in-memory run of each method first and read from the cache by
every timed run.

    python bench/offload_edit.py --out bench/results/offload_edit.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import CACHE_DIR, counterfact_requests, load_exported, user_continuations
from accelerate.utils import compute_module_sizes

from kedit.core.repo import Repository
from kedit.core.sources import default_model_folder
from kedit.edit.run import EditOptions, run_edits
from kedit.eval import metrics
from kedit.model.export import export
from kedit.model.load import load_revision
from kedit.model.placement import Placement, is_offloaded

log = logging.getLogger("offload_edit")


def budgets(repo: Repository, fractions: list[float]) -> dict[float, int]:
    """CPU bytes that leave about `fraction` of the decoder layers to the disk (everything else in memory)."""
    model, _ = load_revision(repo, "HEAD", dtype=torch.float32)
    sizes = compute_module_sizes(model)
    n = model.config.num_hidden_layers
    layer = max(sizes[f"model.layers.{i}"] for i in range(n))
    rest = sizes[""] - sum(sizes[f"model.layers.{i}"] for i in range(n))
    del model
    # accelerate keeps room for the largest layer besides what it places; half a layer of margin
    return {f: int(rest + (round(n * (1 - f)) + 1.5) * layer) for f in fractions}


def on_disk(repo: Repository, placement: Placement) -> list[int]:
    """The decoder layers `placement` puts on disk."""
    model, _ = load_revision(repo, "HEAD", dtype=torch.float32, device="auto", placement=placement)
    layers = [i for i in range(model.config.num_hidden_layers)
              if is_offloaded(model.get_submodule(f"model.layers.{i}.mlp.down_proj"))]
    del model
    return layers


def fingerprint(repo: Repository) -> list[list[Any]]:
    return sorted([c.name, c.result_hash, [s.object_id for s in c.steps]] for c in repo.changes("HEAD"))


def run(repo: Repository, method: str, facts: list, placement: Placement | None, samples: int,
        tmp: Path) -> dict[str, Any]:
    options = EditOptions(method=method, overrides={"v_dtype": "float32"}, stats_samples=samples, measure=False,
                          dtype=torch.float32, device="auto" if placement else "cpu", placement=placement)
    t0 = time.perf_counter()
    (commit,) = run_edits(repo, facts, options)
    wall = time.perf_counter() - t0
    folder = tmp / "export"
    export(repo, "HEAD", folder)
    model, tok = load_exported(folder, adapters=False)
    said = user_continuations(model, tok, [f.text for f in facts])
    del model
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    layers = commit.hparams.get("layers") or [commit.hparams["layer"]]
    return {"wall_s": round(wall, 1), "edit_s": commit.info["edit_seconds"], "edited_layers": layers,
            "fingerprint": fingerprint(repo),
            "shows": [metrics.shows(s, f.target_new) for s, f in zip(said, facts, strict=True)],
            "continuations": said, "targets": [f.target_new for f in facts]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--offset", type=int, default=100, help="skip the first facts (held out of rome_counterfact)")
    ap.add_argument("--stats-samples", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench/results/offload_edit.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    folder = default_model_folder(CACHE_DIR)
    facts = counterfact_requests(args.offset + 4)[args.offset:]
    rows: list[dict[str, Any]] = []
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        repo = Repository.init(tmp / "work", str(folder), copy=False, progress=False)
        base = repo.head()
        cpu = budgets(repo, [0.5, 0.9])
        placements: list[tuple[str, Placement | None]] = [("in memory", None)] + [
            (f"~{int(f * 100)}% of layers on disk", Placement({"cpu": f"{cpu[f] // 1000}KB"}, tmp / f"offload-{f}"))
            for f in (0.5, 0.9)]
        disk = {label: on_disk(repo, p) if p else [] for label, p in placements}
        warmup: dict[str, float] = {}
        for method, group in (("rome", facts[:1]), ("memit", facts[1:4])):
            repo.reset(base)  # an untimed run computes and caches the statistics every timed run then reads
            warmup[method] = run(repo, method, group, None, args.stats_samples, tmp)["wall_s"]
            reference = None
            for label, placement in placements:
                repo.reset(base)
                row = {"method": method, "placement": label, "n_facts": len(group),
                       "max_memory": placement.max_memory if placement else None,
                       "layers_on_disk": len(disk[label]), "of_layers": 30,
                       **run(repo, method, group, placement, args.stats_samples, tmp)}
                row["edited_layers_on_disk"] = [x for x in row["edited_layers"] if x in disk[label]]
                reference = reference or row["fingerprint"]
                row["identical_to_in_memory"] = row["fingerprint"] == reference
                log.info("%s %s: %.1f s, identical %s, shows %s", method, label, row["wall_s"],
                         row["identical_to_in_memory"], row["shows"])
                rows.append(row)
    result = {"load_before": load, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "stats_samples": args.stats_samples,
              "warmup_with_statistics_s": warmup,
              "protocol": "float32 on both sides (v_dtype=float32); shows: exported folder, plain transformers, "
                          "tokenizer(prompt) + generate(max_new_tokens=10, do_sample=False), kedit.eval.metrics.shows",
              "rows": rows}
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Editing SmolLM2 with layers offloaded to disk", "",
             f"Load average before: {', '.join(f'{x:.2f}' for x in result['load_before'])}; "
             f"{result['threads']} thread(s); statistics from {result['stats_samples']} texts, computed by an untimed "
             "first run of each method (wall with statistics: "
             f"{', '.join(f'{m} {s} s' for m, s in result['warmup_with_statistics_s'].items())}) and read from "
             "the cache by every timed run; float32 on both sides.", "",
             "| method | placement | layers on disk | edited layers on disk | run_edits wall (s) | method (s) "
             "| delta identical to in-memory | edits shown (exported, plain transformers) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} ({r['n_facts']} fact{'s' if r['n_facts'] > 1 else ''}) | {r['placement']} | "
                     f"{r['layers_on_disk']}/{r['of_layers']} | {r['edited_layers_on_disk'] or '-'} | {r['wall_s']} | "
                     f"{r['edit_s']} | {'yes' if r['identical_to_in_memory'] else 'NO'} | "
                     f"{sum(r['shows'])}/{len(r['shows'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
