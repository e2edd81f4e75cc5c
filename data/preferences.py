"""Preference data for DPO in any of the usual row schemas, detected per file.

Four schemas are accepted (trainers/README.md: "Your own data"). Each file holds one of them;
the first row that is a JSON object decides which, and the log says so:

  hh               {"chosen": transcript, "rejected": transcript}: Anthropic HH-RLHF,
                   parsed by data/hh_rlhf.py exactly as before
  plain            {"prompt": str, "chosen": str, "rejected": str}
  conversational   {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}
  conversational (implicit prompt)
                   {"chosen": [messages], "rejected": [messages]}: two whole conversations that
                   share every message but the last, which is the assistant's reply

A message is {"role": "system"|"user"|"assistant", "content": str}. Prompts become
a `PreferencePair` whose prompt is an HH transcript (hh, and plain prompts that are
already one) or a tuple of messages; `data.prompts.format_transcript` writes either
in the run's `prompt_format`. Replies get HH's leading space (the collator drops it
for the chat format). A row that does not fit the file's schema, or cannot teach a
preference, is skipped and counted by reason, as data/hh_rlhf.py does.
"""

from __future__ import annotations

from collections import Counter
from itertools import chain
from pathlib import Path

from twophase.data.base.errors import UserError
from twophase.data.base.rows import MALFORMED_LINE, SUFFIXES, read_file_rows
from twophase.data.hh_rlhf import (
    EMPTY_CHOSEN,
    EMPTY_REJECTED,
    IDENTICAL,
    MALFORMED_JSON,
    MISSING_FIELD,
    NO_ASSISTANT_TURN,
    NOT_AN_OBJECT,
    PROMPTS_DIFFER,
    PreferencePair,
    _iter_rows,
    classify_hh_row,
)
from twophase.data.prompts import ASSISTANT_MARKER, chat_messages

HH, PLAIN, CONVERSATIONAL, IMPLICIT = "hh", "plain", "conversational", "conversational (implicit prompt)"
SCHEMA_FIELDS = {
    HH: '"chosen" and "rejected" HH transcripts',
    PLAIN: '"prompt", "chosen" and "rejected" strings',
    CONVERSATIONAL: '"prompt", "chosen" and "rejected" lists of chat messages',
    IMPLICIT: '"chosen" and "rejected" conversations (lists of chat messages) sharing all but the last message',
}

# Skip reasons of the schemas other than hh (hh's own are in data/hh_rlhf.py).
WRONG_TYPES = "fields of another schema"
NOT_MESSAGES = "not a list of chat messages"
EMPTY_PROMPT = "empty prompt"
REPLY_NOT_ASSISTANT = "reply is not one assistant message"


def detect_schema(row) -> str:
    """The schema a row is written in (hh when it fits none: its skip reasons then say what is missing)."""
    if not isinstance(row, dict):
        return HH
    conversational = isinstance(row.get("chosen"), list)
    if "prompt" in row:
        return CONVERSATIONAL if conversational or isinstance(row.get("prompt"), list) else PLAIN
    return IMPLICIT if conversational else HH


def classify_row(row, schema: str) -> tuple[PreferencePair | None, str | None]:
    """`(pair, None)`, or `(None, reason)` when the row cannot be used as a pair of this schema."""
    if not isinstance(row, dict):
        return None, NOT_AN_OBJECT
    if schema == HH:
        return classify_hh_row(row)
    if any(key not in row for key in ("chosen", "rejected") + (("prompt",) if schema != IMPLICIT else ())):
        return None, MISSING_FIELD
    if detect_schema(row) != schema:
        return None, WRONG_TYPES
    if schema == PLAIN:
        return _plain_pair(row)
    if schema == CONVERSATIONAL:
        return _conversational_pair(row)
    return _implicit_pair(row)


def _plain_pair(row: dict):
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if not all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        return None, WRONG_TYPES
    if not prompt.strip():
        return None, EMPTY_PROMPT
    # A prompt already in HH schema stays a transcript; any other text is one user turn.
    as_prompt = prompt if prompt.endswith(ASSISTANT_MARKER) else ({"role": "user", "content": prompt},)
    return _pair(as_prompt, chosen, rejected)


def _conversational_pair(row: dict):
    prompt = chat_messages(row["prompt"])
    if prompt is None:
        return None, NOT_MESSAGES
    if not prompt:
        return None, EMPTY_PROMPT
    chosen, rejected = chat_messages(row["chosen"]), chat_messages(row["rejected"])
    if chosen is None or rejected is None:
        return None, NOT_MESSAGES
    if not _one_assistant_reply(chosen) or not _one_assistant_reply(rejected):
        return None, REPLY_NOT_ASSISTANT
    return _pair(prompt, chosen[0]["content"], rejected[0]["content"])


def _implicit_pair(row: dict):
    chosen, rejected = chat_messages(row["chosen"]), chat_messages(row["rejected"])
    if chosen is None or rejected is None:
        return None, NOT_MESSAGES
    if not chosen or not rejected or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return None, NO_ASSISTANT_TURN
    if chosen[:-1] != rejected[:-1]:
        return None, PROMPTS_DIFFER
    if not chosen[:-1]:
        return None, EMPTY_PROMPT
    return _pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


def _pair(prompt, chosen: str, rejected: str):
    if not chosen.strip():
        return None, EMPTY_CHOSEN
    if not rejected.strip():
        return None, EMPTY_REJECTED
    if chosen.strip() == rejected.strip():
        return None, IDENTICAL
    if not isinstance(prompt, str):
        prompt = tuple(dict(m) for m in prompt)
    return PreferencePair(prompt=prompt, chosen=" " + chosen.lstrip(), rejected=" " + rejected.lstrip()), None


def _one_assistant_reply(messages: list[dict]) -> bool:
    return len(messages) == 1 and messages[0]["role"] == "assistant"


# --------------------------------------------------------------------------- loading


def load_preferences(
    source: str, split: str = "train", data_dir: str | None = None, limit: int | None = None
) -> tuple[list[PreferencePair], dict]:
    """Preference pairs of a file, directory or hub dataset in any accepted schema, and a load report.

    A file is read by data/base/rows.py (.jsonl, .jsonl.gz, .json, .csv, .parquet); where
    files are looked for in a directory is `data.hh_rlhf.load_hh_rlhf`'s rule. The report is load_hh_rlhf's
    (`source`, `split`, `rows`, `used`, `skipped`) plus `schema`.
    """
    if limit is not None and limit < 0:
        raise UserError(f"limit must be a non-negative number of pairs or None, got {limit}")
    rows = iter(read_file_rows(Path(source)) if str(source).lower().endswith(SUFFIXES) and Path(source).is_file()
                else _iter_rows(source, split, data_dir))  # fmt: skip
    head = []
    for row in rows:  # the first object decides the schema; rows before it are kept for counting
        head.append(row)
        if isinstance(row, dict):
            break
    schema = detect_schema(head[-1]) if head else HH
    pairs: list[PreferencePair] = []
    skipped: Counter[str] = Counter()
    rows_read = 0
    for row in chain(head, rows):
        if limit is not None and len(pairs) >= limit:
            break
        rows_read += 1
        pair, reason = (None, MALFORMED_JSON) if row is MALFORMED_LINE else classify_row(row, schema)
        if pair is None:
            skipped[reason] += 1
        else:
            pairs.append(pair)
    report = {"source": str(source), "split": split, "schema": schema, "rows": rows_read, "used": len(pairs),
              "skipped": dict(skipped.most_common())}  # fmt: skip
    return pairs, report
