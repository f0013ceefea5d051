"""10 ROME edits of SmolLM2-135M shipped as one PEFT LoRA adapter: its size against the full folder,
and in a fresh process, with no kedit code, how many new targets `PeftModel.from_pretrained` over
the base generates (`tokenizer(prompt)` + greedy `generate(max_new_tokens=10)`), next to the full
exported folder and the bare base.

    nice -n 10 env OMP_NUM_THREADS=1 python bench/peft_adapter.py --out bench/results/peft_adapter.json
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

from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import counterfact_requests
from kedit.cli import cli


def kedit(root: Path, *args: str) -> dict:
    result = CliRunner().invoke(cli, ["--repo", str(root), *args, "--json"])
    if result.exit_code != 0:
        raise SystemExit(f"kedit {' '.join(args)} failed: {result.stderr or result.stdout}")
    return json.loads(result.stdout)


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fact_dicts(n: int) -> list[dict[str, str]]:
    """`n` known_dev.json counterfacts as `kedit edit --requests` reads them."""
    return [{"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new, "target_true": r.target_true}
            for r in counterfact_requests(n)]


def generated_targets(model: Any, tok: Any, facts: list[dict[str, str]]) -> tuple[int, list[str]]:
    """How many new targets `model` generates as a user calls it (`tokenizer(prompt)`, greedy 10
    tokens, one prompt at a time), and the continuations."""
    import torch

    texts = []
    for f in facts:
        ids = tok(f["prompt"].replace("{}", f["subject"]), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=10, do_sample=False)
        texts.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return sum(f["target_new"].lower() in t.lower() for f, t in zip(facts, texts, strict=True)), texts


def measure(root: Path) -> dict[str, Any]:
    """What a user of the three folders gets: plain transformers and PEFT, one prompt at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    facts = json.loads((root / "facts.json").read_text())
    tok = AutoTokenizer.from_pretrained(root / "base")

    def generated(model: Any) -> tuple[int, list[str], float]:
        t0 = time.perf_counter()
        hits, texts = generated_targets(model, tok, facts)
        return hits, texts, round(time.perf_counter() - t0, 1)

    rows: dict[str, Any] = {}
    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32).eval()
    rows["base"] = {"load_s": round(time.perf_counter() - t0, 1)}
    hits, texts, gen_s = generated(base)
    rows["base"].update(targets=hits, generate_s=gen_s, continuations=texts)
    t0 = time.perf_counter()
    lora = PeftModel.from_pretrained(base, root / "lora").eval()
    rows["peft"] = {"load_adapter_s": round(time.perf_counter() - t0, 1)}
    hits, texts, gen_s = generated(lora)
    rows["peft"].update(targets=hits, generate_s=gen_s, continuations=texts)
    del lora, base
    t0 = time.perf_counter()
    full = AutoModelForCausalLM.from_pretrained(root / "full", dtype=torch.float32).eval()
    rows["folder"] = {"load_s": round(time.perf_counter() - t0, 1)}
    hits, texts, gen_s = generated(full)
    rows["folder"].update(targets=hits, generate_s=gen_s, continuations=texts)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/peft_adapter.json"))
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--stats-samples", default="64")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the fresh process's entry
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    facts = fact_dicts(args.n)
    report: dict[str, Any] = {"facts": facts}
    with tempfile.TemporaryDirectory(prefix="kedit-peft-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        kedit(root, "init", "--bare")
        kedit(root, "config", "stats.samples", args.stats_samples)
        report["init_s"] = round(time.perf_counter() - t0, 1)
        (root / "facts.json").write_text(json.dumps(facts))
        t0 = time.perf_counter()
        kedit(root, "edit", "--method", "rome", "--requests", str(root / "facts.json"), "--no-eval")
        report["edit_s"] = round(time.perf_counter() - t0, 1)
        commits = kedit(root, "log")["commits"]
        report["commits"] = len(commits)
        t0 = time.perf_counter()
        lora = kedit(root, "export", "HEAD", str(root / "lora"), "--format", "peft")
        report["export_peft_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        kedit(root, "export", "HEAD", str(root / "full"))
        report["export_folder_s"] = round(time.perf_counter() - t0, 1)
        kedit(root, "export", commits[-1]["id"], str(root / "base"))
        report["adapter_bytes"] = size(root / "lora")
        report["adapter_files"] = {p.name: p.stat().st_size for p in sorted((root / "lora").iterdir())}
        report["folder_bytes"] = size(root / "full")
        report["adapter_rank"], report["adapter_exact"] = lora["rank"], lora["exact"]
        report["adapter_modules"] = lora["modules"]
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--measure", str(root)], check=True,
                             capture_output=True, text=True).stdout
        report["fresh_process_s"] = round(time.perf_counter() - t0, 1)
        report["rows"] = json.loads(out.strip().splitlines()[-1])
    args.out.write_text(json.dumps(report, indent=1))
    n, rows = args.n, report["rows"]
    lines = [f"# {n} ROME edits of SmolLM2-135M as one PEFT adapter", "",
             "Fresh process, no kedit code: `tokenizer(prompt)` + greedy `generate(max_new_tokens=10)`.", "",
             "| model | bytes on disk | new targets generated | load s | generate s |", "|---|---|---|---|---|",
             f"| base + PEFT adapter (`PeftModel.from_pretrained`) | {report['adapter_bytes']:,} (adapter, rank "
             f"{report['adapter_rank']}) | {rows['peft']['targets']} of {n} | {rows['peft']['load_adapter_s']} "
             f"(adapter) | {rows['peft']['generate_s']} |",
             f"| full exported folder | {report['folder_bytes']:,} | {rows['folder']['targets']} of {n} | "
             f"{rows['folder']['load_s']} | {rows['folder']['generate_s']} |",
             f"| bare base (root revision exported) | | {rows['base']['targets']} of {n} | {rows['base']['load_s']} | "
             f"{rows['base']['generate_s']} |", "",
             f"init {report['init_s']} s, {n} ROME edits {report['edit_s']} s, export --format peft "
             f"{report['export_peft_s']} s, export folder {report['export_folder_s']} s."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
