"""The repository a Python user works with (`kedit.Repository`): the engine's history operations,
plus those that need a model (edit, eval, check, load). The engine's `kedit.core.repo.Repository`
knows no model; this class adds the model layers on top, as the CLI does, so that a notebook and
`kedit edit` make the same commits.

    repo = kedit.Repository.open("work")
    (commit,) = repo.edit({"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "target_new": "Rome"})
    repo.check().broken   # [] when no probe regressed
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kedit.core.repo import CommitInfo, Metric
from kedit.core.repo import Repository as CoreRepository

if TYPE_CHECKING:
    from kedit.edit.rebase import RebaseReport
    from kedit.eval.probes import CheckReport
    from kedit.methods.base import EditRequest

# The model layers (kedit.edit, kedit.eval, kedit.model) import torch and transformers: each
# method imports them when called, so opening a repository to read its history stays cheap.


class Repository(CoreRepository):
    """A kedit repository with its model-side operations. Every call is one CLI command's work."""

    def load(self, rev: str = "HEAD", *, dtype: Any = None, device: str = "cpu",
             max_memory: Mapping[int | str, str] | None = None,
             offload_folder: str | Path | None = None) -> tuple[Any, Any]:
        """(model, tokenizer) of `rev`, as `from_pretrained` gives them, adapters included. With
        `device="auto"`, `max_memory` ({"cpu": "2GB", 0: "20GiB"}) and `offload_folder` place it."""
        from kedit.model.load import load_revision
        from kedit.model.placement import placement_of

        return load_revision(self, rev, dtype=dtype, device=device, placement=placement_of(max_memory, offload_folder))

    def edit(self, requests: EditRequest | Mapping[str, Any] | Iterable[EditRequest | Mapping[str, Any]], *,
             method: str = "rome", overrides: Mapping[str, Any] | None = None, hparams_file: str | Path | None = None,
             corpus: str | Path | None = None, stats_samples: int | None = None, batch_size: int | None = None,
             measure: bool = True, fluency: bool = False, message: str | None = None, dtype: Any = None,
             device: str = "cpu", max_memory: Mapping[int | str, str] | None = None,
             offload_folder: str | Path | None = None, progress: bool = False) -> list[CommitInfo]:
        """Edit facts on HEAD, one commit per request (per batch for batched methods), as `kedit edit`.

        A request is an `EditRequest` or a record in any format `kedit edit --requests` reads
        (kedit/EasyEdit, CounterFact, zsRE, KnowEdit). `overrides` are hyper-parameters (`--set`).
        """
        from kedit.edit.requests import record_to_request
        from kedit.edit.run import EditOptions, run_edits
        from kedit.methods.base import EditRequest
        from kedit.model.placement import placement_of

        one = isinstance(requests, EditRequest | Mapping)
        items = [requests] if one else list(requests)  # type: ignore[list-item]
        parsed = [r if isinstance(r, EditRequest) else record_to_request(dict(r)) for r in items]
        options = EditOptions(method=method, overrides={k: str(v) for k, v in (overrides or {}).items()},
                              hparams_file=Path(hparams_file) if hparams_file else None,
                              corpus=Path(corpus) if corpus else None, stats_samples=stats_samples, dtype=dtype,
                              device=device, placement=placement_of(max_memory, offload_folder), batch_size=batch_size,
                              measure=measure, fluency=fluency, message=message, progress=progress)
        return run_edits(self, parsed, options)

    def revert(self, rev: str, message: str | None = None, *, reapply: bool = False, dtype: Any = None,
               device: str = "cpu", progress: bool = False) -> CommitInfo:
        """Revert `rev` (a new commit, recomputed from the base), as `kedit revert`. With `reapply`, the
        first-parent commits after it are reverted too and their requests re-run, so that no later
        delta was computed on a model that held `rev` (`kedit revert --reapply`); HEAD is then the
        last re-run commit. Returns the revert of `rev`."""
        if not reapply:
            return super().revert(rev, message=message)
        from kedit.edit.rebase import revert_reapply
        from kedit.edit.run import EditOptions

        options = EditOptions(measure=False, dtype=dtype, device=device, progress=progress)
        return revert_reapply(self, rev, options=options, message=message).revert

    def rebase(self, onto: str, branch: str | None = None, *, check: bool = True, dtype: Any = None,
               device: str = "cpu", progress: bool = False) -> RebaseReport:
        """Re-run `branch`'s edits (default: the current one's) on the base `onto` (`add_base`) and move
        the branch there when all are committed, as `kedit rebase --onto`; the report says per edit
        whether it shows on the old and the new base and what `kedit check` says (`check`)."""
        from kedit.edit.rebase import rebase
        from kedit.edit.run import EditOptions

        options = EditOptions(measure=False, dtype=dtype, device=device, progress=progress)
        return rebase(self, onto, branch, options=options, check_probes=check)

    def eval(self, rev: str = "HEAD", *, suite: str | Path | None = None, fluency: bool = False, chat: bool = False,
             dtype: Any = None, device: str = "cpu", quant: str | None = None) -> list[Metric]:
        """Score `rev` on the edits in effect there (or a request file) and store the scores, as `kedit eval`;
        `quant`: as a GGUF file of that type would run it (suite recorded as `SUITE@QUANT`)."""
        from kedit.eval.revision import evaluate_revision

        return evaluate_revision(self, rev, suite=Path(suite) if suite else None, fluency=fluency, dtype=dtype,
                                 device=device, chat=chat, quant=quant)

    def check(self, rev: str = "HEAD", *, threshold: float = 0.1, protocol: str = "teacher-forced",
              against: str | None = None, chat: bool = False, dtype: Any = None, device: str = "cpu",
              quant: str | None = None) -> CheckReport:
        """Re-run the probe suite at `rev` against its parent and the base, as `kedit check`;
        `report.broken` lists what regressed. `quant`: every revision as a GGUF file of that type runs it."""
        from kedit.eval.probes import check
        from kedit.eval.revision import load_quantized

        setting = f"{device}/{_dtype_name(dtype)}" + (f"/{quant}" if quant else "")
        return check(self, rev, lambda c: load_quantized(self, c, quant, dtype=dtype, device=device),
                     threshold=threshold, setting=setting, protocol=protocol, against=against, chat=chat)


def _dtype_name(dtype: Any) -> str:
    """The name `kedit check` keys kept probe outputs by ('auto' when the stored dtype is used)."""
    return "auto" if dtype is None else str(dtype).removeprefix("torch.")

