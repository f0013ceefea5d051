"""Streaming: safetensors files written one tensor at a time, and commands whose memory stays
near one tensor whatever the model's size."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from kedit.core.store import WRITE_PIECE, PieceWriter
from kedit.core.stwriter import StreamReader, TensorSpec, spec_of, write_stream, write_tensors
from tests.hubserver import HubServer

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


def test_a_stored_tensor_reaches_the_kernel_in_64_kb_pieces_with_its_bytes_unchanged() -> None:
    """A whole-tensor write() costs a virtual machine's kernel several times more than small
    pieces (bench/README.md, "Write size"): the store's files are written through PieceWriter."""

    sizes: list[int] = []

    class Recording(io.BytesIO):
        def write(self, data) -> int:  # type: ignore[override]
            sizes.append(len(memoryview(data).cast("B")))
            return super().write(data)

    big = {"w": torch.randn(300, 1000), "b": torch.randn(1000, dtype=torch.bfloat16)}
    out = Recording()
    write_tensors(PieceWriter(out), big, {"format": "pt"})  # type: ignore[arg-type]
    assert out.getvalue() == save(big, metadata={"format": "pt"})
    assert max(sizes) == WRITE_PIECE and len(sizes) > 1_200_000 // WRITE_PIECE


def test_a_piece_writer_is_otherwise_the_file_it_wraps(tmp_path: Path) -> None:
    """Hooks and writers given the wrapped file may flush it, ask its name or position."""
    with open(tmp_path / "t.safetensors", "wb") as out:
        pieced = PieceWriter(out)
        pieced.write(b"x" * (WRITE_PIECE + 3))
        pieced.flush()
        assert pieced.name == out.name and pieced.tell() == WRITE_PIECE + 3
        assert (tmp_path / "t.safetensors").stat().st_size == WRITE_PIECE + 3


def test_a_value_unlike_its_header_is_refused() -> None:
    with pytest.raises(ValueError, match="expected F32\\[2, 2\\], got F32\\[4\\]"):
        write_stream(io.BytesIO(), [TensorSpec("w", "F32", (2, 2))], lambda _: torch.zeros(4))


def test_stream_reader_reads_and_seeks_like_the_written_file() -> None:
    """The bytes `write_tensors` writes, read front to back in any piece size and after any seek
    (an upload re-reads from a saved position, a multipart upload reads slices)."""
    written = io.BytesIO()
    write_tensors(written, MIXED, {"format": "pt"})
    expected = written.getvalue()
    asked: list[str] = []

    def value_of(name: str) -> torch.Tensor:
        asked.append(name)
        return MIXED[name]

    reader = StreamReader([spec_of(n, t) for n, t in MIXED.items()], value_of, {"format": "pt"})
    assert reader.size == len(expected) and reader.read() == expected and reader.read() == b""
    assert len(asked) == len([t for t in MIXED.values() if t.numel()])  # each value asked for once
    for piece in (1, 7, 4096):
        reader.seek(0)
        assert b"".join(iter(lambda: reader.read(piece), b"")) == expected  # noqa: B023
    generator = torch.Generator().manual_seed(0)
    for start, size in torch.randint(0, len(expected) + 4, (200, 2), generator=generator).tolist():
        assert reader.seek(start) == start
        assert reader.read(size % 64) == expected[start:start + size % 64]
        buffer = bytearray(size % 64)
        reader.seek(-(size % 64), io.SEEK_END)
        assert bytes(buffer[:reader.readinto(buffer)]) == expected[len(expected) - size % 64:]
    with pytest.raises(ValueError, match="expected F32"):
        StreamReader([TensorSpec("w", "F32", (2, 2))], lambda _: torch.zeros(4)).read()


# -- memory of whole commands ----------------------------------------------------------------

TOKEN = "hf_kedit_stream_token"
BIG = (2048, 4096)  # 32 MB in float32: one tensor
LAYERS = 4  # 128 MB of weights in all


def _model(folder: Path, shape: tuple[int, int]) -> Path:
    """A safetensors checkpoint of LAYERS layers, each one tensor of `shape`, plus a config."""
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(shape, generator=generator)
               for i in range(LAYERS)}
    with open(folder / "model.safetensors", "wb") as f:
        write_tensors(f, tensors, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def _peak_anon_mb(argv: list[str], env: dict[str, str]) -> float:
    """Run a command in its own process; its peak RssAnon (anonymous memory), sampled every 20 ms."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while proc.poll() is None:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]))
        time.sleep(0.02)
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, out
    return peak / 1024


def _commands_peaks(tmp_path: Path, shape: tuple[int, int], env: dict[str, str]) -> dict[str, float]:
    model = _model(tmp_path / "model", shape)
    where = tmp_path / "work"
    kedit = [sys.executable, "-m", "kedit.cli", "--repo", str(where)]
    subprocess.run([*kedit, "init", str(model), "-q"], env=env, check=True)
    shutil.rmtree(where / ".kedit" / "worktree")
    (where / ".kedit" / "worktree.json").unlink()
    repo_id = f"alice/{tmp_path.name}"
    subprocess.run([*kedit, "remote", "add", "origin", f"hf://{repo_id}"], env=env, check=True, capture_output=True)
    return {
        "checkout": _peak_anon_mb([*kedit, "checkout", "--force", "main", "-q"], env),
        "export": _peak_anon_mb([*kedit, "export", "main", str(tmp_path / "out"), "-q"], env),
        "push": _peak_anon_mb([*kedit, "push", "origin", "main", "--create", "-q"], env),
        "clone --bare": _peak_anon_mb([sys.executable, "-m", "kedit.cli", "clone", "--bare", f"hf://{repo_id}",
                                       str(tmp_path / "clone"), "-q"], env),
    }


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc")
def test_checkout_export_push_and_clone_hold_about_one_tensor(tmp_path: Path) -> None:
    """The same commands on a 128 MB model and on a tiny one of the same layout: the difference in
    peak anonymous memory stays near one 32 MB tensor, far from the model (or a shard of it)."""
    server = HubServer(tmp_path / "hub", {TOKEN: "alice"}).start()
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_XET": "1", "OMP_NUM_THREADS": "1"}
    try:
        (tmp_path / "big").mkdir()
        (tmp_path / "tiny").mkdir()
        big = _commands_peaks(tmp_path / "big", BIG, env)
        tiny = _commands_peaks(tmp_path / "tiny", (2, 4), env)
    finally:
        server.stop()
    model_mb = LAYERS * BIG[0] * BIG[1] * 4 / 2**20
    for command in big:
        assert big[command] - tiny[command] < model_mb / 3, (command, big, tiny)


def test_a_streamed_tensor_is_stored_as_put_tensors_stores_it_or_not_at_all(tmp_path: Path) -> None:
    """`put_streamed_tensor` (what a clone does with each tensor of a downloading shard): the same
    object id and file as `put_tensors`; a short stream or wrong bytes store nothing."""
    from kedit.core.store import ObjectStore
    from kedit.core.tensors import hash_tensor, tensor_bytes

    value = torch.randn(700, 600, generator=torch.Generator().manual_seed(0)).bfloat16()  # 840 kB, under 1 MB
    data = bytes(tensor_bytes(value))

    def reader(blob: bytes):
        stream = io.BytesIO(blob)
        return stream.readinto

    kept, streamed = ObjectStore(tmp_path / "a"), ObjectStore(tmp_path / "b")
    expected = kept.put_tensors({"value": value})
    got = streamed.put_streamed_tensor("BF16", (700, 600), reader(data), hash_tensor(value))
    assert got == expected
    assert streamed.path(got.id, "st").read_bytes() == kept.path(expected.id, "st").read_bytes()
    for blob, why in ((data[:-2], "cut short"), (data[:-2] + b"\0\0", "does not match")):
        empty = ObjectStore(tmp_path / why)
        with pytest.raises(ValueError, match=why):
            empty.put_streamed_tensor("BF16", (700, 600), reader(blob), hash_tensor(value))
        assert not empty.path(got.id, "st").exists()
