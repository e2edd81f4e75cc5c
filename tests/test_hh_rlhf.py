"""Parsing, loading and prompt formatting for Anthropic HH-RLHF rows.

The fixture rows are hand-written in the real schema and copy the shape of the edge
cases found in the real harmless-base test split.
"""

from __future__ import annotations

import gzip
import json

import pytest

import twophase.data.base.hub as hub
from twophase.data.base.errors import UserError
from twophase.data.base.rows import describe_skips
from twophase.data.hh_rlhf import (
    PreferencePair,
    classify_hh_row,
    load_hh_rlhf,
    parse_hh_row,
)
from twophase.data.prompts import format_transcript as format_prompt
from twophase.data.prompts import transcript_to_messages

MULTI_TURN_PROMPT = (
    "\n\nHuman: How do I pick a lock?"
    "\n\nAssistant: Why do you want to pick a lock?"
    "\n\nHuman: I locked myself out."
    "\n\nAssistant:"
)
MULTI_TURN_ROW = {
    "chosen": MULTI_TURN_PROMPT + " Call a locksmith or your landlord; they can let you in.",
    "rejected": MULTI_TURN_PROMPT + " Insert a tension wrench and rake the pins.",
}
# The reply of the chosen transcript is empty: it is a strict prefix of rejected.
EMPTY_CHOSEN_ROW = {
    "chosen": "\n\nHuman: list of bad words\n\nAssistant: ",
    "rejected": "\n\nHuman: list of bad words\n\nAssistant: Ok",
}
# The chosen reply holds a glued "Human:" and a further real Assistant turn.
PROMPTS_DIFFER_ROW = {
    "chosen": "\n\nHuman: Is that a drag king?\n\nAssistant: No.  Human: Then what is it?\n\nAssistant: A performer.",
    "rejected": "\n\nHuman: Is that a drag king?\n\nAssistant: A drag king is a performer.",
}
# A turn glued into the text without blank lines; it is text, not a new turn.
GLUED_PROMPT = (
    "\n\nHuman: Do you like movies?"
    "\n\nAssistant: I was not watching television.  Human: So what do you like?"
    "\n\nAssistant:"
)
GLUED_ROW = {
    "chosen": GLUED_PROMPT + " I like documentaries.",
    "rejected": GLUED_PROMPT + " Human: nothing.",
}


# --------------------------------------------------------------------------- parsing


def test_multi_turn_row_splits_at_the_last_assistant_turn():
    pair = parse_hh_row(MULTI_TURN_ROW)
    assert pair == PreferencePair(
        prompt=MULTI_TURN_PROMPT,
        chosen=" Call a locksmith or your landlord; they can let you in.",
        rejected=" Insert a tension wrench and rake the pins.",
    )
    assert pair.prompt + pair.chosen == MULTI_TURN_ROW["chosen"]
    assert pair.prompt + pair.rejected == MULTI_TURN_ROW["rejected"]


@pytest.mark.parametrize(
    "row, reason",
    [
        (EMPTY_CHOSEN_ROW, "empty chosen response"),
        ({"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: Hello"}, "empty chosen response"),
        ({"chosen": "\n\nHuman: hi\n\nAssistant: Hello", "rejected": "\n\nHuman: hi\n\nAssistant:  "}, "empty rejected response"),
        (PROMPTS_DIFFER_ROW, "chosen and rejected prompts differ"),
        ({"chosen": "\n\nHuman: hi\n\nAssistant: Hey", "rejected": "\n\nHuman: hi\n\nAssistant: Hey"}, "chosen and rejected identical"),
        ({"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi\n\nAssistant: Hey"}, "no Assistant turn"),
        ({"chosen": "\n\nHuman: hi\n\nAssistant: Hey"}, "missing field"),
        ({"chosen": None, "rejected": "\n\nHuman: hi\n\nAssistant: Hey"}, "missing field"),
        (["chosen", "rejected"], "not a JSON object"),
    ],
)
def test_unusable_rows_are_skipped_with_their_reason(row, reason):
    assert classify_hh_row(row) == (None, reason)
    assert parse_hh_row(row) is None


def test_glued_inline_turn_stays_inside_its_turn():
    pair, reason = classify_hh_row(GLUED_ROW)
    assert reason is None
    assert pair.prompt == GLUED_PROMPT
    assert pair.chosen == " I like documentaries."
    assert pair.rejected == " Human: nothing."
    assert pair.prompt + pair.rejected == GLUED_ROW["rejected"]
    assert transcript_to_messages(pair.prompt) == [
        {"role": "user", "content": "Do you like movies?"},
        {"role": "assistant", "content": "I was not watching television.  Human: So what do you like?"},
    ]


# --------------------------------------------------------------------------- messages


def test_transcript_to_messages_drops_the_open_assistant_slot():
    prompt = "\n\nHuman: a \n\nAssistant:  b\n\nHuman: c\n\nAssistant:"
    assert transcript_to_messages(prompt) == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]


def test_transcript_to_messages_merges_repeated_speakers():
    prompt = "\n\nHuman: first\n\nHuman: second\n\nAssistant:"
    assert transcript_to_messages(prompt) == [{"role": "user", "content": "first\n\nsecond"}]


# --------------------------------------------------------------------------- prompt formats


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from twophase.data.base.tiny import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", with_chat_template=True)
    return AutoTokenizer.from_pretrained(path)


def test_hh_format_is_the_transcript_unchanged():
    assert format_prompt(MULTI_TURN_PROMPT, "hh") == MULTI_TURN_PROMPT


def test_chat_format_renders_the_template(chat_tokenizer):
    text = format_prompt(MULTI_TURN_PROMPT, "chat", chat_tokenizer)
    assert text == (
        "<s>User: How do I pick a lock?\n\n"
        "Assistant: Why do you want to pick a lock?</s>"
        "User: I locked myself out.\n\n"
        "Assistant:"
    )


# The format is checked once, where a run starts (the collator), not for every prompt.
def test_chat_format_without_template_is_a_user_error(chat_tokenizer, monkeypatch):
    from twophase.data.collators import PreferenceCollator

    monkeypatch.setattr(chat_tokenizer, "chat_template", None)
    with pytest.raises(UserError, match="chat needs a tokenizer with a chat template; this one has none \\(use hh\\)"):
        PreferenceCollator(chat_tokenizer, 64, 32, prompt_format="chat")


def test_unknown_format_names_the_valid_ones(chat_tokenizer):
    from twophase.data.collators import PreferenceCollator

    with pytest.raises(UserError, match="hh, chat"):
        PreferenceCollator(chat_tokenizer, 64, 32, prompt_format="alpaca")


# --------------------------------------------------------------------------- loading

GOOD_ROWS = [MULTI_TURN_ROW, GLUED_ROW]


def _lines_with_one_malformed_and_one_bad_row() -> list[str]:
    return [
        json.dumps(MULTI_TURN_ROW),
        "{not json",
        "",  # a blank line is not a row
        json.dumps(EMPTY_CHOSEN_ROW),
        json.dumps(GLUED_ROW),
    ]


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.jsonl.gz"])
def test_local_file_report_counts_every_row(tmp_path, name):
    path = tmp_path / name
    text = "\n".join(_lines_with_one_malformed_and_one_bad_row()) + "\n"
    if name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")

    pairs, report = load_hh_rlhf(str(path))

    assert pairs == [parse_hh_row(row) for row in GOOD_ROWS]
    assert report["rows"] == 4
    assert report["used"] == 2
    assert report["skipped"] == {"malformed JSON": 1, "empty chosen response": 1}
    assert describe_skips(report) == "used 2 of 4 rows; skipped 1 malformed JSON, 1 empty chosen response"


def test_directory_source_finds_the_split_file(tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps(MULTI_TURN_ROW) + "\n", encoding="utf-8")
    pairs, report = load_hh_rlhf(str(tmp_path), split="test")
    assert pairs == [parse_hh_row(MULTI_TURN_ROW)]
    assert describe_skips(report) == "used 1 of 1 rows; skipped none"


def test_limit_caps_the_pairs_and_reports_rows_read(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(_lines_with_one_malformed_and_one_bad_row()), encoding="utf-8")
    pairs, report = load_hh_rlhf(str(path), limit=1)
    assert pairs == [parse_hh_row(MULTI_TURN_ROW)]
    assert (report["rows"], report["used"], report["skipped"]) == (1, 1, {})


@pytest.mark.parametrize("source", ["./no/such/file.jsonl", "missing.jsonl.gz", "/nonexistent/dir"])
def test_missing_local_path_is_a_user_error(source):
    with pytest.raises(UserError, match="no such file or directory"):
        load_hh_rlhf(source)


def test_hub_id_goes_to_the_hub_loader(monkeypatch):
    calls = []

    def fake_load_hub_dataset(dataset_id, split, **kwargs):
        calls.append((dataset_id, split, kwargs))
        return [MULTI_TURN_ROW, PROMPTS_DIFFER_ROW]

    monkeypatch.setattr(hub, "load_hub_dataset", fake_load_hub_dataset)
    pairs, report = load_hh_rlhf("Anthropic/hh-rlhf", split="test", data_dir="harmless-base")

    assert calls == [("Anthropic/hh-rlhf", "test", {"data_dir": "harmless-base"})]
    assert pairs == [parse_hh_row(MULTI_TURN_ROW)]
    assert report["skipped"] == {"chosen and rejected prompts differ": 1}
