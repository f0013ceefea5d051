"""Architecture facts, keyed by `model.config.model_type` (never by the model's path).

Methods find modules through this table: the decoder layers, the MLP and its output
projection (the matrix ROME, MEMIT and AlphaEdit rewrite), attention, the final norm, the
embedding and the output head. One row per architecture; module names are templates in
which `{}` is the layer index.

GPT-2 keeps its MLP projections as `Conv1D`, whose weight is stored transposed, (in, out)
instead of nn.Linear's (out, in); `out_proj_transposed` says so, and methods return deltas in
the stored layout.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

__all__ = ["ARCHITECTURES", "Arch", "UnknownArchitectureError", "arch_for", "get_module"]


class UnknownArchitectureError(ValueError):
    """The model's `model_type` is not in the table; carries the type for callers."""

    def __init__(self, model_type: str) -> None:
        self.model_type = model_type
        known = ", ".join(sorted(ARCHITECTURES))
        super().__init__(
            f"kedit has no architecture map for model_type={model_type!r} (known: {known}). "
            "Pass the module names yourself as hyper-parameters, e.g. "
            "`--set layer=5 --set rewrite_module_tmp=model.layers.{}.mlp.down_proj` "
            "(and layer_module_tmp, mlp_module_tmp for the key), or add a row to kedit.model.arch.ARCHITECTURES."
        )


@dataclass(frozen=True)
class Arch:
    """Where things are in one architecture's module tree."""

    model_type: str
    layer_tmp: str  # one decoder block, e.g. "model.layers.{}"
    mlp_tmp: str  # the block's MLP
    out_proj_tmp: str  # the MLP output projection: keys are its input, values its output
    attn_tmp: str
    final_norm: str
    embed: str
    lm_head: str
    out_proj_transposed: bool = False  # Conv1D stores W^T as (in, out)
    rome_layer_fraction: float = 0.2  # default ROME layer as a fraction of depth (causal-tracing peak)
    n_layers_attr: str = "num_hidden_layers"

    def out_proj(self, layer: int) -> str:
        return self.out_proj_tmp.format(layer)

    def out_proj_weight(self, layer: int) -> str:
        """State-dict name of the projection's weight (what a ROME delta is keyed by)."""
        return self.out_proj(layer) + ".weight"

    def default_layer(self, n_layers: int) -> int:
        """The ROME layer for a model of this depth: a fixed fraction, at least 1 when depth allows."""
        layer = round(self.rome_layer_fraction * n_layers)
        return max(min(layer, n_layers - 1), 1 if n_layers > 2 else 0)


def _llama_like(model_type: str, fraction: float = 0.17) -> Arch:
    return Arch(
        model_type=model_type,
        layer_tmp="model.layers.{}",
        mlp_tmp="model.layers.{}.mlp",
        out_proj_tmp="model.layers.{}.mlp.down_proj",
        attn_tmp="model.layers.{}.self_attn",
        final_norm="model.norm",
        embed="model.embed_tokens",
        lm_head="lm_head",
        rome_layer_fraction=fraction,
    )


# Fractions: GPT-2 XL peaks at layer 17 of 48, GPT-J at 5 of 28, Llama-2-7B is edited at 5 of 32
# (the layers ROME's and MEMIT's papers edit); SmolLM2-135M (30 layers) lands at 5, the layer
# EasyEdit's runs on it used.
ARCHITECTURES: dict[str, Arch] = {
    "gpt2": Arch(
        model_type="gpt2",
        layer_tmp="transformer.h.{}",
        mlp_tmp="transformer.h.{}.mlp",
        out_proj_tmp="transformer.h.{}.mlp.c_proj",
        attn_tmp="transformer.h.{}.attn",
        final_norm="transformer.ln_f",
        embed="transformer.wte",
        lm_head="lm_head",
        out_proj_transposed=True,
        rome_layer_fraction=0.35,
    ),
    "gptj": Arch(
        model_type="gptj",
        layer_tmp="transformer.h.{}",
        mlp_tmp="transformer.h.{}.mlp",
        out_proj_tmp="transformer.h.{}.mlp.fc_out",
        attn_tmp="transformer.h.{}.attn",
        final_norm="transformer.ln_f",
        embed="transformer.wte",
        lm_head="lm_head",
        rome_layer_fraction=0.18,
    ),
    "gpt_neox": Arch(
        model_type="gpt_neox",
        layer_tmp="gpt_neox.layers.{}",
        mlp_tmp="gpt_neox.layers.{}.mlp",
        out_proj_tmp="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        attn_tmp="gpt_neox.layers.{}.attention",
        final_norm="gpt_neox.final_layer_norm",
        embed="gpt_neox.embed_in",
        lm_head="lm_head",  # "embed_out" before transformers 5
        rome_layer_fraction=0.2,
    ),
    "falcon": Arch(
        model_type="falcon",
        layer_tmp="transformer.h.{}",
        mlp_tmp="transformer.h.{}.mlp",
        out_proj_tmp="transformer.h.{}.mlp.dense_4h_to_h",
        attn_tmp="transformer.h.{}.self_attention",
        final_norm="transformer.ln_f",
        embed="transformer.word_embeddings",
        lm_head="lm_head",
    ),
    **{
        t: _llama_like(t)
        for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2", "smollm3")
    },
}


def _config_of(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def arch_for(model_or_config: Any) -> Arch:
    """The architecture row for a model (or its config).

    Raises:
        UnknownArchitectureError (a ValueError): `model_type` is missing or not in the table.
    """
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise UnknownArchitectureError(str(model_type))
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise UnknownArchitectureError(model_type)
    return arch


def n_layers(model_or_config: Any, arch: Arch | None = None) -> int:
    """Number of decoder layers, read from the config."""
    config = _config_of(model_or_config)
    attr = arch.n_layers_attr if arch is not None else "num_hidden_layers"
    return int(getattr(config, attr))


def get_module(model: Any, name: str) -> Any:
    """The submodule called `name`, with an error that names what is missing."""
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise ValueError(f"model (model_type={model_type!r}) has no module {name!r}") from e


def cache_keyword(forward: Any) -> str:
    """The keyword under which `forward` takes a KV cache: `cache` from transformers 5.25 on, which
    warns that `past_key_values` is deprecated; `past_key_values` before; `layer_past` in GPT-2 blocks."""
    params = inspect.signature(forward).parameters
    return next((name for name in ("cache", "past_key_values", "layer_past") if name in params), "past_key_values")


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned, read by its current name where it has one (see `cache_keyword`)."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache
