"""kedit: version control for the knowledge inside a language model.

The porcelain a Python user needs: `kedit.Repository` (the repository: init, commit, checkout,
revert, log, materialize, and edit, eval, check) and `kedit.load_model(path)` (a folder `kedit export` wrote). Both load
on first use, so `import kedit` stays cheap. The layers are sub-packages: kedit.core (the engine),
kedit.model, kedit.edit, kedit.eval, kedit.hub and kedit.cli (README.md, "Layout").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def load_model(path: str | Path, *, dtype: Any = None, device: str = "cpu") -> Any:
    """The transformers model in a folder `kedit export` wrote, with its adapters (GRACE codebooks) in place.

    Plain `from_pretrained` refuses such a folder when it has adapters; the tokenizer loads as usual
    (`AutoTokenizer.from_pretrained(path)`). Example:
        model = kedit.load_model("exported/")
    """
    from kedit.model.load import load_folder  # lazy: `import kedit` stays cheap

    return load_folder(path, dtype=dtype, device=device)[0]


def __getattr__(name: str) -> Any:
    if name == "Repository":  # lazy, as load_model: `import kedit` (every command) stays cheap
        from kedit.repository import Repository

        return Repository
    raise AttributeError(f"module 'kedit' has no attribute {name!r}")


__all__ = ["Repository", "__version__", "load_model"]
