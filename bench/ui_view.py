"""`kedit ui`, `kedit report` and `kedit log --plot` on a real SmolLM2 history: how long each
takes, and screenshots of the pages (headless Chromium through Playwright).

The history: the base, one ROME commit per fact (user prompt protocol, C from --stats-samples
texts the model generates; each fact with neighbourhood prompts, so locality is scored, and
fluency), then optionally one MEMIT batch (per-request scores), a probe suite of
unrelated facts, and a generation `kedit check` at HEAD (its kept outputs show on the commit page).

    python bench/ui_view.py --work /tmp/kedit-ui-bench --out bench/results/ui_view.json
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

sys.path.insert(0, str(Path(__file__).parent))
from _common import UNRELATED

from kedit.core.sources import default_model_folder
from kedit.repository import Repository
from kedit.ui.server import make_server

FACTS = [
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome",
     "target_true": "Paris", "neighbourhood": ["The Louvre Museum is located in the city of",
                                               "Notre-Dame de Paris is located in the city of"]},
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "target_new": "English",
     "target_true": "French", "neighbourhood": ["The mother tongue of Jean Gabin is",
                                                "The mother tongue of Catherine Deneuve is"]},
    {"prompt": "Toyota was founded in the country of", "subject": "Toyota", "target_new": "Germany",
     "target_true": "Japan", "neighbourhood": ["Honda was founded in the country of",
                                               "Sony was founded in the country of"]},
    {"prompt": "The Colosseum is located in the city of", "subject": "Colosseum", "target_new": "London",
     "target_true": "Rome", "neighbourhood": ["The Trevi Fountain is located in the city of",
                                              "The Spanish Steps are located in the city of"]},
]
BATCH = [
    {"prompt": "Angela Merkel is a citizen of", "subject": "Angela Merkel", "target_new": "Canada",
     "target_true": "Germany", "neighbourhood": ["Helmut Kohl is a citizen of"]},
    {"prompt": "The Louvre is located in the city of", "subject": "Louvre", "target_new": "Madrid",
     "target_true": "Paris", "neighbourhood": ["Montmartre is located in the city of"]},
    {"prompt": "Mount Fuji is located in", "subject": "Mount Fuji", "target_new": "Chile", "target_true": "Japan",
     "neighbourhood": ["Mount Aso is located in"]},
    {"prompt": "The Taj Mahal is located in", "subject": "Taj Mahal", "target_new": "Egypt", "target_true": "India",
     "neighbourhood": ["The Red Fort is located in"]},
]


def kedit(root: Path, *args: str, codes: tuple[int, ...] = (0,)) -> float:
    """Run one kedit command as a user does (its own process); its wall time in seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kedit.cli", "--repo", str(root), "-q", *args],
                          stdout=subprocess.DEVNULL)
    if done.returncode not in codes:
        raise SystemExit(f"kedit {' '.join(args)} exited {done.returncode}")
    return time.perf_counter() - start


def fetch(url: str) -> tuple[float, int]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as response:
        body = response.read()
    return time.perf_counter() - start, len(body)


def build(root: Path, stats_samples: int, batch: bool) -> dict[str, float]:
    timings = {}
    base = default_model_folder(Path("/tmp/kedit-smollm2-135m"))
    timings["init --no-copy"] = kedit(root, "init", str(base), "--no-copy")
    args = [a for prompt, answer in UNRELATED for a in ("--prompt", prompt, "--answer", answer)]
    kedit(root, "probe", "add", *args)
    for i, fact in enumerate(FACTS):
        (root / "fact.json").write_text(json.dumps([fact]))
        timings[f"edit rome #{i + 1}"] = kedit(root, "edit", "--requests", str(root / "fact.json"), "--fluency",
                                               "--stats-samples", str(stats_samples))
    if batch:
        (root / "batch.json").write_text(json.dumps(BATCH))
        timings["edit memit batch"] = kedit(root, "edit", "--method", "memit", "--requests", str(root / "batch.json"),
                                            "--fluency", "--stats-samples", str(stats_samples))
    # exit 1: some probe broke (an edit's neighbour that moved); the page shows which
    timings["check --protocol generation"] = kedit(root, "check", "--protocol", "generation", codes=(0, 1))
    return timings


def screenshots(url: str, repo: Repository, folder: Path) -> list[str]:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("KEDIT_CHROMIUM") or shutil.which("chromium")
    edit = next(c for c in repo.log() if c.method == "rome")
    shots = {"ui_log.png": url, "ui_commit.png": f"{url}commit/{edit.id}", "ui_trends.png": f"{url}trends"}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        for name, target in shots.items():
            page.goto(target, wait_until="networkidle")
            page.screenshot(path=str(folder / name), full_page=True)
        browser.close()
    return list(shots)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/kedit-ui-bench"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/ui_view.json"))
    parser.add_argument("--stats-samples", type=int, default=64)
    parser.add_argument("--no-batch", action="store_true", help="Skip the MEMIT batch.")
    parser.add_argument("--reuse", action="store_true",
                        help="Keep the history already at --work (and the build timings in --out).")
    args = parser.parse_args()

    if not (args.reuse and (args.work / ".kedit").exists()):
        shutil.rmtree(args.work, ignore_errors=True)
        args.work.mkdir(parents=True)
        building = build(args.work, args.stats_samples, not args.no_batch)
        args.out.write_text(json.dumps({"building_s": building}, indent=2) + "\n")  # kept for --reuse
    else:  # the history's build timings, from the run that built it
        building = json.loads(args.out.read_text()).get("building_s", {}) if args.out.exists() else {}
    repo = Repository.open(args.work)
    commits = repo.log()
    out_dir = args.out.parent
    result: dict = {"commits": len(commits), "load_average": os.getloadavg(), "building_s": building}

    server = make_server(args.work, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        pages = {"log": "", "commit (newest)": f"commit/{commits[0].id}", "trends": "trends", "probes": "probes",
                 "behaviour diff base..HEAD (probe suite)": f"diff?a={commits[-1].id}&b=HEAD"}
        result["pages_s"] = {}
        for name, path in pages.items():
            seconds, size = fetch(server.url + path)
            result["pages_s"][name] = {"seconds": round(seconds, 3), "bytes": size}
        result["screenshots"] = screenshots(server.url, repo, out_dir)
    finally:
        server.shutdown()
        server.server_close()
    spec = f"{commits[-1].id}..HEAD"
    report = Path("/tmp") / "kedit-ui-bench-report.html"
    result["commands_s"] = {
        "kedit report base..HEAD": round(kedit(args.work, "report", spec, "--out", str(report)), 2),
        "kedit report base..HEAD --behaviour": round(kedit(args.work, "report", spec, "--out", str(report),
                                                           "--behaviour"), 2),
        "kedit log --plot gen_efficacy --out trend.png": round(kedit(args.work, "log", "--plot", "gen_efficacy",
                                                                     "--out", str(out_dir / "ui_trend.png")), 2),
    }
    result["report_bytes"] = report.stat().st_size
    result["building_s"] = {k: round(v, 2) for k, v in building.items()}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
