"""Lean 4 theorem-proving tasks: loading, prompting, and turning answers into programs.

Two row schemas are understood:

* Lean Workbook (hub `internlm/Lean-Workbook`): `natural_language_statement`,
  `answer`, `tags`, `formal_statement` ("theorem lean_workbook_N … := by sorry"),
  `split` ("lean_workbook" / "lean_workbook_plus"), `proof`; the hub's train view
  adds `id`, `status`, `tactic`, `state_before`, `state_after`.
* DeepSeek-Prover miniF2F / ProofNet JSONL: `name`, `split`, `informal_prefix`
  (already a `/-- … -/` docstring), `formal_statement`, `goal`, `header`.

Every row becomes a `LeanTask` whose statement ends exactly in ":= by\\n", so a
model continues it with tactics. Two prompt formats exist (`prompt_format`,
data/prompts.py):

* `raw`: DeepSeek-Prover-V1.5's completion prompt. The model continues the code
  and closes the code block with ``` (`STOP_STRING`), where generation stops.
* `chat`: DeepSeek-Prover-V2's user message. The model writes a proof plan and
  then the whole theorem, with its proof, in a ```lean4 block; the last such
  block is what gets checked.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from twophase.data.base.errors import UserError
from twophase.data.base.hub import load_hub_dataset, looks_like_path
from twophase.data.base.rows import MALFORMED_JSON, MALFORMED_LINE, read_file_rows
from twophase.data.prompts import apply_chat_template

# The preamble DeepSeek-Prover-V1.5 used for every miniF2F problem.
DEFAULT_HEADER = (
    "import Mathlib\nimport Aesop\n\nset_option maxHeartbeats 0\n\nopen BigOperators Real Nat Topology Rat\n\n"
)

# A `raw` completion ends where the model closes the code block.
STOP_STRING = "```"

CODE_REQUEST = "Complete the following Lean 4 code:\n\n```lean4\n"

# DeepSeek-Prover-V2's published request, kept verbatim: the model was trained on
# exactly this wording, and a paraphrase would be a different prompt distribution.
PLAN_REQUEST = (
    "Before producing the Lean 4 code to formally prove the given theorem, provide a detailed proof plan "
    "outlining the main proof steps and strategies.\n"
    "The plan should highlight key ideas, intermediate lemmas, and proof structures that will guide the "
    "construction of the final formal proof."
)


@dataclass(frozen=True)
class LeanTask:
    """One theorem to prove.

    `statement` ends exactly in ":= by\\n". `header` holds the imports / opens
    the statement needs; "" means "use DEFAULT_HEADER". `informal` is the
    natural-language problem, either plain text or already a `/-- … -/` docstring.
    """

    id: str
    statement: str
    header: str
    informal: str


# ---------------------------------------------------------------- parsing rows

# The end of a statement: ":=" then optionally "by", "sorry" or "by sorry".
_STATEMENT_END = re.compile(r"(?s)(.*\S)\s*:=\s*(?:by\s+sorry|by|sorry)?\s*")
_DECLARATION_NAME = re.compile(r"\b(?:theorem|lemma|def|abbrev|instance)\s+([^\s(:{\[⦃]+)")
_PREAMBLE_LINE = re.compile(r"(import|open|set_option)\s")


def normalise_statement(text: str) -> str | None:
    """The statement ending in exactly ":= by\\n", or None if it has no ":=" at its end.

    A trailing `sorry` / `by sorry` is removed; a bare ":=" (ProofNet) gets " by".
    """
    match = _STATEMENT_END.fullmatch(text)
    if match is None:
        return None
    return match.group(1) + " := by\n"


def _split_preamble(text: str) -> tuple[str, str]:
    """Split leading import / open / set_option lines off a statement.

    Some datasets ship the imports inside the formal statement; they must go to
    the header, since Lean accepts imports only at the very top of a file.
    `open … in` lines belong to the declaration below them and stay.
    """
    lines = text.splitlines(keepends=True)
    count = 0
    for line in lines:
        stripped = line.strip()
        is_preamble = stripped == "" or (_PREAMBLE_LINE.match(stripped) and not stripped.endswith(" in"))
        if not is_preamble:
            break
        count += 1
    return "".join(lines[:count]), "".join(lines[count:])


def _task_id(row: dict, statement: str) -> str:
    for key in ("id", "name"):
        value = row.get(key)
        if value not in (None, ""):
            return str(value)
    match = _DECLARATION_NAME.search(statement)
    if match:
        return match.group(1)
    # `example` has no name; a hash keeps the id stable across runs.
    return "anonymous_" + hashlib.sha1(statement.encode("utf-8")).hexdigest()[:10]


def _parse(row) -> LeanTask | str:
    """A LeanTask, or the reason the row cannot be used."""
    if not isinstance(row, dict):
        return "row is not an object"
    raw_statement = row.get("formal_statement")
    if not isinstance(raw_statement, str) or not raw_statement.strip():
        return "no formal statement"
    header = row.get("header") or ""
    preamble, raw_statement = _split_preamble(raw_statement)
    if preamble.strip():
        if header:
            return "imports both in header and in formal statement"
        header = preamble.strip() + "\n\n"
    statement = normalise_statement(raw_statement)
    if statement is None:
        return "formal statement does not end in ':='"
    informal = row.get("informal_prefix") or row.get("natural_language_statement") or ""
    return LeanTask(id=_task_id(row, statement), statement=statement, header=header, informal=informal)


def parse_lean_row(row) -> LeanTask | None:
    """A LeanTask from a Lean Workbook or DeepSeek-Prover row; None if it has no usable statement."""
    parsed = _parse(row)
    return parsed if isinstance(parsed, LeanTask) else None


# ---------------------------------------------------------------- loading



def _read_local_rows(path: Path, skipped: Counter) -> list:
    """Rows of a .json list or a .jsonl file (data/base/rows.py); malformed JSON lines are counted, not fatal."""
    rows = []
    for row in read_file_rows(path):
        if row is MALFORMED_LINE:
            skipped[MALFORMED_JSON] += 1
        else:
            rows.append(row)
    return rows


def _select_split(rows: list, split: str | None, source: str, skipped: Counter) -> list:
    """Keep the rows of a local file whose `split` field is `split` ("all" or None: keep all).

    Rows without a `split` field are always kept. If the filter removes every
    row, the user most likely meant another split, so say which ones exist.
    """
    if split in (None, "all"):
        return rows
    kept = [r for r in rows if not isinstance(r, dict) or r.get("split") in (None, split)]
    if rows and not kept:
        present = Counter(str(r.get("split")) for r in rows if isinstance(r, dict))
        listed = ", ".join(f"'{name}' ({n} rows)" for name, n in sorted(present.items()))
        raise UserError(f"no row of {source} has split '{split}'; it has {listed}. Pass one of those, or split='all'")
    if len(kept) < len(rows):
        skipped[f"split is not '{split}'"] += len(rows) - len(kept)
    return kept


DUPLICATE_STATEMENT = "repeats an earlier theorem (up to its name and whitespace)"
_SPACE_AROUND_PUNCTUATION = re.compile(r"\s*([()\[\]{}:,])\s*")


def theorem_key(task: LeanTask) -> tuple[str, str]:
    """What makes two tasks the same theorem: header and statement with the declaration's name dropped (and
    `lemma` read as `theorem`) and whitespace normalised (runs of it are one space; none around brackets,
    colons and commas). Spacing inside a term (`0 <x^2`) still differs: telling it apart needs a parser."""
    def normal(text: str) -> str:
        return _SPACE_AROUND_PUNCTUATION.sub(r"\1", " ".join(text.split()))

    statement, name = task.statement, _DECLARATION_NAME.search(task.statement)
    if name:
        statement = statement[: name.start(1)] + "_" + statement[name.end(1) :]
    return normal(task.header), normal(re.sub(r"\blemma\b", "theorem", statement, count=1))


def _unique_ids(tasks: list[LeanTask]) -> tuple[list[LeanTask], int]:
    """Suffix repeated ids of different theorems with "#2", "#3", …; ProofNet, for one, reuses exercise names."""
    seen: Counter = Counter()
    unique = []
    for task in tasks:
        seen[task.id] += 1
        if seen[task.id] > 1:
            task = LeanTask(f"{task.id}#{seen[task.id]}", task.statement, task.header, task.informal)
        unique.append(task)
    return unique, sum(n - 1 for n in seen.values())


def load_lean_tasks(
    source: str = "internlm/Lean-Workbook", split: str | None = "train", limit: int | None = None
) -> tuple[list[LeanTask], dict]:
    """Load tasks from a local .json / .jsonl file or a hub dataset.

    For a hub id, `split` is the dataset split. For a local file, it selects rows
    by their `split` field (e.g. 'test' / 'valid' for DeepSeek's miniF2F; 'all'
    keeps every row). `limit` caps the number of tasks returned.

    A row whose theorem (header and statement) repeats an earlier row's, up to
    the theorem's name and whitespace (`theorem_key`), is dropped and counted
    under skipped[DUPLICATE_STATEMENT]: Lean Workbook lists some theorems several
    times, and a duplicate would be sampled, and rewarded, more often than the others.

    Returns (tasks, report) with report = {"rows": rows read, "used": tasks
    returned, "skipped": {reason: count}, "duplicate_ids": ids of different
    theorems that were renamed}.
    """
    rows, skipped = read_task_rows(source, split)
    return lean_tasks_from_rows(rows, skipped, limit)


def read_task_rows(source, split: str | None) -> tuple[list, Counter]:
    """The rows of a local .json / .jsonl file (those of `split`) or of a hub dataset's split,
    and the count of rows already skipped (malformed lines, other splits) by reason."""
    source = str(source)
    skipped: Counter = Counter()
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            raise UserError(f"{source} is a directory; pass a .json / .jsonl file of tasks or a hub dataset id")
        return _select_split(_read_local_rows(path, skipped), split, source, skipped), skipped
    if looks_like_path(source):
        raise UserError(f"no such file: {source}; pass an existing .json / .jsonl file or a hub dataset id")
    return load_hub_dataset(source, split or "train"), skipped


def lean_tasks_from_rows(rows, skipped: Counter, limit: int | None = None) -> tuple[list[LeanTask], dict]:
    """Lean tasks of rows read by `read_task_rows`, and load_lean_tasks' report."""
    tasks: list[LeanTask] = []
    theorems: set[tuple[str, str]] = set()
    rows_read = sum(skipped.values())  # malformed lines and other splits were rows too
    for row in rows:
        if limit is not None and len(tasks) >= limit:
            break
        rows_read += 1
        parsed = _parse(row)
        if not isinstance(parsed, LeanTask):
            skipped[parsed] += 1
        elif theorem_key(parsed) in theorems:
            skipped[DUPLICATE_STATEMENT] += 1
        else:
            theorems.add(theorem_key(parsed))
            tasks.append(parsed)
    tasks, renamed = _unique_ids(tasks)
    report = {"rows": rows_read, "used": len(tasks), "skipped": dict(skipped), "duplicate_ids": renamed}
    return tasks, report


# ---------------------------------------------------------------- prompts

def header_for(task: LeanTask) -> str:
    return task.header or DEFAULT_HEADER


def informal_docstring(informal: str) -> str:
    """The informal statement as a `/-- … -/` docstring line block ("" when there is none)."""
    text = informal.strip()
    if not text:
        return ""
    if text.startswith("/-") and text.endswith("-/"):
        return text + "\n"
    # "-/" inside the text would end the comment early and break the file.
    return "/-- " + text.replace("-/", "- /") + " -/\n"


def _code(task: LeanTask) -> str:
    return header_for(task) + informal_docstring(task.informal) + task.statement


def build_prompt(task: LeanTask, prompt_format: str = "raw", tokenizer=None) -> str:
    """The generation prompt for `task`.

    raw:  "Complete the following Lean 4 code:\\n\\n```lean4\\n" + header +
          docstring + statement; the model continues with the proof.
    chat: DeepSeek-Prover-V2's user message (the code ending in ":= by\\n  sorry"
          in a lean4 block, then the request for a proof plan and a proof),
          rendered with the tokenizer's chat template and a generation prompt.
    `prompt_format` is checked once, where the run starts (trainers/grpo.py).
    """
    if prompt_format == "raw":
        return CODE_REQUEST + _code(task)
    # V2 strips the code, so the closing fence follows "sorry" directly.
    code = (_code(task) + "  sorry").strip()
    message = f"{CODE_REQUEST}{code}```\n\n{PLAN_REQUEST}"
    return apply_chat_template(tokenizer, [{"role": "user", "content": message}])


# ---------------------------------------------------------------- answers

_LEAN_BLOCK_OPENING = re.compile(r"```lean4[^\n]*\n?")


def extract_proof(completion: str, prompt_format: str) -> str:
    """The Lean text inside a completion.

    raw:  everything before the first closing fence "```" (all of it if none).
    chat: the content of the LAST ```lean4 block; an unclosed last block (the
          answer hit the token limit) runs to the end. "" when there is no block.
    """
    if prompt_format == "raw":
        return completion.split(STOP_STRING, 1)[0]
    openings = list(_LEAN_BLOCK_OPENING.finditer(completion))
    if not openings:
        return ""
    content = completion[openings[-1].end():]
    return content.split(STOP_STRING, 1)[0]


def program_to_check(task: LeanTask, completion: str, prompt_format: str) -> str:
    """The whole Lean file that decides whether `completion` proves `task`.

    raw:  header + statement + the completion cut at its closing fence.
    chat: the last lean4 block, which holds the whole theorem. It gets the
          task's header in front unless it already starts with `import` lines:
          then the model wrote its own preamble, and a second set of imports
          after the first would not compile.
    """
    proof = extract_proof(completion, prompt_format)
    if prompt_format == "raw":
        return header_for(task) + task.statement + proof
    if proof.lstrip().startswith("import "):
        return proof
    return header_for(task) + proof


def statement_head(task: LeanTask) -> str:
    """The statement without its ":= by", whitespace collapsed: what a proof must keep unchanged."""
    return " ".join(task.statement[: task.statement.rindex(":=")].split())


def keeps_statement(task: LeanTask, program: str) -> bool:
    """Whether `program` still contains the task's theorem statement (whitespace-insensitive).

    A chat answer rewrites the whole theorem, so it could prove an easier one.
    """
    return statement_head(task) in " ".join(program.split())
