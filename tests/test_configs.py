"""The published configs load and say what the paper ran; overrides behave."""

from pathlib import Path

import pytest

from twophase.data.base.errors import UserError
from twophase.trainers.config import DPOConfig, GRPOConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs"


def test_phase_one_config_is_the_published_run():
    c = load_config(DPOConfig, CONFIGS / "wu17_v5_dpo.yaml")
    assert c.model == "deepseek-ai/DeepSeek-Prover-V2-7B"
    assert (c.dataset, c.data_dir, c.split) == ("Anthropic/hh-rlhf", "harmless-base", "train")
    assert (c.lora, c.lora_r, c.lora_alpha) == (True, 64, 128)
    assert (c.max_steps, c.lr, c.beta) == (1000, 5e-7, 0.1)
    assert c.micro_batch_size * c.grad_accum_steps == 16 and c.micro_batch_size == 4
    assert (c.gradient_checkpointing, c.optimizer, c.precision, c.merge_after) == (True, "adamw8bit", "bf16", True)


@pytest.mark.parametrize("condition,reward", [("random", "random"), ("zero", "zero"), ("fv", "lean")])
def test_phase_two_configs_are_the_published_runs(condition, reward):
    c = load_config(GRPOConfig, CONFIGS / f"wu17_v5_grpo_{condition}.yaml")
    assert c.model == "runs/wu17_v5/dpo/merged"  # starts from the merged Phase 1 model
    assert c.dataset == "internlm/Lean-Workbook"
    assert (c.lora, c.max_steps, c.lr, c.num_generations, c.reward) == (False, 1000, 1e-6, 8, reward)
    assert c.out_dir.endswith(condition)


def test_overrides_including_dotted_keys():
    c = load_config(GRPOConfig, CONFIGS / "wu17_v5_grpo_fv.yaml", ["reward_options.lean.project_dir=/opt/mathlib", "lr=2e-6"])
    assert c.reward_options["lean"]["project_dir"] == "/opt/mathlib"
    assert c.reward_options["lean"]["pool_size"] == 8  # the rest of the mapping is kept
    assert c.lr == 2e-6


def test_yaml_reads_5e_7_as_a_string_but_the_config_gets_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 5e-7\nmax_steps: 3\n")
    c = load_config(DPOConfig, path)
    assert c.lr == 5e-7 and isinstance(c.lr, float)


def test_bad_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(DPOConfig, bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(DPOConfig, listing)
    with pytest.raises(UserError, match="key=value"):
        load_config(DPOConfig, None, ["lr"])


def test_dpo_layout_is_one_line_to_switch_and_checked():
    c = load_config(DPOConfig, CONFIGS / "wu17_v5_dpo.yaml", ["layout=shared_prompt"])
    assert (c.layout, c.max_tokens_per_pass) == ("shared_prompt", 8192)
    assert load_config(DPOConfig, CONFIGS / "wu17_v5_dpo.yaml").layout == DPOConfig().layout == "packed_shared_prompt"
    with pytest.raises(UserError, match="layout = 'packd' is not one of: stacked, shared_prompt, packed"):
        load_config(DPOConfig, None, ["layout=packd"])
    with pytest.raises(UserError, match="share_prompt .* was replaced by layout .*false is layout: stacked"):
        load_config(DPOConfig, None, ["share_prompt=false"])


def test_choices_come_from_each_class_types():
    """A key's words are its Literal type, per class: prompt_format means hh|chat to DPO and raw|chat to GRPO."""
    assert load_config(DPOConfig, None, ["prompt_format=raw"]).prompt_format == "hh"  # DPO's old name for hh
    assert load_config(GRPOConfig, None, ["prompt_format=raw"]).prompt_format == "raw"
    with pytest.raises(UserError, match="prompt_format = 'hh' is not one of: raw, chat$"):
        load_config(GRPOConfig, None, ["prompt_format=hh"])
    with pytest.raises(UserError, match="merge_dtype = 'fp8' is not one of: bfloat16, float16, float32$"):
        load_config(DPOConfig, None, ["merge_dtype=fp8"])
    assert load_config(DPOConfig, None, ["merge_dtype=null"]).merge_dtype is None
    # YAML reads 5e-7 as a string; an int in a float field becomes a float; a bool is never a number
    c = load_config(DPOConfig, None, ["lr=5e-7", "max_grad_norm=2"])
    assert (c.lr, c.max_grad_norm, type(c.max_grad_norm)) == (5e-7, 2.0, float)
    with pytest.raises(UserError, match=r"max_steps = True in --set should be int$"):
        load_config(DPOConfig, None, ["max_steps=true"])
    with pytest.raises(UserError, match=r"stop_strings = 'x' in --set should be list \| None$"):
        load_config(GRPOConfig, None, ["stop_strings=x"])


def test_reward_options_have_one_shape():
    from twophase.trainers.grpo import build_rewards

    c = load_config(GRPOConfig, None, ["reward=random,zero", "reward_options.random.seed=5"])
    assert build_rewards(c)["random"].seed == 5
    with pytest.raises(UserError, match=r"reward_options = \{'seed': 5\} in --set must be a mapping from each reward's name"):
        load_config(GRPOConfig, None, ["reward=random", "reward_options.seed=5"])
    with pytest.raises(UserError, match="reward_options.lean gives options to a reward that reward = 'zero' does not use"):
        build_rewards(load_config(GRPOConfig, None, ["reward=zero", "reward_options.lean.pool_size=2"]))


def test_grpo_lr_schedule_is_one_of_the_declared_choices():
    """GRPOConfig.lr_schedule was typed str, so a misspelling ran as a constant schedule; it is one declared choice now."""
    with pytest.raises(UserError, match="cosinee"):
        load_config(GRPOConfig, None, ["lr_schedule=cosinee"])
    assert load_config(GRPOConfig, None, ["lr_schedule=cosine"]).lr_schedule == "cosine"


def test_each_run_names_its_algorithm_in_one_line():
    from twophase.trainers.dpo import algorithm_line as dpo_line
    from twophase.trainers.grpo import algorithm_line as grpo_line

    assert grpo_line(GRPOConfig()) == (
        "GRPO: group-normalised advantages, token-level aggregation (DAPO), μ = 1 on-policy, β = 0 no reference, clip 0.2/0.2")
    dr_grpo = GRPOConfig(advantage_scale="none", aggregation="constant", num_iterations=2, beta=0.04, clip_high=0.28)
    assert grpo_line(dr_grpo) == ("GRPO: centred, unscaled advantages (Dr. GRPO), constant normaliser (Dr. GRPO), "
                                  "μ = 2 updates per generation batch, β = 0.04 k3 KL to the reference, clip 0.2/0.28 (clip-higher)")
    assert dpo_line(DPOConfig()) == "DPO: β = 0.1, reference = the base model under the LoRA adapter, packed_shared_prompt batch layout"
    assert dpo_line(DPOConfig(loss_type="ipo", lora=False)).startswith("IPO: β = 0.1, reference = a frozen copy")
