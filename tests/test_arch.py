from types import SimpleNamespace

import pytest
import torch

from kedit.model.arch import ARCHITECTURES, UnknownArchitectureError, arch_for, get_module, n_layers
from tests import tiny


@pytest.fixture(scope="module")
def tiny_tok():
    return tiny.make_tokenizer()


@pytest.fixture(scope="module", params=tiny.MODEL_TYPES)
def tiny_model(request, tiny_tok):
    return tiny.make_model(request.param, len(tiny_tok))


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_tok):
    return tiny.make_model("gpt2", len(tiny_tok))


def test_unknown_model_type_names_type_and_fix():
    with pytest.raises(UnknownArchitectureError) as e:
        arch_for(SimpleNamespace(model_type="mamba"))
    assert isinstance(e.value, ValueError)
    assert "mamba" in str(e.value) and "rewrite_module_tmp" in str(e.value)
    assert e.value.model_type == "mamba"


def test_keyed_by_config_not_path():
    cfg = SimpleNamespace(model_type="llama", num_hidden_layers=30, name_or_path="gpt2-xl")
    arch = arch_for(SimpleNamespace(config=cfg))
    assert arch.out_proj(5) == "model.layers.5.mlp.down_proj"
    assert arch.default_layer(30) == 5  # SmolLM2's ROME layer
    assert n_layers(cfg) == 30


def test_default_layers_match_the_literature():
    assert ARCHITECTURES["gpt2"].default_layer(48) == 17  # GPT-2 XL
    assert ARCHITECTURES["gptj"].default_layer(28) == 5  # GPT-J
    assert ARCHITECTURES["gpt2"].out_proj_transposed and not ARCHITECTURES["gptj"].out_proj_transposed
    for arch in ARCHITECTURES.values():
        for depth in (2, 3, 12):
            assert 0 <= arch.default_layer(depth) < depth


def test_every_module_resolves_on_tiny_models(tiny_model):
    arch = arch_for(tiny_model)
    for name in (arch.layer_tmp, arch.mlp_tmp, arch.attn_tmp, arch.out_proj_tmp):
        get_module(tiny_model, name.format(1))
    for name in (arch.final_norm, arch.embed, arch.lm_head):
        get_module(tiny_model, name)
    weight = get_module(tiny_model, arch.out_proj(1)).weight
    hidden = tiny_model.config.hidden_size
    # The projection writes the residual stream: its output side is the hidden size.
    assert weight.shape[1 if arch.out_proj_transposed else 0] == hidden
    assert dict(tiny_model.named_parameters())[arch.out_proj_weight(1)] is weight


def test_missing_module_is_a_clear_error(tiny_gpt2):
    with pytest.raises(ValueError, match=r"no module 'transformer\.h\.9\.mlp\.c_proj'"):
        get_module(tiny_gpt2, "transformer.h.9.mlp.c_proj")


def test_conv1d_is_transposed(tiny_gpt2):
    module = get_module(tiny_gpt2, arch_for(tiny_gpt2).out_proj(0))
    x = torch.randn(4, module.weight.shape[0])
    torch.testing.assert_close(module(x), x @ module.weight + module.bias)
