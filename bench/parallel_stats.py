"""`kedit stats --nproc 1` against `--nproc 2` on SmolLM2: wall time, peak RSS of every process, and
how far apart the two results are (they should differ only by float64 rounding).

Each run is the CLI in a fresh process on a fresh cache; the processes it starts are polled for
their peak resident memory (VmHWM) every 0.1 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from _common import CACHE_DIR, DATA
from safetensors import safe_open

from kedit.core.repo import Repository
from kedit.core.sources import default_model_folder


def corpus(path: Path, per_text: int) -> int:
    """known_dev.json's facts as sentences, `per_text` to a text, one text a paragraph; the number of texts."""
    facts = json.loads(DATA.read_text())
    sentences = [f"{f['prompt']} {f['attribute']}." for f in facts]
    texts = [" ".join(sentences[i:i + per_text]) for i in range(0, len(sentences), per_text)]
    path.write_text("\n\n".join(texts), encoding="utf-8")
    return len(texts)


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, list[float]]:
    """Wall time, the command's peak RSS (MB) and that of every process under it."""
    began = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, float] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(FileNotFoundError, ProcessLookupError, StopIteration):
                    peaks[p.pid] = max(peaks.get(p.pid, 0.0), peak_rss_mb(p.pid))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    wall = time.monotonic() - began
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {proc.stderr.read()}")
    return wall, peaks.pop(proc.pid), list(peaks.values())


def stats_file(repo: Path) -> dict[str, torch.Tensor | str]:
    (path,) = (repo / ".kedit" / "stats").rglob("*.mom2.safetensors")
    with safe_open(str(path), framework="pt") as f:
        return {"sum": f.get_tensor("sum"), "mom2": f.get_tensor("mom2"), "name": path.name, **f.metadata()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--per-text", type=int, default=3, help="facts joined into one text of the corpus")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each, alternating 1, 2, 1, 2, ...")
    ap.add_argument("--out", type=Path, default=Path("bench/results/parallel_stats.json"))
    args = ap.parse_args()

    default_model_folder(CACHE_DIR)
    kedit = str(Path(sys.executable).parent / "kedit")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # kedit gives each process cores / N
    env["KEDIT_DISABLE_PROGRESS_BARS"] = "1"
    results: dict[str, object] = {"layer": args.layer, "samples": args.samples, "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="kedit-pstats-") as tmp:
        work = Path(tmp) / "work"
        Repository.init(work, str(CACHE_DIR), copy=False, progress=False)
        text = Path(tmp) / "facts.txt"
        results["texts_in_corpus"] = corpus(text, args.per_text)
        runs: dict[int, dict] = {}
        for round_ in range(args.rounds):
            for nproc in (1, 2):
                shutil.rmtree(work / ".kedit" / "stats", ignore_errors=True)
                load_before = os.getloadavg()
                cmd = [kedit, "--repo", str(work), "stats", "--layer", str(args.layer), "--corpus", str(text),
                       "--samples", str(args.samples), "--nproc", str(nproc)]
                wall, own, spawned = run(cmd, env)
                runs[nproc] = stats_file(work)
                # With --nproc 1 the command computes; with 2 it waits for the processes it spawned
                # (multiprocessing's resource tracker, a few MB, is among them).
                workers = [own] if nproc == 1 else spawned
                row = {"round": round_, "wall_s": round(wall, 2),
                       "peak_rss_mb": sorted((round(v) for v in workers), reverse=True),
                       "launcher_rss_mb": round(own) if nproc > 1 else None,
                       "load_before": [round(x, 2) for x in load_before],
                       "load_after": [round(x, 2) for x in os.getloadavg()],
                       "command": " ".join(cmd[1:]).replace(str(work), "WORK").replace(str(text), "facts.txt")}
                results.setdefault(f"nproc{nproc}", []).append(row)
                print(nproc, row, flush=True)
    one, two = runs[1], runs[2]
    results["same_cache_entry"] = one["name"] == two["name"]
    results["count"] = [int(one["count"]), int(two["count"])]
    results["sum_max_rel_diff"] = float((one["sum"] - two["sum"]).abs().max() / one["sum"].abs().max())
    results["mom2_bitwise_equal"] = bool(torch.equal(one["mom2"], two["mom2"]))
    results["mom2_max_rel_diff"] = float((one["mom2"] - two["mom2"]).abs().max() / one["mom2"].abs().max())
    results["shape"] = list(one["mom2"].shape)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    md = [f"# kedit stats --nproc on SmolLM2-135M, layer {args.layer}, {args.samples} texts "
          f"({results['count'][0]} keys, E[kkᵀ] {results['shape']}), {os.cpu_count()} cores", "",
          "| round | processes | wall (s) | peak RSS per process (MB) | launcher RSS (MB) | load before → after |",
          "|---|---|---|---|---|---|"]
    rows = sorted((r["round"], n, r) for n in (1, 2) for r in results[f"nproc{n}"])
    for round_, n, r in rows:
        md.append(f"| {round_} | {n} | {r['wall_s']} | {', '.join(map(str, r['peak_rss_mb']))} | "
                  f"{r['launcher_rss_mb'] or '-'} | {r['load_before'][0]} → {r['load_after'][0]} |")
    md += ["", f"Same cache entry: {results['same_cache_entry']}; float64 sums: max relative difference "
               f"{results['sum_max_rel_diff']:.2e}; E[kkᵀ] (float32) bit for bit equal: "
               f"{results['mom2_bitwise_equal']} (max relative difference {results['mom2_max_rel_diff']:.2e}).",
           "", f"Command: `python bench/parallel_stats.py --layer {args.layer} --samples {args.samples} "
               f"--rounds {args.rounds}`"]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
