"""How ROME's edit quality depends on the number of covariance samples (self-generated text).

Usage: python bench/stats_samples.py --edits 20 --out bench/results/stats_samples.json
One pass over a stream of self-generated texts; the running second moment is snapshotted at
each budget, and the same edits are scored with each snapshot (and with C = I). Reports the
smallest budget whose CounterFact score is within one point of the largest budget's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import counterfact_requests, load_smollm2
from kedit.methods import rome
from kedit.methods.stats import GeneratedSource, MomentState, accumulate_second_moment

from kedit.core.delta import apply_step
from kedit.eval import metrics

log = logging.getLogger("bench")


def score(model, tok, requests, hp, c) -> dict:
    name = hp.module_name + ".weight"
    weight = dict(model.named_parameters())[name]
    original = weight.detach().clone()
    es, ps, ns, norms = [], [], [], []
    for req in requests:
        result = rome.apply(model, tok, [req], hp, second_moment=c)
        norms.append(result.info["requests"][0]["update_norm"])
        with torch.no_grad():
            weight.copy_(apply_step(original, result.deltas[name]))
        try:
            cf = metrics.counterfact_scores(model, tok, [req])
        finally:
            with torch.no_grad():
                weight.copy_(original)
        es.append(cf["efficacy"].value)
        ps.append(cf["paraphrase"].value)
        ns.append(cf["neighbourhood"].value)
    e, p, n = statistics.fmean(es), statistics.fmean(ps), statistics.fmean(ns)
    return {
        "efficacy": e,
        "paraphrase": p,
        "neighbourhood": n,
        "score": 3 / (1 / max(e, 1e-9) + 1 / max(p, 1e-9) + 1 / max(n, 1e-9)),
        "update_norm_median": statistics.median(norms),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--budgets", default="16,64,256,1024", help="numbers of self-generated texts (32 tokens each)")
    ap.add_argument("--out", default="bench/results/stats_samples.json")
    ap.add_argument("--gen-batch", type=int, default=128, help="texts generated per batch")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    model, tok = load_smollm2()
    hp = rome.ROMEHyperParams.for_model(model)
    requests = counterfact_requests(args.edits, seed=1)
    budgets = sorted(int(b) for b in args.budgets.split(","))
    source = GeneratedSource(model, tok, n_texts=budgets[-1], max_new_tokens=32, batch_size=args.gen_batch)
    rows = [
        {
            "texts": 0,
            "tokens": 0,
            "stats_s": 0.0,
            "generate_s": 0.0,
            "accumulate_s": 0.0,
            "texts_per_s": 0.0,
            **score(model, tok, requests, dataclasses.replace(hp, mom2_adjustment=False), None),
        }
    ]
    log.info("identity: %s", rows[-1])
    state: MomentState | None = None
    it = source.iter_from(0)
    done, t_gen, t_acc = 0, 0.0, 0.0
    for b in budgets:
        t0 = time.perf_counter()
        texts = [next(it) for _ in range(b - done)]
        t1 = time.perf_counter()
        state = accumulate_second_moment(model, tok, hp.module_name, texts, state=state, batch_size=32)
        t_gen += t1 - t0
        t_acc += time.perf_counter() - t1
        done = b
        rows.append(
            {
                "texts": b,
                "tokens": state.count,
                "stats_s": round(t_gen + t_acc, 1),
                "generate_s": round(t_gen, 1),
                "accumulate_s": round(t_acc, 1),
                "texts_per_s": round(b / max(t_gen, 1e-9), 2),
                **score(model, tok, requests, hp, state.mom2()),
            }
        )
        log.info("%d texts: %s", b, rows[-1])
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))
    best = rows[-1]["score"]
    enough = next(r for r in rows[1:] if r["score"] >= best - 0.01)
    out = {
        "n_edits": len(requests),
        "layer": hp.layer,
        "generation": {"batch_size": args.gen_batch, "max_new_tokens": 32, "texts_per_s": rows[-1]["texts_per_s"]},
        "load_average_at_end": list(os.getloadavg()),
        "rows": rows,
        "smallest_within_one_point": enough,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    md = [
        f"ROME on SmolLM2-135M, layer {hp.layer}, {len(requests)} edits; C from self-generated texts "
        f"(32 new tokens, batch {args.gen_batch}); load average at the end {out['load_average_at_end']}",
        "",
        "| texts | tokens | stats time (s) | generation texts/s | efficacy | paraphrase | neighbourhood | score "
        "| median update norm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['texts'] or 'C = I'} | {r['tokens']} | {r['stats_s']} | {r['texts_per_s'] or ''} "
            f"| {r['efficacy']:.1%} | {r['paraphrase']:.1%} "
            f"| {r['neighbourhood']:.1%} | {r['score']:.1%} | {r['update_norm_median']:.1f} |"
        )
    md.append("")
    md.append(f"smallest budget within one point of the largest: {enough['texts']} texts ({enough['tokens']} tokens)")
    Path(args.out).with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
