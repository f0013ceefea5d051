"""Covariance statistics computed by several processes: `kedit stats --nproc N`, or `kedit stats` under torchrun.

E[kkᵀ] over thousands of texts is the long step before a ROME, MEMIT or AlphaEdit edit, and it
splits by texts. Each process takes a contiguous run of whole batches of the texts one process
would read, batched as one process batches them, so every batch's float64 sum is the one a single
process computes. The per-process sums and counts are reduced once, in float64, with
torch.distributed (gloo on CPU, NCCL on CUDA); only the order of the additions differs, so the
result equals the single-process one to float64 rounding. Rank 0 writes it into the cache entry
`kedit edit` reads (kedit.methods.stats), so an edit afterwards computes nothing.

Each process checkpoints its partial sum (`StatsCache.save_shard`): rerunning the command after a
killed worker continues where every process stopped. A process holds the model and one layer's
d×d float64 sum, whatever the number of texts.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kedit.core.errors import KeditError
from kedit.core.repo import Repository
from kedit.edit.stats import check_layers, compute_stats

log = logging.getLogger(__name__)

# Texts each process reads between two checkpoints of its partial sum (as one process does).
CHECKPOINT_EVERY = 1000
# How long a process waits for the others at a reduction: the slowest share plus loading the model.
COLLECTIVE_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class StatsJob:
    """What `kedit stats` computes, in a form every process can be handed (it is pickled to spawned ones)."""

    repo: Path
    base: str
    method: str
    layers: tuple[int, ...]
    values: dict[str, str] = field(default_factory=dict)
    corpus: Path | None = None
    dtype: torch.dtype | None = None
    device: str = "cpu"
    progress: bool = False


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher with its environment) started this process."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def split_share(n_texts: int, batch_size: int, world: int, rank: int) -> tuple[int, int]:
    """Texts [lo, hi) of `rank`'s share: whole batches, contiguous, as even as whole batches allow."""
    batches = -(-n_texts // batch_size)
    lo, hi = batches * rank // world, batches * (rank + 1) // world
    return min(lo * batch_size, n_texts), min(hi * batch_size, n_texts)


def parallel_second_moment(model: Any, tok: Any, layer: int, module_name: str, source: Any, *, n_samples: int,
                           cache: Any, base_hash: str = "", batch_size: int = 8, max_length: int = 128,
                           progress: Any = None) -> torch.Tensor:
    """`cached_second_moment` (same arguments and defaults, so the same batches) shared by the process group.

    Every process calls it with the same arguments; each returns the same E[kkᵀ].
    """
    from kedit.methods.base import no_progress
    from kedit.methods.stats import StatsKey, accumulate_second_moment

    rank, world = dist.get_rank(), dist.get_world_size()
    key = StatsKey(base_hash, layer, source.corpus_id, n_samples, module_name)
    hit = cache.get(key)
    if hit is not None:
        return hit
    # Where one process would start: its own checkpoint, or a finished run over fewer texts.
    prior = cache.load_partial(key)
    smaller = cache.largest_prefix(key)
    if smaller is not None and smaller[1].n_texts > (prior.n_texts if prior is not None else 0):
        prior = smaller[1]
    start = prior.n_texts if prior is not None else 0
    lo, hi = (start + i for i in split_share(n_samples - start, batch_size, world, rank))
    shard = f"{rank}of{world}-from{start}-b{batch_size}"  # another split or start cannot reuse it
    state = cache.load_shard(key, shard)
    done = state.n_texts if state is not None else 0
    if done:
        log.info("process %d resumes statistics for %s at text %d of its %d", rank, module_name, done, hi - lo)
    saved = [done]

    def checkpoint(s: Any) -> None:
        if s.n_texts - saved[0] >= CHECKPOINT_EVERY and lo + s.n_texts < hi:
            cache.save_shard(key, shard, s)
            saved[0] = s.n_texts

    if lo + done < hi:
        state = accumulate_second_moment(
            model, tok, module_name, islice(source.iter_from(lo + done), hi - lo - done), state=state,
            batch_size=batch_size, max_length=max_length, total=hi - lo, on_batch=checkpoint,
            progress=progress if progress is not None and rank == 0 else no_progress)
        cache.save_shard(key, shard, state)  # kept if another process dies before the reduction
    total = _reduce(state, _collective_device())
    if prior is not None:
        total.sum += prior.sum
        total.count += prior.count
        total.n_texts += prior.n_texts
    mom2 = cache.put(key, total) if rank == 0 else total.mom2()
    dist.barrier()  # the cache entry exists before any process goes on
    return mom2


def _collective_device() -> torch.device:
    """NCCL reduces tensors on the process's GPU, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(state: Any, device: torch.device) -> Any:
    """Σ of every process's float64 sum, key count and text count (a process with no texts adds zeros)."""
    from kedit.methods.stats import MomentState

    dim = torch.tensor([0 if state is None else state.sum.shape[0]], device=device)
    dist.all_reduce(dim, op=dist.ReduceOp.MAX)
    total = (state.sum if state is not None else torch.zeros(int(dim), int(dim), dtype=torch.float64)).to(device)
    counts = torch.tensor([0, 0] if state is None else [state.count, state.n_texts], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    dist.all_reduce(counts)
    return MomentState(sum=total.cpu(), count=int(counts[0]), n_texts=int(counts[1]))


def _rank_device(device: str, local_rank: int) -> str:
    """One GPU per process when the job asks for CUDA (or auto and there is one), else the CPU."""
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return f"cuda:{local_rank}"
    return "cpu"


def run_in_group(job: StatsJob, rank: int, world: int, local_rank: int,
                 init_method: str = "env://") -> list[dict[str, Any]]:
    """This process's part of `job` in a process group of `world`; every rank returns the summaries."""
    device = _rank_device(job.device, local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:  # N processes on the CPU share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", init_method=init_method, rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        return compute_stats(Repository.open(job.repo), job.base, job.method, job.layers, job.values,
                             corpus=job.corpus, dtype=job.dtype, device=device, progress=job.progress and rank == 0,
                             moment=parallel_second_moment)
    finally:
        dist.destroy_process_group()


def run_under_torchrun(job: StatsJob) -> list[dict[str, Any]] | None:
    """`kedit stats` started by torchrun: this rank's part; the summaries on rank 0, None elsewhere."""
    rank = int(os.environ["RANK"])
    computed = run_in_group(job, rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank)))
    return computed if rank == 0 else None


def spawn_stats(job: StatsJob, nproc: int) -> list[dict[str, Any]]:
    """Run `job` in `nproc` processes started here, meeting on 127.0.0.1 at a free port."""
    check_layers(Repository.open(job.repo), job.base, job.layers)  # a typo fails before N processes start
    with tempfile.TemporaryDirectory(prefix="kedit-stats-") as tmp:
        result = Path(tmp) / "result.json"
        spawn_log = logging.getLogger("torch.multiprocessing.spawn")
        level = spawn_log.level
        spawn_log.setLevel(logging.ERROR)  # our one line says which process ended
        try:
            torch.multiprocessing.start_processes(
                _worker, args=(job, nproc, f"tcp://127.0.0.1:{_free_port()}", result), nprocs=nproc,
                start_method="spawn")
        except torch.multiprocessing.ProcessExitedException as e:
            how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with code {e.exit_code}"
            raise KeditError(f"statistics process {e.error_index} {how}",
                             hint="run the same command again: it continues from every process's checkpoint") from None
        except torch.multiprocessing.ProcessRaisedException as e:
            last = str(e).strip().splitlines()[-1]
            raise KeditError(f"statistics process {e.error_index} failed: {last}",
                             hint="run the same command again: it continues from every process's checkpoint") from None
        finally:
            spawn_log.setLevel(level)
        outcome = json.loads(result.read_text(encoding="utf-8"))
    if "error" in outcome:
        raise KeditError(outcome["error"], hint=outcome.get("hint"))
    return outcome["layers"]


def _worker(rank: int, job: StatsJob, world: int, init_method: str, result: Path) -> None:
    """A spawned process: its share, and on rank 0 the summaries (or the user's error) for the parent."""
    try:
        computed = run_in_group(job, rank, world, rank, init_method)
        outcome: dict[str, Any] = {"layers": computed}
    except KeditError as e:  # every process meets the same one (a layer past the last, a bad corpus)
        outcome = {"error": str(e), "hint": e.hint}
    if rank == 0:
        result.write_text(json.dumps(outcome), encoding="utf-8")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
