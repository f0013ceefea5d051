"""Do edits survive quantisation? ROME (each fact on the base alone) and MEMIT (all facts in one
batch) on SmolLM2-135M, scored by greedy generation after every weight went through a GGUF
quantise -> dequantise round trip (f16, q8_0, q4_1, q4_0: `kedit.model.quantize`, the rule and the
`gguf` quantisers behind `kedit eval --quant` and `export --format gguf --quant`), next to the
unquantised edit and the unedited model at the same precision.

    nice -n 10 env OMP_NUM_THREADS=1 python bench/quant_edits.py --n 100 --out bench/results/quant_edits.json

Quantisation works tensor by tensor, so the base is quantised once per precision and only the
edited matrices are quantised again for each edit: the same weights `quantize_weights` gives the
whole edited model. Locality is held against the unedited model at the same precision, so it
measures the edit, not the quantisation. `--delta-scale S` multiplies every edit's update by S
before quantising (a larger update norm: does it carry an edit through the q4 grid?); `--edit-on Q`
computes the edits on the model as precision Q holds it (the base a Q file is made from).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kedit.methods import memit, rome
from kedit.methods.base import EditRequest

from bench._common import load_smollm2
from bench.mass_editing import edits_and_scored, hparams_for, layer_modules, neighbour_pairs, stats_for
from kedit.core.delta import LowRank, apply_step
from kedit.eval import metrics
from kedit.model.quantize import ggml_type, quantize_weights, round_trip

log = logging.getLogger("bench.quant_edits")
PRECISIONS = ("none", "f16", "q8_0", "q4_1", "q4_0")


def scaled(delta: Any, factor: float) -> Any:
    """The update times `factor` (a low-rank step scales its left factor)."""
    if factor == 1.0:
        return delta
    if isinstance(delta, LowRank):
        return LowRank(delta.a * factor, delta.b)
    raise TypeError(f"cannot scale a {type(delta).__name__} step")


def as_stored(value: torch.Tensor, quant: str) -> torch.Tensor:
    """`value` as a GGUF file of type `quant` holds it (the matrix rule of `quantize_weights`)."""
    import gguf

    if quant == "none":
        return value
    qtype = ggml_type(tuple(value.shape), gguf.GGMLQuantizationType[quant.upper()])
    return round_trip(value, qtype).to(value.dtype)


def set_edit(params: dict[str, torch.nn.Parameter], originals: dict[str, torch.Tensor], deltas: dict[str, Any],
             quant: str, factor: float) -> None:
    """The edited matrices as stored at `quant`: base + update, then the round trip."""
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].copy_(as_stored(apply_step(originals[name], scaled(delta, factor)), quant))


def restore(params: dict[str, torch.nn.Parameter], base_at: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in base_at.items():
            params[name].copy_(value)


def gen(model: Any, tok: Any, requests: list[EditRequest], reference: list[str] | None) -> dict[str, float]:
    """gen_efficacy / gen_paraphrase, and gen_locality against `reference` (None: not scored)."""
    pairs = neighbour_pairs(requests) if reference is not None else []
    return {m.name: m.value for m in metrics.generation_scores(model, tok, requests, pairs, reference)}


def per_fact_references(requests: list[EditRequest], reference: list[str]) -> list[list[str]]:
    out, i = [], 0
    for r in requests:
        out.append(reference[i : i + len(r.neighbourhood)])
        i += len(r.neighbourhood)
    return out


def mean_of(rows: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return round(statistics.fmean(values), 4) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path("bench/results/quant_edits.json"))
    ap.add_argument("--methods", default="rome,memit")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--delta-scale", type=float, default=1.0)
    ap.add_argument("--edit-neighbours", type=int, default=5)
    ap.add_argument("--edit-on", default="none", choices=PRECISIONS,
                    help="compute the edits on the model as this precision holds it (editing in its grid)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    methods, precisions = args.methods.split(","), args.precisions.split(",")

    t_start = time.perf_counter()
    model, tok = load_smollm2()
    given, requests = edits_and_scored(args.n, args.edit_neighbours)
    params = dict(model.named_parameters())
    if args.edit_on != "none":
        quantize_weights(model, args.edit_on)
    originals = {name: p.detach().clone() for name, p in params.items()}

    deltas: dict[str, Any] = {}
    timings: dict[str, float] = {}
    if "rome" in methods:
        hp = hparams_for("rome", model, {})
        c = stats_for(model, tok, {hp.layer: hp.module_name})[hp.layer]
        t0 = time.perf_counter()
        deltas["rome"] = [rome.apply(model, tok, [r], hp, second_moment=c) for r in given]
        timings["rome_edits_s"] = round(time.perf_counter() - t0, 1)
        log.info("%d ROME edits in %.0f s", len(given), timings["rome_edits_s"])
    if "memit" in methods:
        hp = hparams_for("memit", model, {})
        cs = stats_for(model, tok, layer_modules(hp))
        t0 = time.perf_counter()
        deltas["memit"] = memit.apply(model, tok, given, hp, second_moments_by_layer=cs)
        timings["memit_edit_s"] = round(time.perf_counter() - t0, 1)
        log.info("MEMIT batch of %d in %.0f s", len(given), timings["memit_edit_s"])

    report: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (the embedded Q4_1 GGUF dequantised to float32)",
        "n": len(requests), "delta_scale": args.delta_scale, "edit_on": args.edit_on,
        "edit_neighbours": args.edit_neighbours,
        "protocol": "user_prompt_greedy10: tokenizer(prompt), 10 greedy tokens; locality against the "
                    "unedited model at the same precision",
        "rome_update_norms": [round(r.info["requests"][0]["update_norm"], 3) for r in deltas.get("rome", [])],
        "precisions": {},
    }
    for quant in precisions:
        t0 = time.perf_counter()
        restore(params, originals)
        counts = quantize_weights(model, quant) if quant != "none" else {"F32": len(params)}
        edited_names = {n for res in deltas.get("rome", []) for n in res.deltas} | set(
            deltas["memit"].deltas if "memit" in deltas else ())
        base_at = {n: params[n].detach().clone() for n in edited_names}
        reference = metrics.greedy_continuations(model, tok, [p for p, _ in neighbour_pairs(requests)])
        row: dict[str, Any] = {"types": counts, "unedited": {**gen(model, tok, requests, None), "gen_locality": 1.0}}
        if "rome" in deltas:
            refs = per_fact_references(requests, reference)
            facts = []
            for req, res, ref in zip(requests, deltas["rome"], refs, strict=True):
                set_edit(params, originals, res.deltas, quant, args.delta_scale)
                facts.append(gen(model, tok, [req], ref if req.neighbourhood else None))
                restore(params, base_at)
            row["rome"] = {k: mean_of(facts, k) for k in ("gen_efficacy", "gen_paraphrase", "gen_locality")}
            row["rome"]["lost"] = [r.subject for r, f in zip(requests, facts, strict=True) if f["gen_efficacy"] < 1]
        if "memit" in deltas:
            set_edit(params, originals, deltas["memit"].deltas, quant, args.delta_scale)
            row["memit"] = {k: round(v, 4) for k, v in gen(model, tok, requests, reference).items()}
            restore(params, base_at)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        report["precisions"][quant] = row
        log.info("%s: %s", quant, json.dumps({k: v for k, v in row.items() if k != "types"}))
        args.out.with_suffix(".partial.json").write_text(json.dumps(report, indent=1))
    report.update(timings, wall_s=round(time.perf_counter() - t_start, 1), threads=torch.get_num_threads(),
                  load_average=os.getloadavg())
    args.out.write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    """The table: one row per precision, the unedited model and each method's generation scores."""
    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    lines = [f"# Edits after quantisation: {report['n']} facts, SmolLM2-135M (delta scale {report['delta_scale']})",
             "", "gen efficacy / gen paraphrase / gen locality (10 greedy tokens of tokenizer(prompt)); "
             "locality against the unedited model at the same precision.", "",
             "| precision | unedited | ROME (each fact on the base) | ROME edits lost | MEMIT (one batch) |",
             "|---|---|---|---|---|"]
    for quant, row in report["precisions"].items():
        u = row["unedited"]
        cells = [quant, f"{pct(u['gen_efficacy'])} / {pct(u['gen_paraphrase'])}"]
        for method in ("rome", "memit"):
            m = row.get(method)
            cells.append(f"{pct(m['gen_efficacy'])} / {pct(m['gen_paraphrase'])} / {pct(m['gen_locality'])}"
                         if m else "–")
            if method == "rome":
                cells.append(", ".join(m["lost"]) if m else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
