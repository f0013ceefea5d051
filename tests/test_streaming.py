"""Streaming: safetensors files written one tensor at a time, and commands whose memory stays
near one tensor whatever the model's size."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from kedit.core.stwriter import TensorSpec, spec_of, write_stream, write_tensors

MIXED = {
    "b.weight": torch.randn(3, 5, dtype=torch.bfloat16),
    "a.weight": torch.randn(4, 2),
    "c.ids": torch.arange(7, dtype=torch.int64),
    "d.half": torch.randn(2, 3, 4, dtype=torch.float16),
    "e.mask": torch.tensor([True, False, True]),
    "f.empty": torch.zeros(0, 3),
    "g.scalar": torch.tensor(2.5, dtype=torch.float64),
    "h.bytes": torch.arange(5, dtype=torch.uint8),
    "i.fp8": torch.randn(4).to(torch.float8_e4m3fn),
}


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"note": "ünïcode"}])
def test_writer_matches_safetensors_byte_for_byte(metadata: dict | None) -> None:
    """(With several metadata keys safetensors' order is its hash map's: equal as JSON, not as bytes.)"""
    out = io.BytesIO()
    write_tensors(out, MIXED, metadata)
    assert out.getvalue() == save(MIXED, metadata=metadata)


def test_streamed_file_reads_back_with_safe_open(tmp_path) -> None:
    """Values are asked for one at a time, in file order, and `safe_open` reads them back identical."""
    asked = []

    def value_of(name: str) -> torch.Tensor:
        asked.append(name)
        return MIXED[name].clone()

    specs = [spec_of(n, t) for n, t in MIXED.items()]
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        write_stream(f, specs, value_of, {"format": "pt", "note": "ünïcode"})
    assert sorted(asked) == sorted(MIXED) and asked[0] == "c.ids"  # widest dtype first, as safetensors orders
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "ünïcode"}
        for name, value in MIXED.items():
            got = f.get_tensor(name)
            assert got.dtype == value.dtype and got.shape == value.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8))


def test_a_value_unlike_its_header_is_refused() -> None:
    with pytest.raises(ValueError, match="expected F32\\[2, 2\\], got F32\\[4\\]"):
        write_stream(io.BytesIO(), [TensorSpec("w", "F32", (2, 2))], lambda _: torch.zeros(4))
