"""Time and peak anonymous memory of kedit's commands on a randomly initialised 7B-shape Llama.

Builds a bfloat16 Llama checkpoint of Llama-2-7B's shape (hidden 4096, 32 layers, intermediate
11008, vocab 32000: 13.5 GB in 5 GB shards) on disk one tensor at a time (kedit's streaming
safetensors writer), then runs each command in its own process, one at a time, sampling the
process's RssAnon (anonymous memory: file pages mapped for reading are not counted) from
/proc every 50 ms. The yardstick is `cp -r` + `sync` of the checkpoint, run right before each
run of each command: its time varies severalfold from one run to the next on a shared machine
(the kernel's cost of new page-cache pages), so a ratio is taken between neighbours, and medians
over --repeat runs are reported. Each cp+sync and each command starts after --settle seconds of
quiet: this virtual machine hands free memory back to its host within seconds, and memory freed
a moment ago (the copy just deleted) is several times cheaper to write into than memory that has
sat free, so without the pause whichever runs first after a deletion is favoured.
huggingface_hub's own upload_folder and snapshot_download of the same bytes to and from the same
server are timed as a second yardstick for push and clone.
The test Hub server (tests/hubserver.py) runs in its own process, so its memory is not counted.
Outputs are deleted as soon as they are measured: at most four copies of the weights are on
disk at once (about 54 GB at the default shape), and everything is deleted at the end.

    python bench/streaming_7b.py --work /tmp/kedit-stream7b --out bench/results/streaming_7b
    python bench/streaming_7b.py --layers 2 --hidden 1024 --repeat 1 ...    # a quick run at a smaller shape
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kedit.core.store import stream_tensors_atomic  # noqa: E402
from kedit.core.stwriter import TensorSpec  # noqa: E402

TOKEN = "hf_bench_token"
REPO_ID = "bench/llama-7b-shape"
PLAIN_ID = "bench/plain-upload"  # the yardstick upload: not a kedit repository
KEDIT = str(Path(sys.executable).parent / "kedit")
MAX_SHARD = 5 * 10**9


def llama_specs(hidden: int, layers: int, intermediate: int, vocab: int) -> list[TensorSpec]:
    bf16 = "BF16"
    specs = [TensorSpec("model.embed_tokens.weight", bf16, (vocab, hidden)),
             TensorSpec("model.norm.weight", bf16, (hidden,)), TensorSpec("lm_head.weight", bf16, (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [TensorSpec(p + f"self_attn.{x}_proj.weight", bf16, (hidden, hidden)) for x in "qkvo"]
        specs += [TensorSpec(p + f"mlp.{x}_proj.weight", bf16, (intermediate, hidden)) for x in ("gate", "up")]
        specs += [TensorSpec(p + "mlp.down_proj.weight", bf16, (hidden, intermediate)),
                  TensorSpec(p + "input_layernorm.weight", bf16, (hidden,)),
                  TensorSpec(p + "post_attention_layernorm.weight", bf16, (hidden,))]
    return specs


def build_checkpoint(folder: Path, specs: list[TensorSpec], config: dict) -> int:
    """Random bf16 weights written tensor by tensor into transformers-style shards."""
    folder.mkdir(parents=True)
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > MAX_SHARD:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    generator = torch.Generator().manual_seed(0)
    by_name = {s.name: s for s in specs}

    bases: dict[tuple[int, ...], torch.Tensor] = {}

    def finite_bits(shape: tuple[int, ...]) -> torch.Tensor:
        # random bits with the exponent's top bit cleared: finite bfloat16 values below 2 in size
        bits = torch.randint(-2**15, 2**15, shape, generator=generator, dtype=torch.int16)
        return (bits & 0x3FFF) | (bits & -2**15)

    def value_of(name: str) -> torch.Tensor:
        # one random block per shape, its first 64 values fresh for each tensor: every tensor (and
        # its hash) differs, at the speed of a copy (random numbers are 10-100x slower to make)
        shape = by_name[name].shape
        if shape not in bases:
            bases[shape] = finite_bits(shape)
        value = bases[shape].clone()
        head = value.view(-1)[:64]
        head.copy_(finite_bits(head.shape))
        return value.view(torch.bfloat16)

    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        stream_tensors_atomic(folder / file, shard, value_of, {"format": "pt"})
        weight_map.update({s.name: file for s in shard})
    total = sum(s.nbytes for s in specs)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def sample_anon(pid: int, peak: list[int], stop: threading.Event) -> None:
    """Peak RssAnon (kB) of `pid`, read from /proc every 50 ms."""
    status = f"/proc/{pid}/status"
    while not stop.is_set():
        try:
            with open(status) as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
                        break
        except (FileNotFoundError, ProcessLookupError):
            return
        stop.wait(0.05)


def measure(argv: list[str], env: dict[str, str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, stop = [0], threading.Event()
    sampler = threading.Thread(target=sample_anon, args=(proc.pid, peak, stop), daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {out[-2000:]}{err[-2000:]}")
    return {"seconds": round(elapsed, 1), "peak_anon_mb": round(peak[0] / 1024, 1)}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def cp_sync(src: Path, dest: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dest)], check=True)
    subprocess.run(["sync"], check=True)
    elapsed = time.perf_counter() - start
    shutil.rmtree(dest)
    return elapsed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hub:
    """tests/hubserver.py in its own process, on a fixed port (a remote's URL outlives a restart),
    restarted empty when a run must upload everything again (its LFS store is shared by repos)."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.proc = root, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def restart(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        code = ("import sys, time; from pathlib import Path; from tests.hubserver import HubServer; "
                f"s = HubServer(Path(sys.argv[1]), {{{TOKEN!r}: 'bench'}}, port={self.port}).start(); "
                f"s.store.create_repo({REPO_ID!r}); s.store.create_repo({PLAIN_ID!r}); print(s.url, flush=True); "
                "time.sleep(10**6)")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(self.root)], cwd=ROOT, stdout=subprocess.PIPE,
                                     text=True)
        if not self.proc.stdout.readline().strip():
            raise SystemExit("the Hub server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.proc = None


def markdown(figures: dict) -> str:
    gb = figures["weights_bytes"] / 1e9
    lines = [f"# Streaming at a 7B shape ({figures['shape']}, bfloat16, {gb:.1f} GB)", "",
             f"Each command ran {figures['repeat']} times, each time right after `cp -r` + `sync` of the "
             "checkpoint (the yardstick, whose time varies from run to run on this shared machine), with "
             f"{figures.get('settle', 0):g} s of quiet before each; the "
             "table gives medians: of the times, of the yardsticks, and of each run's ratio to the yardstick "
             "just before it. Rows in italics are not kedit: huggingface_hub uploading or downloading the same "
             f"bytes to and from the same server. Load average at the start: "
             f"{', '.join(f'{x:.1f}' for x in figures['load_average'])}.", "",
             "| command | wall time | cp+sync before it | ratio | peak anonymous memory | what it reads / writes |",
             "|---|---|---|---|---|---|"]
    for name, row in figures["commands"].items():
        label = f"*{name}*" if row.get("yardstick") else f"`{name}`"
        lines.append(f"| {label} | {row['seconds']:.1f} s | {row['cp_sync_seconds']:.1f} s | {row['ratio']:.2f}x | "
                     f"{row['peak_anon_mb']:.0f} MB | {row['io']} |")
    rows = figures["commands"]
    pairs = (("push", "huggingface_hub upload_folder"), ("clone --bare", "huggingface_hub snapshot_download"))
    for ours, theirs in pairs:
        if ours in rows and theirs in rows:
            lines.append(f"\n`{ours}` took {rows[ours]['seconds'] / rows[theirs]['seconds']:.2f}x the time of "
                         f"{theirs} (medians).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/kedit-stream7b"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/streaming_7b")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each command, each after its own cp+sync")
    parser.add_argument("--settle", type=float, default=8.0,
                        help="seconds of quiet before each cp+sync and each command, so both find free memory "
                             "in the same state (this machine returns idle free memory to its host)")
    args = parser.parse_args()
    if args.work.exists():
        raise SystemExit(f"{args.work} exists: remove it or choose another --work")
    work = args.work
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
              "num_hidden_layers": args.layers, "intermediate_size": args.intermediate, "vocab_size": args.vocab,
              "num_attention_heads": args.hidden // 128, "num_key_value_heads": args.hidden // 128,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
              "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    shape = f"hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, vocab {args.vocab}"
    figures: dict = {"shape": shape, "load_average": os.getloadavg(), "repeat": args.repeat, "settle": args.settle,
                     "commands": {}}
    hub = Hub(work / "hub")
    try:
        model, repo = work / "model", work / "repo"
        start = time.perf_counter()
        figures["weights_bytes"] = build_checkpoint(model, llama_specs(args.hidden, args.layers, args.intermediate,
                                                                       args.vocab), config)
        figures["build_seconds"] = round(time.perf_counter() - start, 1)
        print(f"built {figures['weights_bytes'] / 1e9:.2f} GB in {figures['build_seconds']} s", flush=True)
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_OFFLINE": "0", "KEDIT_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        worktree = repo / ".kedit" / "worktree"

        def measured(name: str, io: str, argv: list[str], before=None, after=None, yardstick: bool = False) -> None:
            """`argv` run --repeat times, each after `before()` and a cp+sync, and followed by `after()`."""
            runs = []
            for _ in range(args.repeat):
                if before:
                    before()
                time.sleep(args.settle)
                base = cp_sync(model, work / "copy")
                time.sleep(args.settle)
                row = measure(argv, env)
                if after:
                    after()
                runs.append({**row, "cp_sync_seconds": round(base, 1), "ratio": round(row["seconds"] / base, 2)})
                print(name, runs[-1], flush=True)
            figures["commands"][name] = {
                "seconds": statistics.median(r["seconds"] for r in runs),
                "cp_sync_seconds": statistics.median(r["cp_sync_seconds"] for r in runs),
                "ratio": statistics.median(r["ratio"] for r in runs),
                "peak_anon_mb": max(r["peak_anon_mb"] for r in runs), "io": io, "runs": runs,
                **({"yardstick": True} if yardstick else {})}
            save(args.out, figures)  # after each command: a run cut short keeps what it measured

        def kedit(*argv: str) -> list[str]:
            return [KEDIT, "--repo", str(repo), *argv, "--quiet"]

        def drop_repo() -> None:
            shutil.rmtree(repo, ignore_errors=True)

        def drop_worktree() -> None:
            shutil.rmtree(worktree)
            (repo / ".kedit" / "worktree.json").unlink()

        def python(code: str, *argv: str) -> list[str]:
            return [sys.executable, "-c", code, *argv]

        measured("init --no-copy", "reads and hashes the weights; writes the working model",
                 kedit("init", str(model), "--no-copy"), before=drop_repo)
        measured("fsck", "re-hashes the referenced weights and the working model", kedit("fsck"))
        measured("gc --prune now", "walks the history and the object store", kedit("gc", "--prune", "now"))
        measured("checkout --force main", "writes the working model (one shard per tensor)",
                 kedit("checkout", "--force", "main"), before=drop_worktree)
        measured("export", "writes the weights as 5 GB shards", kedit("export", "main", str(work / "export")),
                 after=lambda: shutil.rmtree(work / "export"))

        def fresh_remote() -> None:  # an empty Hub, and a remote that has not seen it: push sends everything
            hub.restart()
            subprocess.run(kedit("remote", "remove", "origin"), env=env, capture_output=True)
            subprocess.run(kedit("remote", "add", "origin", f"hf://{REPO_ID}"), env=env, check=True)

        measured("huggingface_hub upload_folder", "the checkpoint's files from disk, each read twice (SHA-256, "
                 "upload); the server stores them",
                 python("import sys; from huggingface_hub import HfApi; "
                        "HfApi().upload_folder(repo_id=sys.argv[1], folder_path=sys.argv[2])", PLAIN_ID, str(model)),
                 before=hub.restart, yardstick=True)
        measured("push", "reads each layer's shard twice (SHA-256 in a thread ahead, then upload, three at "
                 "once) without writing it; the server stores it", kedit("push", "origin", "main"), before=fresh_remote)
        drop_repo()
        measured("huggingface_hub snapshot_download", "downloads the pushed files into a folder",
                 python("import sys; from huggingface_hub import snapshot_download; "
                        "snapshot_download(sys.argv[1], local_dir=sys.argv[2])", REPO_ID, str(work / "download")),
                 after=lambda: shutil.rmtree(work / "download"), yardstick=True)
        measured("clone --bare", "reads each shard as it downloads, hashing each tensor into its object",
                 [KEDIT, "clone", "--bare", f"hf://{REPO_ID}", str(work / "clone"), "--quiet"],
                 after=lambda: shutil.rmtree(work / "clone"))
    finally:
        hub.stop()
        shutil.rmtree(work, ignore_errors=True)
    save(args.out, figures)
    print(markdown(figures))


def save(out: Path, figures: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(figures, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(figures))


if __name__ == "__main__":
    main()
