"""Anthropic HH-RLHF as DPO preference pairs: parse rows, load files.

An HH-RLHF row is `{"chosen": transcript, "rejected": transcript}`. Each transcript is
a whole conversation, "\\n\\nHuman: ...\\n\\nAssistant: ...", and the two transcripts
of a row normally share everything except the final Assistant reply. DPO needs that
shared part (the prompt) and the two replies apart.

Parsing rules, checked by hand against the 2,312-row harmless-base test split:

- The prompt is the transcript up to and including its last "\\n\\nAssistant:".
  The replies keep their leading space, so `prompt + chosen == row["chosen"]` and
  `prompt + rejected == row["rejected"]` exactly: nothing is lost or invented.
- Only a marker after a blank line ("\\n\\nHuman:", "\\n\\nAssistant:") starts a turn.
  A few transcripts have a marker glued into the text ("...text.  Human: more", or a
  reply that begins "Human: ..."). That is text the model produced or was shown, so it
  stays inside its turn; splitting on it would invent turns that never happened.
- A row that cannot be a preference is skipped with a reason (see `classify_hh_row`),
  and loaders count every skip, so no row disappears silently:
  * an empty or whitespace-only reply (the conversation was cut off before the reply;
    there is nothing to prefer),
  * chosen and rejected prompts that differ (the pair does not compare two replies to
    one prompt; in HH this happens when a reply itself contains "\\n\\nAssistant:"),
  * identical chosen and rejected transcripts (DPO gets exactly zero signal from them),
  * a transcript with no "\\n\\nAssistant:" turn, or a missing / non-text field.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from twophase.data.base import hub
from twophase.data.base.rows import MALFORMED_JSON, MALFORMED_LINE, read_file_rows
from twophase.data.base.errors import UserError
from twophase.data.prompts import ASSISTANT_MARKER


# Why a row is skipped; these exact strings are the keys of a load report's "skipped".
MISSING_FIELD = "missing field"
NOT_AN_OBJECT = "not a JSON object"
NO_ASSISTANT_TURN = "no Assistant turn"
EMPTY_CHOSEN = "empty chosen response"
EMPTY_REJECTED = "empty rejected response"
PROMPTS_DIFFER = "chosen and rejected prompts differ"
IDENTICAL = "chosen and rejected identical"



@dataclass(frozen=True)
class PreferencePair:
    """One DPO example: a prompt and two replies to it, the preferred one first."""

    prompt: str
    chosen: str
    rejected: str


# --------------------------------------------------------------------------- parsing


def split_transcript(transcript: str) -> tuple[str, str] | None:
    """Split a transcript into (prompt, reply) at its last "\\n\\nAssistant:".

    The prompt includes the marker and the reply keeps its leading space, so the two
    concatenate back to `transcript`. None when there is no Assistant turn.
    """
    cut = transcript.rfind(ASSISTANT_MARKER)
    if cut < 0:
        return None
    end_of_prompt = cut + len(ASSISTANT_MARKER)
    return transcript[:end_of_prompt], transcript[end_of_prompt:]


def classify_hh_row(row) -> tuple[PreferencePair | None, str | None]:
    """Parse one HH-RLHF row into `(pair, None)`, or `(None, reason)` when it is unusable.

    The reason is one of the module's short constants (e.g. "empty chosen response").
    The checks run in a fixed order and the first failing one is reported.
    """
    if not isinstance(row, dict):
        return None, NOT_AN_OBJECT
    chosen_text, rejected_text = row.get("chosen"), row.get("rejected")
    if not isinstance(chosen_text, str) or not isinstance(rejected_text, str):
        return None, MISSING_FIELD
    chosen_split, rejected_split = split_transcript(chosen_text), split_transcript(rejected_text)
    if chosen_split is None or rejected_split is None:
        return None, NO_ASSISTANT_TURN
    (prompt, chosen), (rejected_prompt, rejected) = chosen_split, rejected_split
    if not chosen.strip():
        return None, EMPTY_CHOSEN
    if not rejected.strip():
        return None, EMPTY_REJECTED
    if prompt != rejected_prompt:
        return None, PROMPTS_DIFFER
    if chosen == rejected:
        return None, IDENTICAL
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected), None


def parse_hh_row(row) -> PreferencePair | None:
    """The pair in an HH-RLHF row, or None when `classify_hh_row` gives a skip reason."""
    pair, _reason = classify_hh_row(row)
    return pair


# --------------------------------------------------------------------------- loading


def load_hh_rlhf(
    source: str = "Anthropic/hh-rlhf",
    split: str = "train",
    data_dir: str | None = "harmless-base",
    limit: int | None = None,
) -> tuple[list[PreferencePair], dict]:
    """Load HH-RLHF preference pairs and a report of what was used and skipped.

    `source` is either a local path or a hub dataset id:
    - a `.jsonl` / `.jsonl.gz` file is read as is (`split` and `data_dir` are ignored);
    - a directory is searched for `{split}.jsonl[.gz]`, then `{data_dir}/{split}.jsonl[.gz]`
      (the hub repository's layout), then `{data_dir}-{split}.jsonl[.gz]`;
    - anything else goes to the hub: `load_hub_dataset(source, split=split, data_dir=data_dir)`.
    A path that does not exist but looks like one (see `data/base/hub.py: looks_like_path`) is a UserError
    rather than a confusing hub lookup.

    `limit` caps the number of pairs returned; reading stops once that many are used.
    The report is `{"source", "split", "rows", "used", "skipped": {reason: count}}`,
    where rows = used + sum(skipped): every row read is accounted for. A line that is
    not valid JSON counts as a skipped row ("malformed JSON"); blank lines are not rows.
    """
    if limit is not None and limit < 0:
        raise UserError(f"limit must be a non-negative number of pairs or None, got {limit}")
    rows = _iter_rows(source, split, data_dir)
    pairs: list[PreferencePair] = []
    skipped: Counter[str] = Counter()
    rows_read = 0
    for row in rows:
        if limit is not None and len(pairs) >= limit:
            break
        rows_read += 1
        pair, reason = (None, MALFORMED_JSON) if row is MALFORMED_LINE else classify_hh_row(row)
        if pair is None:
            skipped[reason] += 1
        else:
            pairs.append(pair)
    report = {
        "source": str(source),
        "split": split,
        "rows": rows_read,
        "used": len(pairs),
        "skipped": dict(skipped.most_common()),
    }
    return pairs, report




def _iter_rows(source: str, split: str, data_dir: str | None):
    path = Path(source).expanduser()
    if path.exists():
        return read_file_rows(_local_data_file(path, split, data_dir))
    if hub.looks_like_path(source):
        raise UserError(
            f"no such file or directory: '{source}'. Pass an existing .jsonl/.jsonl.gz file "
            f"(or a directory with {split}.jsonl.gz), or a hub dataset id like Anthropic/hh-rlhf."
        )
    return hub.load_hub_dataset(source, split=split, data_dir=data_dir)


def _local_data_file(path: Path, split: str, data_dir: str | None) -> Path:
    if path.is_file():
        if not path.name.endswith((".jsonl", ".jsonl.gz")):
            raise UserError(f"'{path}' is not a .jsonl or .jsonl.gz file; HH-RLHF data is read from JSON lines.")
        return path
    candidates = [path / f"{split}.jsonl.gz", path / f"{split}.jsonl"]
    if data_dir:
        candidates += [path / data_dir / f"{split}.jsonl.gz", path / data_dir / f"{split}.jsonl"]
        candidates += [path / f"{data_dir}-{split}.jsonl.gz", path / f"{data_dir}-{split}.jsonl"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c.relative_to(path)) for c in candidates)
    raise UserError(f"directory '{path}' has no HH-RLHF file for split '{split}' (looked for {tried}).")
