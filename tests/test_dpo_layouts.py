"""The DPO recipe gives the same step whatever its layout: same pairs, log-probabilities, loss and gradients.

A step's gradient must be the gradient of the mean loss over its 16 pairs however the
pairs are grouped into forward passes. Each layout runs the real recipe (LoRA, gradient
checkpointing, the reference with the adapter off) in float64 on the tiny model, with
max_length 64 / max_prompt_length 40 so that several pairs are cut by the truncation
rules, and packed passes of 256 tokens so that a step takes several passes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from twophase.data.base.errors import UserError
from twophase.trainers.config import DPOConfig, make_config
from twophase.trainers.dpo import DPORecipe
from twophase.trainers.loop import _sum_shares

SAMPLES = str(Path(__file__).resolve().parents[1] / "data" / "samples" / "hh_demo.jsonl")
LAYOUTS = ("stacked", "shared_prompt", "packed", "packed_shared_prompt")
GRADIENT_TOLERANCE = 1e-6  # the float32 floor of Llama's RMSNorm; see tests/test_packing.py


def _recipe(model_dir, out_dir, layout: str, **overrides) -> DPORecipe:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twophase.trainers.models import prepare_policy

    values = dict(
        model=model_dir, dataset=SAMPLES, out_dir=str(out_dir), max_steps=2, micro_batch_size=4, grad_accum_steps=4,
        lora_r=4, lora_alpha=8, max_length=64, max_prompt_length=40, precision="fp32", device="cpu", save_every=0,
        log_every=0, optimizer="adamw", merge_after=False, layout=layout, max_tokens_per_pass=256, logprob_chunk_size=16,
    )  # fmt: skip
    config = make_config(DPOConfig, values | overrides)
    torch.manual_seed(3)  # LoRA's initialisation draws from the global generator
    model = prepare_policy(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64), config)
    with torch.no_grad():  # a non-trivial adapter on sharper weights, identical for every layout
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return DPORecipe(config, Path(out_dir), policy=(model, AutoTokenizer.from_pretrained(model_dir), torch.device("cpu")))


def _run_step(recipe: DPORecipe, step: int) -> dict:
    """The step's passes, its loss and LoRA gradients, and every pair's (chosen, rejected) log-probabilities."""
    passes = recipe.step_batches(step)
    loss, metrics = 0.0, []
    for micro_batch in passes:
        part, part_metrics = recipe.loss(micro_batch)
        part.backward()
        loss += float(part.detach())
        metrics.append(part_metrics)
    logps = {}
    with torch.no_grad():
        for micro_batch in passes:
            values, n = recipe.pair_logprobs(recipe.model, micro_batch["batch"]), len(micro_batch["indices"])
            logps.update({index: (values[i], values[n + i]) for i, index in enumerate(micro_batch["indices"])})
    grads = {name: p.grad.clone() for name, p in recipe.model.named_parameters() if p.grad is not None}
    logged = _sum_shares(metrics)  # what the loop logs for the step: the passes' shares, summed
    return {"passes": [mb["indices"] for mb in passes], "loss": loss, "grads": grads, "logps": logps, "logged": logged}


@pytest.fixture(scope="module")
def steps(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    return {layout: _run_step(_recipe(tiny_model_dir, out / layout, layout), step=1) for layout in LAYOUTS}


def test_the_layouts_group_the_same_pairs_differently(steps):
    order = [i for group in steps["stacked"]["passes"] for i in group]
    assert len(order) == 16
    for layout in LAYOUTS:
        assert [i for group in steps[layout]["passes"] for i in group] == order, layout
    assert [len(group) for group in steps["stacked"]["passes"]] == [4, 4, 4, 4]
    assert len(steps["packed"]["passes"]) > len(steps["packed_shared_prompt"]["passes"]) > 1  # the prompt once: fewer passes


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_every_layout_gives_the_stacked_step_in_float64(steps, layout):
    expected, got = steps["stacked"], steps[layout]
    for index, (chosen, rejected) in expected["logps"].items():
        torch.testing.assert_close(torch.stack(got["logps"][index]), torch.stack([chosen, rejected]), rtol=0, atol=1e-10)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-12)
    for key in ("rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected", "tokens"):
        assert got["logged"][key] == pytest.approx(expected["logged"][key], rel=1e-9, abs=1e-12), key
    mean_chosen = sum(float(chosen) for chosen, _ in expected["logps"].values()) / 16
    assert expected["logged"]["logps/chosen"] == pytest.approx(mean_chosen, rel=1e-12)  # a mean over the 16 pairs
    assert got["grads"].keys() == expected["grads"].keys() and len(expected["grads"]) == 2 * 7 * 2  # A and B, 7 modules, 2 layers
    for name, grad in expected["grads"].items():
        assert float((got["grads"][name] - grad).norm() / grad.norm()) < GRADIENT_TOLERANCE, name


def test_some_pairs_of_the_step_are_truncated(tiny_model_dir, tmp_path):
    recipe = _recipe(tiny_model_dir, tmp_path / "t", "stacked")
    indices = recipe.sampler.indices(16, 16)  # step 1
    untruncated = [recipe.collator.token_ids(recipe.pairs[i]) for i in indices]
    assert any(len(pair.prompt) > 40 for pair in untruncated)  # prompts cut to max_prompt_length
    assert any(len(pair.prompt) + max(len(pair.chosen), len(pair.rejected)) > 64 for pair in untruncated)


def test_a_token_budget_smaller_than_two_sequences_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="max_tokens_per_pass"):
        _recipe(tiny_model_dir, tmp_path / "small", "packed", max_tokens_per_pass=127)


@pytest.mark.parametrize("layout", ["stacked", "shared_prompt"])
def test_ipo_is_trls_ipo_on_per_token_mean_log_probs(tiny_model_dir, tmp_path, layout):
    """IPO as TRL computes it: ((mean π_c − mean π_r) − (mean ref_c − mean ref_r) − 1/(2β))², each mean a reply's
    log-probability divided by its token count, recomputed here from plain per-sequence forwards in float64."""
    recipe = _recipe(tiny_model_dir, tmp_path / layout, layout, loss_type="ipo", beta=0.1)
    micro_batch = recipe.step_batches(0)[0]
    loss, _ = recipe.loss(micro_batch)
    pairs = [recipe.tokenized_pair(i) for i in micro_batch["indices"]]

    def mean_logp(model, prompt, reply):
        ids = torch.tensor([prompt + reply])
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        return float(logps[len(prompt) - 1 :].gather(-1, ids[0, len(prompt) :, None]).sum()) / len(reply)

    expected = []
    with torch.no_grad():
        for p in pairs:
            policy = mean_logp(recipe.model, p.prompt, p.chosen) - mean_logp(recipe.model, p.prompt, p.rejected)
            with recipe.model.disable_adapter():
                reference = mean_logp(recipe.model, p.prompt, p.chosen) - mean_logp(recipe.model, p.prompt, p.rejected)
            expected.append((policy - reference - 1 / (2 * 0.1)) ** 2)
    share = len(pairs) / recipe.pairs_per_step
    assert float(loss) / share == pytest.approx(sum(expected) / len(expected), rel=1e-9)
    assert abs(sum(expected) / len(expected) - 25.0) < 5  # near (0 − 5)² at the start, as TRL's first IPO loss


def test_ipo_step_is_the_same_in_every_layout(tiny_model_dir, tmp_path):
    steps = {layout: _run_step(_recipe(tiny_model_dir, tmp_path / layout, layout, loss_type="ipo"), 0) for layout in LAYOUTS}
    for layout in LAYOUTS[1:]:
        assert steps[layout]["loss"] == pytest.approx(steps["stacked"]["loss"], rel=1e-9), layout
