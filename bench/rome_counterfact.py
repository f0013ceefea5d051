"""ROME on SmolLM2-135M: 100 CounterFact-style edits from known_dev.json, each applied to the base alone.

Usage: python bench/rome_counterfact.py --n 100 --out bench/results/rome_counterfact.json
Reports efficacy / paraphrase / neighbourhood (ROME's NLL-margin protocol), teacher-forced
reliability, fluency next to the unedited model, latency (statistics cached beforehand), each
edit's update norm, and edits whose neighbourhood collapses. Each edit is given its first 5
neighbourhood prompts (what a user passes as --locality: ROME checks them and holds fixed the keys
it would move) and neighbourhood is scored only on the other ones, which no edit saw.
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
from _common import counterfact_requests, load_smollm2, split_neighbourhood
from kedit.methods import prompts, rome
from kedit.methods.hparams import hparams_to_dict
from kedit.methods.stats import GeneratedSource, StatsCache, cached_second_moment

from kedit.core.delta import apply_step
from kedit.core.progress import progress_bar
from kedit.eval import metrics

log = logging.getLogger("bench")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--out", default="bench/results/rome_counterfact.json")
    ap.add_argument("--templates", default=None, help='context_template_length_params as JSON, e.g. "[[5,10],[10,10]]"')
    ap.add_argument("--no-mom2", action="store_true", help="C = I instead of the second moment")
    ap.add_argument("--stats-texts", type=int, default=256, help="self-generated texts (32 tokens each) behind C")
    ap.add_argument("--stats-dir", default="/tmp/kedit-work/stats")
    ap.add_argument("--fluency-tokens", type=int, default=40)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--hp", default=None, help="other ROMEHyperParams fields as JSON, e.g. '{\"v_lr\": 1.0}'")
    ap.add_argument("--edit-neighbours", type=int, default=5,
                    help="give each edit its first N neighbourhood prompts (at most half; for the overlap check "
                         "and protect_overlap) and score neighbourhood only on the others (0: all scored)")
    ap.add_argument("--gen-tokens", type=int, default=10, help="greedy tokens behind the gen_* metrics")
    ap.add_argument("--gen-batch", type=int, default=128, help="texts generated per batch for the statistics")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    model, tok = load_smollm2()
    hp = rome.ROMEHyperParams.for_model(model)
    changes: dict = {"mom2_adjustment": not args.no_mom2, "mom2_n_samples": args.stats_texts}
    if args.templates:
        changes["context_template_length_params"] = tuple(tuple(p) for p in json.loads(args.templates))
    if args.layer is not None:
        changes["layer"] = args.layer
    if args.hp:
        changes.update(json.loads(args.hp))
    hp = dataclasses.replace(hp, **changes)
    requests = counterfact_requests(args.n)
    edit_views, requests = split_neighbourhood(requests, args.edit_neighbours)

    c = None
    stats_s = 0.0
    if hp.mom2_adjustment:
        t0 = time.perf_counter()
        source = GeneratedSource(model, tok, n_texts=hp.mom2_n_samples, max_new_tokens=32, batch_size=args.gen_batch)
        c = cached_second_moment(
            model,
            tok,
            hp.layer,
            hp.module_name,
            source,
            n_samples=hp.mom2_n_samples,
            cache=StatsCache(args.stats_dir),
            base_hash="smollm2-135m-instruct-q4_1",
            progress=progress_bar,
        )
        stats_s = time.perf_counter() - t0
        log.info("statistics ready in %.1f s", stats_s)

    # Unedited baselines.
    base_cf = metrics.counterfact_scores(model, tok, requests)
    base_rel = metrics.reliability(model, tok, requests)
    base_flu = metrics.fluency(model, tok, [r.text for r in requests], args.fluency_tokens)
    per_nb_base = [metrics.counterfact_scores(model, tok, [r])["neighbourhood"].value for r in requests]
    # What a user reads: greedy continuations of tokenizer(prompt), the unedited model's kept as the
    # locality reference of each edit's scored neighbourhood prompts.
    nb_reference = [metrics.greedy_continuations(model, tok, list(r.neighbourhood), args.gen_tokens)
                    for r in requests]
    # The unedited model's locality is its own reference: 1 by construction, not generated twice.
    base_gen = {**_generation(model, tok, requests, [None] * len(requests), args.gen_tokens), "gen_locality": 1.0}
    prompts.context_templates(model, tok, hp)  # generated once per model, as in a kedit session

    name = hp.module_name + ".weight"
    weight = dict(model.named_parameters())[name]
    original = weight.detach().clone()
    rows = []
    interrupted = False
    try:
        _run(model, tok, requests, edit_views, hp, c, weight, original, per_nb_base, nb_reference, rows, args)
    except KeyboardInterrupt:  # `timeout -s INT`: summarise the edits done so far
        interrupted = True
        log.warning("interrupted after %d of %d edits", len(rows), len(requests))
    _summarise(model, hp, c, stats_s, rows, requests, base_cf, base_rel, base_flu, base_gen, interrupted, args)


def _generation(model, tok, requests, nb_reference, n_tokens: int) -> dict[str, float]:
    """gen_efficacy / gen_paraphrase / gen_locality (kedit.eval.metrics.generation_scores), pooled over requests."""
    sums: dict[str, list[float]] = {}
    for req, ref in zip(requests, nb_reference, strict=True):
        for m in _request_generation(model, tok, req, ref, n_tokens):
            sums.setdefault(m.name, []).append(m.value)
    return {k: statistics.fmean(v) for k, v in sums.items()}


def _request_generation(model, tok, req, ref, n_tokens: int) -> list:
    """The request's gen_* scores; gen_locality only against a reference (`ref` None: none)."""
    pairs = [(p, req.target_true) for p in req.neighbourhood] if ref is not None else []
    return metrics.generation_scores(model, tok, [req], pairs, ref, n_tokens)


def _run(model, tok, requests, edit_views, hp, c, weight, original, per_nb_base, nb_reference, rows, args) -> None:
    name = hp.module_name + ".weight"
    for i, (req, view) in enumerate(zip(requests, edit_views, strict=True)):
        t0 = time.perf_counter()
        result = rome.apply(model, tok, [view], hp, second_moment=c)
        latency = time.perf_counter() - t0
        with torch.no_grad():
            weight.copy_(apply_step(original, result.deltas[name]))
        try:
            cf = metrics.counterfact_scores(model, tok, [req])
            rel = metrics.reliability(model, tok, [req])
            generalization = metrics.generalization(model, tok, [req])
            flu = metrics.fluency(model, tok, [req.text], args.fluency_tokens)
            gen = {m.name: m.value for m in _request_generation(model, tok, req, nb_reference[i], args.gen_tokens)}
        finally:
            with torch.no_grad():
                weight.copy_(original)
        info = result.info["requests"][0]
        row = {
            "subject": req.subject,
            "prompt": req.text,
            "target_true": req.target_true,
            "target_new": req.target_new,
            "latency_s": round(latency, 3),
            "steps": info["steps"],
            "final_loss": info["loss"][-1],
            "final_nll": info["nll"][-1],
            "timings": info["timings"],
            "update_norm": round(info["update_norm"], 3),
            "denominator": round(info["denominator"], 4),
            "position0_guarded": info["position0_guarded"],
            "neighbour_overlap": info.get("neighbour_overlap"),
            "prompt_gain": info["prompt_gain"],
            "rome_prompt_gain": info["rome_prompt_gain"],
            "equal_gain": info["equal_gain"],
            "gain_floor": info["gain_floor"],
            "shows_in_generation": info["shows_in_generation"],
            "retried": info["retried"],
            "protected_keys": info.get("protected_keys", 0),
            "efficacy": cf["efficacy"].value,
            "paraphrase": cf["paraphrase"].value,
            "neighbourhood": cf["neighbourhood"].value,
            "neighbourhood_unedited": per_nb_base[i],
            "reliability": rel.value,
            "generalization": generalization.value,
            **gen,
            "fluency": flu.value,
        }
        row["neighbourhood_collapsed"] = bool(per_nb_base[i] - row["neighbourhood"] >= 0.5)
        rows.append(row)
        if len(rows) % 10 == 0:  # partial results survive an interrupted run
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps(rows, indent=1))
        log.info(
            "%3d %-30s %.2fs ES=%.0f PS=%.2f NS=%.2f (base %.2f) |Δ|=%.1f gen %s",
            i,
            req.subject,
            latency,
            row["efficacy"],
            row["paraphrase"],
            row["neighbourhood"],
            per_nb_base[i],
            row["update_norm"],
            {k: round(v, 2) for k, v in gen.items()},
        )


def _summarise(model, hp, c, stats_s, rows, requests, base_cf, base_rel, base_flu, base_gen, interrupted,
               args) -> None:
    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in rows)

    lat = [r["latency_s"] for r in rows]
    summary = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to fp32)",
        "n_edits": len(rows),
        "n_planned": len(requests),
        "interrupted": interrupted,
        "hparams": hparams_to_dict(hp),
        "stats": {
            "source": "self-generated",
            "n_texts": hp.mom2_n_samples if c is not None else 0,
            "seconds": round(stats_s, 1),
        },
        "threads": torch.get_num_threads(),
        "edited": {
            "efficacy": mean("efficacy"),
            "paraphrase": mean("paraphrase"),
            "neighbourhood": mean("neighbourhood"),
            "reliability": mean("reliability"),
            "generalization": mean("generalization"),
            "fluency": mean("fluency"),
            **{k: mean(k) for k in base_gen},
        },
        "unedited": {
            "efficacy": base_cf["efficacy"].value,
            "paraphrase": base_cf["paraphrase"].value,
            "neighbourhood": base_cf["neighbourhood"].value,
            "reliability": base_rel.value,
            "fluency": base_flu.value,
            **base_gen,
        },
        "protocols": {
            "efficacy/paraphrase/neighbourhood": "user_prompt_counterfact_nll_margin",
            "reliability/generalization": "user_prompt_teacher_forced_token_acc",
            "fluency": f"user_prompt_ngram_entropy_greedy{args.fluency_tokens}",
            "gen_efficacy/gen_paraphrase": f"user_prompt_greedy{args.gen_tokens}_contains",
            "gen_locality": f"user_prompt_greedy{args.gen_tokens}_holds_or_unchanged",
        },
        "latency_s": {"median": statistics.median(lat), "max": max(lat), "mean": statistics.fmean(lat)},
        "breakdown_median_s": {
            k: round(statistics.median(r["timings"][k] for r in rows), 4) for k in rows[0]["timings"]
        },
        "steps": {
            "median": statistics.median(r["steps"] for r in rows),
            "max": max(r["steps"] for r in rows),
            "early_stopped": sum(r["steps"] < hp.v_num_grad_steps - 1 for r in rows),  # 12 steps: 11 scored updates
        },
        "seconds_per_step_median": round(statistics.median(r["timings"]["value_s"] / r["steps"] for r in rows), 4),
        "load_average_at_end": list(os.getloadavg()),
        "update_norm": {
            "median": statistics.median(r["update_norm"] for r in rows),
            "max": max(r["update_norm"] for r in rows),
        },
        "collapsed_neighbourhoods": [r["subject"] for r in rows if r["neighbourhood_collapsed"]],
        "collapsed_overlap": [r["neighbour_overlap"][1] for r in rows if r["neighbourhood_collapsed"]],
        "overlap_warned": [r["subject"] for r in rows
                           if (r["neighbour_overlap"] or ("", 0))[1] > rome.OVERLAP_WARNING],
        "edit_neighbours": args.edit_neighbours,
        "raised_floor": sum(r["equal_gain"] for r in rows),
        "retried": [r["subject"] for r in rows if r["retried"]],
        "not_shown": [r["subject"] for r in rows if r["shows_in_generation"] is False],
        "protected_edits": sum(r["protected_keys"] > 0 for r in rows),
        "equal_gain_edits": [
            {k: r[k] for k in ("subject", "rome_prompt_gain", "gain_floor", "retried", "efficacy", "paraphrase",
                               "neighbourhood", "neighbourhood_unedited", "update_norm")}
            for r in rows if r["equal_gain"]
        ],
        "edits": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    e, u = summary["edited"], summary["unedited"]
    md = [
        f"# ROME on SmolLM2-135M: {len(rows)} CounterFact-style edits (known_dev.json), each on the base alone"
        + (f" (interrupted: {len(rows)} of {len(requests)} planned)" if interrupted else ""),
        "",
        f"layer {hp.layer}, C from {summary['stats']['n_texts']} self-generated texts (0 = identity), "
        f"v_lr {hp.v_lr}, up to {hp.v_num_grad_steps} steps, "
        f"templates {list(map(list, hp.context_template_length_params))}, {torch.get_num_threads()} threads",
        "",
        "The user's view (greedy continuation of `tokenizer(prompt)`, "
        f"{args.gen_tokens} tokens, contains the new target / holds the true answer or the unedited continuation):",
        "",
        "| | gen efficacy | gen paraphrase | gen locality |",
        "|---|---|---|---|",
        *[f"| {who} | {d['gen_efficacy']:.1%} | {d['gen_paraphrase']:.1%} | {d['gen_locality']:.1%} |"
          for who, d in (("unedited", u), ("ROME", e))],
        "",
        "Diagnostics: CounterFact NLL margin (efficacy, paraphrase, neighbourhood) and teacher forcing, "
        "both on `tokenizer(prompt)`:",
        "",
        "| | efficacy | paraphrase | neighbourhood | reliability (TF acc) | generalization | fluency (bits) |",
        "|---|---|---|---|---|---|---|",
        f"| unedited | {u['efficacy']:.1%} | {u['paraphrase']:.1%} | {u['neighbourhood']:.1%} "
        f"| {u['reliability']:.1%} | | {u['fluency']:.3f} |",
        f"| ROME | {e['efficacy']:.1%} | {e['paraphrase']:.1%} | {e['neighbourhood']:.1%} "
        f"| {e['reliability']:.1%} | {e['generalization']:.1%} | {e['fluency']:.3f} |",
        "",
        f"latency per edit: median {summary['latency_s']['median']:.2f} s, worst {summary['latency_s']['max']:.2f} s "
        f"(median breakdown {summary['breakdown_median_s']}; steps median {summary['steps']['median']}, "
        f"{summary['steps']['early_stopped']} early-stopped, {summary['seconds_per_step_median']} s/step; "
        f"load average at the end {summary['load_average_at_end']}); "
        f"update norm median {summary['update_norm']['median']:.1f}, max {summary['update_norm']['max']:.1f}; "
        f"collapsed neighbourhoods: {len(summary['collapsed_neighbourhoods'])} {summary['collapsed_neighbourhoods']} "
        f"(largest neighbour key overlap (u·k)/(u·k*) of each: {summary['collapsed_overlap']}); "
        f"edits whose overlap warning fired (> {rome.OVERLAP_WARNING}): {summary['overlap_warned']}",
        "",
        f"hparams: prompt_gain_floor {hp.prompt_gain_floor}, escalate_gain_floors {list(hp.escalate_gain_floors)}, "
        f"retry_grad_steps {hp.retry_grad_steps}, protect_overlap {hp.protect_overlap}; "
        + f"each edit given its first {args.edit_neighbours} neighbourhood prompts (at most half), scored on the rest"
        + f"; edits with protected neighbour keys: {summary['protected_edits']}; v* optimised again: "
        f"{summary['retried']}; not showing on their prompt at the end: {summary['not_shown']}",
        "",
        "Edits whose u was moved toward the equal-gain u (gain floor raised because the edit did not show on "
        "its prompt, or set by prompt_gain_floor; rome_prompt_gain is ROME's (u·k)/(u·k*) at the prompt as asked):",
        "",
        "| subject | ROME's prompt gain | floor | v* again | efficacy | paraphrase | neighbourhood (unedited) "
        "| update norm |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {r['subject']} | {r['rome_prompt_gain']:.3f} | {r['gain_floor']} | {'yes' if r['retried'] else ''} "
          f"| {r['efficacy']:.0f} | {r['paraphrase']:.2f} "
          f"| {r['neighbourhood']:.2f} ({r['neighbourhood_unedited']:.2f}) | {r['update_norm']:.1f} |"
          for r in summary["equal_gain_edits"]],
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
