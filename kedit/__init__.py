"""kedit: version control for the knowledge inside a language model."""

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
