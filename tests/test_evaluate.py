import math

import pytest
import torch
from kedit.methods.base import EditRequest

from kedit import evaluate
from tests import tiny


@pytest.fixture(scope="module")
def tok():
    return tiny.make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny.make_model("llama", len(tok))


def hand_teacher_forced(model, tok, prompt, answer):
    """One unpadded pass after the start token, positions read by hand."""
    p = [evaluate.start_token_id(tok), *tok(prompt)["input_ids"]]
    a = evaluate.answer_ids(tok, answer)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + a])).logits[0]
    logp = logits.log_softmax(-1)
    preds = [int(logits[len(p) - 1 + j].argmax()) for j in range(len(a))]
    nll = -sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a)) / len(a)
    return preds, a, nll


PROMPTS = ["The capital of France is", "Tokyo is in", "Apple makes the", "Berlin is the capital of Germany and"]
ANSWERS = ["Paris", "Japan", "iPhone", "Madrid is in Spain"]


def test_teacher_forced_matches_unpadded_passes(model, tok):
    got = evaluate.teacher_forced(model, tok, PROMPTS, ANSWERS, batch_size=3)  # padded batches
    for g, p, a in zip(got, PROMPTS, ANSWERS, strict=True):
        preds, ids, nll = hand_teacher_forced(model, tok, p, a)
        assert list(g.predicted) == preds and list(g.target) == ids
        assert g.nll == pytest.approx(nll, rel=1e-4)
        assert g.accuracy == sum(x == y for x, y in zip(preds, ids, strict=True)) / len(ids)


def test_prompts_start_after_a_separator(tok):
    """The tiny tokenizer adds no BOS, so every prompt gets one token in front, never two."""
    assert evaluate.start_token_id(tok) is not None
    assert evaluate.prompt_ids(tok, "Tokyo is in") == [evaluate.start_token_id(tok), *tok("Tokyo is in")["input_ids"]]


def test_answer_ids_boundary(tok):
    ids = evaluate.answer_ids(tok, "Paris")
    assert tok.decode(ids) == " Paris"
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        evaluate.answer_ids(tok, "   ")


def test_reliability_generalization_locality(model, tok):
    reqs = [
        EditRequest(prompt=p, subject=p.split()[0], target_new=a, paraphrases=(p + " really",))
        for p, a in zip(PROMPTS, ANSWERS, strict=True)
    ]
    rel = evaluate.reliability(model, tok, reqs)
    expected = [hand_teacher_forced(model, tok, p, a) for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    accs = [sum(x == y for x, y in zip(pr, ids, strict=True)) / len(ids) for pr, ids, _ in expected]
    assert rel.value == pytest.approx(sum(accs) / len(accs)) and rel.protocol == "teacher_forced_token_acc"
    assert evaluate.generalization(model, tok, reqs).n == 4
    pairs = list(zip(PROMPTS, ANSWERS, strict=True))
    ref = evaluate.locality_reference(model, tok, pairs)
    assert evaluate.locality(model, tok, pairs, ref).value == 1.0
    # One changed token out of the first pair's answer: agreement drops by 1/len/len(pairs).
    bad = [list(r) for r in ref]
    bad[0][0] = bad[0][0] + 1
    loc = evaluate.locality(model, tok, pairs, bad)
    assert loc.value == pytest.approx(1 - 1 / len(ref[0]) / len(pairs)) and loc.protocol == "teacher_forced_agreement"
    assert math.isnan(evaluate.portability(model, tok, reqs).value)


def test_counterfact_scores_by_hand(model, tok):
    req = EditRequest(
        prompt="The capital of France is",
        subject="France",
        target_new="Rome",
        target_true="Paris",
        paraphrases=("France has the capital",),
        neighbourhood=("The capital of Germany is", "The capital of Italy is"),
    )
    scores = evaluate.counterfact_scores(model, tok, [req])

    def nll(p, a):
        return hand_teacher_forced(model, tok, p, a)[2]

    assert scores["efficacy"].value == float(nll(req.text, "Rome") < nll(req.text, "Paris"))
    assert scores["paraphrase"].value == float(nll(req.paraphrases[0], "Rome") < nll(req.paraphrases[0], "Paris"))
    ns = [float(nll(p, "Paris") < nll(p, "Rome")) for p in req.neighbourhood]
    assert scores["neighbourhood"].value == sum(ns) / 2 and scores["neighbourhood"].n == 2
    assert all(m.protocol == "counterfact_nll_margin" for m in scores.values())
    only = evaluate.counterfact_scores(model, tok, [req], which=("neighbourhood",))
    assert list(only) == ["neighbourhood"] and only["neighbourhood"] == scores["neighbourhood"]
    with pytest.raises(ValueError, match="target_true"):
        evaluate.counterfact_scores(model, tok, [EditRequest(prompt="{} is", subject="X", target_new="Y")])


def test_ngram_entropy_by_hand():
    # Words a b a b: bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert evaluate.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # Punctuation is a word: a , b . -> three distinct bigrams, two distinct trigrams.
    assert evaluate.ngram_entropy("a, b.") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    assert evaluate.ngram_entropy("one") == 0.0


def test_generation_metrics(model, tok):
    p = "The capital of France is"
    with torch.no_grad():
        ids = torch.tensor([tok(p)["input_ids"]])
        greedy = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=1, pad_token_id=0
        )[0, -1]
    answer = tok.decode([int(greedy)])
    acc = evaluate.generation_accuracy(model, tok, [p], [answer])
    assert acc == [1.0] or evaluate.answer_ids(tok, answer) != [int(greedy)]
    flu = evaluate.fluency(model, tok, [p], max_new_tokens=8)
    assert flu.protocol == "ngram_entropy_greedy8" and flu.value >= 0
