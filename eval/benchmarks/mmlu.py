"""MMLU: four-option multiple choice over 57 subjects (Hendrycks et al., 2021).

14,042 test questions. Each is asked five-shot, the shots being the five dev
questions of the same subject, in the paper's prompt format; the answer is the
letter among " A" .. " D" with the highest log-likelihood after "Answer:".
Reported: micro-averaged accuracy (every question counts once) and the
accuracy of each of the paper's four categories.

The lettered-question format and its scoring are shared with WMDP
(`eval.benchmarks.wmdp`), which asks the same way, zero-shot. Prompts are
lm-evaluation-harness's (0.4.x, tasks mmlu_* and wmdp_*) character for
character: the question is stripped, the choices are not (lm-eval's template
strips only the question; 16 dev questions of 6 subjects in the common copies
begin with whitespace, 10 dev choices carry some), the shots are the first
dev questions, each answered " X" and followed by a blank line.

Data: the hub's cais/mmlu; or a local directory holding either the original
`{subject}_{split}.csv` files or the hub's layout (`all/{split}-*.parquet`,
or `{split}.jsonl` / `.json` / `.parquet` rows of question, subject,
choices, answer).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from itertools import zip_longest
from pathlib import Path

from twophase.data.base.errors import UserError
from twophase.data.base.hub import is_local, load_hub_dataset
from twophase.eval.benchmarks.base import Benchmark, EvalContext, read_split_rows
from twophase.eval.engine.loglikelihood import LoglikelihoodRequest
from twophase.eval.benchmarks.metrics import Metric, proportion

LETTERS = ("A", "B", "C", "D")

# Each subject's category, as grouped in the MMLU paper's repository
# (subject -> subcategory -> category). Counts: 18 / 13 / 12 / 14 subjects.
CATEGORY_SUBJECTS = {
    "stem": (
        "abstract_algebra", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics",
        "computer_security", "conceptual_physics", "electrical_engineering",
        "elementary_mathematics", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history",
        "high_school_world_history", "international_law", "jurisprudence",
        "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy",
        "prehistory", "professional_law", "world_religions",
    ),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations",
        "security_studies", "sociology", "us_foreign_policy",
    ),
    "other": (
        "anatomy", "business_ethics", "clinical_knowledge", "college_medicine",
        "global_facts", "human_aging", "management", "marketing", "medical_genetics",
        "miscellaneous", "nutrition", "professional_accounting", "professional_medicine",
        "virology",
    ),
}
SUBJECT_CATEGORY = {s: category for category, subjects in CATEGORY_SUBJECTS.items() for s in subjects}


# --- the lettered multiple-choice format, shared with WMDP ---


def header(topic: str) -> str:
    return f"The following are multiple choice questions (with answers) about {topic}.\n\n"


def format_question(question: dict, with_answer: bool = False) -> str:
    """'{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:' and, for a shot, ' {letter}\\n\\n'."""
    lines = [question["question"].strip()] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, question["choices"])]
    text = "\n".join(lines) + "\nAnswer:"
    return text + f" {LETTERS[question['answer']]}\n\n" if with_answer else text


def score_lettered(items: list[dict], prompts: list[str], ctx: EvalContext, desc: str) -> list[dict]:
    """Pick each item's answer by the log-likelihood of ' A'..' D'; audits and returns one record per item."""
    requests = [LoglikelihoodRequest(context=p, continuation=f" {letter}") for p in prompts for letter in LETTERS]
    scores = ctx.scorer.loglikelihood(requests, desc=desc)
    records = []
    for i, item in enumerate(items):
        lls = scores[4 * i : 4 * i + 4]
        prediction = lls.index(max(lls))
        record = {
            "id": item["id"],
            "group": item["group"],
            "loglikelihoods": dict(zip(LETTERS, lls)),
            "prediction": LETTERS[prediction],
            "answer": LETTERS[item["answer"]],
            "correct": prediction == item["answer"],
        }
        ctx.audit(record)
        records.append(record)
    return records


def accuracy_by(records: list[dict], key) -> dict[str, Metric]:
    """Accuracy of each group that `key(record)` names (None: counted in no group)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        if key(record) is not None:
            groups[key(record)].append(record["correct"])
    return {name: proportion(sum(hits), len(hits)) for name, hits in groups.items()}


def interleave(groups: dict[str, list[dict]], limit: int | None) -> list[dict]:
    """Round-robin over groups, so a `limit`-ed run still samples every subject."""
    mixed = [item for round_ in zip_longest(*groups.values()) for item in round_ if item is not None]
    return mixed[:limit] if limit is not None else mixed


def parse_answer(value, where: str) -> int:
    """An answer given as 0-3 or as a letter A-D, as an index."""
    text = str(value).strip().upper()
    if text in LETTERS:
        return LETTERS.index(text)
    if text in ("0", "1", "2", "3"):
        return int(text)
    raise UserError(f"{where}: answer must be 0-3 or A-D, got {value!r}")


def make_question(item_id: str, group: str, question: str, choices, answer, where: str) -> dict:
    choices = [str(c) for c in choices]
    if len(choices) != 4:
        raise UserError(f"{where}: expected 4 choices, got {len(choices)}")
    return {"id": item_id, "group": group, "question": question, "choices": choices, "answer": parse_answer(answer, where)}


def build_prompt(item: dict, shots: list[dict]) -> str:
    """Subject header, the answered shots, then the question ending in 'Answer:'."""
    topic = item["group"].replace("_", " ")
    return header(topic) + "".join(format_question(s, with_answer=True) for s in shots) + format_question(item)


# --- loading: the hub's cais/mmlu, or a directory of per-subject CSV files ---


def _read_csv(path: Path) -> list[list[str]]:
    """Rows of question, four choices, answer; the header line (if any) dropped.

    The original MMLU files have no header and letter answers; common converted
    copies add 'question,choice0,..,choice3,answer' and answers 0-3.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [row for row in csv.reader(f) if row]
    if rows and rows[0][0].strip().lower() == "question" and rows[0][-1].strip().lower() == "answer":
        rows = rows[1:]
    for row in rows:
        if len(row) != 6:
            raise UserError(f"{path}: expected 6 columns (question, 4 choices, answer), got {len(row)}")
    return rows


def _local_split(root: Path, split: str) -> dict[str, list[dict]]:
    """{subject: questions} from `{subject}_{split}.csv` files, else from files in the hub's layout."""
    csv_files = sorted(root.rglob(f"*_{split}.csv"))
    if not csv_files:
        return _group_by_subject(read_split_rows(root, split), str(root))
    by_subject = {}
    for path in csv_files:
        subject = path.name[: -len(f"_{split}.csv")]
        by_subject[subject] = [
            make_question(f"{subject}/{i}", subject, row[0], row[1:5], row[5], f"{path}:{i + 1}")
            for i, row in enumerate(_read_csv(path))
        ]
    return by_subject


def _group_by_subject(rows, where: str) -> dict[str, list[dict]]:
    """Rows of the hub's schema (question, subject, choices, answer) as {subject: questions}."""
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        subject = row["subject"]
        item_id = f"{subject}/{len(by_subject[subject])}"
        by_subject[subject].append(make_question(item_id, subject, row["question"], row["choices"], row["answer"], where))
    return dict(by_subject)


def _hub_split(dataset_id: str, split: str) -> dict[str, list[dict]]:
    return _group_by_subject(load_hub_dataset(dataset_id, split, name="all"), dataset_id)


class MMLU(Benchmark):
    name = "mmlu"
    option_names = ("num_shots",)
    default_source = "cais/mmlu"  # config all
    split = "test"
    local_file = "mmlu"  # a directory of {subject}_dev.csv and {subject}_test.csv
    description = "MMLU: 5-shot multiple choice over 57 subjects, answered by letter log-likelihood"
    own_prompt_format = "raw"  # its own text, never a chat template
    num_shots = 5

    def load(self, source: str | None, limit: int | None) -> list[dict]:
        """Test questions, each carrying the dev questions of its subject as `shots`."""
        source = source or self.default_source
        if is_local(source):
            root = Path(source).expanduser()
            test, dev = _local_split(root, "test"), _local_split(root, "dev")
        else:
            test, dev = _hub_split(source, "test"), _hub_split(source, "dev")
        if not test:
            raise UserError(f"{source}: no MMLU test questions found (expected {{subject}}_test.csv files, "
                            f"or the hub's all/test-*.parquet or test.jsonl)")
        missing = sorted(set(test) - set(dev))
        if missing:
            raise UserError(f"{source}: no dev questions (the few-shot examples) for {', '.join(missing)}")
        items = interleave(test, limit)
        return [{**item, "shots": dev[item["group"]]} for item in items]

    def settings(self, options: dict) -> dict:
        return {"num_shots": int(options.get("num_shots", self.num_shots))}

    def evaluate(self, items: list[dict], ctx: EvalContext) -> dict[str, Metric]:
        shots = self.settings(ctx.options)["num_shots"]
        prompts = [build_prompt(item, item["shots"][:shots]) for item in items]
        records = score_lettered(items, prompts, ctx, desc="mmlu")
        per_subject = accuracy_by(records, lambda r: r["group"])
        subjects = {s: {"category": SUBJECT_CATEGORY.get(s), "n": m.n, "correct": m.k} for s, m in sorted(per_subject.items())}
        for subject, counts in subjects.items():
            ctx.audit({"summary": "subject", "subject": subject, **counts})
        ctx.details["subjects"] = subjects
        categories = accuracy_by(records, lambda r: SUBJECT_CATEGORY.get(r["group"]))
        overall = proportion(sum(r["correct"] for r in records), len(records))
        return {"accuracy": overall, **{c: categories[c] for c in CATEGORY_SUBJECTS if c in categories}}
