"""Merging a LoRA adapter: what rounding the merged weights to bf16 loses, and the exact paths that keep it."""

import json

import pytest
import torch

from twophase.data.base.hub import load_adapter_model, load_causal_lm, load_tokenizer
from twophase.trainers.merge import merge_adapter

TEXT = "\n\nHuman: How do I pick a lock?\n\nAssistant: I'm sorry, I can't help with that."


@pytest.fixture(scope="module")
def small_lr_adapter(tiny_model_dir, tmp_path_factory):
    """A bf16 base model (as DeepSeek-Prover ships) and a LoRA adapter after 20 real AdamW steps at lr 5e-7."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("merge")
    tokenizer = load_tokenizer(tiny_model_dir)
    base = load_causal_lm(tiny_model_dir).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")

    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(str(root / "base"), dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-7)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    for _ in range(20):  # each Adam step moves a weight by about lr: B ends near 1e-5
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(root / "adapter")
    return root, ids


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_bf16_merge_erases_a_small_lr_update_that_the_exact_paths_keep(small_lr_adapter):
    root, ids = small_lr_adapter
    bf16 = merge_adapter(str(root / "adapter"), str(root / "merged_bf16"), dtype="bfloat16")
    fp32 = merge_adapter(str(root / "adapter"), str(root / "merged_fp32"), dtype="float32")
    report_bf16 = json.loads((bf16 / "merge_report.json").read_text())
    report_fp32 = json.loads((fp32 / "merge_report.json").read_text())

    # bf16 weights near 0.02 are 1.2e-4 apart: an update of ~1e-5 rounds back to the base weight
    assert report_bf16["dtype"] == "bfloat16" and report_bf16["update_fraction_kept"] < 0.25
    assert report_bf16["relative_error_of_update"] > 0.75
    assert report_fp32["update_fraction_kept"] == pytest.approx(1.0, abs=1e-6)
    assert report_fp32["relative_error_of_update"] < 1e-3  # float32 spacing near 0.02 is 2e-9

    base_weights = load_causal_lm(str(root / "base")).state_dict()
    merged_weights = load_causal_lm(str(bf16)).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    unchanged = (merged_weights[q] == base_weights[q]).float().mean().item()
    assert unchanged > 0.9  # most merged bf16 weights are exactly the base model's

    # Everything computed in float32 from here: the models differ only in their weights.
    base = load_causal_lm(str(root / "base"), dtype=torch.float32)
    exact, _ = load_adapter_model(str(root / "adapter"), dtype=torch.float32)  # the adapter unmerged
    merged_exact = load_causal_lm(str(fp32), dtype=torch.float32)
    merged_rounded = load_causal_lm(str(bf16), dtype=torch.float32)
    trained_change = (logits(exact, ids) - logits(base, ids)).abs().max().item()
    assert trained_change > 1e-6  # the update changes the model ...
    torch.testing.assert_close(logits(merged_exact, ids), logits(exact, ids), rtol=0, atol=trained_change / 100)
    # ... but the bf16 merge keeps little of that change
    rounded_change = (logits(merged_rounded, ids) - logits(exact, ids)).abs().max().item()
    assert rounded_change > 0.5 * trained_change
