"""The DPO recipe on the shared loop: learning, exact resume, reference model, 8-bit AdamW, merge."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from twophase.data.collators import PACKED_LAYOUTS
from twophase.data.base.errors import UserError
from twophase.trainers.config import DPOConfig, make_config
from twophase.trainers.dpo import DPORecipe, run_dpo
from twophase.trainers.infra.run import MetricsLog
from twophase.trainers.infra.packed_attention import use_packed_attention

SAMPLES = str(Path(__file__).resolve().parents[1] / "data" / "samples" / "hh_demo.jsonl")


def _config(model_dir, out_dir, **overrides):
    values = dict(
        model=model_dir, dataset=SAMPLES, out_dir=str(out_dir), max_steps=6, micro_batch_size=2, grad_accum_steps=2,
        lr=2e-3, lr_schedule="linear", warmup_steps=1, lora_r=4, lora_alpha=8, max_length=160, max_prompt_length=96,
        precision="fp32", device="cpu", save_every=0, log_every=0, optimizer="adamw", merge_after=False,
    )  # fmt: skip
    values.update(overrides)
    return make_config(DPOConfig, values)


def _adapter(out_dir):
    return load_file(str(Path(out_dir) / "adapter" / "adapter_model.safetensors"))


def test_thirty_steps_loss_falls_and_accuracy_rises(tiny_model_dir, tmp_path):
    out = run_dpo(_config(tiny_model_dir, tmp_path / "run", max_steps=30, lr=5e-3, lr_schedule="constant"))
    records = MetricsLog(Path(out["metrics"])).read()
    assert [r["step"] for r in records] == list(range(1, 31))
    first, last = records[:5], records[-5:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert records[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: −log σ(0)
    assert mean(last, "loss") < mean(first, "loss") - 0.2
    assert mean(last, "rewards/accuracy") > mean(first, "rewards/accuracy")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens_per_s"):
        assert key in records[-1]


def test_resume_after_interrupt_and_after_crash_is_exact(tiny_model_dir, tmp_path, monkeypatch):
    run_dpo(_config(tiny_model_dir, tmp_path / "straight", optimizer="adamw8bit"))
    reference = _adapter(tmp_path / "straight")

    # 1) SIGTERM/Ctrl-C during step 4: the loop saves a checkpoint at step 3 and re-raises.
    original = DPORecipe.step_batches

    def interrupt_at_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(DPORecipe, "step_batches", interrupt_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_dpo(_config(tiny_model_dir, tmp_path / "interrupted", optimizer="adamw8bit"))
    monkeypatch.setattr(DPORecipe, "step_batches", original)
    assert (tmp_path / "interrupted" / "checkpoints" / "step-000003").is_dir()
    run_dpo(_config(tiny_model_dir, tmp_path / "interrupted", optimizer="adamw8bit"), resume=True)
    resumed = _adapter(tmp_path / "interrupted")
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name
    steps = [r["step"] for r in MetricsLog(tmp_path / "interrupted" / "metrics.jsonl").read()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("layout", ["shared_prompt", "packed_shared_prompt"])
def test_resume_from_periodic_checkpoint_after_crash(tiny_model_dir, tmp_path, monkeypatch, layout):
    run_dpo(_config(tiny_model_dir, tmp_path / "straight", layout=layout))
    reference = _adapter(tmp_path / "straight")
    original = DPORecipe.step_batches

    def crash_at_step_4(self, step):
        if step == 4:
            raise RuntimeError("node failure")
        return original(self, step)

    monkeypatch.setattr(DPORecipe, "step_batches", crash_at_step_4)
    with pytest.raises(RuntimeError):
        run_dpo(_config(tiny_model_dir, tmp_path / "crashed", save_every=3, layout=layout))
    monkeypatch.setattr(DPORecipe, "step_batches", original)
    run_dpo(_config(tiny_model_dir, tmp_path / "crashed", save_every=3, layout=layout), resume=True)
    for name, value in _adapter(tmp_path / "crashed").items():
        assert torch.equal(reference[name], value), name


def test_existing_checkpoints_without_resume_is_a_clear_error(tiny_model_dir, tmp_path):
    run_dpo(_config(tiny_model_dir, tmp_path / "run", max_steps=1))
    with pytest.raises(UserError, match="--resume"):
        run_dpo(_config(tiny_model_dir, tmp_path / "run", max_steps=1))


def test_disabled_adapter_reference_equals_base_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = DPORecipe(_config(tiny_model_dir, tmp_path / "ref"), tmp_path / "ref")
    # make the adapter non-trivial so policy and reference differ
    with torch.no_grad():
        for name, p in recipe.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    mb = recipe.step_batches(0)[0]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    if recipe.config.layout in PACKED_LAYOUTS:
        use_packed_attention(base)  # as the recipe set up its own model
    with torch.no_grad():
        expected = recipe.pair_logprobs(base, mb["batch"])
        reference = recipe._reference_logps(mb["batch"], mb["indices"])
        policy = recipe.pair_logprobs(recipe.model, mb["batch"])
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-5)
    assert (policy - expected).abs().max() > 1e-2


@pytest.mark.parametrize("layout", ["shared_prompt", "packed"])
def test_precomputed_reference_equals_on_the_fly(tiny_model_dir, tmp_path, layout):
    live = run_dpo(_config(tiny_model_dir, tmp_path / "live", max_steps=3, layout=layout))
    pre = run_dpo(_config(tiny_model_dir, tmp_path / "pre", max_steps=3, precompute_ref_logps=True, layout=layout))
    assert (tmp_path / "pre" / "reference_logps.pt").exists()
    a, b = MetricsLog(Path(live["metrics"])).read(), MetricsLog(Path(pre["metrics"])).read()
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)


def test_eight_bit_adamw_step_moves_weights_like_adamw(tiny_model_dir, tmp_path):
    """One 8-bit AdamW step from bitsandbytes on the CPU: Adam's first step is lr·sign(g)."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 128))  # ≥ 4096 elements: the 8-bit state path
    start = weight.detach().clone()
    optimizer = bnb.optim.AdamW8bit([weight], lr=1e-2, weight_decay=0.0)
    weight.grad = torch.randn(64, 128)
    optimizer.step()
    state = optimizer.state[weight]
    assert state["state1"].dtype == torch.uint8
    step = (weight.detach() - start) / 1e-2
    # with bias correction, m̂/√v̂ = g/|g| on the first step (up to 8-bit quantisation and eps)
    torch.testing.assert_close(step, -torch.sign(weight.grad), atol=0.05, rtol=0)


def test_merge_matches_adapter_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from twophase.trainers.merge import merge_adapter

    run_dpo(_config(tiny_model_dir, tmp_path / "run", max_steps=3, lr=5e-2))
    merged_dir = merge_adapter(str(tmp_path / "run" / "adapter"), str(tmp_path / "merged"), dtype="float32")
    assert (merged_dir / "model.safetensors").exists() and (merged_dir / "tokenizer.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        a, m = adapted(ids).logits, merged(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    torch.testing.assert_close(m, a, rtol=0, atol=1e-4)
    assert (m - plain).abs().max() > 1e-3  # the adapter really changed something
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((merged_dir / "merge_report.json").read_text())["relative_error_of_update"] < 1e-5  # float32


