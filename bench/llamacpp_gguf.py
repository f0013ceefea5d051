"""Edits as llama.cpp runs them: 10 ROME edits of SmolLM2-135M (known_dev.json counterfacts, one
commit each) exported to GGUF at f16, q8_0, q4_1 and q4_0 and run by llama.cpp through
llama-cpp-python, as a user would (`llm(prompt, max_tokens=10, temperature=0)`): how many new
targets are generated, next to the unedited base exported at the same precision, and how many
unrelated prompts (other subjects' facts) still hold their answer or the base's continuation. The
full Hugging Face folder, run by plain transformers, is the reference row.

    nice -n 10 env OMP_NUM_THREADS=1 python bench/llamacpp_gguf.py --out bench/results/llamacpp_gguf.json

Needs llama-cpp-python (not a kedit dependency: built from source, see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import counterfact_requests, user_continuations
from kedit.cli import cli
from kedit.eval.metrics import holds, shows

QUANTS = ("f16", "q8_0", "q4_1", "q4_0")


def kedit(root: Path, *args: str) -> dict:
    result = CliRunner().invoke(cli, ["--repo", str(root), *args, "--json"])
    if result.exit_code != 0:
        raise SystemExit(f"kedit {' '.join(args)} failed: {result.stderr or result.stdout}")
    return json.loads(result.stdout)


def llamacpp_continuations(path: Path, prompts: list[str]) -> list[str]:
    """Each prompt alone, greedy, 10 tokens: llama-cpp-python's plain completion call."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
    return [llm(p, max_tokens=10, temperature=0)["choices"][0]["text"] for p in prompts]


def scores(texts: list[str], base_texts: list[str], facts: list[dict], unrelated: list[tuple[str, str]]) -> dict:
    """Targets shown among the fact prompts; unrelated prompts that hold their answer or the base's text."""
    n = len(facts)
    return {"targets_shown": sum(shows(t, f["target_new"]) for t, f in zip(texts[:n], facts, strict=True)),
            "unrelated_held": sum(holds(t, a, b) for t, (_, a), b in zip(texts[n:], unrelated, base_texts[n:],
                                                                          strict=True)),
            "continuations": texts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/llamacpp_gguf.json"))
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--stats-samples", default="64")
    args = ap.parse_args()
    import llama_cpp  # fail before any work when it is missing

    requests = counterfact_requests(args.n)
    facts = [{"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new, "target_true": r.target_true}
             for r in requests]
    # Unrelated: two facts about other subjects per edit (their true answers), which no edit touches.
    edited = {r.subject for r in requests}
    unrelated = [(p, r.target_true) for r in requests for p in r.neighbourhood[:2]
                 if not any(s in p for s in edited)]
    prompts = [r.text for r in requests] + [p for p, _ in unrelated]
    report: dict[str, Any] = {"llama_cpp_version": llama_cpp.__version__, "facts": facts,
                              "unrelated_prompts": len(unrelated), "rows": {}}
    with tempfile.TemporaryDirectory(prefix="kedit-llamacpp-") as tmp:
        root = Path(tmp)
        kedit(root, "init", "--bare")
        (root / "facts.json").write_text(json.dumps(facts))
        t0 = time.perf_counter()
        kedit(root, "edit", "--method", "rome", "--requests", str(root / "facts.json"), "--no-eval",
              "--stats-samples", args.stats_samples)
        report["edit_s"] = round(time.perf_counter() - t0, 1)
        base_rev = kedit(root, "log")["commits"][-1]["id"]
        for rev, label in ((base_rev, "base"), ("HEAD", "edited")):
            kedit(root, "export", rev, str(root / f"{label}_hf"))
        tok = AutoTokenizer.from_pretrained(root / "base_hf")
        texts = {}
        for label in ("base", "edited"):
            model = AutoModelForCausalLM.from_pretrained(root / f"{label}_hf", dtype=torch.float32).eval()
            texts[label] = user_continuations(model, tok, prompts)
            del model
        report["rows"]["hf_folder (transformers)"] = {
            "edited": scores(texts["edited"], texts["base"], facts, unrelated),
            "base": scores(texts["base"], texts["base"], facts, unrelated)}
        for quant in QUANTS:
            row: dict[str, Any] = {}
            for rev, label in ((base_rev, "base"), ("HEAD", "edited")):
                path = root / f"{label}_{quant}.gguf"
                row[f"{label}_bytes"] = kedit(root, "export", rev, str(path), "--format", "gguf",
                                              "--quant", quant)["bytes"]
                t0 = time.perf_counter()
                texts[label] = llamacpp_continuations(path, prompts)
                row[f"{label}_run_s"] = round(time.perf_counter() - t0, 1)
                path.unlink()
            row["edited"] = scores(texts["edited"], texts["base"], facts, unrelated)
            row["base"] = scores(texts["base"], texts["base"], facts, unrelated)
            report["rows"][f"gguf {quant} (llama.cpp)"] = row
            print(quant, row["edited"]["targets_shown"], row["edited"]["unrelated_held"], row["base"]["targets_shown"],
                  file=sys.stderr)
    report["load_average"] = os.getloadavg()
    args.out.write_text(json.dumps(report, indent=1))
    lines = [f"# {args.n} ROME edits of SmolLM2-135M run by llama.cpp ({report['llama_cpp_version']})", "",
             f"`llm(prompt, max_tokens=10, temperature=0)`; unrelated: {len(unrelated)} prompts about other subjects "
             "(held: the true answer or the base's continuation at the same precision).", "",
             "| file | edited: targets generated | unedited base: targets | unrelated held |", "|---|---|---|---|"]
    for name, row in report["rows"].items():
        lines.append(f"| {name} | {row['edited']['targets_shown']} of {args.n} | {row['base']['targets_shown']} of "
                     f"{args.n} | {row['edited']['unrelated_held']} of {len(unrelated)} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
