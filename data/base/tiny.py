"""A tiny Llama-architecture model and a byte-level BPE tokenizer, built offline.

The demo and the test suite need a real Hugging Face causal LM without a hub.
`write_tiny_model(out_dir)` trains a small byte-level BPE tokenizer on the
bundled sample texts, builds a randomly initialised `LlamaForCausalLM` of the
same family as DeepSeek-Prover-V2-7B (only much smaller) and saves both with
`save_pretrained`, so everything downstream loads it by path exactly as it
would load the real model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# A minimal chat template in the style of DeepSeek's, so the `chat` prompt
# formats can be exercised offline. Like DeepSeek's, it writes BOS into the text,
# so tokenizing its output naively would give two BOS tokens.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n\n"
    "{% else %}Assistant: {{ message['content'] }}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _training_texts() -> list[str]:
    """Every string in the bundled samples: the tokenizer's training corpus."""
    texts: list[str] = []
    for path in sorted(SAMPLES_DIR.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.extend(_strings_in(json.loads(line)))
    texts.append("Complete the following Lean 4 code:\n\n```lean4\nimport Mathlib\n")
    return texts


def _strings_in(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings_in(v)]
    return []


def build_tiny_tokenizer(vocab_size: int = 1024, with_chat_template: bool = False):
    """A byte-level BPE tokenizer that adds BOS, like Llama's, trained on the samples."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )
    if with_chat_template:
        fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny_model(vocab_size: int, seed: int = 0, hidden_size: int = 64, num_layers: int = 2):
    """A randomly initialised LlamaForCausalLM with DeepSeek-Prover-V2-7B's layout, scaled down."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2 + hidden_size // 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    return model


def write_tiny_model(out_dir: str | os.PathLike, seed: int = 0, with_chat_template: bool = False, **model_kwargs) -> str:
    """Build the tiny tokenizer and model and save both to `out_dir`; returns the path.

    Reuses an existing complete directory, so repeated demo runs are cheap.
    """
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return str(out)
    tokenizer = build_tiny_tokenizer(with_chat_template=with_chat_template)
    model = build_tiny_model(len(tokenizer), seed=seed, **model_kwargs)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    from twophase.data.base.hub import quiet_transformers_bars

    quiet_transformers_bars()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)  # an incomplete earlier attempt
    os.replace(tmp, out)
    return str(out)
