"""ROME on the real SmolLM2-135M: one counterfactual edit takes, ten unrelated facts stay."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from kedit.methods import rome
from kedit.methods.base import EditRequest
from kedit.methods.stats import GeneratedSource, StatsCache, cached_second_moment

from kedit.core.delta import apply_step
from kedit.core.sources import default_model_folder
from kedit.eval import metrics

pytestmark = pytest.mark.slow



@pytest.fixture(scope="session")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model_folder(Path("/tmp/kedit-smollm2-135m"))  # 4 s to load instead of 17 s
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tok


UNRELATED = [
    ("The capital of Japan is", "Tokyo"),
    ("The capital of Germany is", "Berlin"),
    ("The capital of Italy is", "Rome"),
    ("The Statue of Liberty is located in", "New York"),
    ("The currency of the United Kingdom is the", "pound"),
    ("Water is made of hydrogen and", "oxygen"),
    ("The largest planet in the solar system is", "Jupiter"),
    ("The author of Romeo and Juliet is William", "Shakespeare"),
    ("The chemical symbol for gold is", "Au"),
    ("The first president of the United States was George", "Washington"),
]


def test_counterfactual_edit(smollm2, tmp_path):
    model, tok = smollm2
    req = EditRequest(
        prompt="The Eiffel Tower is located in the city of",
        subject="Eiffel Tower",
        target_new="Rome",
        target_true="Paris",
        paraphrases=("The Eiffel Tower can be found in the city of",),
    )
    hp = rome.ROMEHyperParams.for_model(model)
    source = GeneratedSource(model, tok, n_texts=64, max_new_tokens=32, batch_size=32)
    c = cached_second_moment(
        model, tok, hp.layer, hp.module_name, source, n_samples=64, cache=StatsCache(tmp_path), base_hash="t"
    )
    hp = dataclasses.replace(hp, mom2_n_samples=64)
    reference = metrics.locality_reference(model, tok, UNRELATED)
    result = rome.apply(model, tok, [req], hp, second_moment=c)
    ((name, delta),) = result.deltas.items()
    weight = dict(model.named_parameters())[name]
    original = weight.detach().clone()
    with torch.no_grad():
        weight.copy_(apply_step(original, delta))
    try:
        assert metrics.shows_in_generation(model, tok, [req.text], ["Rome"]) == [True]
        cf = metrics.counterfact_scores(model, tok, [req])
        assert cf["efficacy"].value == 1.0 and cf["paraphrase"].value == 1.0
        assert metrics.reliability(model, tok, [req]).value == 1.0
        assert metrics.locality(model, tok, UNRELATED, reference).value >= 0.9
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert result.info["requests"][0]["update_norm"] < 0.5 * result.info["requests"][0]["weight_norm"]
