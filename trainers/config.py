"""Training configuration: plain dataclasses, a YAML file, and `key=value` overrides.

A config file is a flat YAML mapping whose keys are the fields below; the
command line can override any of them with `--set key=value` (the value is
read as YAML, so `--set lr=1e-6`, `--set lora=false`, `--set
lora_target_modules=[q_proj,v_proj]` all work; a dotted key such as
`reward_options.lean.project_dir=/x` sets one entry of a mapping). An unknown key is an error
that lists the valid ones, because a typo silently ignored is a wrong run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
import types
import typing
from typing import Any, Callable, Literal, Union

import yaml

from twophase.data.collators import Layout
from twophase.data.base.errors import UserError
from twophase.data.base.files import atomic_write_text
from twophase.data.prompts import DPO_OLD_NAMES, DPOFormat, GRPOFormat
from twophase.losses.dpo import LossType
from twophase.losses.grpo import AdvantageScale, Aggregation, ImportanceRatio

LRSchedule = Literal["constant", "linear", "cosine"]  # trainers/infra/optim.py: build_scheduler

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    """Settings of the shared training loop (trainers/loop.py)."""

    model: str = "deepseek-ai/DeepSeek-Prover-V2-7B"
    out_dir: str = "runs/train"
    seed: int = 0
    max_steps: int = 1000
    lr: float = 5e-7
    lr_schedule: LRSchedule = "linear"  # decay to 0 after warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    optimizer: Literal["adamw8bit", "adamw"] = "adamw8bit"  # bitsandbytes 8-bit | torch
    stochastic_rounding: bool = True  # adamw8bit: round bf16 weight updates stochastically (trainers/infra/optim.py)
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16: bf16 weights and bf16 autocast on GPU
    device: str = "auto"  # auto | cuda | cpu | cuda:N
    gradient_checkpointing: bool = True
    compile_layers: bool = False  # GPU: torch.compile each layer's blocks: DPO +38 %, GRPO update +24 % (BENCHMARKS.md)
    logprob_chunk_size: int = 256  # 256 x 102,400 float32 logits = 100 MB at a time (BENCHMARKS.md)
    log_every: int = 1
    save_every: int = 100
    keep_checkpoints: int = 2
    lora: bool = True
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    report_to: list[str] = field(default_factory=list)  # also log live to: tensorboard, wandb (trainers/infra/reporting.py)


@dataclass
class DPOConfig(TrainConfig):
    """Phase 1: DPO on HH-RLHF (trainers/dpo.py)."""

    out_dir: str = "runs/dpo"
    dataset: str = "Anthropic/hh-rlhf"
    data_dir: str = "harmless-base"
    split: str = "train"
    limit: int | None = None
    prompt_format: DPOFormat = "hh"  # hh: the transcript as text; chat: the chat template (data/prompts.py)
    max_length: int = 1024
    max_prompt_length: int = 512
    micro_batch_size: int = 4  # pairs per forward pass
    grad_accum_steps: int = 4  # micro-batches per optimizer step
    beta: float = 0.1
    loss_type: LossType = "sigmoid"  # losses/dpo.py
    label_smoothing: float = 0.0
    precompute_ref_logps: bool = False
    # How a forward pass holds its pairs (trainers/README.md: "DPO batch layouts"): stacked | shared_prompt | packed |
    # packed_shared_prompt. Padded layouts take micro_batch_size pairs a pass; packed ones as many as fit
    # in max_tokens_per_pass tokens (at least 2 x max_length, so that any pair fits).
    layout: Layout = "packed_shared_prompt"
    max_tokens_per_pass: int = 8192
    merge_after: bool = True  # write out_dir/merged when training ends
    merge_dtype: Literal["bfloat16", "float16", "float32"] | None = None  # dtype of out_dir/merged; None: the weights' own


@dataclass
class GRPOConfig(TrainConfig):
    """Phase 2: GRPO on Lean theorem statements (trainers/grpo.py)."""

    out_dir: str = "runs/grpo"
    lr: float = 1e-6
    lr_schedule: LRSchedule = "constant"
    lora: bool = False  # full fine-tuning, as in the published run
    dataset: str = "internlm/Lean-Workbook"
    split: str = "train"
    limit: int | None = None
    prompt_format: GRPOFormat = "raw"  # raw: code completion; chat: a chat request (data/lean_workbook.py)
    max_prompt_length: int = 512
    prompts_per_step: int = 2
    num_generations: int = 8  # G completions per prompt
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_strings: list[str] | None = None  # None: the closing fence for raw prompts, nothing for chat
    generation_batch_size: int = 16  # sequences decoded at once
    generation_cuda_graphs: bool = True  # GPU: each decode step is a replayed CUDA graph (eval/engine/decoder.py)
    micro_batch_size: int = 4  # completions per forward pass in the update
    num_iterations: int = 1  # μ: policy updates per generation batch
    reward: str = "random"  # random | zero | lean | toy | module:function; comma-separated to sum several
    reward_options: dict[str, dict] = field(default_factory=dict)  # reward name -> its options
    advantage_scale: AdvantageScale = "group"  # losses/grpo.py: group_advantages
    advantage_eps: float = 1e-4
    beta: float = 0.0  # KL coefficient; a reference model exists only when > 0
    clip_low: float = 0.2
    clip_high: float = 0.2
    aggregation: Aggregation = "token"  # losses/grpo.py: grpo_loss
    importance_ratio: ImportanceRatio = "token"  # token: GRPO's ρ per token; sequence: GSPO's s per sequence (gspo_loss)
    # DAPO's dynamic sampling: drop groups whose rewards are all equal and draw further prompts until the step has
    # prompts_per_step informative groups, in at most dynamic_sampling_max_batches generation batches (the first included).
    dynamic_sampling: bool = False
    dynamic_sampling_max_batches: int = 10
    # A published variant's switches in one word (ALGORITHM_PRESETS below); switches the config sets itself override it.
    algorithm: Algorithm | None = None


# --------------------------------------------------------------------------- the published GRPO variants
# What `algorithm:` expands to, per paper. Keys a config sets itself win; config.json records the expanded values.
Algorithm = Literal["grpo", "dr_grpo", "dapo", "gspo"]
ALGORITHM_PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeekMath (Shao et al., 2024): group-normalised advantages, each sequence weighs the same, KL β = 0.04
    "grpo": dict(advantage_scale="group", aggregation="sequence", clip_low=0.2, clip_high=0.2, beta=0.04,
                 importance_ratio="token", dynamic_sampling=False),
    # Dr. GRPO (Liu et al., 2025, "Understanding R1-Zero-Like Training"): no std scaling, no length normalisation, no KL
    "dr_grpo": dict(advantage_scale="none", aggregation="constant", clip_low=0.2, clip_high=0.2, beta=0.0,
                    importance_ratio="token", dynamic_sampling=False),
    # DAPO (Yu et al., 2025): clip-higher, token-level aggregation, no KL, dynamic sampling (overlong shaping: not here)
    "dapo": dict(advantage_scale="group", aggregation="token", clip_low=0.2, clip_high=0.28, beta=0.0,
                 importance_ratio="token", dynamic_sampling=True),
    # GSPO (Zheng et al., 2025): sequence-level ratio, the paper's clip range 3e-4 / 4e-4, each sequence weighs the same
    "gspo": dict(advantage_scale="group", aggregation="sequence", clip_low=3e-4, clip_high=4e-4, beta=0.0,
                 importance_ratio="sequence", dynamic_sampling=False),
}


# --------------------------------------------------------------------------- the values a run accepts
# One rule per key, checked on every config that make_config builds (after the types): a value
# outside it is one line naming the key, the value and what it must be. The words a key accepts
# are its type (`Literal[...]` above); these bound its numbers and shapes.


@dataclass(frozen=True)
class Rule:
    allows: Callable[[Any], bool]
    must_be: str  # completes "config key K = V must be ..."


def at_least(low: int, why: str = "") -> Rule:
    return Rule(lambda v: v >= low, f"at least {low}" + (f" ({why})" if why else ""))


def positive(why: str = "") -> Rule:
    return Rule(lambda v: math.isfinite(v) and v > 0, "a positive number" + (f" ({why})" if why else ""))


def non_negative(why: str = "") -> Rule:
    return Rule(lambda v: math.isfinite(v) and v >= 0, "a number >= 0" + (f" ({why})" if why else ""))


def in_range(low: float, high: float, include_low: bool = True, include_high: bool = False) -> Rule:
    """[low, high) by default; the brackets of the message say which ends belong."""
    inside = lambda v: (low <= v if include_low else low < v) and (v <= high if include_high else v < high)  # noqa: E731
    return Rule(inside, f"in {'[' if include_low else '('}{low:g}, {high:g}{']' if include_high else ')'}")


def unset_or(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.allows(v), rule.must_be + " or unset")


TRAIN_RULES = {
    "max_steps": at_least(1, "fewer would save the untrained model"),
    "seed": at_least(0),
    "lr": positive(),
    "warmup_steps": at_least(0),
    "weight_decay": non_negative(),
    "adam_beta1": in_range(0, 1),
    "adam_beta2": in_range(0, 1),
    "adam_eps": positive(),
    "max_grad_norm": non_negative("0 turns clipping off"),
    "device": Rule(lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "auto, cpu, cuda or cuda:N"),
    "logprob_chunk_size": at_least(1),
    "log_every": at_least(0, "0 prints no step lines"),
    "save_every": at_least(0, "0 saves only at the end and when stopped"),
    "keep_checkpoints": at_least(0, "0 keeps every checkpoint"),
    "lora_r": at_least(1),
    "lora_alpha": positive(),
    "lora_dropout": in_range(0, 1),
    "lora_target_modules": Rule(lambda v: bool(v) and all(isinstance(x, str) and x for x in v), "a non-empty list of module names"),
    "report_to": Rule(lambda v: all(x in ("tensorboard", "wandb") for x in v), "a list of: tensorboard, wandb (or [])"),
}
DPO_RULES = {
    "limit": unset_or(at_least(1)),
    "max_length": at_least(2),
    "max_prompt_length": at_least(1),
    "micro_batch_size": at_least(1),
    "grad_accum_steps": at_least(1, "the micro-batches of one step"),
    "beta": positive(),
    "label_smoothing": in_range(0, 0.5),
    "max_tokens_per_pass": at_least(2),
}
GRPO_RULES = {
    "limit": unset_or(at_least(1)),
    "max_prompt_length": at_least(1),
    "prompts_per_step": at_least(1),
    "num_generations": at_least(2, "advantages compare the completions of one prompt: with 1 every advantage is 0"),
    "max_new_tokens": at_least(1),
    "temperature": non_negative("0 is greedy"),
    "top_p": in_range(0, 1, include_low=False, include_high=True),
    "top_k": at_least(0, "0 turns it off"),
    "generation_batch_size": at_least(1),
    "micro_batch_size": at_least(1),
    "num_iterations": at_least(1),
    "advantage_eps": non_negative(),
    "beta": non_negative("0: no KL term"),
    "clip_low": in_range(0, 1),
    "clip_high": non_negative(),
    "dynamic_sampling_max_batches": at_least(2, "the first generation batch included: 1 would draw no further prompts"),
    "reward_options": Rule(
        lambda v: all(isinstance(options, dict) for options in v.values()),
        "a mapping from each reward's name to its options, e.g. {random: {seed: 1}, lean: {pool_size: 8}}",
    ),
}
RULES = {TrainConfig: TRAIN_RULES, DPOConfig: DPO_RULES, GRPOConfig: GRPO_RULES}


def check_values(config, source: str = "config") -> None:
    """Apply the rules of the config's class and its bases; the first value outside its rule is a UserError."""
    rules: dict[str, Rule] = {}
    for cls in reversed(type(config).__mro__):  # a subclass's rule for a key replaces its base's
        rules.update(RULES.get(cls, {}))
    for key, rule in rules.items():
        value = getattr(config, key)
        try:
            allowed = rule.allows(value)
        except TypeError:  # e.g. None where a number is needed
            allowed = False
        if not allowed:
            raise UserError(f"config key {key} = {value!r} in {source} must be {rule.must_be}")


# Keys that were renamed: an old config gets told what to write instead.
REPLACED_KEYS = {"share_prompt": "layout (share_prompt: true is layout: shared_prompt; false is layout: stacked)"}


def load_config(cls, path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()):
    """Build a `cls` config from an optional YAML file and `key=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_yaml(path))
    for key, value in parse_overrides(overrides).items():
        _set_nested(values, key.split("."), value)
    return make_config(cls, values, source=str(path) if path else "--set")


# Keys renamed since earlier releases: old config files keep working.
RENAMED_KEYS = {"prompt_style": "prompt_format"}


def make_config(cls, values: dict, source: str = "config"):
    valid = {f.name: f for f in dataclasses.fields(cls)}
    values = _renamed(values, source)
    unknown = sorted(set(values) - set(valid))
    replaced = [key for key in unknown if key in REPLACED_KEYS]
    if replaced:
        raise UserError(f"config key {replaced[0]} in {source} was replaced by {REPLACED_KEYS[replaced[0]]}")
    if unknown:
        raise UserError(
            f"unknown config key(s) {', '.join(unknown)} in {source}; valid keys: {', '.join(sorted(valid))}"
        )
    if "algorithm" in valid and values.get("algorithm") is not None:
        values = {**preset_of(values["algorithm"], source), **values}  # what the config sets itself wins
    if issubclass(cls, DPOConfig) and values.get("prompt_format") in DPO_OLD_NAMES:
        values["prompt_format"] = DPO_OLD_NAMES[values["prompt_format"]]
    hints = typing.get_type_hints(cls)
    config = cls(**{key: _coerce(key, value, hints[key], source) for key, value in values.items()})
    check_values(config, source)
    return config


def preset_of(algorithm, source: str = "config") -> dict[str, Any]:
    """The switches that `algorithm: NAME` stands for (ALGORITHM_PRESETS); an unknown name is one line naming the valid ones."""
    if algorithm not in ALGORITHM_PRESETS:
        raise UserError(f"config key algorithm = {algorithm!r} in {source} is not one of: {', '.join(ALGORITHM_PRESETS)}")
    return dict(ALGORITHM_PRESETS[algorithm])


def _renamed(values: dict, source: str) -> dict:
    values = dict(values)
    for old, new in RENAMED_KEYS.items():
        if old in values:
            if new in values:
                raise UserError(f"{source} sets both {old} and {new}; {old} is the old name of {new}: keep only {new}")
            values[new] = values.pop(old)
    return values


def save_config(config, path: str | os.PathLike) -> None:
    atomic_write_text(Path(path), json.dumps(dataclasses.asdict(config), indent=2) + "\n")


MAX_CONFIG_BYTES = 1 << 20
MAX_ALIASES = 64  # a config repeats a block (`&name` ... `*name`) a few times; thousands are a "billion laughs" file


class _StrictLoader(yaml.SafeLoader):
    """YAML as safe_load reads it, except that a key given twice in one mapping is an error (PyYAML keeps the
    last silently) and that aliases are counted, so a file whose aliases multiply is refused before it expands."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases = getattr(self, "aliases", 0) + 1
            if self.aliases > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (*name): refused before they are expanded")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.YAMLError(f"key {key!r} is given twice in one mapping (again on line {line}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml_text(text: str, source: str):
    """YAML text as Python values, refusing duplicate keys and alias bombs (see _StrictLoader)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def _first_line(err: yaml.YAMLError) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass the path of a YAML file (see launch/configs/)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"config file {path} has {path.stat().st_size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,}")
    try:
        values = read_yaml_text(path.read_text(encoding="utf-8"), str(path)) or {}
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path} is not a text file (byte {err.start} is not UTF-8); pass a YAML file") from None
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {_first_line(err)}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must be a mapping of key: value lines")
    return values


def _set_nested(values: dict, path: list[str], value) -> None:
    """`reward_options.lean.project_dir=/x` sets values["reward_options"]["lean"]["project_dir"]."""
    for key in path[:-1]:
        if not isinstance(values.get(key), dict):
            values[key] = {}
        values = values[key]
    values[path[-1]] = value


def parse_overrides(items) -> dict[str, Any]:
    """`["lr=1e-6", "lora=false"]` -> {"lr": 1e-6, "lora": False}; values are read as YAML."""
    return dict(_parse_override(item) for item in items)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UserError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        return key.strip(), raw


def _coerce(key: str, value, hint, source: str):
    """`value` checked against the field's declared type. YAML reads `5e-7` as a string, so a
    number written that way is converted; `Literal[...]` names the words a key accepts."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise UserError(f"config key {key} in {source} needs a value ({_describe(hint)})")
    for option in options:
        if option is not type(None) and _matches(option, value):
            return _converted(option, value)
    words = [word for option in options if typing.get_origin(option) is Literal for word in typing.get_args(option)]
    if words:
        raise UserError(f"config key {key} = {value!r} is not one of: {', '.join(map(str, words))}")
    raise UserError(f"config key {key} = {value!r} in {source} should be {_describe(hint)}")


def _matches(option, value) -> bool:
    if typing.get_origin(option) is Literal:
        return value in typing.get_args(option)
    kind = typing.get_origin(option) or option  # list[str] -> list
    if kind is bool or isinstance(value, bool):  # YAML's true/false are not numbers, nor 1/0 booleans
        return kind is bool and isinstance(value, bool)
    if kind in (int, float) and isinstance(value, str):
        try:
            kind(value)
        except ValueError:
            return False
        return True
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _converted(option, value):
    kind = typing.get_origin(option) or option
    if kind in (int, float) and not isinstance(value, bool):
        return kind(value)
    return value


def _describe(hint) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " | ".join(_describe(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if hint is type(None):
        return "None"
    return getattr(typing.get_origin(hint) or hint, "__name__", str(hint))
