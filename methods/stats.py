"""Covariance statistics: the uncentered second moment C = E[k kᵀ] of an MLP projection's input.

ROME, MEMIT and AlphaEdit weight their updates by C⁻¹. The peers
compute it from 100k Wikipedia texts (tens of GPU hours, an 18 GB download); here it streams
from any text source, including text the model writes itself, and is cached per base model.

Calling sequence:
    source = corpus_source(path) or GeneratedSource(model, tok, n_texts=2000)
    cache = StatsCache(repo_dir / "stats")
    c = cached_second_moment(model, tok, layer, "model.layers.5.mlp.down_proj", source,
                             n_samples=2000, cache=cache, base_hash=h)

Error handling: a run that dies leaves a checkpoint (sum, count, texts consumed) beside the
final file; the next call with the same key continues from it. Files are safetensors written
to a temp file and `os.replace`d, never pickles.

Caveats: the sum is accumulated in float64 (fp32 sums over millions of tokens lose digits);
pad tokens are skipped through the attention mask; texts are truncated to `max_length` tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from kedit.methods.base import ProgressFn, no_progress
from kedit.methods.capture import capture_at_module
from kedit.methods.prompts import input_device
from safetensors.torch import load_file, save_file

from kedit.eval.metrics import start_token_id

__all__ = [
    "CorpusSource",
    "GeneratedSource",
    "ListSource",
    "MomentState",
    "StatsCache",
    "StatsKey",
    "TextSource",
    "accumulate_second_moment",
    "cached_second_moment",
    "corpus_source",
    "read_corpus",
]

log = logging.getLogger(__name__)


@dataclass
class MomentState:
    """A running uncentered second moment: Σ k kᵀ, the number of keys, and texts consumed."""

    sum: torch.Tensor  # (d, d) float64
    count: int = 0
    n_texts: int = 0

    @classmethod
    def empty(cls, dim: int) -> MomentState:
        return cls(sum=torch.zeros(dim, dim, dtype=torch.float64))

    def mom2(self) -> torch.Tensor:
        """E[k kᵀ] in float32, shape (d, d)."""
        if self.count == 0:
            raise ValueError("no tokens were accumulated; the text source gave no usable text")
        return (self.sum / self.count).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# text sources


class TextSource:
    """Texts in a fixed order; `iter_from(start)` skips to a position (for resuming)."""

    corpus_id: str = "texts"

    def iter_from(self, start: int = 0) -> Iterator[str]:
        raise NotImplementedError


class ListSource(TextSource):
    def __init__(self, texts: Sequence[str], corpus_id: str | None = None) -> None:
        self.texts = list(texts)
        digest = hashlib.sha256("\x00".join(self.texts).encode()).hexdigest()[:12]
        self.corpus_id = corpus_id or f"list-{digest}"

    def iter_from(self, start: int = 0) -> Iterator[str]:
        return iter(self.texts[start:])


def _read_file(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict) or "text" not in record:
                        raise ValueError(f"{path}:{n}: a JSONL corpus needs a 'text' field on every line")
                    if str(record["text"]).strip():
                        yield str(record["text"])
        return
    text = path.read_text(encoding="utf-8")
    # Paragraphs (blank-line separated) when the file has them, otherwise one sample per line.
    has_paragraphs = re.search(r"\S[ \t]*\n\s*\n\s*\S", text) is not None
    parts = re.split(r"\n\s*\n", text) if has_paragraphs else text.splitlines()
    yield from (p.strip() for p in parts if p.strip())


def read_corpus(path: str | Path) -> Iterator[str]:
    """Texts from a .txt file (paragraphs or lines), a .jsonl file ("text" field), or a folder of them."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl", ".md"))
        if not files:
            raise ValueError(f"{path} holds no .txt, .md or .jsonl files")
        for f in files:
            yield from _read_file(f)
    elif path.is_file():
        yield from _read_file(path)
    else:
        raise FileNotFoundError(f"corpus {path} does not exist")


class CorpusSource(TextSource):
    """Texts read from a path; its id hashes the file names, sizes and modification times."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        files = sorted(self.path.rglob("*")) if self.path.is_dir() else [self.path]
        meta = [
            (str(f.relative_to(self.path.parent)), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()
        ]
        digest = hashlib.sha256(json.dumps(meta).encode()).hexdigest()[:12]
        self.corpus_id = f"{self.path.name}-{digest}"

    def iter_from(self, start: int = 0) -> Iterator[str]:
        return islice(read_corpus(self.path), start, None)


def corpus_source(path: str | Path) -> CorpusSource:
    return CorpusSource(path)


class GeneratedSource(TextSource):
    """Text the model samples itself from short seeds, when the user has no corpus.

    Batch i is sampled with seed (seed, i), so resuming at text n regenerates nothing before it.
    Generation uses the KV cache; each new token reads all the weights once, whatever the batch,
    so larger batches give more texts per second (texts/s: bench/results/stats_samples.md).
    The batch size decides which seed each text gets, so it is part of `corpus_id`.
    """

    SEEDS = ("The", "In", "A", "It", "When", "This", "He", "She", "We", "There", "After", "One")

    def __init__(
        self,
        model: Any,
        tok: Any,
        n_texts: int,
        *,
        max_new_tokens: int = 64,
        batch_size: int = 64,
        seed: int = 0,
        top_k: int = 50,
    ) -> None:
        self.model, self.tok = model, tok
        self.n_texts, self.max_new_tokens, self.batch_size, self.seed, self.top_k = (
            n_texts,
            max_new_tokens,
            batch_size,
            seed,
            top_k,
        )
        self.corpus_id = f"self-gen-s{seed}-t{max_new_tokens}-k{top_k}-b{batch_size}"
        self._generated: dict[int, list[str]] = {}  # batches kept: statistics for several layers share them

    def _batch(self, index: int) -> list[str]:
        if index not in self._generated:
            self._generated[index] = self._sample(index)
        return self._generated[index]

    @torch.no_grad()
    def _sample(self, index: int) -> list[str]:
        tok, model = self.tok, self.model
        seeds = [self.SEEDS[(index * self.batch_size + j) % len(self.SEEDS)] for j in range(self.batch_size)]
        pad = next(t for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None)
        start = start_token_id(tok)
        prefix = [] if start is None else [start]
        encoded = [prefix + list(tok(s)["input_ids"]) for s in seeds]
        width = max(len(e) for e in encoded)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        device = input_device(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + index)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                top_k=self.top_k,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=pad,
            )
        return [s + tok.decode(row, skip_special_tokens=True) for s, row in zip(seeds, out[:, width:], strict=True)]

    def iter_from(self, start: int = 0) -> Iterator[str]:
        index, skip = divmod(start, self.batch_size)
        produced = start
        while produced < self.n_texts:
            texts = self._batch(index)[skip:]
            skip = 0
            index += 1
            for t in texts[: self.n_texts - produced]:
                produced += 1
                yield t


# ---------------------------------------------------------------------------------------------
# accumulation


@torch.no_grad()
def accumulate_second_moment(
    model: Any,
    tok: Any,
    module_name: str,
    texts: Iterable[str],
    *,
    state: MomentState | None = None,
    batch_size: int = 8,
    max_length: int = 128,
    progress: ProgressFn = no_progress,
    total: int | None = None,
    on_batch: Any = None,
) -> MomentState:
    """Add Σ k kᵀ over the non-pad tokens of `texts` to `state` (k = input of `module_name`).

    Texts are encoded as prompts are (a start token first where the tokenizer adds no BOS) and
    position 0 is left out: no edit ever reads a key at the attention sink, whose states are
    outliers large enough to distort C. on_batch(state) is called after each batch
    (checkpointing). The forward pass stops at the module: layers above it are never run.
    """
    module = model.get_submodule(module_name)
    pad = next(t for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None)
    start = start_token_id(tok)
    prefix = [] if start is None else [start]
    device = input_device(model)
    was_training = model.training
    model.eval()
    bar = progress(total=total, initial=state.n_texts if state else 0, unit="text",
                   desc=f"statistics of {module_name}")
    try:
        it = iter(texts)
        while batch := list(islice(it, batch_size)):
            enc = [prefix + tok(t, truncation=True, max_length=max_length)["input_ids"] for t in batch]
            enc = [e for e in enc if len(e) > 1]
            if enc:
                width = max(len(e) for e in enc)
                ids = torch.tensor([list(e) + [pad] * (width - len(e)) for e in enc], device=device)
                mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc], device=device)
                # Hooked only around this call: the text source may run the model itself (generation).
                x = capture_at_module(model, module, ids, mask)
                mask[:, 0] = 0  # the attention sink
                keys = x[mask.bool()].to(torch.float64)  # (n_tokens, d)
                if state is None:
                    state = MomentState.empty(keys.shape[1])
                state.sum += (keys.t() @ keys).cpu()
                state.count += keys.shape[0]
            if state is not None:  # texts before the first usable one are not counted
                state.n_texts += len(batch)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(state)
    finally:
        bar.close()
        model.train(was_training)
    if state is None:
        raise ValueError("the text source gave no texts")
    return state


# ---------------------------------------------------------------------------------------------
# cache


# How keys are read (start token, position 0 left out); part of every cache name, so statistics
# gathered under an older protocol are recomputed rather than mixed in.
KEY_PROTOCOL = "k1"


@dataclass(frozen=True)
class StatsKey:
    base_hash: str
    layer: int
    corpus_id: str
    n_samples: int
    module: str = ""  # the projection's name, when two projections share a layer

    def filename(self) -> str:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.corpus_id}")
        mod = re.sub(r"[^A-Za-z0-9._-]+", "_", self.module)
        return f"{self.base_hash}/L{self.layer}{'-' + mod if mod else ''}__{safe}__n{self.n_samples}__{KEY_PROTOCOL}"


class StatsCache:
    """Second moments on disk under `root`, keyed by (base hash, layer, corpus, samples)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: StatsKey, kind: str) -> Path:
        return self.root / f"{key.filename()}.{kind}.safetensors"

    def _write(self, path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: StatsKey) -> torch.Tensor | None:
        """E[k kᵀ] (float32) if cached."""
        path = self._path(key, "mom2")
        return load_file(path)["mom2"] if path.exists() else None

    def put(self, key: StatsKey, state: MomentState) -> torch.Tensor:
        """Store E[k kᵀ] with the float64 sum behind it, so a larger run can start from it."""
        mom2 = state.mom2()
        meta = {"count": str(state.count), "n_texts": str(state.n_texts), "corpus_id": key.corpus_id}
        self._write(self._path(key, "mom2"), {"mom2": mom2, "sum": state.sum}, meta)
        self._path(key, "partial").unlink(missing_ok=True)
        for shard in self.root.glob(f"{key.filename()}.shard-*.safetensors"):
            shard.unlink(missing_ok=True)
        return mom2

    def largest_prefix(self, key: StatsKey) -> tuple[int, MomentState] | None:
        """The largest finished run of the same statistics over fewer texts, as a state to extend.

        The texts of a source come in a fixed order, so a run over n texts is the first n of a
        larger one: its sum and count are where the larger run would be after n texts. Files
        written before the sum was kept hold only E[k kᵀ] in float32 and cannot be extended.
        """
        best: tuple[int, Path] | None = None
        pattern = dataclasses.replace(key, n_samples=0).filename().replace("__n0__", "__n*__")
        for path in self.root.glob(f"{pattern}.mom2.safetensors"):
            n = int(re.findall(r"__n(\d+)__", path.name)[-1])
            if n < key.n_samples and (best is None or n > best[0]):
                best = (n, path)
        if best is None:
            return None
        from safetensors import safe_open

        with safe_open(str(best[1]), framework="pt") as f:
            names = f.keys()
            if "sum" not in names:
                return None
            meta = f.metadata()
            return best[0], MomentState(sum=f.get_tensor("sum"), count=int(meta["count"]), n_texts=int(meta["n_texts"]))

    def load_partial(self, key: StatsKey, kind: str = "partial") -> MomentState | None:
        path = self._path(key, kind)
        if not path.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            total = f.get_tensor("sum")
        return MomentState(sum=total, count=int(meta["count"]), n_texts=int(meta["n_texts"]))

    def save_partial(self, key: StatsKey, state: MomentState, kind: str = "partial") -> None:
        self._write(
            self._path(key, kind), {"sum": state.sum}, {"count": str(state.count), "n_texts": str(state.n_texts)}
        )

    def load_shard(self, key: StatsKey, shard: str) -> MomentState | None:
        """One process's checkpoint of a parallel run (`shard` names its rank and share); see kedit.edit.parallel."""
        return self.load_partial(key, f"shard-{shard}")

    def save_shard(self, key: StatsKey, shard: str, state: MomentState) -> None:
        """Checkpoint one process's partial sum; `put` of the finished statistics removes every shard."""
        self.save_partial(key, state, f"shard-{shard}")


def cached_second_moment(
    model: Any,
    tok: Any,
    layer: int,
    module_name: str,
    source: TextSource,
    *,
    n_samples: int,
    cache: StatsCache | None = None,
    base_hash: str = "",
    batch_size: int = 8,
    max_length: int = 128,
    checkpoint_every: int = 1000,
    progress: ProgressFn = no_progress,
) -> torch.Tensor:
    """E[k kᵀ] of `module_name`'s input over the first `n_samples` texts of `source`, cached.

    With a cache, a finished result is returned at once and an interrupted run resumes from its
    last checkpoint (every `checkpoint_every` texts).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    key = StatsKey(base_hash, layer, source.corpus_id, n_samples, module_name)
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            log.info("second moment for %s from cache", module_name)
            return hit
    state = cache.load_partial(key) if cache is not None else None
    smaller = cache.largest_prefix(key) if cache is not None else None
    if smaller is not None and smaller[1].n_texts > (state.n_texts if state is not None else 0):
        log.info("extending the cached statistics for %s from %d to %d texts", module_name, smaller[0], n_samples)
        state = smaller[1]
    elif state is not None:
        log.info("resuming statistics for %s at text %d of %d", module_name, state.n_texts, n_samples)
    else:
        log.info("computing statistics for %s over %d texts (cached for later edits)", module_name, n_samples)
    start = state.n_texts if state is not None else 0
    last_saved, began, estimated = [start], time.monotonic(), [False]

    def checkpoint(s: MomentState) -> None:
        if not estimated[0] and ESTIMATE_AFTER <= s.n_texts - start < n_samples - start:
            estimated[0] = True
            left = (time.monotonic() - began) / (s.n_texts - start) * (n_samples - s.n_texts)
            log.info("statistics for %s: about %s more for %d texts", module_name, _duration(left),
                     n_samples - s.n_texts)
        if cache is not None and s.n_texts - last_saved[0] >= checkpoint_every and s.n_texts < n_samples:
            cache.save_partial(key, s)
            last_saved[0] = s.n_texts

    texts = islice(source.iter_from(start), max(n_samples - start, 0))
    state = accumulate_second_moment(
        model,
        tok,
        module_name,
        texts,
        state=state,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
        total=n_samples,
        on_batch=checkpoint,
    )
    return cache.put(key, state) if cache is not None else state.mom2()


# Texts timed before the time left is estimated: text the model writes itself is generated 64 at
# a time, so the first batch of keys also pays for the next 63 texts.
ESTIMATE_AFTER = 64


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
