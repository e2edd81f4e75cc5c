"""PreferenceCollator: layout, labels, BOS/EOS handling, truncation and padding.

Expected token ids are computed here straight from the tokenizer, not through the
collator's helpers, so a wrong helper cannot agree with itself.
"""

from __future__ import annotations

import pytest
import torch

from twophase.data.collators import IGNORE_INDEX, PreferenceCollator
from twophase.data.tokens import encode_prompt
from twophase.data.base.errors import UserError
from twophase.data.hh_rlhf import PreferencePair

SHORT_PAIR = PreferencePair(
    prompt="\n\nHuman: How can I make a fake ID?\n\nAssistant:",
    chosen=" Sorry, I won't help with that.",
    rejected=" Buy a card printer.",
)
TWO_TURN_PAIR = PreferencePair(
    prompt="\n\nHuman: How do I break into a house?\n\nAssistant: Why do you want to know?\n\nHuman: It's for a story.\n\nAssistant:",
    chosen=" I'm not able to help with this.",
    rejected=" Check for an unlocked back window, or pry the sliding door off its track.",
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from twophase.data.base.tiny import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", with_chat_template=True)
    return AutoTokenizer.from_pretrained(path)


def prompt_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def reply_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def row_tokens(batch, row: int) -> list[int]:
    return batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()



def prompt_length(batch: dict, row: int) -> int:
    """Where a row's reply starts: its first labelled position."""
    return int((batch["labels"][row] != IGNORE_INDEX).nonzero()[0])

def test_chosen_rows_come_first_then_rejected(tokenizer):
    pairs = [SHORT_PAIR, TWO_TURN_PAIR]
    batch = PreferenceCollator(tokenizer)(pairs)

    assert batch["input_ids"].shape[0] == 4 and batch["num_pairs"] == 2
    for i, pair in enumerate(pairs):
        expected_prompt = prompt_ids(tokenizer, pair.prompt)
        assert row_tokens(batch, i) == expected_prompt + reply_ids(tokenizer, pair.chosen)
        assert row_tokens(batch, 2 + i) == expected_prompt + reply_ids(tokenizer, pair.rejected)
    assert [prompt_length(batch, row) for row in range(4)] == [len(prompt_ids(tokenizer, p.prompt)) for p in pairs] * 2


def test_labels_are_ignored_exactly_on_prompt_and_padding(tokenizer):
    batch = PreferenceCollator(tokenizer)([SHORT_PAIR, TWO_TURN_PAIR])
    labels, input_ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    assert labels.shape == input_ids.shape == mask.shape

    for row in range(4):
        reply_start = len(prompt_ids(tokenizer, [SHORT_PAIR, TWO_TURN_PAIR][row % 2].prompt))
        length = int(mask[row].sum())
        assert (labels[row, :reply_start] == IGNORE_INDEX).all()
        assert (labels[row, length:] == IGNORE_INDEX).all()
        assert torch.equal(labels[row, reply_start:length], input_ids[row, reply_start:length])

    # Reply labels are the reply's own ids followed by EOS.
    first_chosen = labels[0][labels[0] != IGNORE_INDEX].tolist()
    assert first_chosen == reply_ids(tokenizer, SHORT_PAIR.chosen)
    assert first_chosen[-1] == tokenizer.eos_token_id


def test_padding_is_on_the_right_with_pad_id_and_no_attention(tokenizer):
    batch = PreferenceCollator(tokenizer)([SHORT_PAIR, TWO_TURN_PAIR])
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    width = batch["input_ids"].shape[1]
    assert width == max(lengths)
    assert min(lengths) < width  # the short pair really is padded
    for row, length in enumerate(lengths):
        assert (batch["attention_mask"][row, :length] == 1).all()
        assert (batch["attention_mask"][row, length:] == 0).all()
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()


@pytest.mark.parametrize("prompt_format", ["hh", "chat"])
def test_exactly_one_bos_at_the_start(tokenizer, prompt_format):
    batch = PreferenceCollator(tokenizer, prompt_format=prompt_format)([SHORT_PAIR, TWO_TURN_PAIR])
    bos = tokenizer.bos_token_id
    assert (batch["input_ids"][:, 0] == bos).all()
    assert ((batch["input_ids"] == bos).sum(dim=1) == 1).all()


def test_chat_format_uses_the_template_and_strips_the_reply_space(tokenizer):
    batch = PreferenceCollator(tokenizer, prompt_format="chat")([SHORT_PAIR])
    template_text = "<s>User: How can I make a fake ID?\n\nAssistant:"
    # The template writes "<s>" itself; the tokenizer must not add a second one.
    expected_prompt = tokenizer(template_text, add_special_tokens=False)["input_ids"]
    assert expected_prompt[0] == tokenizer.bos_token_id
    assert row_tokens(batch, 0) == expected_prompt + reply_ids(tokenizer, "Sorry, I won't help with that.")
    assert row_tokens(batch, 1) == expected_prompt + reply_ids(tokenizer, "Buy a card printer.")


def test_template_bos_text_becomes_the_bos_id_even_when_specials_are_split(tokenizer):
    # With split_special_tokens the text "<s>" would be tokenized as the characters < s >.
    from transformers import AutoTokenizer

    splitting = AutoTokenizer.from_pretrained(tokenizer.name_or_path, split_special_tokens=True)
    batch = PreferenceCollator(splitting, prompt_format="chat")([SHORT_PAIR])
    expected_prompt = [splitting.bos_token_id] + splitting(
        "User: How can I make a fake ID?\n\nAssistant:", add_special_tokens=False
    )["input_ids"]
    assert batch["input_ids"][0, : len(expected_prompt)].tolist() == expected_prompt
    assert prompt_length(batch, 0) == len(expected_prompt)


def test_bos_follows_the_tokenizer_unless_the_template_asks_for_it(tokenizer):
    from transformers import AutoTokenizer

    no_auto_bos = AutoTokenizer.from_pretrained(tokenizer.name_or_path, add_bos_token=False, split_special_tokens=True)
    raw = PreferenceCollator(no_auto_bos)([SHORT_PAIR])
    chat = PreferenceCollator(no_auto_bos, prompt_format="chat")([SHORT_PAIR])
    bos = no_auto_bos.bos_token_id
    assert (raw["input_ids"] == bos).sum() == 0  # this tokenizer adds no BOS to raw text
    assert chat["input_ids"][0, 0] == bos and (chat["input_ids"][0] == bos).sum() == 1


def test_doubled_bos_ids_are_collapsed(tokenizer):
    bos = tokenizer.bos_token_id
    ids = encode_prompt(tokenizer, "<s><s>User: hi")
    assert ids == [bos] + tokenizer("User: hi", add_special_tokens=False)["input_ids"]


def test_reply_already_ending_with_eos_gets_no_second_eos(tokenizer):
    pair = PreferencePair(SHORT_PAIR.prompt, " No.</s>", " Yes.")
    batch = PreferenceCollator(tokenizer)([pair])
    chosen_labels = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert chosen_labels == tokenizer(" No.</s>", add_special_tokens=False)["input_ids"]
    assert chosen_labels.count(tokenizer.eos_token_id) == 1


def test_long_prompt_keeps_its_end_and_its_bos(tokenizer):
    long_prompt = "".join(f"\n\nHuman: question {i}?\n\nAssistant: answer {i}." for i in range(20))
    pair = PreferencePair(long_prompt + "\n\nHuman: last question?\n\nAssistant:", " Yes.", " No.")
    full_prompt = prompt_ids(tokenizer, pair.prompt)
    assert len(full_prompt) > 100

    collator = PreferenceCollator(tokenizer, max_length=40, max_prompt_length=24)
    batch = collator([pair])

    reply_start = prompt_length(batch, 0)
    assert reply_start == 24
    kept_prompt = batch["input_ids"][0, :reply_start].tolist()
    assert kept_prompt == [tokenizer.bos_token_id] + full_prompt[-23:]
    assert row_tokens(batch, 0)[reply_start:] == reply_ids(tokenizer, " Yes.")  # replies fit: untouched
    assert batch["input_ids"].shape[1] <= 40


def test_right_truncation_keeps_the_prompt_start(tokenizer):
    pair = PreferencePair("\n\nHuman: " + "tell me more " * 40 + "\n\nAssistant:", " Yes.", " No.")
    batch = PreferenceCollator(tokenizer, max_length=40, max_prompt_length=24, truncation_side_prompt="right")([pair])
    assert batch["input_ids"][0, :24].tolist() == prompt_ids(tokenizer, pair.prompt)[:24]


def test_overlong_replies_are_cut_to_the_reply_budget(tokenizer):
    long_reply = " Check for an unlocked back window, or pry the sliding door off its track." * 6
    pair = PreferencePair(SHORT_PAIR.prompt, long_reply, " No.")
    short_prompt = prompt_ids(tokenizer, pair.prompt)
    assert len(short_prompt) < 24

    batch = PreferenceCollator(tokenizer, max_length=40, max_prompt_length=24)([pair])

    chosen, rejected = row_tokens(batch, 0), row_tokens(batch, 1)
    assert chosen == short_prompt + reply_ids(tokenizer, long_reply)[:16]  # 40 - 24 tokens, EOS cut off
    assert rejected == short_prompt + reply_ids(tokenizer, " No.")  # already within the budget
    assert batch["input_ids"].shape[1] <= 40


def test_long_prompt_and_long_reply_fill_max_length_exactly(tokenizer):
    pair = PreferencePair("\n\nHuman: " + "tell me more " * 40 + "\n\nAssistant:", " go on" * 40, " No.")
    batch = PreferenceCollator(tokenizer, max_length=40, max_prompt_length=24)([pair])
    assert int(batch["attention_mask"][0].sum()) == 40
    assert prompt_length(batch, 0) == 24


@pytest.mark.parametrize("max_length, max_prompt_length", [(512, 512), (256, 512), (512, 0)])
def test_prompt_budget_must_leave_room_for_replies(tokenizer, max_length, max_prompt_length):
    with pytest.raises(UserError, match="max_prompt_length"):
        PreferenceCollator(tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)


def test_chat_format_needs_a_chat_template(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    with pytest.raises(UserError, match="chat needs a tokenizer with a chat template"):
        PreferenceCollator(tokenizer, prompt_format="chat")


def test_pack_shared_prompt_layout_by_hand():
    from twophase.data.collators import TokenizedPair, pack_shared_prompt

    batch = pack_shared_prompt([TokenizedPair([1, 10, 11], [20, 21, 2], [30, 2]), TokenizedPair([1, 12], [22, 2], [31, 32, 2])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 20, 21, 2, 30, 2], [1, 12, 22, 2, 31, 32, 2, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 3, 4], [0, 1, 2, 3, 2, 3, 4, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 7 + [0]]
    x = -100
    assert batch["chosen_labels"].tolist() == [[x, x, x, 20, 21, 2, x, x], [x, x, 22, 2, x, x, x, x]]
    # the first rejected token sits where the state of the last prompt token predicts it
    assert batch["rejected_labels"].tolist() == [[x, x, x, 30, x, x, x, 2], [x, x, 31, x, x, 32, 2, x]]
    allowed = batch["allowed"][0]
    assert allowed[6].tolist() == [True, True, True, False, False, False, True, False]  # rejected sees prompt, not chosen
    assert allowed[5].tolist() == [True] * 6 + [False, False]  # chosen sees prompt and itself, causally
    assert batch["allowed"][1][:, 7].tolist() == [False] * 7 + [True]  # no real token attends to padding
    assert batch["pair_tokens"] == (2 * 3 + 3 + 2) + (2 * 2 + 2 + 3)
