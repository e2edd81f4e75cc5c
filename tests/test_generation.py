"""The generation engine (eval/engine/generation.py, eval/engine/decoder.py, eval/engine/sampling.py) on the tiny model, CPU.

Exactness against transformers' own `model.generate`, reproducible seeded
sampling, stopping at EOS and at stop strings that span tokens, prefix sharing,
dropping finished rows, and the sampler's log-probabilities against the
training forward pass.
"""

import math

import pytest
import torch

from twophase.data.base.hub import load_causal_lm, load_tokenizer
from twophase.data.tokens import encode_prompt
from twophase.eval.engine.decoder import CacheDecoder, FusedOps, StaticDecoder, add_rms_norm, bucket, rope
from twophase.eval.engine.generation import Generator
from twophase.eval.engine.sampling import SamplingParams, choose_tokens, filter_logits, row_keys, uniform_noise, vocabulary_keys
from twophase.trainers.infra.grad_arena import GradientArena

PROMPTS = [
    "\n\nHuman: How do I bake bread?\n\nAssistant:",
    "Complete the following Lean 4 code:\n\n```lean4\ntheorem t (x : ℝ) (h : 0 < x) : 0 < x ^ 2 := by\n",
    "x",
    "The quick brown fox jumps over the lazy dog, then naps in the sun for a long, long while",
    "Why is the sky blue?",
]
SAMPLE = SamplingParams(temperature=1.0)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    return model, tokenizer, [encode_prompt(tokenizer, p) for p in PROMPTS]


def reference_greedy(model, ids, new_tokens):
    out = model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=new_tokens,
        do_sample=False, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return out[0, len(ids) :].tolist()


def test_greedy_equals_transformers_generate_for_ragged_batches(tiny):
    model, tok, ids = tiny
    for generator in (Generator(model, tok, max_batch=4, stop_at_eos=False), _eager_generator(model, tok)):
        completions = generator.generate(ids, 16)  # 5 prompts: a batch of 4 (left-padded) and a batch of 1
        for prompt, completion in zip(ids, completions):
            assert completion.tokens == reference_greedy(model, prompt, 16)
            assert completion.finish == "length"


def test_qwen2_layout_with_qkv_biases_and_grouped_query_attention_equals_transformers_generate(tiny):
    """Qwen2.5's layout (q, k, v biases, 2 query heads per KV head) through the fused q/k/v projection."""
    from twophase.launch.bench.training import random_model

    _, tok, ids = tiny
    model = random_model("tiny-qwen2", torch.device("cpu"), torch.float32).eval()
    with torch.no_grad():  # random_model's zero biases would not show a missing bias: make them count
        for layer in model.model.layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, name).bias.normal_(0, 0.5)
    generator = Generator(model, tok, max_batch=4, stop_at_eos=False)
    assert isinstance(generator.decoder, StaticDecoder) and generator.decoder.qkv_biased
    ids = [[min(t, 2047) for t in prompt] for prompt in ids]
    for prompt, completion in zip(ids, generator.generate(ids, 12)):
        assert completion.tokens == reference_greedy(model, prompt, 12)


def _eager_generator(model, tok):
    """The same engine on transformers' own forward and cache (the path for non-Llama models)."""
    generator = Generator(model, tok, max_batch=4, stop_at_eos=False)
    generator.decoder = CacheDecoder(model, 4)
    return generator


def test_sampling_is_reproducible_and_independent_of_batching(tiny):
    model, tok, ids = tiny
    seeds = [11, 12, 13, 14, 15]
    first = [c.tokens for c in Generator(model, tok, max_batch=4).generate(ids, 12, SAMPLE, seeds)]
    again = [c.tokens for c in Generator(model, tok, max_batch=4).generate(ids, 12, SAMPLE, seeds)]
    alone = [c.tokens for c in Generator(model, tok, max_batch=1).generate(ids, 12, SAMPLE, seeds)]
    other = [c.tokens for c in Generator(model, tok, max_batch=4).generate(ids, 12, SAMPLE, [s + 100 for s in seeds])]
    assert first == again == alone
    assert first != other
    eager = [c.tokens for c in _eager_generator(model, tok).generate(ids, 12, SAMPLE, seeds)]
    assert eager == first


def test_g_samples_share_one_prefill_and_equal_independent_prefills(tiny, monkeypatch):
    model, tok, ids = tiny
    rows = [ids[1]] * 4 + [ids[3]] * 4  # two prompts, G = 4 each, as a GRPO step lays them out
    seeds = list(range(8))
    generator = Generator(model, tok, max_batch=8)
    prefilled = []
    original = StaticDecoder._prefill
    monkeypatch.setattr(StaticDecoder, "_prefill", lambda self, prompts, *a: prefilled.extend(prompts) or original(self, prompts, *a))
    shared = generator.generate(rows, 10, SAMPLE, seeds)
    assert prefilled == [ids[1], ids[3]]  # each distinct prompt ran once
    separate = [Generator(model, tok, max_batch=1).generate([row], 10, SAMPLE, [seed])[0] for row, seed in zip(rows, seeds)]
    assert [c.tokens for c in shared] == [c.tokens for c in separate]
    assert len({tuple(c.tokens) for c in shared[:4]}) > 1  # four different samples of one prompt


def test_eos_ends_a_row_and_is_kept_as_its_last_token(tiny):
    model, tok, ids = tiny
    full = reference_greedy(model, ids[2], 12)
    at = next(i for i, t in enumerate(full) if i >= 2 and t not in full[:i])
    generator = Generator(model, tok)
    generator.eos_ids = {full[at]}
    completion = generator.generate([ids[2]], 12)[0]
    assert completion.tokens == full[: at + 1] and completion.finish == "eos"
    assert completion.text == tok.decode(full[:at], skip_special_tokens=True)


def test_stop_string_across_token_boundaries_ends_at_the_completing_token(tiny):
    model, tok, ids = tiny
    full = reference_greedy(model, ids[1], 20)
    pieces = [tok.decode([t]) for t in full]
    # A stop string made of the end of one token and the start of the next.
    cut = next(i for i in range(3, 19) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 1)
    stop = pieces[cut][-2:] + pieces[cut + 1][:1]
    text = tok.decode(full)
    assert stop in text
    # the completion ends with the first token whose text completes the stop string
    expected_end = next(n for n in range(1, 21) if stop in tok.decode(full[:n]))
    completion = Generator(model, tok).generate([ids[1]], 20, stop=(stop,))[0]
    assert completion.finish == "stop"
    assert completion.tokens == full[:expected_end]
    assert tok.decode(full[: expected_end - 1]).count(stop) == 0


def test_finished_rows_are_dropped_and_results_are_unchanged(tiny, monkeypatch):
    model, tok, ids = tiny
    limits = [3, 25, 2, 4, 30]  # most rows finish early; two keep going
    kept = []
    original = StaticDecoder.keep
    monkeypatch.setattr(StaticDecoder, "keep", lambda self, slots: kept.append(list(slots)) or original(self, slots))
    batched = Generator(model, tok, max_batch=8, check_every=2).generate(ids, limits, SAMPLE, [1, 2, 3, 4, 5])
    # 5 rows in 8 slots -> 3 rows (4 slots) -> the two long rows (2) -> the longest alone (1)
    assert [len(k) for k in kept] == [3, 2, 1]
    alone = [Generator(model, tok, max_batch=1).generate([p], n, SAMPLE, [s])[0] for p, n, s in zip(ids, limits, [1, 2, 3, 4, 5])]
    assert [c.tokens for c in batched] == [c.tokens for c in alone]
    assert [len(c.tokens) for c in batched] == limits


def test_sampler_logprobs_equal_a_full_forward(tiny):
    model, tok, ids = tiny
    completion = Generator(model, tok).generate([ids[3]], 15, SAMPLE, [5])[0]
    sequence = torch.tensor([ids[3] + completion.tokens])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(sequence).logits.float(), dim=-1)[0, len(ids[3]) - 1 : -1]
    expected = logprobs.gather(-1, torch.tensor(completion.tokens)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(completion.logprobs), expected, rtol=0, atol=2e-5)


def test_decoder_ops_equal_transformers_llama_modules():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.randn(2, 3, 5, 8, dtype=torch.float64)
    angle = torch.randn(2, 5, 4, dtype=torch.float64)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    for ours, theirs in zip(rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    norm = LlamaRMSNorm(8, eps=1e-6)  # computes in float32 whatever its input
    norm.weight.data = torch.randn(8)
    x, update = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    summed, normed = add_rms_norm(x, update, norm.weight, 1e-6)
    torch.testing.assert_close(summed, x + update, rtol=0, atol=0)
    torch.testing.assert_close(normed, norm(x + update), rtol=1e-6, atol=1e-6)
    assert FusedOps(compiled=False).rope is rope  # the CPU runs these very functions


def test_gumbel_sampling_follows_softmax_and_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    draws = 20000
    seeds = torch.arange(draws, dtype=torch.long)
    vocab_keys = vocabulary_keys(5, "cpu")
    tokens, _ = choose_tokens(logits.expand(draws, 5), SamplingParams(temperature=1.0), seeds, torch.tensor(0), vocab_keys)
    counts = torch.bincount(tokens, minlength=5).double()
    probs = torch.softmax(logits[0].double(), 0)
    # each frequency within 4 standard errors of its probability
    assert ((counts / draws - probs).abs() <= 4 * (probs * (1 - probs) / draws).sqrt() + 1e-9).all(), counts
    hot, _ = choose_tokens(logits.expand(draws, 5), SamplingParams(temperature=0.5), seeds, torch.tensor(0), vocab_keys)
    hot_probs = torch.softmax(logits[0].double() / 0.5, 0)
    assert abs(float((hot == 0).double().mean()) - float(hot_probs[0])) < 4 * math.sqrt(0.25 / draws)
    top2, _ = choose_tokens(logits.expand(draws, 5), SamplingParams(temperature=1.0, top_k=2), seeds, torch.tensor(0), vocab_keys)
    assert set(top2.tolist()) == {0, 1}
    filtered = filter_logits(logits, top_k=0, top_p=0.8)  # p = .64, .24, .09, …: .64 < .8 keeps the second one too
    assert torch.isfinite(filtered[0]).tolist() == [True, True, False, False, False]


def test_noise_depends_on_seed_and_index_only():
    vocab_keys = vocabulary_keys(7, "cpu")
    a = uniform_noise(row_keys(torch.tensor([3, 4]), torch.tensor([5, 5])), vocab_keys)
    b = uniform_noise(row_keys(torch.tensor([4, 3, 3]), torch.tensor([5, 5, 6])), vocab_keys)
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0]) and not torch.equal(b[1], b[2])
    assert ((a > 0) & (a < 1)).all()


def test_bucket_sizes():
    assert [bucket(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert bucket(11, 12) == 12


def test_gradient_arena_views_accumulate_like_ordinary_gradients():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    layer(x).square().sum().backward()
    layer(2 * x).square().sum().backward()
    expected = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    arena = GradientArena(list(layer.parameters()))
    arena.buffer.fill_(7.0)  # as if a KV cache had used the memory
    arena.attach()
    layer(x).square().sum().backward()
    layer(2 * x).square().sum().backward()
    for p, want in zip(layer.parameters(), expected):
        assert p.grad.data_ptr() >= arena.buffer.data_ptr()  # still a view of the arena
        torch.testing.assert_close(p.grad, want)


def test_the_kv_cache_can_live_in_borrowed_storage(tiny):
    model, tok, ids = tiny
    storage = torch.full((4_000_000,), float("nan"))  # whatever the memory held, even NaN, must not leak in
    generator = Generator(model, tok, max_batch=4, cache_storage=storage)
    borrowed = generator.generate(ids[:4], 10, SAMPLE, [1, 2, 3, 4])
    assert generator.decoder.kv.data_ptr() == storage.data_ptr()
    own = Generator(model, tok, max_batch=4).generate(ids[:4], 10, SAMPLE, [1, 2, 3, 4])
    assert [c.tokens for c in borrowed] == [c.tokens for c in own]


def test_lora_adapters_apply_during_generation(tiny_model_dir, tiny):
    from peft import LoraConfig, get_peft_model

    _, tok, ids = tiny
    base = load_causal_lm(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])).eval()
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (no effect); make the adapter matter
            param.data.normal_(std=0.5)
    generator = Generator(peft_model, tok, max_batch=4, stop_at_eos=False)
    assert not generator.decoder.fused_qkv  # wrapped projections are called, never copied
    for prompt, completion in zip(ids[:3], generator.generate(ids[:3], 12)):
        assert completion.tokens == reference_greedy(peft_model, prompt, 12)
    with peft_model.disable_adapter():
        plain = [c.tokens for c in generator.generate(ids[:3], 12)]
        assert plain == [reference_greedy(peft_model, p, 12) for p in ids[:3]]
    assert plain != [c.tokens for c in generator.generate(ids[:3], 12)]
