"""A model's weights as they come out of a GGUF quantisation: quantised and dequantised with the
`gguf` package's own quantisers, so `kedit eval --quant` and `kedit check --quant` measure what
llama.cpp would run, before anything is shipped.

The rule for which type a tensor gets is the one `kedit export --format gguf` writes by: vectors
(norms, biases) stay F32, a matrix whose rows are not whole quantisation blocks falls back to F16,
every other matrix gets the asked type. Llama's q/k permutation for llama.cpp moves whole rows and
blocks run along a row, so quantising the Hugging Face layout gives the same values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")


def ggml_type(shape: tuple[int, ...], asked: Any) -> Any:
    """The GGML type a tensor of `shape` is written as when `asked` is wanted for matrices."""
    import gguf

    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[asked]
    return gguf.GGMLQuantizationType.F16 if shape[-1] % block else asked


def round_trip(value: torch.Tensor, qtype: Any) -> torch.Tensor:
    """`value` quantised to `qtype` and back, in float32 (gguf.quants both ways)."""
    from gguf import quants

    data = quants.quantize(value.detach().to(torch.float32).cpu().contiguous().numpy(), qtype)
    return torch.from_numpy(np.ascontiguousarray(quants.dequantize(data, qtype))).reshape(value.shape)


def quantize_weights(model: Any, quant: str) -> dict[str, int]:
    """Replace, in place, every weight of `model` by its `quant` round trip; returns tensors per type."""
    import gguf

    if quant not in QUANTS:
        raise ValueError(f"unknown quantisation {quant!r}; choose one of {', '.join(QUANTS)}")
    asked = gguf.GGMLQuantizationType[quant.upper()]
    counts: dict[str, int] = {}
    with torch.no_grad():
        for _, param in model.named_parameters():  # tied weights appear once
            qtype = ggml_type(tuple(param.shape), asked)
            if qtype != gguf.GGMLQuantizationType.F32:
                param.copy_(round_trip(param, qtype).to(param.dtype))
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return counts
