"""`kedit ui` and `kedit report` on a long history: 500 commits of synthetic deltas committed through
the public API on a small model (every commit with its requests and scores as an edit records them,
every tenth a batch of ten with per-request scores, a probe suite with kept check outputs, branches
and tags), then the time of each page and of the report.

    python bench/ui_scale.py --commits 500 --out bench/results/ui_scale.json
"""

from __future__ import annotations

import argparse
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

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kedit.core.delta import Dense
from kedit.core.repo import Metric
from kedit.core.sources import default_model_folder
from kedit.eval.probes import add_probes
from kedit.repository import Repository
from kedit.ui.server import make_server

SCORES = ("efficacy", "gen_efficacy", "reliability", "locality", "neighbourhood", "gen_locality", "fluency")
TARGET = "model.layers.{}.mlp.down_proj.weight"


def small_model(folder: Path) -> None:
    """A 4-layer Llama with SmolLM2's tokenizer: the pages read the history, not the weights."""
    tok = AutoTokenizer.from_pretrained(default_model_folder(Path("/tmp/kedit-smollm2-135m")))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def scores(i: int, suite: str = "") -> list[Metric]:
    """Scores that drift along the history, as a long run of edits does."""
    return [Metric(name, max(0.0, 1.0 - 0.0005 * i - 0.01 * (k % 3)), "synthetic", stage, suite)
            for k, name in enumerate(SCORES) for stage in ("pre", "post")]


def build(root: Path, n: int) -> Repository:
    small_model(root.parent / "model")
    repo = Repository.init(root, str(root.parent / "model"), progress=False)
    add_probes(repo, [("locality", f"The capital of country {k} is", f"City{k}", None) for k in range(20)])
    gen = torch.Generator().manual_seed(0)
    for i in range(n - 1):
        size = 10 if i % 10 == 9 else 1
        requests = [{"prompt": "{} is located in", "subject": f"Subject {i}.{j}", "target_new": f"Place {i}.{j}",
                     "target_true": "Somewhere"} for j in range(size)]
        metrics = scores(i) + [m for j in range(size if size > 1 else 0) for m in scores(i, f"request {j}")]
        repo.commit({TARGET.format(i % 4): Dense(torch.randn(64, 128, generator=gen) * 1e-3)}, requests=requests,
                    method="memit" if size > 1 else "rome", hparams={"layers": [i % 4]}, metrics=metrics,
                    info={"delta_norm": 0.1}, message=f"edit {i}")
        if i % 100 == 50:
            repo.create_branch(f"topic-{i}")
            repo.create_tag(f"v{i // 100}")
    return repo


def fetch(url: str) -> tuple[float, int]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=900) as response:
        body = response.read()
    return round(time.perf_counter() - start, 3), len(body)


def kedit(root: Path, *args: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kedit.cli", "--repo", str(root), "-q", *args],
                          stdout=subprocess.DEVNULL)
    if done.returncode:
        raise SystemExit(f"kedit {' '.join(args)} exited {done.returncode}")
    return round(time.perf_counter() - start, 2)


def measure(root: Path, repo: Repository, runs: int) -> dict[str, Any]:
    """The best of `runs` fetches of each page (the server opens the repository afresh per request)."""
    log = repo.log()
    batch = next(c for c in log if c.method == "memit")
    pages = {"log": "", "commit (HEAD)": f"commit/{log[0].id}", "commit (a batch of 10)": f"commit/{batch.id}",
             "commit (the base)": f"commit/{log[-1].id}", "trends": "trends", "probes": "probes"}
    server = make_server(root, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    out: dict[str, Any] = {}
    try:
        for name, path in pages.items():
            timings = [fetch(server.url + path) for _ in range(runs)]
            out[name] = {"seconds": min(t for t, _ in timings), "bytes": timings[0][1]}
    finally:
        server.shutdown()
        server.server_close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/kedit-ui-scale/work"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/ui_scale.json"))
    parser.add_argument("--commits", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reuse", action="store_true", help="Keep the history already at --work.")
    parser.add_argument("--label", default="", help="Name of this measurement in --out (several are kept).")
    args = parser.parse_args()

    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    if not (args.reuse and (args.work / ".kedit").exists()):
        shutil.rmtree(args.work.parent, ignore_errors=True)
        args.work.mkdir(parents=True)
        start = time.perf_counter()
        build(args.work, args.commits)
        result["build_s"] = round(time.perf_counter() - start, 1)
    repo = Repository.open(args.work)
    result["commits"] = repo.count_commits()
    run: dict[str, Any] = {"load_average": os.getloadavg(), "pages_s": measure(args.work, repo, args.runs)}
    report = args.work.parent / "report.html"
    run["commands_s"] = {"kedit report (all 500 commits)": kedit(args.work, "report", "HEAD", "--out", str(report)),
                         "kedit log --plot efficacy": kedit(args.work, "log", "--plot", "efficacy",
                                                            "--out", str(args.work.parent / "trend.png"))}
    run["report_bytes"] = report.stat().st_size
    result.setdefault("runs", {})[args.label or "latest"] = run
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(run, indent=2))


if __name__ == "__main__":
    main()
