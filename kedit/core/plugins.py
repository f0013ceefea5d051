"""Editing methods as their distributions declare them: the `kedit.methods` entry points, read as
package metadata without importing any method (nor torch).

A method is registered by one entry point naming the module that calls `register_method`, with
what the method needs from kedit in the entry point's extras (setup.cfg):

    [options.entry_points]
    kedit.methods =
        memit = kedit.methods.memit [batch, stats]

The built-in methods are declared so, in kedit's own setup.cfg, like any third-party package's.
`kedit edit --help`, `kedit train-editor --help` and shell completion list the methods from here,
so they cost a scan of the installed distributions' metadata (milliseconds), not an import.

Why extras: they are the only part of an entry point besides its target, importlib.metadata parses
them (`EntryPoint.extras`), and they keep the declaration on the registration's own line, where a
separate table could drift from it. The packaging specification lets consumers ignore extras for
installation ("Entry points specification", packaging.python.org); kedit gives them this meaning.

Caveat: the scan is cached per `sys.path`; a distribution installed into a folder already on the
path while the process runs is seen by the next process.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

__all__ = ["CAPABILITIES", "GROUP", "Declared", "declared_methods"]

GROUP = "kedit.methods"

# What a method may declare; the engine acts on these words and on nothing else it could guess.
CAPABILITIES: dict[str, str] = {
    "batch": "one call edits many requests, and `kedit edit` gives it all of them at once (one commit)",
    "stats": "`apply` takes `stats_provider(module_name, layer)`, the second moment E[kk^T] of that module's "
             "input on the base model, computed once and cached; the hyper-parameters carry `mom2_n_samples`, "
             "the number of texts behind it",
    "memory": "`apply` takes `memory`: what this method kept (`EditResult.memory`) with the edits still in "
              "effect, oldest first",
    "editor": "a trained editor: `register_method` gets `train` and `train_hparams_cls` (`kedit train-editor`), "
              "the hyper-parameters name the `editor`, and `apply` takes `load_editor_fn`",
    "adapters": "`apply` returns adapters, and importing the method's module registers the installer of their "
                "kind (`register_installer`)",
}


@dataclass(frozen=True)
class Declared:
    """One method's entry point: its name, what it needs, and where it registers itself."""

    name: str
    capabilities: frozenset[str]
    entry_point: EntryPoint
    distribution: str  # the installed package that declares it

    def load(self) -> None:
        """Import the method's module, which registers the method (and its adapters' installer)."""
        self.entry_point.load()


def declared_methods() -> dict[str, Declared]:
    """Every method an installed distribution declares, by name; the first on `sys.path` wins a name."""
    return _scan(tuple(sys.path))


@functools.lru_cache(maxsize=4)
def _scan(path: tuple[str, ...]) -> dict[str, Declared]:
    found: dict[str, Declared] = {}
    for ep in entry_points(group=GROUP):
        if ep.name not in found:
            found[ep.name] = Declared(ep.name, frozenset(ep.extras), ep, ep.dist.name if ep.dist else "")
    return found
