import json
import re

import pytest
import torch
from kedit.methods.stats import (
    GeneratedSource,
    ListSource,
    MomentState,
    StatsCache,
    StatsKey,
    accumulate_second_moment,
    cached_second_moment,
    corpus_source,
    read_corpus,
)

from kedit.eval.metrics import start_token_id
from kedit.model.arch import arch_for, get_module

TEXTS = [
    "The Eiffel Tower is located in the city of Paris.",
    "Berlin is the capital of Germany.",
    "Tokyo is in Japan.",
    "Apple makes the iPhone.",
    "",
    "The capital of France is Paris and the capital of Italy is Rome.",
    "Madrid is in Spain. London, Rome, Paris.",
    "Danielle Darrieux speaks French.",
]


def direct_second_moment(model, tok, module_name, texts, max_length=128):
    """Σ k kᵀ / n over every token after the start token, one text at a time (no padding at all)."""
    module = get_module(model, module_name)
    keys = []
    handle = module.register_forward_pre_hook(lambda _m, args: keys.append(args[0][0, 1:].double()))
    try:
        with torch.no_grad():
            for t in texts:
                ids = [start_token_id(tok), *tok(t, truncation=True, max_length=max_length)["input_ids"]]
                model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    k = torch.cat(keys)
    return (k.t() @ k) / k.shape[0], k.shape[0]


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_matches_direct_computation(request, fixture, tiny_tok):
    model = request.getfixturevalue(fixture)
    name = arch_for(model).out_proj(1)
    state = accumulate_second_moment(model, tiny_tok, name, TEXTS, batch_size=3)  # padded batches
    expected, n = direct_second_moment(model, tiny_tok, name, TEXTS)
    assert state.count == n and state.n_texts == len(TEXTS)
    torch.testing.assert_close(state.sum / state.count, expected, rtol=1e-5, atol=1e-6)
    assert state.sum.dtype == torch.float64 and state.mom2().dtype == torch.float32


def test_max_length_caps_tokens(tiny_gpt2, tiny_tok):
    name = arch_for(tiny_gpt2).out_proj(0)
    state = accumulate_second_moment(tiny_gpt2, tiny_tok, name, TEXTS, max_length=4)
    assert state.count == 4 * sum(1 for t in TEXTS if t)


def test_cache_round_trip_and_resume(tiny_llama, tiny_tok, tmp_path):
    name = arch_for(tiny_llama).out_proj(1)
    source = ListSource(TEXTS * 3)
    n = len(TEXTS) * 3
    full = cached_second_moment(tiny_llama, tiny_tok, 1, name, source, n_samples=n, batch_size=2)

    cache = StatsCache(tmp_path / "stats")

    class Killed(Exception):
        pass

    class Flaky(ListSource):
        def iter_from(self, start=0):
            for i, t in enumerate(super().iter_from(start), start):
                if i == 13 and not self.killed:
                    self.killed = True
                    raise Killed
                yield t

    flaky = Flaky(TEXTS * 3, corpus_id=source.corpus_id)
    flaky.killed = False
    with pytest.raises(Killed):
        cached_second_moment(
            tiny_llama,
            tiny_tok,
            1,
            name,
            flaky,
            n_samples=n,
            cache=cache,
            base_hash="b",
            batch_size=2,
            checkpoint_every=4,
        )
    key = StatsKey("b", 1, source.corpus_id, n, name)
    partial = cache.load_partial(key)
    assert partial is not None and 4 <= partial.n_texts <= 12 and cache.get(key) is None
    resumed = cached_second_moment(
        tiny_llama, tiny_tok, 1, name, flaky, n_samples=n, cache=cache, base_hash="b", batch_size=2
    )
    torch.testing.assert_close(resumed, full, rtol=1e-6, atol=1e-7)
    assert cache.load_partial(key) is None
    torch.testing.assert_close(cache.get(key), full)
    assert not list((tmp_path / "stats").rglob(".tmp-*"))
    # A hit returns the stored tensor without running the model.
    hit = cached_second_moment(None, None, 1, name, source, n_samples=n, cache=cache, base_hash="b")
    assert torch.equal(hit, cache.get(key))


def test_state_from_nothing_is_an_error():
    with pytest.raises(ValueError, match="no tokens"):
        MomentState.empty(3).mom2()


def test_read_corpus_formats(tmp_path):
    (tmp_path / "lines.txt").write_text("first line\n\nsecond para\nstill second\n")
    (tmp_path / "plain.txt").write_text("a\nb\n\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert list(read_corpus(tmp_path / "lines.txt")) == ["first line", "second para\nstill second"]
    assert list(read_corpus(tmp_path / "plain.txt")) == ["a", "b"]
    assert list(read_corpus(tmp_path / "d.jsonl")) == ["json one", "two"]
    assert len(list(read_corpus(tmp_path))) == 6
    src = corpus_source(tmp_path)
    assert list(src.iter_from(5)) == ["b"] and src.corpus_id.startswith(tmp_path.name)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="'text' field"):
        list(read_corpus(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError):
        list(read_corpus(tmp_path / "missing"))


def test_generated_source_is_seeded_and_resumable(tiny_gpt2, tiny_tok):
    src = GeneratedSource(tiny_gpt2, tiny_tok, n_texts=5, max_new_tokens=4, batch_size=2, seed=3)
    texts = list(src.iter_from(0))
    assert len(texts) == 5 and all(t for t in texts)
    assert list(src.iter_from(3)) == texts[3:]
    assert list(GeneratedSource(tiny_gpt2, tiny_tok, 5, max_new_tokens=4, batch_size=2, seed=3).iter_from()) == texts


def test_a_smaller_cached_run_is_extended_to_the_from_scratch_result(tiny_llama, tiny_tok, tmp_path, caplog):
    name = arch_for(tiny_llama).out_proj(1)
    texts = TEXTS * 4
    starts: list[int] = []

    class Recording(ListSource):
        def iter_from(self, start=0):
            starts.append(start)
            return super().iter_from(start)

    cache = StatsCache(tmp_path / "stats")
    small = Recording(texts, corpus_id="corpus")
    cached_second_moment(tiny_llama, tiny_tok, 1, name, small, n_samples=16, cache=cache, base_hash="b", batch_size=4)
    with caplog.at_level("INFO", logger="kedit.methods.stats"):
        extended = cached_second_moment(tiny_llama, tiny_tok, 1, name, small, n_samples=32, cache=cache,
                                        base_hash="b", batch_size=4)
    assert starts == [0, 16]  # the second run read only the 16 texts the first had not
    assert "extending the cached statistics" in caplog.text and "from 16 to 32 texts" in caplog.text
    scratch = accumulate_second_moment(tiny_llama, tiny_tok, name, texts, batch_size=4)
    stored = cache.largest_prefix(StatsKey("b", 1, "corpus", 33, name))[1]
    assert stored.count == scratch.count and stored.n_texts == 32
    torch.testing.assert_close(stored.sum, scratch.sum, rtol=1e-12, atol=1e-12)  # float64 rounding
    torch.testing.assert_close(extended, scratch.mom2(), rtol=0, atol=0)
    # another corpus or layer is never taken as a prefix
    assert cache.largest_prefix(StatsKey("b", 1, "other", 64, name)) is None
    assert cache.largest_prefix(StatsKey("b", 2, "corpus", 64, name)) is None


def test_a_long_run_says_how_long_it_will_take(tiny_llama, tiny_tok, caplog):
    name = arch_for(tiny_llama).out_proj(1)
    with caplog.at_level("INFO", logger="kedit.methods.stats"):
        cached_second_moment(tiny_llama, tiny_tok, 1, name, ListSource(TEXTS * 20), n_samples=96, batch_size=16)
    assert re.search(r"about \d+ s more for 32 texts", caplog.text)  # timed over the first 64
