"""Covariance statistics for a method: computed on the base model once, cached under `.kedit/stats/`
keyed by the base commit, layer, corpus and sample count (the `stats_provider` a method that declares
`stats` is given; its hyper-parameters' `mom2_n_samples` says how many texts)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kedit.core import history
from kedit.core.errors import KeditError
from kedit.core.progress import progress_bar
from kedit.core.repo import Repository
from kedit.model.load import load_revision
from kedit.model.placement import Placement


class StatsProvider:
    """Second moments for a method, computed on the base model once and cached.

    `current` is a model already in memory at commit `current_commit`; it is used when that
    commit is the base, and the base is loaded otherwise.
    """

    def __init__(self, repo: Repository, hparams: Any, current: tuple[Any, Any], current_commit: str, *,
                 corpus: Path | None = None, dtype: torch.dtype | None = None, device: str = "cpu",
                 placement: Placement | None = None, progress: bool = False,
                 moment: Callable[..., torch.Tensor] | None = None) -> None:
        self.repo, self.hparams, self.moment = repo, hparams, moment
        self.corpus, self.dtype, self.device, self.progress = corpus, dtype, device, progress
        self.placement = placement
        self.current, self.current_commit = current, current_commit
        self.base = history.ancestors(repo.db, current_commit)[-1]
        self.used: dict[str, Any] = {}  # what the last statistics were computed from, for the record
        self._generated: dict[int, Any] = {}
        self._base_model: tuple[Any, Any] | None = None

    def __call__(self, module_name: str, layer: int) -> torch.Tensor:
        from kedit.methods.stats import GeneratedSource, StatsCache, cached_second_moment, corpus_source

        n = self.hparams.mom2_n_samples
        model, tok = self.current
        if self.current_commit != self.base:
            if self._base_model is None:  # statistics are always of the base; loaded once per run
                self._base_model = load_revision(self.repo, self.base, dtype=self.dtype,
                                                 device=self.device, placement=self.placement)
            model, tok = self._base_model
        if self.corpus:
            source = corpus_source(self.corpus)
        else:  # one source for every layer: the texts are generated once
            source = self._generated.get(n) or self._generated.setdefault(n, GeneratedSource(model, tok, n))
        self.used = {"corpus": source.corpus_id, "samples": n, "layer": layer}
        return (self.moment or cached_second_moment)(
            model, tok, layer, module_name, source, n_samples=n, cache=StatsCache(self.repo.path / "stats"),
            base_hash=self.base, progress=functools.partial(progress_bar, disable=not self.progress))


def check_layers(repo: Repository, base: str, layers: Sequence[int]) -> None:
    """Refuse a layer past the last one from the stored config.json, before any weights are read."""
    from transformers import AutoConfig

    from kedit.model.arch import arch_for, n_layers

    stored = repo.files(base).get("config.json")
    if stored is None:  # not a model; load_revision says so
        return
    config = AutoConfig.for_model(**json.loads(stored))
    total = n_layers(config, arch_for(config))
    for lay in layers:
        if lay >= total:
            raise KeditError(f"--layer {lay} is past the model's last layer ({total} layers: 0..{total - 1})")


def compute_stats(repo: Repository, base: str, method: str, layers: Sequence[int], values: dict[str, str], *,
                  corpus: Path | None = None, dtype: torch.dtype | None = None, device: str = "cpu",
                  placement: Placement | None = None, progress: bool = False,
                  moment: Callable[..., torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """What `kedit stats` does in one process: E[kkᵀ] of each layer (default: the method's) into the cache.

    `moment` replaces the single-process computation (kedit.edit.parallel passes its own); the
    result lands in the same cache entry either way. Returns one summary per layer.
    """
    from kedit.methods.base import get_method
    from kedit.methods.hparams import hparams_from_overrides
    from kedit.model.arch import arch_for

    check_layers(repo, base, layers)
    model, tok = load_revision(repo, base, dtype=dtype, device=device, placement=placement)
    hp = hparams_from_overrides(get_method(method).hparams_cls, model, values)
    provider = StatsProvider(repo, hp, (model, tok), base, corpus=corpus, device=device, dtype=dtype,
                             placement=placement, progress=progress, moment=moment)
    computed = []
    for lay in layers or (hp.layer,):
        module = arch_for(model).out_proj(lay)
        try:
            c = provider(module, lay)
        except ValueError as e:  # a corpus without texts, statistics that cannot be computed
            raise KeditError(f"statistics for layer {lay}: {e}") from e
        computed.append({"layer": lay, "module": module, "shape": list(c.shape), "trace": float(c.trace()),
                         **provider.used})
    return computed
