"""Wall time of the everyday read commands (log, show, status, branch, ...), beside git's.

Builds a kedit repository of SmolLM2-135M-Instruct with a handful of ROME edits (`kedit edit
--requests`, CounterFact-style facts from known_dev.json), a branch, a tag, a remote and a probe,
or takes one with --repo; and a git repository of the same shape: as many commits, one file per
tensor in the first (so `git status` stats as many files as kedit's working model has shards),
one small file per edit after it, the same branch, tag and remote. Then runs each command in a
fresh process --runs times, alternating kedit and git, and reports the median and p90 wall time,
with Python's bytecode cache in place (as after any first run; PYTHONDONTWRITEBYTECODE is
dropped). `kedit --version` (the interpreter, click and the command table) and `python -c pass`
are the floors.

    python bench/read_latency.py --out bench/results/read_latency.json           # ~2 min to build
    python bench/read_latency.py --repo /path/to/work --out /tmp/read_latency.json

--tiny builds the kedit repository from a tiny random Llama with rank-one commits instead (a
smoke test: seconds, no figures). Writes the JSON and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEDIT = [str(Path(sys.executable).parent / "kedit")]  # the console script users run
# (name, kedit arguments, git arguments or None)
COMMANDS = [
    ("log", ["log"], ["log"]),
    ("log --oneline", ["log", "--oneline"], ["log", "--oneline"]),
    ("show", ["show"], ["show"]),
    ("status", ["status"], ["status"]),
    ("branch", ["branch"], ["branch"]),
    ("tag", ["tag"], ["tag"]),
    ("reflog", ["reflog"], ["reflog"]),
    ("remote list", ["remote", "list"], ["remote", "-v"]),
    ("probe list", ["probe", "list"], None),
    ("editors", ["editors"], None),
    ("config --list", ["config", "--list"], ["config", "--list"]),
]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(command: list[str], cwd: Path, env: dict[str, str]) -> None:
    done = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed in {cwd}: {done.stderr}")


def kedit(where: Path, *args: str) -> None:
    run([*KEDIT, "-q", *args], where, os.environ.copy())


def git(where: Path, *args: str, date: str | None = None) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.org",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.org"}
    if date:
        env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = date
    run(["git", *args], where, env)


def build_kedit(work: Path, n_edits: int, tiny: bool) -> None:
    """A repository at `work`: the base, `n_edits` edits on main, a branch, a tag, a remote, a probe."""
    if tiny:
        import torch

        from kedit.core.delta import LowRank
        from kedit.core.repo import Repository
        from tests.tiny import make_model

        make_model("llama", vocab=128, seed=0).save_pretrained(work.parent / "tiny-model")
        repo = Repository.init(work, str(work.parent / "tiny-model"), progress=False)
        for i in range(n_edits):
            repo.commit({"model.layers.0.mlp.down_proj.weight": LowRank(torch.randn(32, 1), torch.randn(1, 64))},
                        method="rome", requests=[{"prompt": "{} is in", "subject": f"Place {i}", "target_new": "X"}],
                        message=f"edit {i}")
    else:
        from bench._common import CACHE_DIR, counterfact_requests
        from kedit.core.sources import default_model_folder

        default_model_folder(CACHE_DIR)
        work.mkdir(parents=True)
        kedit(work, "init", str(CACHE_DIR))
        requests = [{"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
                     "target_true": r.target_true} for r in counterfact_requests(n_edits)]
        (work.parent / "requests.json").write_text(json.dumps(requests))
        kedit(work, "edit", "--requests", str(work.parent / "requests.json"), "--set", "mom2_adjustment=false")
    kedit(work, "branch", "experiment", "HEAD~1")
    kedit(work, "tag", "v1", "HEAD~1")
    kedit(work, "remote", "add", "origin", "hf://me/smollm2-edited")
    kedit(work, "probe", "add", "--kind", "locality", "--prompt", "The capital of France is", "--answer", "Paris")


def build_git(where: Path, kedit_work: Path) -> int:
    """A git repository shaped as the kedit one: one file per tensor, then one file per edit."""
    from kedit.core.repo import Repository

    repo = Repository.open(kedit_work)
    commits = list(reversed(repo.log()))
    where.mkdir(parents=True)
    git(where, "init", "-q", "-b", "main")
    base = commits[0]
    for name, entry in repo.manifest(base.id).items():
        (where / "weights").mkdir(exist_ok=True)
        (where / "weights" / f"{name}.txt").write_text(f"{entry.hash} {entry.dtype} {list(entry.shape)}\n")
    for path, data in repo.files(base.id).items():
        (where / path).write_bytes(data)
    git(where, "add", "-A")
    git(where, "commit", "-q", "-m", base.message, date=base.created)
    for c in commits[1:]:
        (where / "edits").mkdir(exist_ok=True)
        (where / "edits" / f"{c.short}.json").write_text(json.dumps({"requests": c.requests, "hparams": c.hparams}))
        git(where, "add", "-A")
        git(where, "commit", "-q", "-m", c.message, date=c.created)
    git(where, "branch", "experiment", "HEAD~1")
    git(where, "tag", "v1", "HEAD~1")
    git(where, "remote", "add", "origin", "https://huggingface.co/me/smollm2-edited")
    count = len(commits)
    repo.db.conn.close()
    return count


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run; CPU time (user + system) suffers less from a busy machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run(command, cwd, env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    wall = sorted(w for w, _ in samples)
    return {"median_ms": round(statistics.median(wall) * 1000, 1),
            "p90_ms": round(wall[min(len(wall) - 1, int(0.9 * len(wall)))] * 1000, 1),
            "min_ms": round(wall[0] * 1000, 1),
            "cpu_median_ms": round(statistics.median(c for _, c in samples) * 1000, 1)}


def measure(kedit_work: Path, git_work: Path, runs: int) -> list[dict]:
    # bytecode cached, as after any first run (the warm-up run below writes it)
    kedit_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {"NO_COLOR": "1"}
    git_env = {**os.environ, "GIT_PAGER": "cat", "PAGER": "cat"}
    floors = [("python -c pass", [sys.executable, "-c", "pass"]), ("kedit --version", [*KEDIT, "--version"])]
    rows = []
    for name, command in floors:
        timed(command, kedit_work, kedit_env)  # warm the page cache
        rows.append({"command": name, "kedit": summary([timed(command, kedit_work, kedit_env) for _ in range(runs)])})
        print(f"{name:<22} {rows[-1]['kedit']['median_ms']:7.1f} ms", flush=True)
    for name, kedit_args, git_args in COMMANDS:
        k_cmd = [*KEDIT, "--no-pager", *kedit_args]
        g_cmd = ["git", "--no-pager", *git_args] if git_args else None
        timed(k_cmd, kedit_work, kedit_env)
        if g_cmd:
            timed(g_cmd, git_work, git_env)
        k_samples, g_samples = [], []
        for _ in range(runs):  # alternating, so both see the same load
            k_samples.append(timed(k_cmd, kedit_work, kedit_env))
            if g_cmd:
                g_samples.append(timed(g_cmd, git_work, git_env))
        row = {"command": f"kedit {name}", "kedit_args": kedit_args, "kedit": summary(k_samples)}
        if g_cmd:
            row.update(git_args=git_args, git=summary(g_samples))
        rows.append(row)
        print(f"{row['command']:<22} {row['kedit']['median_ms']:7.1f} ms"
              + (f"   git {row['git']['median_ms']:6.1f} ms" if g_cmd else ""), flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = [
        "# Read latency: kedit's everyday commands beside git's",
        "",
        f"{result['repository']}; {result['commits']} commits in each. Median and p90 wall time of "
        f"{result['runs']} runs, each a fresh process, and the median CPU time (user + system) of "
        f"kedit's (kedit {result['kedit_commit']}, Python "
        f"{result['python']}, git {result['git_version']}). Load average at start {result['loadavg_start']}, "
        f"at end {result['loadavg_end']}.",
        "",
        "| command | kedit median (p90) | kedit CPU | git | git median (p90) |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        k = f"{r['kedit']['median_ms']:.0f} ms ({r['kedit']['p90_ms']:.0f})"
        g = f"{r['git']['median_ms']:.1f} ms ({r['git']['p90_ms']:.1f})" if "git" in r else "-"
        git_command = f"`git {' '.join(r['git_args'])}`" if "git" in r else "-"
        lines.append(f"| `{r['command']}` | {k} | {r['kedit']['cpu_median_ms']:.0f} ms | {git_command} | {g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, help="An existing kedit repository (the folder holding .kedit).")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kedit-read-latency"),
                        help="Where the repositories are built (kedit/ and git/, replaced).")
    parser.add_argument("--edits", type=int, default=5, help="Edits on main in the built repository.")
    parser.add_argument("--runs", type=int, default=21, help="Runs of each command.")
    parser.add_argument("--tiny", action="store_true", help="A tiny random model (a smoke test, not figures).")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/read_latency.json")
    args = parser.parse_args()

    kedit_work = args.repo.resolve() if args.repo else args.workdir / "kedit"
    shutil.rmtree(args.workdir / "git", ignore_errors=True)
    if not args.repo:
        shutil.rmtree(kedit_work, ignore_errors=True)
        args.workdir.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        build_kedit(kedit_work, args.edits, args.tiny)
        print(f"built the kedit repository in {time.perf_counter() - t:.0f} s", flush=True)
    commits = build_git(args.workdir / "git", kedit_work)

    result = {
        "repository": str(args.repo) if args.repo else "a tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct",
        "commits": commits, "runs": args.runs, "loadavg_start": loadavg(), "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "git_version": subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.split()[-1],
        "kedit_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip(),
    }
    result["rows"] = measure(kedit_work, args.workdir / "git", args.runs)
    result["loadavg_end"] = loadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
