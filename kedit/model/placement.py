"""A model placed over devices by accelerate, and the weights of a layer wherever it lives.

`--device auto` loads with accelerate's `device_map="auto"`: layers fill the GPUs, then the CPU, and
what `--max-memory` leaves no room for is offloaded to `--offload-folder` on disk. An offloaded
layer's parameters are meta tensors; accelerate's hook on the layer reads the real ones from its
`weights_map` for each forward. Methods read and write weights through `read_weight` and
`write_weight`, so that a delta is always computed from the real values: an offloaded layer is read
through its hook's `weights_map` in its stored dtype, and a changed weight goes into the loader's
own in-memory state dict, which accelerate reads before the disk (the offloaded files are never
written, so the working model's shards stay as committed). `weight_restored` undoes such changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kedit.core.errors import KeditError

__all__ = ["Placement", "add_to_weight", "execution_device", "is_offloaded", "is_placed", "loading_kwargs",
           "parse_max_memory", "placement_of", "read_weight", "weight_restored", "write_weight"]


@dataclass(frozen=True)
class Placement:
    """Where `--device auto` may put the model: memory per device, and the folder for disk offload."""

    max_memory: dict[int | str, str] | None = None
    offload_folder: Path | None = None


def parse_max_memory(specs: Sequence[str]) -> dict[int | str, str]:
    """`cpu=200MB`, `0=20GiB`, `cuda:1=20GB` as accelerate's `max_memory` mapping; one clear line if malformed."""
    from accelerate.utils import convert_file_size_to_int

    out: dict[int | str, str] = {}
    for spec in specs:
        device, sep, size = spec.partition("=")
        device, size = device.strip(), size.strip()
        if not sep or not device or not size:
            raise KeditError(f"--max-memory {spec!r}: expected DEVICE=SIZE, e.g. cpu=2GB or 0=20GiB")
        try:
            if convert_file_size_to_int(size) <= 0:
                raise ValueError(size)
        except ValueError:
            raise KeditError(f"--max-memory {spec!r}: {size!r} is not a size (e.g. 500MB, 2GiB)") from None
        key: int | str
        if device.isdigit():
            key = int(device)
        elif device.startswith("cuda:") and device[5:].isdigit():
            key = int(device[5:])
        elif device in ("cpu", "mps", "disk"):
            key = device
        else:
            raise KeditError(f"--max-memory {spec!r}: the device must be cpu, mps, disk, N or cuda:N")
        if key in out:
            raise KeditError(f"--max-memory names {device!r} twice")
        out[key] = size
    return out


def placement_of(max_memory: Sequence[str] | Mapping[int | str, str] | None,
                 offload_folder: str | Path | None) -> Placement | None:
    """The Placement that `--max-memory DEVICE=SIZE` (or a mapping) and `--offload-folder` ask for; None for neither."""
    if not max_memory and offload_folder is None:
        return None
    specs = [f"{d}={s}" for d, s in max_memory.items()] if isinstance(max_memory, Mapping) else list(max_memory or ())
    return Placement(max_memory=parse_max_memory(specs) or None,
                     offload_folder=Path(offload_folder) if offload_folder is not None else None)


def loading_kwargs(device: str, placement: Placement | None) -> dict[str, Any]:
    """`from_pretrained` arguments that place the model (device "auto"), or none."""
    if placement is not None and (placement.max_memory or placement.offload_folder) and device != "auto":
        raise KeditError("--max-memory and --offload-folder place a model over devices: they need --device auto")
    if device != "auto":
        return {}
    kwargs: dict[str, Any] = {"device_map": "auto"}
    if placement is not None and placement.max_memory:
        kwargs["max_memory"] = dict(placement.max_memory)
    if placement is not None and placement.offload_folder is not None:
        folder = Path(placement.offload_folder)
        if folder.exists() and not folder.is_dir():
            raise KeditError(f"--offload-folder {folder} is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        kwargs["offload_folder"] = str(folder)
    return kwargs


def is_placed(module: torch.nn.Module) -> bool:
    """Whether accelerate placed `module` (its forward runs through a hook that moves weights or inputs)."""
    return hasattr(module, "_hf_hook")


def is_offloaded(module: torch.nn.Module) -> bool:
    """Whether `module`'s own parameters are offloaded (meta tensors, real values in the hook's weights_map)."""
    from accelerate.utils import has_offloaded_params

    return has_offloaded_params(module)


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device `module` computes on: its hook's execution device when placed, else its parameters'."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _slot(module: torch.nn.Module, name: str) -> tuple[Any, str]:
    """The mapping that holds an offloaded parameter in memory, and its key there."""
    from accelerate.utils import OffloadedWeightsLoader

    weights = module._hf_hook.weights_map  # a PrefixedDataset over the model's weights
    key = getattr(weights, "prefix", "") + name
    dataset = getattr(weights, "dataset", weights)
    return (dataset.state_dict if isinstance(dataset, OffloadedWeightsLoader) else dataset), key


def read_weight(module: torch.nn.Module, name: str = "weight") -> torch.Tensor:
    """The real values of `module.<name>` on its execution device, in the parameter's dtype.

    Read-only: an offloaded weight may be a view of a memory-mapped file; change it with `write_weight`."""
    param = getattr(module, name)
    if not is_offloaded(module):
        return param
    return module._hf_hook.weights_map[name].to(device=execution_device(module), dtype=param.dtype)


@torch.no_grad()
def write_weight(module: torch.nn.Module, value: torch.Tensor, name: str = "weight") -> None:
    """Set `module.<name>` to `value` (cast to the parameter's dtype) for every later forward."""
    param = getattr(module, name)
    if not is_offloaded(module):
        param.copy_(value.to(device=param.device, dtype=param.dtype))
        return
    holder, key = _slot(module, name)
    holder[key] = value.detach().to(device="cpu", dtype=param.dtype).contiguous()


@torch.no_grad()
def add_to_weight(module: torch.nn.Module, update: torch.Tensor, name: str = "weight") -> None:
    """`module.<name> += update`, with the update cast to the weight's dtype first (the same arithmetic
    in memory and offloaded)."""
    param = getattr(module, name)
    if not is_offloaded(module):
        param.add_(update.to(device=param.device, dtype=param.dtype))
        return
    value = read_weight(module, name).clone()
    value.add_(update.to(device=value.device, dtype=value.dtype))
    write_weight(module, value, name)


@contextlib.contextmanager
def weight_restored(modules: Sequence[torch.nn.Module], name: str = "weight") -> Iterator[None]:
    """Whatever `write_weight`/`add_to_weight` do to these modules' weights inside is undone on exit."""
    saved: list[tuple[torch.nn.Module, Any]] = []
    with torch.no_grad():
        for module in modules:
            if is_offloaded(module):
                holder, key = _slot(module, name)
                saved.append((module, (holder, key, holder.get(key))))
            else:
                saved.append((module, getattr(module, name).detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, state in saved:
                if isinstance(state, torch.Tensor):
                    getattr(module, name).copy_(state)
                    continue
                holder, key, before = state
                if before is None:
                    holder.pop(key, None)  # accelerate reads the offloaded file again
                else:
                    holder[key] = before
