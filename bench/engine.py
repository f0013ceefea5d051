#!/usr/bin/env python
"""Engine benchmarks on the real SmolLM2-135M-Instruct (272 fp32 tensors, 538 MB).

    python bench/engine.py --out bench/results/engine.json          # full run, ~6-9 min on 2 cores
    python bench/engine.py --out /tmp/e.json --quick                # smaller counts, for a smoke test
    python bench/engine.py --model-dir /tmp/smollm2-st ...          # reuse (or create) the converted model

What it measures (each section is independent of the others' results):
  a. init: `Repository.init` from a safetensors folder (copy, --no-copy, bare) against a plain
     `safetensors.torch.load_file` + `save_file` and `from_pretrained` + `save_pretrained` of the
     same weights; the init from the embedded GGUF (dequantised by transformers) separately.
  b. bytes stored by a rank-one commit of a 576x1536 matrix: object file and SQLite growth.
  c. checkout between two commits that differ in k = 1, 5, 30 tensors (in-process, and the CLI).
  d. checkout HEAD <-> HEAD~1 at depth 1,000 (one tensor edited 1,000 times; 30 tensors in turn)
     against depth 1, the first (cold) checkout, and a cold `materialize` without keyframes.
  e. hashing throughput of `kedit.core.hashing.hash_tensor` over the whole model.

Writes JSON (--out), a markdown report beside it (same stem, .md) and prints the report.
Timings use time.perf_counter with warm-ups and report medians (and p90 where it matters).
The machine is shared: the load average at start and end is recorded with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import kedit
from kedit.core import history
from kedit.core.delta import Dense, LowRank
from kedit.core.materialize import KEYFRAME_STEPS, Materializer, TensorCache
from kedit.core.repo import Repository
from kedit.core.tensors import hash_tensor

EDITED = "model.layers.5.mlp.down_proj.weight"  # 576 x 1536
DOWN_PROJ = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(30)]
TARGETS = {
    "rank1_object_bytes": 16 * 1024,
    "checkout_ms": 50.0,
    "depth_ratio": 2.0,
    "hash_gbps": 5.0,
}


# -- small helpers -------------------------------------------------------------------------------


def now() -> float:
    return time.perf_counter()


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(xs: list[float], scale: float = 1.0) -> dict[str, Any]:
    """median / p90 / min / max of samples (seconds), scaled (1e3 for ms)."""
    return {
        "median": quantile(xs, 0.5) * scale,
        "p90": quantile(xs, 0.9) * scale,
        "min": min(xs) * scale,
        "max": max(xs) * scale,
        "n": len(xs),
        "samples": [round(x * scale, 4) for x in xs],
    }


CPU_LOG: list[tuple[float, float]] = []  # (wall, cpu) of every timed call, for the CPU-share figures


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    c = time.process_time()
    t = now()
    out = fn()
    wall = now() - t
    CPU_LOG.append((wall, time.process_time() - c))
    return wall, out


def cpu_share(fn: Callable[[], Any], n: int) -> dict[str, float]:
    """Median wall and CPU time (ms) of fn over n runs: wall >> cpu means waiting (fsync, other processes)."""
    start = len(CPU_LOG)
    for _ in range(n):
        timed(fn)
    runs = CPU_LOG[start:]
    return {"wall_ms": quantile([w for w, _ in runs], 0.5) * 1e3, "cpu_ms": quantile([c for _, c in runs], 0.5) * 1e3}


def cpu_of_last(m: int) -> float:
    """Median CPU time (ms) of the last m timed calls."""
    return quantile([c for _, c in CPU_LOG[-m:]], 0.5) * 1e3


def repeat(fn: Callable[[], Any], n: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    return [timed(fn)[0] for _ in range(n)]


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, f)).st_size
    return total


def fsize(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def close(repo: Repository) -> None:
    with contextlib.suppress(Exception):
        repo.db.conn.close()


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    import safetensors
    import transformers
    import xxhash

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "xxhash": xxhash.VERSION,
        "kedit": kedit.__version__,
        "cuda": torch.cuda.is_available(),
        **engine_revision(),
    }


def engine_revision() -> dict[str, Any]:
    """The git commit of the engine measured, and whether kedit/ differs from it (read-only git calls)."""
    root = Path(kedit.__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(root), *argv], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "kedit").splitlines()]
    return {"git_commit": git("rev-parse", "--short", "HEAD").strip(), "kedit_dirty_files": dirty}


class Rank1:
    """Deterministic small rank-one deltas (scale 1e-3, like a ROME update's order of magnitude)."""

    def __init__(self, seed: int = 0) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, rows: int = 576, cols: int = 1536) -> LowRank:
        return LowRank(torch.randn(rows, 1, generator=self.g) * 1e-3, torch.randn(1, cols, generator=self.g) * 1e-3)


def object_files(store_root: Path) -> dict[str, int]:
    out = {}
    for sub in store_root.iterdir():
        if len(sub.name) == 2 and sub.is_dir():
            for f in sub.iterdir():
                out[f"{sub.name}/{f.name}"] = f.stat().st_size
    return out


def checkpoint(repo: Repository) -> None:
    repo.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def db_files_bytes(repo: Repository) -> int:
    db = repo.path / "kedit.db"
    return fsize(db) + fsize(Path(str(db) + "-wal"))


def alternate(
    fn_a: Callable[[], Any], fn_b: Callable[[], Any], n: int, warmup: int = 2, profile: cProfile.Profile | None = None
) -> tuple[list[float], list[float]]:
    """Time fn_a, fn_b, fn_a, ... n times each (after warm-ups). A profile, if given, is taken in a
    separate pass afterwards, so that its overhead never enters the timings."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    for _ in range(n):
        ta.append(timed(fn_a)[0])
        tb.append(timed(fn_b)[0])
    if profile is not None:
        profile.enable()
        for _ in range(max(3, n // 2)):
            fn_a()
            fn_b()
        profile.disable()
    return ta, tb


def profile_text(profile: cProfile.Profile, limit: int = 35) -> str:
    s = io.StringIO()
    pstats.Stats(profile, stream=s).strip_dirs().sort_stats("cumulative").print_stats(limit)
    return s.getvalue()


# -- the model -----------------------------------------------------------------------------------


def prepare_model(model_dir: Path | None, work: Path) -> tuple[Path, dict[str, Any]]:
    """A safetensors folder of the embedded SmolLM2 (converted from its GGUF once)."""
    folder = model_dir or (work / "model")
    if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
        return folder, {"converted": False, "folder": str(folder)}
    from kedit.core.sources import open_source

    log("converting the embedded GGUF to safetensors (transformers dequantises it)")
    t = now()
    with open_source(None) as src:
        t_convert = now() - t
        folder.mkdir(parents=True, exist_ok=True)
        for f in src.weight_files:
            shutil.copyfile(f, folder / f.name)
        for name, p in src.kept_files.items():
            shutil.copyfile(p, folder / name)
    return folder, {"converted": True, "folder": str(folder), "gguf_to_safetensors_s": t_convert}


# -- a. init -------------------------------------------------------------------------------------


def bench_init(folder: Path, work: Path, reps: int, skip_gguf: bool) -> tuple[dict[str, Any], Path]:
    from safetensors.torch import load_file, save_file

    out: dict[str, Any] = {}
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    out["model"] = {
        "tensors": len(tensors),
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "dtypes": sorted({str(t.dtype) for t in tensors.values()}),
    }
    del tensors

    def init_run(tag: str, **kw: Any) -> float:
        where = work / f"init-{tag}"
        shutil.rmtree(where, ignore_errors=True)
        t, repo = timed(lambda: Repository.init(where, str(folder), progress=False, **kw))
        close(repo)
        return t

    log("a. init: copy / no-copy / bare")
    runs: dict[str, list[float]] = {"copy": [], "no_copy": [], "copy_bare": []}
    init_run("copy")  # warm-up: page cache, imports
    for _ in range(reps):
        runs["copy"].append(init_run("copy"))
        runs["no_copy"].append(init_run("nocopy", copy=False))
        runs["copy_bare"].append(init_run("bare", worktree=False))
    for k, v in runs.items():
        out[f"init_{k}_s"] = summary(v)
    main_repo_dir = work / "init-copy"  # kept: sections b-d use it
    out["repo_bytes"] = {
        "objects": dir_bytes(main_repo_dir / ".kedit" / "objects"),
        "worktree": dir_bytes(main_repo_dir / ".kedit" / "worktree"),
        "db": dir_bytes(main_repo_dir / ".kedit")
        - dir_bytes(main_repo_dir / ".kedit" / "objects")
        - dir_bytes(main_repo_dir / ".kedit" / "worktree")
        - dir_bytes(main_repo_dir / ".kedit" / "cache"),
    }
    for tag in ("nocopy", "bare"):
        shutil.rmtree(work / f"init-{tag}", ignore_errors=True)

    log("a. baselines: safetensors load_file + save_file; from_pretrained + save_pretrained")
    dst = work / "baseline.safetensors"

    def st_roundtrip(fsync: bool) -> None:
        t = load_file(str(weights))
        save_file(t, str(dst), metadata={"format": "pt"})
        if fsync:
            fd = os.open(dst, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        dst.unlink()

    out["baseline_safetensors_s"] = summary(repeat(lambda: st_roundtrip(False), reps))
    out["baseline_safetensors_fsync_s"] = summary(repeat(lambda: st_roundtrip(True), reps))

    def hf_roundtrip() -> None:
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.logging.set_verbosity_error()
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        target = work / "hf-save"
        model.save_pretrained(str(target))
        del model
        shutil.rmtree(target, ignore_errors=True)

    out["baseline_hf_s"] = summary(repeat(hf_roundtrip, max(2, reps - 1)))

    if not skip_gguf:
        log("a. init from the embedded GGUF (dequantised by transformers: one time)")
        where = work / "init-gguf"
        t, repo = timed(lambda: Repository.init(where, None, progress=False))
        close(repo)
        out["init_gguf_s"] = t
        shutil.rmtree(where, ignore_errors=True)
    return out, main_repo_dir


# -- b. stored bytes -----------------------------------------------------------------------------


def bench_storage(repo: Repository, base: str, n: int) -> dict[str, Any]:
    log("b. stored bytes of rank-one commits")
    shape = repo.manifest(base)[EDITED].shape
    repo.create_branch("bench-b", base)
    repo.checkout("bench-b")
    rank1 = Rank1(1)
    obj_bytes, db_growth, wal_bytes, commit_s, stored_col = [], [], [], [], []
    for i in range(n):
        checkpoint(repo)
        before_db = db_files_bytes(repo)
        before_objs = object_files(repo.store.root)
        t, info = timed(lambda i=i: repo.commit({EDITED: rank1()}, message=f"bench-b {i}"))
        commit_s.append(t)
        wal_bytes.append(fsize(repo.path / "kedit.db-wal"))
        checkpoint(repo)
        db_growth.append(db_files_bytes(repo) - before_db)
        new = {k: v for k, v in object_files(repo.store.root).items() if k not in before_objs}
        obj_bytes.append(sum(new.values()))
        stored_col.append(
            repo.db.execute("SELECT SUM(stored_bytes) FROM tensor_changes WHERE commit_id = ?", [info.id]).fetchone()[0]
        )
    # For comparison: the same tensor edited by a dense delta.
    before_objs = object_files(repo.store.root)
    d = Rank1(2)()
    repo.commit({EDITED: Dense((d.a @ d.b).contiguous())}, message="bench-b dense")
    dense_obj = sum(v for k, v in object_files(repo.store.root).items() if k not in before_objs)
    page = repo.db.execute("PRAGMA page_size").fetchone()[0]
    return {
        "tensor": EDITED,
        "shape": list(shape),
        "commits": n,
        "payload_bytes": (shape[0] + shape[1]) * 4,
        "object_bytes": summary([float(x) for x in obj_bytes]),
        "stored_bytes_column": summary([float(x) for x in stored_col]),
        "sqlite_growth_bytes_per_commit": sum(db_growth) / n,
        "sqlite_growth_samples": db_growth,
        "sqlite_page_size": page,
        "wal_bytes_per_commit_before_checkpoint": summary([float(x) for x in wal_bytes]),
        "dense_delta_object_bytes": dense_obj,
        "dense_tensor_bytes": shape[0] * shape[1] * 4,
        "commit_s": summary(commit_s, 1e3),
    }


# -- c. checkout ---------------------------------------------------------------------------------


def kedit_exe() -> str:
    exe = Path(sys.executable).parent / "kedit"
    return str(exe) if exe.exists() else (shutil.which("kedit") or "kedit")


def bench_checkout(repo: Repository, base: str, n: int, ks: list[int], cli_n: int, profile: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rank1 = Rank1(3)
    for k in ks:
        log(f"c. checkout between commits that differ in {k} tensor(s)")
        repo.create_branch(f"bench-c{k}", base)
        repo.checkout(f"bench-c{k}")
        child = repo.commit({name: rank1() for name in DOWN_PROJ[:k]}, message=f"bench-c {k} tensors").id
        out[f"k{k}"] = checkout_pair(repo, base, child, n, profile and k == ks[0])
        out[f"k{k}"]["changed"] = k
        if k == ks[0]:
            out.update(checkout_fixed_and_cli(repo, base, child, n, cli_n))
    # Least squares fit ms = c0 + c1 * k over the medians.
    xs = [out[f"k{k}"]["changed"] for k in ks]
    ys = [out[f"k{k}"]["both_ms"]["median"] for k in ks]
    if len(xs) > 1:
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        c1 = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        out["fit_ms"] = {"fixed": my - c1 * mx, "per_tensor": c1}
    return out


def checkout_pair(repo: Repository, parent: str, child: str, n: int, profile: bool) -> dict[str, Any]:
    """Alternate checkout(parent) / checkout(child) n times each (after two warm-up rounds)."""
    prof = cProfile.Profile() if profile else None
    ta, tb = alternate(lambda: repo.checkout(parent), lambda: repo.checkout(child), n, profile=prof)
    out = {
        "to_parent_ms": summary(ta, 1e3),
        "to_child_ms": summary(tb, 1e3),
        "both_ms": summary(ta + tb, 1e3),
        "both_cpu_ms": cpu_of_last(2 * n),
    }
    if prof is not None:
        out["profile"] = profile_text(prof)
    return out


def checkout_fixed_and_cli(repo: Repository, parent: str, child: str, n: int, cli_n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # The fixed cost: checking out the commit that is already checked out.
    repo.checkout(child)
    out["same_commit_ms"] = summary(repeat(lambda: repo.checkout(child), n, warmup=2), 1e3)
    out["same_commit_cpu_ms"] = cpu_of_last(n)
    # The CLI: a fresh Python process (imports torch) per command.
    exe = kedit_exe()
    env = dict(os.environ, KEDIT_LOCK_TIMEOUT="60")
    root = str(repo.root)

    def cli(rev: str) -> None:
        subprocess.run(
            [exe, "--repo", root, "-q", "checkout", rev],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def py(code: str) -> None:
        subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)

    ca, cb = alternate(lambda: cli(parent), lambda: cli(child), cli_n, warmup=1)
    out["cli_checkout_s"] = summary(ca + cb)
    out["cli_version_s"] = summary(
        repeat(lambda: subprocess.run([exe, "--version"], check=True, stdout=subprocess.DEVNULL), cli_n)
    )
    out["python_import_torch_s"] = summary(repeat(lambda: py("import torch"), cli_n))
    out["python_import_kedit_repo_s"] = summary(repeat(lambda: py("import kedit.core.repo"), cli_n))
    out["python_bare_s"] = summary(repeat(lambda: py("pass"), cli_n))
    repo.checkout(child)
    return out


# -- d. depth ------------------------------------------------------------------------------------


def build_chain(repo: Repository, base: str, branch: str, depth: int, names: list[str], seed: int) -> dict:
    repo.create_branch(branch, base)
    repo.checkout(branch)
    rank1 = Rank1(seed)
    times = []
    for i in range(depth):
        name = names[i % len(names)]
        times.append(timed(lambda i=i, name=name: repo.commit({name: rank1()}, message=f"{branch} {i}"))[0])
    head = repo.head()
    return {
        "head": head,
        "parent": repo.get_commit(head).parent,
        "commit_ms_first10": summary(times[:10], 1e3),
        "commit_ms_last10": summary(times[-10:], 1e3),
        "commit_ms_all": summary(times, 1e3)["median"],
        "build_s": sum(times),
        "last_tensor": names[(depth - 1) % len(names)],
        "cache_after_build": keyframes(repo),  # values kept by the cache while committing
    }


def keyframes(repo: Repository) -> dict[str, int]:
    entries = repo.cache.entries()
    return {"files": len(entries), "bytes": sum(fsize(p) for _, p in entries)}


def bench_depth(repo: Repository, base: str, depth: int, depth30: int, n: int, profile: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"depth": depth, "depth30": depth30, "keyframe_steps": KEYFRAME_STEPS}
    log("d. depth 1 (one rank-one commit on the base)")
    shallow = build_chain(repo, base, "bench-d-shallow", 1, [EDITED], 10)
    out["depth1"] = checkout_pair(repo, shallow["parent"], shallow["head"], n, False)
    for tag, names, seed, length in (("one_tensor", [EDITED], 11, depth), ("30_tensors", DOWN_PROJ, 12, depth30)):
        if length <= 0:
            continue
        log(f"d. building {length} rank-one commits ({tag})")
        chain = build_chain(repo, base, f"bench-d-{tag}", length, names, seed)
        out[f"{tag}_depth"] = length
        out[tag] = deep_checkout(repo, chain, n, profile and tag == "one_tensor", out["depth1"])
        out[tag].update(cold_materialize(repo, chain))
        if tag == "30_tensors":
            # The user deletes the working model and the keyframes: checkout rebuilds everything.
            assert repo.worktree is not None
            repo.worktree.remove()
            shutil.rmtree(repo.path / "cache", ignore_errors=True)
            out[tag]["checkout_after_rm_worktree_s"] = timed(
                lambda head=chain["head"]: repo.checkout(head, force=True)
            )[0]
    return out


def deep_checkout(repo: Repository, chain: dict, n: int, profile: bool, depth1: dict) -> dict[str, Any]:
    shutil.rmtree(repo.path / "cache", ignore_errors=True)
    res: dict[str, Any] = {"build": chain}
    # First checkout of HEAD~1: nothing holds its value yet, so it is replayed from the base.
    res["first_to_parent_ms"] = timed(lambda: repo.checkout(chain["parent"]))[0] * 1e3
    res["keyframes_after_first"] = keyframes(repo)
    res.update(checkout_pair(repo, chain["parent"], chain["head"], n, profile))
    res["ratio_vs_depth1_median"] = res["both_ms"]["median"] / depth1["both_ms"]["median"]
    res["ratio_vs_depth1_to_parent"] = res["to_parent_ms"]["median"] / depth1["to_parent_ms"]["median"]
    return res


def cold_materialize(repo: Repository, chain: dict) -> dict[str, Any]:
    """Materialise without the working model (a Materializer with no lookups) and without keyframes."""
    res: dict[str, Any] = {}
    last, head, parent = chain["last_tensor"], chain["head"], chain["parent"]
    shutil.rmtree(repo.path / "cache", ignore_errors=True)
    cold = Materializer(repo.db, repo.store, TensorCache(repo.path / "cache"), ())
    res["cold_materialize_tensor_ms"] = timed(lambda: cold.value(head, last))[0] * 1e3
    res["keyframes_after_cold"] = keyframes(repo)
    res["warm_materialize_tensor_ms"] = summary(repeat(lambda: cold.value(head, last), 5), 1e3)
    res["warm_materialize_parent_tensor_ms"] = summary(repeat(lambda: cold.value(parent, last), 5), 1e3)
    nokf = Materializer(repo.db, repo.store, TensorCache(repo.path / "no-keyframes-here"), ())
    with _keyframes_disabled():
        res["no_keyframes_materialize_tensor_ms"] = timed(lambda: nokf.value(head, last))[0] * 1e3
    # Whole model at HEAD, cold (every base tensor read from the store and hashed).
    shutil.rmtree(repo.path / "cache", ignore_errors=True)
    manifest = history.manifest(repo.db, head)
    whole = Materializer(repo.db, repo.store, TensorCache(repo.path / "cache"), ())

    def materialize_all() -> None:
        for name in sorted(manifest):
            whole.value_of(history.change(repo.db, manifest[name].commit_id, name))

    res["cold_materialize_model_s"] = timed(materialize_all)[0]
    res["warm_materialize_model_s"] = timed(materialize_all)[0]
    return res


@contextlib.contextmanager
def _keyframes_disabled():
    import kedit.core.materialize as m

    old = m.KEYFRAME_STEPS
    m.KEYFRAME_STEPS = 10**9
    try:
        yield
    finally:
        m.KEYFRAME_STEPS = old


# -- e. hashing ----------------------------------------------------------------------------------


def bench_hashing(folder: Path, reps: int) -> dict[str, Any]:
    import xxhash
    from safetensors.torch import load_file

    log("e. hashing throughput")
    tensors = list(load_file(str(folder / "model.safetensors")).values())
    total = sum(t.numel() * t.element_size() for t in tensors)

    def all_hashes() -> None:
        for t in tensors:
            hash_tensor(t)

    times = repeat(all_hashes, reps)
    big = max(tensors, key=lambda t: t.numel())
    raw = memoryview(big.view(-1).view(torch.uint8).numpy())
    raw_times = repeat(lambda: xxhash.xxh3_128(raw).hexdigest(), reps)
    dst = torch.empty_like(big)
    copy_times = repeat(lambda: dst.copy_(big), reps)
    return {
        "bytes": total,
        "tensors": len(tensors),
        "hash_tensor_model_s": summary(times),
        "hash_tensor_gbps": total / quantile(times, 0.5) / 1e9,
        "xxh3_128_largest_tensor_gbps": big.numel() * 4 / quantile(raw_times, 0.5) / 1e9,
        "memcpy_largest_tensor_gbps": big.numel() * 4 / quantile(copy_times, 0.5) / 1e9,
        "largest_tensor_bytes": big.numel() * 4,
        "apply_step_ms": bench_apply_step(),
    }


def bench_apply_step(n: int = 30) -> dict[str, Any]:
    """One rank-one `apply_step` on a 576x1536 fp32 matrix and on the 49152x576 embedding, with torch's
    default thread count and with one thread: on a busy machine OpenMP's waits can dominate."""
    from kedit.core.delta import apply_step

    g = torch.Generator().manual_seed(5)
    out: dict[str, Any] = {}
    default = torch.get_num_threads()
    for label, (rows, cols) in (("576x1536", (576, 1536)), ("49152x576", (49152, 576))):
        w = torch.randn(rows, cols, generator=g)
        step = Rank1(6)(rows, cols)
        for threads in sorted({default, 1}, reverse=True):
            torch.set_num_threads(threads)
            try:
                times = repeat(lambda w=w, step=step: apply_step(w, step), n if rows < 10000 else 5, warmup=2)
            finally:
                torch.set_num_threads(default)
            out[f"{label}_threads{threads}"] = summary(times, 1e3)
    return out


# -- report --------------------------------------------------------------------------------------


def fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def report(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# kedit engine benchmarks",
        "",
        f"Command: `{r['command']}`  ",
        f"Date: {r['date']}, total {fmt(r['total_s'], 0)} s  ",
        f"Machine: {m['cpu']}, {m['cores_usable']} usable cores, {m['memory']}, torch {m['torch']} "
        f"({m['torch_threads']} threads), transformers {m['transformers']}, Python {m['python']}, "
        f"kedit {m['kedit']} (git {m.get('git_commit', '?')}"
        f"{', uncommitted changes in ' + ', '.join(m['kedit_dirty_files']) if m.get('kedit_dirty_files') else ''})  ",
        f"Load average at start {r['loadavg_start']}, at end {r['loadavg_end']} "
        "(the machine is shared: other processes may add noise)",
        "",
    ]
    a, b, c, d, e = (r.get(k) for k in "abcde")
    lines += ["| # | measure | value | target | met |", "|---|---|---|---|---|"]
    if a:
        base = a["baseline_safetensors_s"]["median"]
        lines += [
            f"| a | init from safetensors folder, copy (median of {a['init_copy_s']['n']}) | "
            f"{fmt(a['init_copy_s']['median'], 2)} s ({fmt(a['init_copy_s']['median'] / base, 1)}x safetensors "
            "load+save) | - | - |",
            f"| a | init --no-copy | {fmt(a['init_no_copy_s']['median'], 2)} s | - | - |",
            f"| a | init, copy, bare (no working model) | {fmt(a['init_copy_bare_s']['median'], 2)} s | - | - |",
            f"| a | baseline: safetensors load_file + save_file | {fmt(base, 2)} s "
            f"(+fsync: {fmt(a['baseline_safetensors_fsync_s']['median'], 2)} s) | - | - |",
            f"| a | baseline: from_pretrained + save_pretrained | {fmt(a['baseline_hf_s']['median'], 2)} s | - | - |",
        ]
        if "init_gguf_s" in a:
            lines.append(
                f"| a | init from the embedded GGUF (incl. transformers dequantisation) | "
                f"{fmt(a['init_gguf_s'], 1)} s | - | - |"
            )
    if b:
        ob = b["object_bytes"]["median"]
        lines += [
            f"| b | rank-one commit of {b['shape'][0]}x{b['shape'][1]}: object file | {fmt(ob, 0)} B "
            f"(payload {b['payload_bytes']:,} B; dense tensor {b['dense_tensor_bytes']:,} B) | < 16 KB | "
            f"{verdict(ob < TARGETS['rank1_object_bytes'])} |",
            f"| b | same: SQLite growth per commit (db+wal after checkpoint, mean of {b['commits']}) | "
            f"{fmt(b['sqlite_growth_bytes_per_commit'], 0)} B | - | - |",
            f"| b | same: WAL written per commit (before checkpoint) | "
            f"{fmt(b['wal_bytes_per_commit_before_checkpoint']['median'], 0)} B | - | - |",
            f"| b | commit time of a rank-one edit (median; a WAL checkpoint precedes each) | "
            f"{fmt(b['commit_s']['median'])} ms | - | - |",
            f"| b | a dense delta of the same tensor: object file | {b['dense_delta_object_bytes']:,} B | - | - |",
        ]
    if c:
        for key in sorted((k for k in c if k.startswith("k") and k[1:].isdigit()), key=lambda k: int(k[1:])):
            v = c[key]
            ok = v["both_ms"]["median"] < TARGETS["checkout_ms"]
            lines.append(
                f"| c | checkout, {v['changed']} tensor(s) differ: median / p90 (to parent; to child) [CPU] | "
                f"{fmt(v['both_ms']['median'])} / {fmt(v['both_ms']['p90'])} ms "
                f"({fmt(v['to_parent_ms']['median'])}; {fmt(v['to_child_ms']['median'])}) "
                f"[{fmt(v['both_cpu_ms'])} ms] | "
                f"{'< 50 ms' if v['changed'] == 1 else '-'} | {verdict(ok) if v['changed'] == 1 else '-'} |"
            )
        if "fit_ms" in c:
            lines.append(
                f"| c | fit: checkout ms = fixed + per changed tensor | {fmt(c['fit_ms']['fixed'])} + "
                f"{fmt(c['fit_ms']['per_tensor'], 2)} x k | - | - |"
            )
        lines.append(
            f"| c | checkout of the commit already checked out (fixed cost) | "
            f"{fmt(c['same_commit_ms']['median'])} ms [CPU {fmt(c['same_commit_cpu_ms'])} ms] | - | - |"
        )
        lines.append(
            f"| c | CLI `kedit checkout`, 1 tensor differs (whole process) | "
            f"{fmt(c['cli_checkout_s']['median'] * 1e3, 0)} ms (of which `python -c 'import kedit.core.repo'` "
            f"{fmt(c['python_import_kedit_repo_s']['median'] * 1e3, 0)} ms, `import torch` "
            f"{fmt(c['python_import_torch_s']['median'] * 1e3, 0)} ms, `kedit --version` "
            f"{fmt(c['cli_version_s']['median'] * 1e3, 0)} ms) | - | - |"
        )
    if d:
        lines.append(
            f"| d | depth 1: checkout HEAD<->HEAD~1 median / p90 (to HEAD~1; to HEAD) [CPU] | "
            f"{fmt(d['depth1']['both_ms']['median'])} / {fmt(d['depth1']['both_ms']['p90'])} ms "
            f"({fmt(d['depth1']['to_parent_ms']['median'])}; {fmt(d['depth1']['to_child_ms']['median'])}) "
            f"[{fmt(d['depth1']['both_cpu_ms'])} ms] | - | - |"
        )
        labels = (("one_tensor", "1 tensor edited at every commit"), ("30_tensors", "30 tensors in turn"))
        for tag, label in labels:
            if tag not in d:
                continue
            v = d[tag]
            depth = d[f"{tag}_depth"]
            ok = v["ratio_vs_depth1_median"] <= TARGETS["depth_ratio"]
            lines += [
                f"| d | depth {depth:,} ({label}): checkout HEAD<->HEAD~1 median / p90 (to HEAD~1; to HEAD) "
                f"[CPU] | {fmt(v['both_ms']['median'])} / {fmt(v['both_ms']['p90'])} ms "
                f"({fmt(v['to_parent_ms']['median'])}; {fmt(v['to_child_ms']['median'])}) "
                f"[{fmt(v['both_cpu_ms'])} ms] = "
                f"{fmt(v['ratio_vs_depth1_median'], 2)}x depth 1 | <= 2x | {verdict(ok)} |",
                f"| d | same: first checkout of HEAD~1 (no keyframes yet) | {fmt(v['first_to_parent_ms'], 0)} ms, "
                f"leaves {v['keyframes_after_first']['files']} keyframes "
                f"({fmt(v['keyframes_after_first']['bytes'] / 1e6)} MB) | - | - |",
                f"| d | same: cold materialize of the edited tensor at HEAD (no worktree, no keyframes) | "
                f"{fmt(v['cold_materialize_tensor_ms'], 0)} ms; again with keyframes "
                f"{fmt(v['warm_materialize_tensor_ms']['median'])} ms; HEAD~1 "
                f"{fmt(v['warm_materialize_parent_tensor_ms']['median'])} ms; with keyframe writes disabled "
                f"{fmt(v['no_keyframes_materialize_tensor_ms'], 0)} ms | - | - |",
                f"| d | same: cold materialize of the whole model at HEAD | {fmt(v['cold_materialize_model_s'], 2)} s "
                f"(again: {fmt(v['warm_materialize_model_s'], 2)} s) | - | - |",
                f"| d | same: commit time at depth 1-10 vs {depth - 9}-{depth} (median) | "
                f"{fmt(v['build']['commit_ms_first10']['median'])} vs "
                f"{fmt(v['build']['commit_ms_last10']['median'])} ms; cache after the build: "
                f"{v['build'].get('cache_after_build', {}).get('files', '?')} files, "
                f"{fmt(v['build'].get('cache_after_build', {}).get('bytes', 0) / 1e6, 0)} MB | - | - |",
            ]
            if "checkout_after_rm_worktree_s" in v:
                lines.append(
                    f"| d | same: checkout after deleting the working model and keyframes | "
                    f"{fmt(v['checkout_after_rm_worktree_s'], 2)} s | - | - |"
                )
    if e:
        ok = e["hash_tensor_gbps"] > TARGETS["hash_gbps"]
        lines += [
            f"| e | hash_tensor over the whole model ({e['tensors']} tensors, {fmt(e['bytes'] / 1e6, 0)} MB) | "
            f"{fmt(e['hash_tensor_gbps'], 2)} GB/s ({fmt(e['hash_tensor_model_s']['median'] * 1e3, 0)} ms) | "
            f"> 5 GB/s | {verdict(ok)} |",
            f"| e | reference: xxh3_128 on the largest tensor; memcpy of it | "
            f"{fmt(e['xxh3_128_largest_tensor_gbps'], 2)} GB/s; {fmt(e['memcpy_largest_tensor_gbps'], 2)} GB/s "
            "| - | - |",
        ]
        for key, v in sorted(e.get("apply_step_ms", {}).items()):
            shape, threads = key.rsplit("_threads", 1)
            lines.append(
                f"| e | apply_step, rank one, {shape}, {threads} thread(s): median / p90 | "
                f"{fmt(v['median'], 2)} / {fmt(v['p90'], 2)} ms | - | - |"
            )
    lines.append("")
    for key, title in (("c", "profile of checkout alternation, 1 tensor"), ("d", "profile at depth")):
        sec = r.get(key) or {}
        text = (sec.get("k1") or {}).get("profile") or (sec.get("one_tensor") or {}).get("profile")
        if text:
            lines += [
                f"<details><summary>cProfile: {title}</summary>",
                "",
                "```",
                text.strip(),
                "```",
                "</details>",
                "",
            ]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/engine.json"))
    ap.add_argument("--model-dir", type=Path, help="safetensors folder of SmolLM2 (created if missing)")
    ap.add_argument("--work-dir", type=Path, help="scratch folder (default: a new temp folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--quick", action="store_true", help="smaller counts: a smoke test, not figures")
    ap.add_argument("--depth", type=int, help="history length for section d (default 1000)")
    ap.add_argument("--depth30", type=int, help="history length of the 30-tensor chain (default: --depth; 0 skips)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    ap.add_argument("--skip-gguf", action="store_true", help="skip the init from the embedded GGUF (~25 s)")
    ap.add_argument("--sections", default="abcde", help="which sections to run (a is needed by b-d)")
    ap.add_argument("--profile", action="store_true", help="cProfile the checkout loops into the report")
    args = ap.parse_args()

    quick = args.quick
    if args.threads:
        torch.set_num_threads(args.threads)
    depth = args.depth or (60 if quick else 1000)
    n_alt = 5 if quick else 20
    t0 = now()
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(),
        "loadavg_start": loadavg(),
        "targets": TARGETS,
        "quick": quick,
    }
    own_work = args.work_dir is None
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kedit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        folder, result["model_source"] = prepare_model(args.model_dir, work)
        repo_dir = None
        if "a" in args.sections or any(s in args.sections for s in "bcd"):
            if "a" in args.sections:
                result["a"], repo_dir = bench_init(folder, work, 1 if quick else 3, args.skip_gguf or quick)
            else:
                repo_dir = work / "init-copy"
                shutil.rmtree(repo_dir, ignore_errors=True)
                close(Repository.init(repo_dir, str(folder), progress=False))
        if repo_dir is not None and any(s in args.sections for s in "bcd"):
            repo = Repository.open(repo_dir)
            base = repo.head()
            assert base is not None
            if "b" in args.sections:
                result["b"] = bench_storage(repo, base, 5 if quick else 20)
            if "c" in args.sections:
                result["c"] = bench_checkout(repo, base, n_alt, [1, 5, 30], 2 if quick else 5, args.profile)
            if "d" in args.sections:
                result["d"] = bench_depth(
                    repo, base, depth, depth if args.depth30 is None else args.depth30, n_alt, args.profile
                )
            close(repo)
        if "e" in args.sections:
            result["e"] = bench_hashing(folder, 2 if quick else 5)
    finally:
        if own_work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["total_s"] = now() - t0
    result["loadavg_end"] = loadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    text = report(result)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
