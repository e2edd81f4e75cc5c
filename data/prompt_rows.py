"""GRPO tasks in either row schema, detected per file: Lean theorems, or prompts for your own reward.

  lean     Lean Workbook / miniF2F / ProofNet rows with a "formal_statement"
           (data/lean_workbook.py, unchanged)
  prompt   {"prompt": str} or {"prompt": [chat messages]}, any other fields kept
           for the reward: {"prompt": "What is 2+3?", "answer": "5"}

The first row that is a JSON object decides the schema, and the log says which.
A prompt-only task has no checker of its own, so it is scored by a reward that
reads only the completions (`toy`, `random`, `zero`) or by yours
(`path/to/file.py:function` or `module:function`, trainers/rewards/), which
receives these `PromptTask`s: `task.fields` holds the row's other fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twophase.data.base.errors import UserError
from twophase.data.lean_workbook import LeanTask, build_prompt, lean_tasks_from_rows, read_task_rows
from twophase.data.prompts import apply_chat_template, chat_messages

LEAN, PROMPT = "lean", "prompt"

NOT_AN_OBJECT = "row is not an object"
NO_PROMPT = "no prompt"
BAD_MESSAGES = "prompt is neither text nor a list of chat messages"


@dataclass(frozen=True)
class PromptTask:
    """One prompt to answer: text or chat messages, and the row's other fields (an answer, a test…) for the reward."""

    id: str
    prompt: str | tuple
    fields: dict = field(default_factory=dict, hash=False)


def detect_schema(row) -> str:
    """lean for a row with a formal statement (or one that fits neither: its skip reasons say why), else prompt."""
    if isinstance(row, dict) and "prompt" in row and "formal_statement" not in row:
        return PROMPT
    return LEAN


def parse_prompt_row(row, number: int) -> PromptTask | str:
    """A PromptTask, or the reason the row cannot be used; `number` names a row without an "id"."""
    if not isinstance(row, dict):
        return NOT_AN_OBJECT
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            return NO_PROMPT
    elif prompt and (messages := chat_messages(prompt)):
        prompt = tuple(messages)
    else:
        return NO_PROMPT if prompt in (None, "", []) else BAD_MESSAGES
    task_id = str(row.get("id") if row.get("id") not in (None, "") else f"row-{number}")
    return PromptTask(task_id, prompt, {k: v for k, v in row.items() if k != "prompt"})


def prompt_text(task, prompt_format: str, tokenizer=None) -> str:
    """The generation prompt of a Lean task (data/lean_workbook.py) or a prompt task.

    A prompt task in `raw` is its text as it is; in `chat` it is one user message
    (text) or its messages, rendered by the chat template. Messages need `chat`.
    `prompt_format` is checked once, where the run starts (trainers/grpo.py), not per task.
    """
    if isinstance(task, LeanTask):
        return build_prompt(task, prompt_format, tokenizer)
    if prompt_format == "raw":
        if not isinstance(task.prompt, str):
            raise UserError(f"task {task.id}: a prompt of chat messages needs prompt_format: chat (raw takes text)")
        return task.prompt
    messages = [{"role": "user", "content": task.prompt}] if isinstance(task.prompt, str) else [dict(m) for m in task.prompt]
    return apply_chat_template(tokenizer, messages)


def load_tasks(source: str, split: str | None = "train", limit: int | None = None) -> tuple[list, dict]:
    """The tasks of a file or hub dataset in either schema, and a report with `schema`, `rows`, `used`, `skipped`."""
    rows, skipped = read_task_rows(source, split)  # read once, whichever schema it turns out to be
    first = next((row for row in rows if isinstance(row, dict)), None)
    if detect_schema(first) == LEAN:
        tasks, report = lean_tasks_from_rows(rows, skipped, limit)
        return tasks, {"schema": LEAN, **report}
    tasks = []
    rows_read = sum(skipped.values())  # malformed lines and other splits were rows too
    for number, row in enumerate(rows, start=1):
        if limit is not None and len(tasks) >= limit:
            break
        rows_read += 1
        parsed = parse_prompt_row(row, number)
        if isinstance(parsed, PromptTask):
            tasks.append(parsed)
        else:
            skipped[parsed] += 1
    return tasks, {"schema": PROMPT, "rows": rows_read, "used": len(tasks), "skipped": dict(skipped)}
