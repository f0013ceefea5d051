"""Does vLLM read kedit's PEFT adapter as the edits it holds? SmolLM2-135M gets 10 ROME edits (one
commit each, all on layer 5's `down_proj`) and one MEMIT batch of 3 other facts (several layers),
so the adapter has modules of different ranks (`rank_pattern`/`alpha_pattern`). In a fresh process
with vLLM installed, vLLM's own loader reads it: `PEFTHelper.from_local_dir` +
`validate_legal(LoRAConfig(max_lora_rank=16))`, then `LoRAModel.from_local_checkpoint` on the CPU.
Every module's weight as vLLM applies it (W + scaling * B @ A, with vLLM's per-module scaling) is
compared with kedit's full exported folder, and those weights, put into the base with plain
transformers, generate the 13 new targets (`tokenizer(prompt)`, greedy 10 tokens).

vLLM's serving engine needs a GPU; this checks its adapter reader and scaling, not its kernels.
vLLM pins a torch of its own: install it beside kedit without its dependencies, in another
environment (see bench/README.md), and pass that interpreter:

    OMP_NUM_THREADS=1 python bench/vllm_lora.py --vllm-python /path/to/venv/bin/python \
        --out bench/results/vllm_lora.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.peft_adapter import fact_dicts, generated_targets, kedit, size

LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def measure(root: Path) -> dict[str, Any]:
    """vLLM's reading of `root/lora`, against `root/full`, and what those weights generate."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import __version__ as vllm_version
    from vllm.config.lora import LoRAConfig
    from vllm.lora import lora_model
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    lora_model.PIN_MEMORY = False  # page-locking is for copies to a GPU; there is none here

    helper = PEFTHelper.from_local_dir(str(root / "lora"), max_position_embeddings=8192)
    helper.validate_legal(LoRAConfig(max_lora_rank=16))
    loaded = LoRAModel.from_local_checkpoint(str(root / "lora"), LLAMA_LORA_MODULES, helper, lora_model_id=1,
                                             device="cpu", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32).eval()
    full = {}
    for shard in sorted((root / "full").glob("*.safetensors")):
        full.update(load_file(shard))
    params = dict(base.named_parameters())
    modules = {}
    for name, lw in sorted(loaded.loras.items()):
        weight = params[f"{name}.weight"]
        as_vllm = weight.detach() + lw.scaling * (lw.lora_b @ lw.lora_a)
        expected = full[f"{name}.weight"].to(torch.float32)
        modules[name] = {"rank": lw.rank, "scaling": lw.scaling,
                         "max_abs_diff": (as_vllm - expected).abs().max().item(),
                         "weight_scale": expected.abs().max().item()}
        with torch.no_grad():
            weight.copy_(as_vllm)
    facts = json.loads((root / "facts.json").read_text())
    tok = AutoTokenizer.from_pretrained(root / "base")

    hits, texts = generated_targets(base, tok, facts)
    folder = AutoModelForCausalLM.from_pretrained(root / "full", dtype=torch.float32)
    folder_hits, folder_texts = generated_targets(folder, tok, facts)
    return {"vllm": vllm_version, "adapter_r": helper.r, "rank_pattern": helper.rank_pattern,
            "modules": modules, "targets": hits, "continuations": texts,
            "folder_targets": folder_hits, "same_text_as_folder": texts == folder_texts}


def markdown(report: dict[str, Any]) -> str:
    reader, n = report["vllm_reader"], len(report["facts"])
    worst = max(m["max_abs_diff"] / m["weight_scale"] for m in reader["modules"].values())
    lines = [f"# kedit's PEFT adapter read by vLLM {reader['vllm']}'s LoRA loader", "",
             f"{report['rome']} ROME edits + one MEMIT batch of {report['memit']}; adapter "
             f"{report['adapter_bytes']:,} bytes (r={reader['adapter_r']}, rank_pattern {reader['rank_pattern']}) "
             f"against the {report['folder_bytes']:,}-byte folder.", "",
             "| module | rank | vLLM scaling | largest difference from the folder's weight |", "|---|---|---|---|"]
    lines += [f"| {name} | {m['rank']} | {m['scaling']} | {m['max_abs_diff']:.2e} (weights up to "
              f"{m['weight_scale']:.2f}) |" for name, m in reader["modules"].items()]
    lines += ["", f"Largest difference relative to the weight's scale: {worst:.1e}. Those weights in the base, "
              f"plain transformers, `tokenizer(prompt)`, greedy 10 tokens: **{reader['targets']} of {n}** new "
              f"targets (the full folder: {reader['folder_targets']} of {n}; the same text as the folder: "
              f"{reader['same_text_as_folder']})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/vllm_lora.json"))
    ap.add_argument("--vllm-python", required=True, help="an interpreter that imports vllm")
    ap.add_argument("--rome", type=int, default=10)
    ap.add_argument("--memit", type=int, default=3)
    ap.add_argument("--stats-samples", default="64")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the fresh process's entry
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    facts = fact_dicts(args.rome + args.memit)
    report: dict[str, Any] = {"facts": facts, "rome": args.rome, "memit": args.memit}
    with tempfile.TemporaryDirectory(prefix="kedit-vllm-") as tmp:
        root = Path(tmp)
        kedit(root, "init", "--bare")
        kedit(root, "config", "stats.samples", args.stats_samples)
        (root / "facts.json").write_text(json.dumps(facts))
        (root / "rome.json").write_text(json.dumps(facts[:args.rome]))
        (root / "memit.json").write_text(json.dumps(facts[args.rome:]))
        t0 = time.perf_counter()
        kedit(root, "edit", "--method", "rome", "--requests", str(root / "rome.json"), "--no-eval")
        kedit(root, "edit", "--method", "memit", "--requests", str(root / "memit.json"), "--no-eval")
        report["edit_s"] = round(time.perf_counter() - t0, 1)
        root_commit = kedit(root, "log")["commits"][-1]["id"]
        lora = kedit(root, "export", "HEAD", str(root / "lora"), "--format", "peft")
        kedit(root, "export", "HEAD", str(root / "full"))
        kedit(root, "export", root_commit, str(root / "base"))
        report.update(adapter_bytes=size(root / "lora"), folder_bytes=size(root / "full"),
                      adapter_rank=lora["rank"], adapter_exact=lora["exact"])
        out = subprocess.run([args.vllm_python, __file__, "--vllm-python", args.vllm_python, "--measure", str(root)],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        report["vllm_reader"] = json.loads(out.strip().splitlines()[-1])
    args.out.write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
