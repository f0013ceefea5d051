"""Crash safety: many random SIGKILLs of every writing kedit command, each followed by proofs.

For each command (init, edit, revert, checkout, branch, tag, reset, gc, push, fetch, pull,
clone) the real CLI is run once to completion (its duration T), then `--runs` times killed
after a random delay in [0, T]. After every run, tests/crashkit.py checks: every acknowledged
commit kept on its branch (and acknowledged ref moves done), `fsck` clean, no change made by
hand visible, an interrupted init/clone refused in one line and finished by the next run, and
the working model equal to HEAD by hash after the next write. Hub commands use the local
Hub server (tests/hubserver.py) on 127.0.0.1. The model is a tiny random Llama with a tokenizer
(tests/tiny.py): what is measured is the repository's state after a kill, not the model.

    python bench/crash_safety.py --runs 20 --out bench/results/crash_safety.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_DISABLE_XET"] = "1"  # the local server speaks LFS, not Xet
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["KEDIT_DISABLE_PROGRESS_BARS"] = "1"
os.environ["KEDIT_AUTHOR"] = "bench"

from tests import crashkit  # noqa: E402
from tests.hubserver import HubServer  # noqa: E402
from tests.tiny import make_model, make_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="killed runs per command")
    parser.add_argument("--commands", default=",".join(crashkit.COMMANDS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/crash_safety.json")
    args = parser.parse_args()
    commands = args.commands.split(",")
    load_before = os.getloadavg()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kedit-crash-bench-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["HF_HOME"] = str(tmp / "hf-home")
        model = tmp / "model"
        tok = make_tokenizer()
        make_model("llama", len(tok)).save_pretrained(model)
        tok.save_pretrained(model)
        server = HubServer(tmp / "hub", {crashkit.TOKEN: crashkit.HUB_USER}).start()
        server.handle_error = lambda request, address: None  # clients killed mid-request: expected here
        os.environ.update({"HF_ENDPOINT": server.url, "HF_TOKEN": crashkit.TOKEN, "HF_HUB_OFFLINE": "0"})
        run = crashkit.CrashRun(tmp / "crash", model, server.url, server.store, seed=args.seed)
        tallies = {}
        try:
            run.start(dict(os.environ))
            for command in commands:
                tallies[command] = crashkit.Tally()
                run.run_command(command, args.runs, tallies[command])
                t = tallies[command]
                print(f"{command:<9} kills {t.kills:>3}  survived {t.survived:>3}  finished first {t.finished:>3}  "
                      f"failures {len(t.failures)}  {t.seconds:6.1f} s", flush=True)
                for failure in t.failures:
                    print(f"    {failure}", flush=True)
        finally:
            run.close()
            server.stop()
    total = {k: sum(getattr(t, k) for t in tallies.values()) for k in ("kills", "survived", "finished")}
    print(f"{'total':<9} kills {total['kills']:>3}  survived {total['survived']:>3}  "
          f"finished first {total['finished']:>3}  in {time.monotonic() - started:.0f} s")
    figures = {"runs_per_command": args.runs, "seed": args.seed, "total": total,
               "seconds": round(time.monotonic() - started, 1), "load_average_before": load_before,
               "load_average_after": os.getloadavg(),
               "commands": {c: {"kills": t.kills, "survived": t.survived, "finished_first": t.finished,
                                "failures": t.failures, "seconds": round(t.seconds, 1)} for c, t in tallies.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
