"""Prompt formats: how a conversation or a question becomes the text a model reads.

One setting, `prompt_format`, names this layout everywhere: DPO (how HH-RLHF
transcripts are shown), GRPO (how Lean tasks are asked) and evaluation (how
benchmark questions are asked). Its values:

  hh    the HH-RLHF transcript layout, "\\n\\nHuman: {question}\\n\\nAssistant:",
        the reply generated after it. Phase 1 trains on these transcripts as
        text, so this is the layout its refusals were learnt in. HH replies
        start with a space (" I'm sorry, ..."), so the prompt ends in the
        colon; Human turns hold one space after "Human:" and no trailing
        whitespace (checked on all 5,756 Human turns of harmless-base test).
  chat  the tokenizer's chat template, with its generation prompt.
  raw   the text alone, no framing: a bare question (eval), or
        DeepSeek-Prover-V1.5's code-completion prompt (GRPO).
  auto  (eval only) chat when the tokenizer has a template, else raw.

Each consumer accepts the formats that mean something for it:
DPO_FORMATS, GRPO_FORMATS, EVAL_FORMATS.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from twophase.data.base.errors import UserError

HUMAN_MARKER = "\n\nHuman:"
ASSISTANT_MARKER = "\n\nAssistant:"

DPOFormat = Literal["hh", "chat"]  # an HH transcript as it is (hh), or rendered by the chat template
GRPOFormat = Literal["raw", "chat"]  # the Lean completion prompt (raw), or DeepSeek-Prover-V2's chat request
EvalFormat = Literal["hh", "chat", "raw", "auto"]
DPO_FORMATS, GRPO_FORMATS, EVAL_FORMATS = get_args(DPOFormat), get_args(GRPOFormat), get_args(EvalFormat)

# Earlier releases called DPO's transcript-as-text format "raw"; old config files keep working.
DPO_OLD_NAMES = {"raw": "hh"}

# A turn starts only at a marker that follows a blank line (data/hh_rlhf.py explains why).
_TURN_MARKER = re.compile(r"\n\n(Human|Assistant):")
_ROLE_OF_SPEAKER = {"Human": "user", "Assistant": "assistant"}


def check_format_name(fmt: str, allowed: tuple[str, ...], where: str = "prompt_format") -> None:
    """Raise UserError unless `fmt` is one of `allowed` (before any tokenizer is loaded)."""
    if fmt not in allowed:
        raise UserError(f"{where} = {fmt!r} is not one of: {', '.join(allowed)}")


def check_format(fmt: str, allowed: tuple[str, ...], tokenizer, where: str = "prompt_format") -> None:
    """Raise UserError unless `fmt` is one of `allowed` and usable with `tokenizer` (chat needs a template)."""
    check_format_name(fmt, allowed, where)
    if fmt == "chat" and not has_chat_template(tokenizer):
        other = next(f for f in allowed if f not in ("chat", "auto"))
        raise UserError(f"{where}: chat needs a tokenizer with a chat template; this one has none (use {other})")


def has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def apply_chat_template(tokenizer, messages: list[dict]) -> str:
    """The chat template's text for `messages`, ending in the generation prompt."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text if isinstance(text, str) else tokenizer.decode(text)


# --------------------------------------------------------------------------- one question (evaluation)


def hh_prompt(user: str, system: str | None = None) -> str:
    """One Human turn in HH layout, ready for the Assistant's reply.

    HH has no system role: a system prompt opens the Human turn, a blank line
    before the question, as chat templates without a system role do.
    """
    text = f"{system.strip()}\n\n{user.strip()}" if system else user.strip()
    return f"{HUMAN_MARKER} {text}{ASSISTANT_MARKER}"


def format_question(tokenizer, user: str, system: str | None = None, fmt: str = "auto") -> str:
    """The model's input for one user message (and optional system prompt) in format `fmt`.

    raw puts a system prompt in front of the message, separated by a blank
    line. A chat template that rejects the system role gets the system prompt
    in front of the user message instead. `fmt` is checked once, where a run starts (check_format).
    """
    if fmt == "auto":
        fmt = "chat" if has_chat_template(tokenizer) else "raw"
    if fmt == "hh":
        return hh_prompt(user, system)
    if fmt == "raw":
        return f"{system}\n\n{user}" if system else user
    messages = [{"role": "user", "content": user}]
    if system:
        try:
            return apply_chat_template(tokenizer, [{"role": "system", "content": system}] + messages)
        except Exception:  # jinja raises its own types for "system role not supported"
            messages = [{"role": "user", "content": f"{system}\n\n{user}"}]
    return apply_chat_template(tokenizer, messages)


def resolved_format(tokenizer, fmt: str) -> str:
    """The format `fmt` stands for with this tokenizer: auto becomes chat or raw."""
    if fmt == "auto":
        return "chat" if has_chat_template(tokenizer) else "raw"
    return fmt


# --------------------------------------------------------------------------- HH transcripts (DPO)


ROLES = ("system", "user", "assistant")


def chat_messages(value) -> list[dict] | None:
    """`value` as {"role", "content"} messages, or None when it is not a list of chat messages
    (each a mapping with a known role and text content). Other keys of a message are dropped."""
    if not isinstance(value, list):
        return None
    messages = []
    for item in value:
        if not isinstance(item, dict) or item.get("role") not in ROLES or not isinstance(item.get("content"), str):
            return None
        messages.append({"role": item["role"], "content": item["content"]})
    return messages


def transcript_to_messages(prompt: str) -> list[dict]:
    """Turn an HH prompt into chat messages: `[{"role": "user"|"assistant", "content": ...}]`.

    Rules:
    - turns start only at "\\n\\nHuman:" / "\\n\\nAssistant:" (glued inline markers stay text);
    - contents are stripped of surrounding whitespace;
    - the empty Assistant turn that ends a prompt is the slot for the reply, so it is dropped
      (`add_generation_prompt=True` puts it back in the template's own words);
    - consecutive turns by the same speaker are merged with a blank line, because many
      chat templates reject conversations whose roles do not alternate;
    - text before the first marker (HH transcripts have none) is kept as a user turn.
    """
    pieces = _TURN_MARKER.split(prompt)
    # re.split with one group gives [lead, speaker, text, speaker, text, ...].
    turns = [("user", pieces[0])] if pieces[0].strip() else []
    turns += [(_ROLE_OF_SPEAKER[speaker], text) for speaker, text in zip(pieces[1::2], pieces[2::2])]
    if turns and turns[-1][0] == "assistant" and not turns[-1][1].strip():
        turns.pop()
    messages: list[dict] = []
    for role, text in turns:
        content = text.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    return messages


def messages_to_transcript(messages) -> str:
    """Chat messages as an HH prompt: "\\n\\nHuman: …\\n\\nAssistant: …" ending in "\\n\\nAssistant:".

    HH has no system role: a system message opens the next Human turn, a blank line
    before it, as `hh_prompt` does for one question.
    """
    text, system = "", None
    for message in messages:
        role, content = message["role"], str(message["content"]).strip()
        if role == "system":
            system = content
        elif role == "user":
            text += hh_prompt(content, system)[: -len(ASSISTANT_MARKER)]
            system = None
        else:
            text += f"{ASSISTANT_MARKER} {content}"
    return text + ASSISTANT_MARKER


def format_transcript(prompt, fmt: str, tokenizer=None) -> str:
    """The text the model sees before its reply to a DPO prompt, in one of `DPO_FORMATS`.

    `prompt` is an HH transcript (a string ending in "\\n\\nAssistant:") or a list
    of chat messages (`{"role", "content"}`, data/preferences.py).
    - "hh": the transcript unchanged ("...\\n\\nAssistant:"); messages are written in
      that layout. Replies keep their leading space.
    - "chat": the conversation rendered by the chat template. Replies are then tokenized
      without their leading whitespace (the collator strips it), as a chat model writes
      them after its own assistant header.

    `fmt` is checked once, where the run starts (trainers/config.py, data/collators.py), not per prompt.
    """
    if not isinstance(prompt, str):
        messages = [dict(m) for m in prompt]
        return messages_to_transcript(messages) if fmt == "hh" else apply_chat_template(tokenizer, messages)
    if fmt == "hh":
        return prompt
    return apply_chat_template(tokenizer, transcript_to_messages(prompt))
