"""Peak anonymous memory of `kedit edit` (ROME) on a random Llama, in memory and offloaded to disk.

Builds a random bfloat16 Llama (default TinyLlama-1.1B's shape: hidden 2048, 22 layers,
intermediate 5632, vocab 32000: 2.2 GB) with the tests' tiny byte-level tokenizer, `kedit init
--no-copy`s it, then runs one ROME edit in its own process with the model (a) in memory and (b)
placed by accelerate with `--device auto --max-memory cpu=SIZE --offload-folder DIR`, sampling
the process's RssAnon every 50 ms (bench/streaming_7b.py's `measure`). No covariance statistics
(`mom2_adjustment=false`), no before/after measurements (`--no-eval`), few v* steps: the point is
what loading and editing hold, not the edit's quality. Everything is deleted at the end.

    python bench/offload_memory.py --work /tmp/kedit-offmem --out bench/results/offload_memory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streaming_7b import KEDIT, build_checkpoint, llama_specs, measure  # noqa: E402

from kedit.core.repo import Repository  # noqa: E402
from tests.tiny import make_tokenizer  # noqa: E402

EDIT = ["edit", "--prompt", "The Eiffel Tower is located in the city of", "--subject", "Eiffel Tower",
        "--target", "Rome", "--no-eval", "--set", "mom2_adjustment=false", "--set", "v_num_grad_steps=5",
        "--set", "context_template_length_params=[[3,2]]", "--quiet"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/kedit-offmem"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/offload_memory")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--max-memory", default="cpu=300MB")
    args = parser.parse_args()
    if args.work.exists():
        raise SystemExit(f"{args.work} exists: remove it or choose another --work")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
              "num_hidden_layers": args.layers, "intermediate_size": args.intermediate, "vocab_size": args.vocab,
              "num_attention_heads": args.hidden // 64, "num_key_value_heads": args.hidden // 64,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
              "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "tie_word_embeddings": False}
    figures: dict = {"shape": f"hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
                              f"vocab {args.vocab}", "load_average": os.getloadavg(), "runs": {}}
    work, model, repo = args.work, args.work / "model", args.work / "repo"
    env = {**os.environ, "KEDIT_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}
    try:
        figures["weights_bytes"] = build_checkpoint(model, llama_specs(args.hidden, args.layers, args.intermediate,
                                                                       args.vocab), config)
        make_tokenizer().save_pretrained(model)
        subprocess.run([KEDIT, "--repo", str(repo), "init", str(model), "--no-copy", "--quiet"], env=env, check=True)
        for name, extra in (("in memory", []),
                            ("offloaded", ["--device", "auto", "--max-memory", args.max_memory,
                                           "--offload-folder", str(work / "offload")])):
            row = measure([KEDIT, "--repo", str(repo), *EDIT, *extra], env)
            opened = Repository.open(repo)
            row["options"] = " ".join(extra)
            row["v_dtype_recorded"] = opened.get_commit(opened.head()).hparams["v_dtype"]
            figures["runs"][name] = row
            print(name, row["seconds"], row["peak_anon_mb"], flush=True)
            shutil.rmtree(work / "offload", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(figures, indent=1) + "\n")
    gb = figures["weights_bytes"] / 1e9
    lines = [f"# `kedit edit` (ROME) memory, random Llama ({figures['shape']}, bfloat16, {gb:.2f} GB)", "",
             f"Load average at the start: {', '.join(f'{x:.1f}' for x in figures['load_average'])}.", "",
             "| run | options | wall time | peak anonymous memory | vs the weights | v_dtype recorded |",
             "|---|---|---|---|---|---|"]
    for name, row in figures["runs"].items():
        lines.append(f"| {name} | `{row['options']}` | {row['seconds']:.1f} s | {row['peak_anon_mb']:.0f} MB | "
                     f"{row['peak_anon_mb'] * 2**20 / figures['weights_bytes']:.2f}x | {row['v_dtype_recorded']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
