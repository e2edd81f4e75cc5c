"""The shared engines give the same numbers batched as one request at a time."""

import math

import pytest
import torch

from twophase.data.base.hub import load_causal_lm, load_tokenizer
from twophase.data.base.tiny import write_tiny_model
from twophase.data.tokens import encode_continuation, encode_prompt
from twophase.eval.engine.loglikelihood import LoglikelihoodEngine, LoglikelihoodRequest
from twophase.eval.engine.generation import GenerationEngine, GenerationRequest, cut_at_stop

PROMPTS = [
    "Hello there",
    "How do I make a cake? Tell me step by step please",
    "x",
    "The quick brown fox jumps over the lazy dog and then some more words to make it long",
    "What is the capital of France?",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", with_chat_template=True)
    model = load_causal_lm(path)
    model.eval()
    return model, load_tokenizer(path)


def one_at_a_time(engine_cls, model, tokenizer, method, requests, **kwargs):
    engine = engine_cls(model, tokenizer, batch_size=1, **kwargs)
    return [getattr(engine, method)([r])[0] for r in requests]


# --------------------------------------------------------------------------- generation


def test_greedy_batched_equals_one_at_a_time(tiny):
    model, tok = tiny
    # Different lengths finish at different steps, which also exercises dropping finished rows.
    requests = [GenerationRequest(p, max_new_tokens=n) for p, n in zip(PROMPTS, [12, 3, 20, 7, 15])]
    batched = GenerationEngine(model, tok, batch_size=4).generate(requests)
    assert batched == one_at_a_time(GenerationEngine, model, tok, "generate", requests)
    assert all(len(texts) == 1 and texts[0] for texts in batched)


def test_sampling_is_seeded_per_answer_not_per_batch(tiny):
    model, tok = tiny
    requests = [GenerationRequest(p, max_new_tokens=10, temperature=1.0, n=3) for p in PROMPTS[:3]]
    batched = GenerationEngine(model, tok, batch_size=4, seed=7).generate(requests)
    assert batched == one_at_a_time(GenerationEngine, model, tok, "generate", requests, seed=7)
    assert len(set(batched[0])) > 1  # three different samples
    assert GenerationEngine(model, tok, batch_size=4, seed=8).generate(requests) != batched


def test_greedy_n_copies_and_top_p_one_token(tiny):
    model, tok = tiny
    greedy = GenerationEngine(model, tok).generate([GenerationRequest(PROMPTS[0], max_new_tokens=6, n=3)])[0]
    assert len(greedy) == 3 and len(set(greedy)) == 1
    # top_p this small keeps only the most likely token: sampling becomes greedy.
    nucleus = GenerationEngine(model, tok).generate(
        [GenerationRequest(PROMPTS[0], max_new_tokens=6, temperature=1.0, top_p=1e-9, n=2)]
    )[0]
    assert nucleus == greedy[:2]


def test_stop_strings_cut_before_the_stop(tiny):
    model, tok = tiny
    full = GenerationEngine(model, tok).generate([GenerationRequest(PROMPTS[1], max_new_tokens=20)])[0][0]
    stop = full[5:8]
    assert stop and stop in full
    cut = GenerationEngine(model, tok).generate([GenerationRequest(PROMPTS[1], max_new_tokens=20, stop=(stop, "\x00never"))])[0][0]
    assert cut == full[: full.index(stop)]
    assert cut_at_stop("abcSTOPdefEND", ("END", "STOP")) == "abc"


def test_eos_ends_a_row(tiny):
    model, tok = tiny
    engine = GenerationEngine(model, tok)
    row_ids = engine.tokenizer(PROMPTS[2])["input_ids"]
    full_ids = model.generate(torch.tensor([row_ids]), max_new_tokens=8, do_sample=False)[0, len(row_ids):].tolist()
    # Declare the first token that differs from its predecessors an end-of-sequence token.
    at = next(i for i, t in enumerate(full_ids) if i >= 2 and t not in full_ids[:i])
    engine.eos_ids = {full_ids[at]}
    text = engine.generate([GenerationRequest(PROMPTS[2], max_new_tokens=8)])[0][0]
    assert text == tok.decode(full_ids[:at], skip_special_tokens=True)


def test_greedy_matches_transformers_generate(tiny):
    model, tok = tiny
    ids = encode_prompt(tok, PROMPTS[3])
    reference = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None)
    expected = tok.decode(reference[0, len(ids):], skip_special_tokens=True)
    engine = GenerationEngine(model, tok, stop_at_eos=False)
    assert engine.generate([GenerationRequest(PROMPTS[3], max_new_tokens=10)])[0][0] == expected


# --------------------------------------------------------------------------- log-likelihood


def manual_loglikelihood(model, tok, context, continuation):
    # lm-eval's rule: tokenize the whole text, the continuation is what follows the context's tokens
    ctx = encode_prompt(tok, context)
    cont = encode_prompt(tok, context + continuation)[len(ctx):]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    return sum(logprobs[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_loglikelihood_batched_equals_one_at_a_time_and_a_full_forward(tiny):
    model, tok = tiny
    requests = [LoglikelihoodRequest(c, x) for c in PROMPTS for x in (" A", " hello world", "Paris", "")]
    batched = LoglikelihoodEngine(model, tok, batch_size=6).loglikelihood(requests)
    single = one_at_a_time(LoglikelihoodEngine, model, tok, "loglikelihood", requests)
    assert max(abs(a - b) for a, b in zip(batched, single)) < 1e-5
    for req, value in zip(requests, batched):
        assert value == pytest.approx(manual_loglikelihood(model, tok, req.context, req.continuation), abs=1e-4)
    assert batched[3] == 0.0 and all(v < 0 for v in batched[:3])


def test_single_token_choices_share_one_forward(tiny):
    model, tok = tiny
    choices = [c for c in ("A", "B", "C", "D") if len(encode_continuation(tok, c)) == 1]
    assert len(choices) == 4
    engine = LoglikelihoodEngine(model, tok, batch_size=8)
    scores = engine.loglikelihood([LoglikelihoodRequest("Question: which? Answer:", c) for c in choices])
    assert engine.stats["rows"] == 1 and engine.stats["forwards"] == 1
    # The four log-probabilities come from one softmax: their probabilities sum below 1.
    assert 0 < sum(math.exp(s) for s in scores) < 1
    assert len(set(scores)) == 4


def test_next_token_logprobs_is_a_distribution(tiny):
    model, tok = tiny
    engine = LoglikelihoodEngine(model, tok, batch_size=2)
    prefixes = [encode_prompt(tok, p) for p in PROMPTS[:3]]
    dists = engine.next_token_logprobs(prefixes)
    for prefix, dist in zip(prefixes, dists):
        assert dist.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([prefix])).logits[0, -1].float(), -1)
        assert torch.allclose(dist, expected, atol=1e-5)
