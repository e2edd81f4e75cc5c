"""data/prompts.py: one prompt-format setting for DPO, GRPO and evaluation."""


import pytest

from twophase.data.base.errors import UserError
from twophase.data.hh_rlhf import split_transcript
from twophase.data.prompts import DPO_FORMATS, EVAL_FORMATS, check_format, format_question, format_transcript, hh_prompt
from twophase.data.tokens import encode_prompt


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_chat_model_dir):
    from twophase.data.base.hub import load_tokenizer

    return load_tokenizer(tiny_chat_model_dir)


# An HH-RLHF row in the layout of harmless-base: one space after each marker, replies start with a space.
HH_ROW = {"chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: I'm sorry, I can't help with that.",
          "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Sure, first get a tension wrench."}


def test_hh_question_is_byte_for_byte_the_prompt_dpo_trains_on(chat_tokenizer):
    trained_prompt, reply = split_transcript(HH_ROW["chosen"])
    assert reply.startswith(" ")  # the model learnt to write " I'm sorry" after the colon
    assert format_question(chat_tokenizer, "How do I pick a lock?", None, "hh") == trained_prompt
    assert format_transcript(trained_prompt, "hh") == trained_prompt
    # surrounding whitespace of a benchmark question is not part of the HH layout
    assert hh_prompt("  How do I pick a lock?\n") == trained_prompt
    # and its tokens are the prompt tokens the DPO collator builds
    assert encode_prompt(chat_tokenizer, hh_prompt("How do I pick a lock?")) == encode_prompt(chat_tokenizer, trained_prompt)


def test_hh_system_prompt_opens_the_human_turn():
    assert hh_prompt("Hi?", "Answer in JSON.") == "\n\nHuman: Answer in JSON.\n\nHi?\n\nAssistant:"


def test_the_other_eval_formats(chat_tokenizer):
    chat = format_question(chat_tokenizer, "hi", "be brief")
    assert chat == "<s>be brief\n\nUser: hi\n\nAssistant:"
    assert encode_prompt(chat_tokenizer, chat).count(chat_tokenizer.bos_token_id) == 1  # the template's BOS is not doubled
    assert format_question(chat_tokenizer, "hi", "be brief", "chat") == chat
    assert format_question(chat_tokenizer, "hi", "be brief", "raw") == "be brief\n\nhi"
    assert format_question(chat_tokenizer, "hi", None, "raw") == "hi"
    assert encode_prompt(chat_tokenizer, "hi")[0] == chat_tokenizer.bos_token_id


def test_unknown_format_and_chat_without_template_are_user_errors(tiny_model_dir):
    from twophase.data.base.hub import load_tokenizer

    plain = load_tokenizer(tiny_model_dir)
    # checked once where a run starts (eval/runner.py), not for every question
    with pytest.raises(UserError, match="is not one of: hh, chat, raw, auto"):
        check_format("alpaca", EVAL_FORMATS, plain)
    with pytest.raises(UserError, match="chat needs a tokenizer with a chat template"):
        check_format("chat", EVAL_FORMATS, plain)
    assert format_question(plain, "hi", None, "auto") == "hi"  # auto without a template is raw
    assert set(DPO_FORMATS) < set(EVAL_FORMATS)  # every DPO format can be evaluated in


def test_dpo_old_name_raw_is_hh():
    from twophase.trainers.config import DPOConfig, GRPOConfig, make_config

    assert make_config(DPOConfig, {"prompt_format": "raw"}).prompt_format == "hh"
    with pytest.raises(UserError, match="prompt_format"):
        make_config(DPOConfig, {"prompt_format": "auto"})
    # GRPO's old key name still reads, and its formats are its own
    assert make_config(GRPOConfig, {"prompt_style": "chat"}).prompt_format == "chat"
    with pytest.raises(UserError, match="sets both prompt_style and prompt_format"):
        make_config(GRPOConfig, {"prompt_style": "chat", "prompt_format": "raw"})
    with pytest.raises(UserError, match="is not one of: raw, chat"):
        make_config(GRPOConfig, {"prompt_format": "hh"})
