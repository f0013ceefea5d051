"""Time and peak anonymous memory of kedit's commands on a randomly initialised 7B-shape Llama.

Builds a bfloat16 Llama checkpoint of Llama-2-7B's shape (hidden 4096, 32 layers, intermediate
11008, vocab 32000: 13.5 GB in 5 GB shards) on disk one tensor at a time (kedit's streaming
safetensors writer), then runs each command in its own process, one at a time, sampling the
process's RssAnon (anonymous memory: file pages mapped for reading are not counted) from
/proc every 50 ms. The yardstick is `cp -r` + `sync` of the checkpoint. The test Hub server
(tests/hubserver.py) runs in its own process, so its memory is not counted. Outputs are deleted
as soon as they are measured: at most about two copies of the weights are on disk at once, and
everything is deleted at the end.

    python bench/streaming_7b.py --work /tmp/kedit-stream7b --out bench/results/streaming_7b
    python bench/streaming_7b.py --layers 4 --hidden 1024 ...    # a quick run at a smaller shape
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kedit.core.store import stream_tensors_atomic  # noqa: E402
from kedit.core.stwriter import TensorSpec  # noqa: E402

TOKEN = "hf_bench_token"
REPO_ID = "bench/llama-7b-shape"
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


def start_hub(root: Path) -> tuple[subprocess.Popen, str]:
    """tests/hubserver.py in its own process; returns it and its URL."""
    code = ("import sys, time; from pathlib import Path; from tests.hubserver import HubServer; "
            f"s = HubServer(Path(sys.argv[1]), {{{TOKEN!r}: 'bench'}}).start(); "
            f"s.store.create_repo({REPO_ID!r}); print(s.url, flush=True); time.sleep(10**6)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    if not url:
        raise SystemExit("the Hub server did not start")
    return proc, url


def markdown(figures: dict) -> str:
    gb = figures["weights_bytes"] / 1e9
    base = figures["cp_sync_seconds"]
    lines = [f"# Streaming at a 7B shape ({figures['shape']}, bfloat16, {gb:.1f} GB)", "",
             f"`cp -r` + `sync` of the checkpoint: {base:.1f} s. Load average at the start: "
             f"{', '.join(f'{x:.1f}' for x in figures['load_average'])}.", "",
             "| command | wall time | vs cp+sync | peak anonymous memory | what it reads / writes |",
             "|---|---|---|---|---|"]
    for name, row in figures["commands"].items():
        lines.append(f"| `{name}` | {row['seconds']:.1f} s | {row['seconds'] / base:.2f}x | "
                     f"{row['peak_anon_mb']:.0f} MB | {row['io']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/kedit-stream7b"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/streaming_7b")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
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
    figures: dict = {"shape": shape, "load_average": os.getloadavg(), "commands": {}}
    hub = None
    try:
        model, repo = work / "model", work / "repo"
        start = time.perf_counter()
        figures["weights_bytes"] = build_checkpoint(model, llama_specs(args.hidden, args.layers, args.intermediate,
                                                                       args.vocab), config)
        figures["build_seconds"] = round(time.perf_counter() - start, 1)
        print(f"built {figures['weights_bytes'] / 1e9:.2f} GB in {figures['build_seconds']} s", flush=True)
        figures["cp_sync_seconds"] = round(cp_sync(model, work / "copy"), 1)
        print(f"cp+sync {figures['cp_sync_seconds']} s", flush=True)
        hub, url = start_hub(work / "hub")
        env = {**os.environ, "HF_ENDPOINT": url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_OFFLINE": "0", "KEDIT_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        worktree = repo / ".kedit" / "worktree"

        def run(name: str, io: str, *argv: str) -> None:
            row = measure([KEDIT, "--repo", str(repo), *argv, "--quiet"], env)
            row["io"] = io
            figures["commands"][name] = row
            print(name, row, flush=True)
            save(args.out, figures)  # after each command: a run cut short keeps what it measured

        def drop_worktree() -> None:
            shutil.rmtree(worktree)
            (repo / ".kedit" / "worktree.json").unlink()

        run("init --no-copy", "reads and hashes the weights; writes the working model", "init", str(model),
            "--no-copy")
        run("fsck", "re-hashes the referenced weights and the working model", "fsck")
        run("gc --prune now", "walks the history and the object store", "gc", "--prune", "now")
        drop_worktree()
        run("checkout --force main", "writes the working model (one shard per tensor)", "checkout", "--force",
            "main")
        drop_worktree()
        run("export", "writes the weights as 5 GB shards", "export", "main", str(work / "export"))
        shutil.rmtree(work / "export")
        subprocess.run([KEDIT, "--repo", str(repo), "remote", "add", "origin", f"hf://{REPO_ID}"],
                       env=env, check=True)
        run("push", "reads each layer's shard twice (SHA-256, then upload) without writing it; the server stores it",
            "push", "origin", "main")
        shutil.rmtree(model)
        shutil.rmtree(repo)
        run("clone --bare", "reads each shard as it downloads, hashing each tensor into its object", "clone", "--bare",
            f"hf://{REPO_ID}", str(work / "clone"))
    finally:
        if hub is not None:
            hub.terminate()
            hub.wait()
        shutil.rmtree(work, ignore_errors=True)
    save(args.out, figures)
    print(markdown(figures))


def save(out: Path, figures: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(figures, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(figures))


if __name__ == "__main__":
    main()
