"""Issue 19: the decoder's CUDA-graph pool across cache sizes, and the eval engines' "auto" batch size.

The crash this guards against happened on a GPU only: a generating benchmark,
then HumanEval's longer generation, made the decoder drop its CUDA graphs and
capture new ones into the old pool, which PyTorch's allocator had already
given up (`it->second->use_count > 0`). `FakeAllocator` below keeps the
allocator's rule so the CPU can check the decoder never breaks it; the engine
tests check that growing the cache mid-life changes no output.
"""

import contextlib

import pytest
import torch

from twophase.data.base.hub import load_causal_lm, load_tokenizer
from twophase.data.tokens import encode_prompt
from twophase.eval.engine.batching import rows_that_fit, scoring_batches
from twophase.eval.engine.decoder import CapturedSteps
from twophase.eval.engine.generation import GenerationEngine, GenerationRequest, Generator
from twophase.eval.engine.loglikelihood import LoglikelihoodEngine, LoglikelihoodRequest
from twophase.eval.engine.sampling import SamplingParams


class FakeAllocator:
    """The caching allocator's pool bookkeeping: a pool lives while a graph captured into it lives."""

    def __init__(self):
        self.use_count: dict[int, int] = {}
        self.next_id = 0
        self.empty_cache_calls = 0

    def graph_pool_handle(self):
        self.next_id += 1
        return self.next_id

    def begin_capture(self, pool):
        if pool in self.use_count:
            # CUDACachingAllocator.cpp: TORCH_INTERNAL_ASSERT(it->second->use_count > 0)
            assert self.use_count[pool] > 0, "INTERNAL ASSERT FAILED: it->second->use_count > 0"
            self.use_count[pool] += 1
        else:
            self.use_count[pool] = 1


@pytest.fixture
def allocator(monkeypatch):
    fake = FakeAllocator()

    class FakeGraph:
        def __init__(self):
            self.pool, self.replays = None, 0

        def replay(self):
            self.replays += 1

        def __del__(self):
            if self.pool is not None:
                fake.use_count[self.pool] -= 1  # the pool's memory stays reserved: its id stays known

    @contextlib.contextmanager
    def graph(g, pool=None):
        fake.begin_capture(pool)
        g.pool = pool
        yield

    def empty_cache():
        fake.empty_cache_calls += 1

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", fake.graph_pool_handle)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    return fake


def test_captures_after_dropping_every_graph_go_into_a_new_pool(allocator):
    steps = CapturedSteps(enabled=True)
    ran = []
    steps.run(("a",), lambda: ran.append("a"))
    steps.run(("b",), lambda: ran.append("b"))
    steps.run(("a",), lambda: ran.append("never: replayed"))
    assert ran == ["a", "a", "b", "b"]  # each first call runs once eagerly and once while captured
    first_pool = steps.pool
    steps.drop()  # e.g. HumanEval needs a longer cache than StrongREJECT had
    assert len(steps) == 0 and allocator.use_count[first_pool] == 0
    steps.run(("a",), lambda: ran.append("a again"))  # the old code captured into first_pool here: the assert
    assert steps.pool != first_pool and allocator.use_count[steps.pool] == 1
    assert allocator.empty_cache_calls == 1  # the dead pool's memory is given back


def test_the_old_rule_trips_the_fake_allocator(allocator):
    """The fake is faithful: capturing into a pool whose graphs are all gone fails as on the GPU."""
    pool = torch.cuda.graph_pool_handle()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        pass
    del g
    with pytest.raises(AssertionError, match="use_count > 0"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), pool=pool):
            pass


def test_dropping_before_any_capture_keeps_the_unused_pool(allocator):
    steps = CapturedSteps(enabled=True)
    pool = steps.pool
    steps.drop()
    assert steps.pool == pool and allocator.empty_cache_calls == 0


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


def test_a_longer_generation_after_a_shorter_one_changes_no_token(tiny):
    """One engine: 8 new tokens, then 80 (a larger cache, re-allocated), then 8 again; each equals a fresh engine."""
    model, tok = tiny
    prompts = [encode_prompt(tok, p) for p in ("Why is the sky blue?", "x", "How do I bake bread?")]
    seeds = [3, 4, 5]
    sample = SamplingParams(temperature=1.0)
    reused = Generator(model, tok, max_batch=4, stop_at_eos=False)
    for new_tokens in (8, 80, 8):
        before = reused.decoder.capacity
        again = reused.generate(prompts, new_tokens, sample, seeds)
        fresh = Generator(model, tok, max_batch=4, stop_at_eos=False).generate(prompts, new_tokens, sample, seeds)
        assert [c.tokens for c in again] == [c.tokens for c in fresh]
        for a, f in zip(again, fresh):
            assert a.logprobs == pytest.approx(f.logprobs, abs=1e-6)
        if new_tokens == 80:
            assert reused.decoder.capacity > before  # the cache grew: new buffers, the graphs dropped


def test_more_rows_after_fewer_reallocate_the_cache_and_keep_outputs(tiny):
    model, tok = tiny
    generator = Generator(model, tok, max_batch=8, stop_at_eos=False)
    one = [encode_prompt(tok, "Why is the sky blue?")]
    many = one * 6
    first = generator.generate(one, 12)
    assert generator.decoder.cache_slots == 1
    rows = generator.generate(many, 12)
    assert generator.decoder.cache_slots == 8  # six rows take the bucket of eight
    assert all(c.tokens == first[0].tokens for c in rows)  # greedy: every row continues the same prompt alike


def test_auto_batch_size_on_cpu_is_eight_rows(tiny):
    model, tok = tiny
    engine = GenerationEngine(model, tok)  # batch_size "auto" is the default
    engine.generate([GenerationRequest(f"question {i}?", max_new_tokens=2) for i in range(3)])
    assert engine.batch_rows == {8}
    scorer = LoglikelihoodEngine(model, tok)
    scorer.loglikelihood([LoglikelihoodRequest(f"q{i}", " A") for i in range(10)])
    assert scorer.stats["forwards"] == 2  # 10 rows in batches of 8


def test_rows_that_fit_halve_until_the_cache_fits():
    assert rows_that_fit(bytes_per_row=1000, budget=1e9) == 256  # the cap
    assert rows_that_fit(bytes_per_row=1000, budget=100_000) == 64  # 128 rows would need 128,000 bytes
    assert rows_that_fit(bytes_per_row=1000, budget=63_999) == 32
    assert rows_that_fit(bytes_per_row=10**12, budget=1.0) == 1  # never fewer than one row
    # The 7B layout: 30 layers x 2 x 32 heads x 128 x 2 bytes = 491,520 bytes a token; 768 columns a row;
    # 60 % of 60 GiB available -> 36 GiB / (768 x 491,520) = 102 rows -> 64.
    assert rows_that_fit(768 * 491_520, 0.6 * 60 * 2**30) == 64


def test_scoring_batches_respect_rows_and_bytes():
    lengths = [10, 50, 30, 50, 20]
    keeps = [1, 1, 1, 1, 1]
    # per token 100 bytes, logits 8 bytes x vocab 10 per kept position: a 50-token row costs 5,080 bytes
    assert scoring_batches(lengths, keeps, 10, (64, 10_160, 100)) == [[1, 3], [2, 4, 0]]  # two 50-rows fit
    assert scoring_batches(lengths, keeps, 10, (64, 10_159, 100)) == [[1], [3], [2, 4, 0]]  # three 30-rows: 9,240
    assert scoring_batches(lengths, keeps, 10, (2, 10**9, 100)) == [[1, 3], [2, 4], [0]]  # at most 2 rows
    # a long kept continuation costs its logits: 50 kept positions x 80 bytes = 4,000 bytes more
    assert scoring_batches([40, 40], [50, 1], 10, (64, 2 * (4_000 + 4_000), 100)) == [[0, 1]]
    assert scoring_batches([40, 40], [50, 1], 10, (64, 2 * (4_000 + 4_000) - 1, 100)) == [[0], [1]]


def test_the_pipeline_check_fails_loudly_naming_the_stage(tmp_path, monkeypatch):
    """`twophase bench pipeline`: a stage that fails makes the command fail (exit 2) after its JSON report."""
    import json

    from click.testing import CliRunner

    from twophase.data.base.errors import UserError
    from twophase.launch import pipeline
    from twophase.launch.cli import cli

    def stage_fails(config, stages, only=None):
        raise UserError("stage eval_original failed: 1 benchmark(s) failed: humaneval: RuntimeError")

    monkeypatch.setattr(pipeline, "execute", stage_fails)
    out = tmp_path / "bench.jsonl"
    result = CliRunner().invoke(cli, ["bench", "pipeline", "--arch", "tiny", "--run-dir", str(tmp_path / "run"),
                                      "--out", str(out)])
    assert result.exit_code == 2
    assert "error: the pipeline check failed: stage eval_original failed" in result.stderr
    report = json.loads(out.read_text())
    assert report["passed"] is False and report["stages"]["eval_original"]["status"] == "not run"
    assert report["stages"]["grpo_fv"]["status"] == "skipped"  # no Lean project: skipped by design, not a failure
