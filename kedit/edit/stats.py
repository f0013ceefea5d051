"""Covariance statistics for a method: computed on the base model once, cached under `.kedit/stats/`
keyed by the base commit, layer, corpus and sample count (the `stats_provider` a method that declares
`stats` is given; its hyper-parameters' `mom2_n_samples` says how many texts)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from kedit.core import history
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
                 placement: Placement | None = None, progress: bool = False) -> None:
        self.repo, self.hparams = repo, hparams
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
        return cached_second_moment(model, tok, layer, module_name, source, n_samples=n,
                                    cache=StatsCache(self.repo.path / "stats"), base_hash=self.base,
                                    progress=functools.partial(progress_bar, disable=not self.progress))
