import math

import pytest
import torch
from kedit.methods.base import EditRequest

from kedit.eval import metrics
from tests import tiny


@pytest.fixture(scope="module")
def tok():
    return tiny.make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny.make_model("llama", len(tok))


def hand_teacher_forced(model, tok, prompt, answer):
    """One unpadded pass of the prompt as the tokenizer encodes it, positions read by hand."""
    p = tok(prompt)["input_ids"]
    a = metrics.answer_ids(tok, answer)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + a])).logits[0]
    logp = logits.log_softmax(-1)
    preds = [int(logits[len(p) - 1 + j].argmax()) for j in range(len(a))]
    nll = -sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a)) / len(a)
    return preds, a, nll


PROMPTS = ["The capital of France is", "Tokyo is in", "Apple makes the", "Berlin is the capital of Germany and"]
ANSWERS = ["Paris", "Japan", "iPhone", "Madrid is in Spain"]


def test_teacher_forced_matches_unpadded_passes(model, tok):
    got = metrics.teacher_forced(model, tok, PROMPTS, ANSWERS, batch_size=3)  # padded batches
    for g, p, a in zip(got, PROMPTS, ANSWERS, strict=True):
        preds, ids, nll = hand_teacher_forced(model, tok, p, a)
        assert list(g.predicted) == preds and list(g.target) == ids
        assert g.nll == pytest.approx(nll, rel=1e-4)
        assert g.accuracy == sum(x == y for x, y in zip(preds, ids, strict=True)) / len(ids)


def test_metrics_feed_the_prompt_as_the_tokenizer_encodes_it(model, tok):
    """The user protocol: exactly tokenizer(prompt), no start token in front, even though the tiny
    tokenizer adds no BOS and a method could put one there."""
    assert metrics.start_token_id(tok) is not None
    assert metrics.prompt_ids(tok, "Tokyo is in") == tok("Tokyo is in")["input_ids"]
    fed = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: fed.append(args[0][0].tolist()))
    try:
        metrics.teacher_forced(model, tok, ["Tokyo is in"], ["Japan"])
        metrics.greedy_continuations(model, tok, ["Tokyo is in"], max_new_tokens=1)
    finally:
        hook.remove()
    prompt = tok("Tokyo is in")["input_ids"]
    assert fed[0] == prompt + metrics.answer_ids(tok, "Japan")  # teacher forcing: prompt then answer
    assert fed[1] == prompt  # generation: the prompt alone, then one new token


def test_answer_ids_boundary(tok):
    ids = metrics.answer_ids(tok, "Paris")
    assert tok.decode(ids) == " Paris"
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        metrics.answer_ids(tok, "   ")


def test_reliability_generalization_locality(model, tok):
    reqs = [
        EditRequest(prompt=p, subject=p.split()[0], target_new=a, paraphrases=(p + " really",))
        for p, a in zip(PROMPTS, ANSWERS, strict=True)
    ]
    rel = metrics.reliability(model, tok, reqs)
    expected = [hand_teacher_forced(model, tok, p, a) for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    accs = [sum(x == y for x, y in zip(pr, ids, strict=True)) / len(ids) for pr, ids, _ in expected]
    assert rel.value == pytest.approx(sum(accs) / len(accs)) and rel.protocol == "user_prompt_teacher_forced_token_acc"
    assert metrics.generalization(model, tok, reqs).n == 4
    pairs = list(zip(PROMPTS, ANSWERS, strict=True))
    ref = metrics.locality_reference(model, tok, pairs)
    assert metrics.locality(model, tok, pairs, ref).value == 1.0
    # One changed token out of the first pair's answer: agreement drops by 1/len/len(pairs).
    bad = [list(r) for r in ref]
    bad[0][0] = bad[0][0] + 1
    loc = metrics.locality(model, tok, pairs, bad)
    assert loc.value == pytest.approx(1 - 1 / len(ref[0]) / len(pairs))
    assert loc.protocol == "user_prompt_teacher_forced_agreement"
    assert math.isnan(metrics.portability(model, tok, reqs).value)


def test_counterfact_scores_by_hand(model, tok):
    req = EditRequest(
        prompt="The capital of France is",
        subject="France",
        target_new="Rome",
        target_true="Paris",
        paraphrases=("France has the capital",),
        neighbourhood=("The capital of Germany is", "The capital of Italy is"),
    )
    scores = metrics.counterfact_scores(model, tok, [req])

    def nll(p, a):
        return hand_teacher_forced(model, tok, p, a)[2]

    assert scores["efficacy"].value == float(nll(req.text, "Rome") < nll(req.text, "Paris"))
    assert scores["paraphrase"].value == float(nll(req.paraphrases[0], "Rome") < nll(req.paraphrases[0], "Paris"))
    ns = [float(nll(p, "Paris") < nll(p, "Rome")) for p in req.neighbourhood]
    assert scores["neighbourhood"].value == sum(ns) / 2 and scores["neighbourhood"].n == 2
    assert all(m.protocol == "user_prompt_counterfact_nll_margin" for m in scores.values())
    only = metrics.counterfact_scores(model, tok, [req], which=("neighbourhood",))
    assert list(only) == ["neighbourhood"] and only["neighbourhood"] == scores["neighbourhood"]
    with pytest.raises(ValueError, match="target_true"):
        metrics.counterfact_scores(model, tok, [EditRequest(prompt="{} is", subject="X", target_new="Y")])


def test_ngram_entropy_by_hand():
    # Words a b a b: bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert metrics.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # Punctuation is a word: a , b . -> three distinct bigrams, two distinct trigrams.
    assert metrics.ngram_entropy("a, b.") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    assert metrics.ngram_entropy("one") == 0.0


def test_fluency_protocol(model, tok):
    flu = metrics.fluency(model, tok, ["The capital of France is"], max_new_tokens=8)
    assert flu.protocol == "user_prompt_ngram_entropy_greedy8" and flu.value >= 0


def test_greedy_continuations_are_what_generate_gives_each_prompt_alone(model, tok):
    """Batched, left-padded generation equals the user's own generate() on tokenizer(prompt), one at a time."""
    prompts = [*PROMPTS, "Paris"]  # lengths 1 to 8 tokens: every row but the longest is padded
    got = metrics.greedy_continuations(model, tok, prompts, max_new_tokens=6, batch_size=3)
    for prompt, text in zip(prompts, got, strict=True):
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert text == tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_stopping_once_the_answer_shows_keeps_every_verdict(model, tok):
    """A row stops as soon as its answer shows, and only that row: whether the answer shows is the same
    as on the full continuation, and rows still running give exactly the full text."""
    prompts = [*PROMPTS, "Paris"]
    full = metrics.greedy_continuations(model, tok, prompts, max_new_tokens=8, batch_size=3)
    start = metrics.greedy_continuations(model, tok, prompts, max_new_tokens=2, batch_size=3)
    # answers that show after two tokens (rows 0, 2), never (1, 4), or only with the last token (3)
    answers = [start[0], "zzz-never-said", start[2], full[3], "zzz-never-said"]
    cut = metrics.greedy_continuations(model, tok, prompts, max_new_tokens=8, batch_size=3, until_shown=answers)
    verdicts = [metrics.shows(t, a) for t, a in zip(full, answers, strict=True)]
    assert [metrics.shows(t, a) for t, a in zip(cut, answers, strict=True)] == verdicts
    assert metrics.shows_in_generation(model, tok, prompts, answers, max_new_tokens=8) == verdicts
    assert verdicts[:2] == [True, False] and verdicts[4] is False
    assert cut[0] == start[0] and cut[2] == start[2] != full[2]  # they did stop early
    assert cut[1] == full[1] and cut[4] == full[4]  # rows that never stop are untouched by the others


def test_comparison_rule():
    assert metrics.shows(" Rome, the capital of Italy.", "rome")  # case-insensitive containment
    assert metrics.shows("It is in\nNew   York city", "new york")  # spacing does not matter
    assert not metrics.shows(" Paris, the capital of France.", "Rome")
    assert not metrics.shows("anything", "  ")  # an empty answer never shows
    assert metrics.holds(" Madrid.", "Madrid", reference=" Barcelona")  # the true answer is still there
    assert metrics.holds(" a city in Spain", "Madrid", reference=" a city in  Spain")  # unchanged from the base
    assert not metrics.holds(" Rome.", "Madrid", reference=" Madrid.")


def test_generation_scores_count_continuations_that_contain_the_target(model, tok):
    """gen_efficacy / gen_paraphrase / gen_locality follow the rule on the model's own continuations."""
    prompts = ["The capital of France is", "Tokyo is in"]
    said = metrics.greedy_continuations(model, tok, prompts)
    word = said[0].split()[0]  # a word the model does say after the first prompt
    req = EditRequest(prompt=prompts[0], subject="France", target_new=word, paraphrases=(prompts[1],))
    pairs = [(prompts[1], "zzz-not-said")]
    scores = {m.name: m for m in metrics.generation_scores(model, tok, [req], pairs, reference=[said[1]])}
    assert scores["gen_efficacy"].value == 1.0 and scores["gen_efficacy"].protocol == "user_prompt_greedy10_contains"
    assert scores["gen_paraphrase"].value == float(metrics.shows(said[1], word))
    assert scores["gen_locality"].value == 1.0  # unchanged from the reference
    assert scores["gen_locality"].protocol == "user_prompt_greedy10_holds_or_unchanged"
    changed = metrics.generation_scores(model, tok, [req], pairs, reference=["something else"])
    assert changed[-1].value == 0.0
