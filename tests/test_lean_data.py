"""Lean task rows → LeanTask, prompts, and the program that gets checked."""

import json

import pytest

from twophase.data.base.errors import UserError
from twophase.data.lean_workbook import (
    DUPLICATE_STATEMENT,
    DEFAULT_HEADER,
    STOP_STRING,
    LeanTask,
    build_prompt,
    extract_proof,
    keeps_statement,
    load_lean_tasks,
    normalise_statement,
    parse_lean_row,
    program_to_check,
)

# Rows in the three schemas, written for these tests.
WORKBOOK_ROW = {
    "natural_language_statement": "Show that $x^2 \\geq 0$ for real $x$.",
    "answer": "",
    "tags": ["inequality"],
    "formal_statement": "theorem lean_workbook_7 (x : ℝ) : x ^ 2 ≥ 0  :=  by sorry",
    "split": "lean_workbook",
    "proof": ["theorem lean_workbook_7 (x : ℝ) : x ^ 2 ≥ 0 := by\n  positivity"],
}
WORKBOOK_HUB_ROW = dict(WORKBOOK_ROW, id="lean_workbook_plus_70", status="proved", tactic="", state_before="", state_after="")
MINIF2F_ROW = {
    "name": "mathd_algebra_1",
    "split": "test",
    "informal_prefix": "/-- What is $2+3$? Show that it is 5.-/\n",
    "formal_statement": "theorem mathd_algebra_1 : (2 : ℕ) + 3 = 5 := by\n",
    "goal": "⊢ 2 + 3 = 5",
    "header": DEFAULT_HEADER,
}
PROOFNET_HEADER = "import Mathlib\n\nopen Filter Set\nopen scoped Topology\n\n"
PROOFNET_ROW = {
    "name": "exercise_9_9",
    "split": "valid",
    "informal_prefix": "/-- Prove that a group of order 4 is abelian.-/\n",
    "formal_statement": "theorem exercise_9_9 {G : Type*} [Group G] [Fintype G]\n  (hG : Fintype.card G = 4) :\n  ∀ a b : G, a * b = b * a :=",
    "goal": "",
    "header": PROOFNET_HEADER,
}


def test_deepseek_row_keeps_its_statement_and_header():
    task = parse_lean_row(MINIF2F_ROW)
    assert task == LeanTask(
        id="mathd_algebra_1",
        statement="theorem mathd_algebra_1 : (2 : ℕ) + 3 = 5 := by\n",
        header=DEFAULT_HEADER,
        informal="/-- What is $2+3$? Show that it is 5.-/\n",
    )


def test_proofnet_statement_ending_in_bare_assign_gets_by():
    task = parse_lean_row(PROOFNET_ROW)
    assert task.statement.endswith("∀ a b : G, a * b = b * a := by\n")
    assert task.statement.startswith("theorem exercise_9_9 {G : Type*}")
    assert task.header == PROOFNET_HEADER


def test_workbook_row_drops_sorry_and_takes_id_from_theorem_name():
    task = parse_lean_row(WORKBOOK_ROW)
    assert task.id == "lean_workbook_7"
    assert task.statement == "theorem lean_workbook_7 (x : ℝ) : x ^ 2 ≥ 0 := by\n"
    assert task.header == ""
    assert task.informal == "Show that $x^2 \\geq 0$ for real $x$."


def test_hub_row_id_field_wins_over_theorem_name():
    assert parse_lean_row(WORKBOOK_HUB_ROW).id == "lean_workbook_plus_70"


@pytest.mark.parametrize(
    "text",
    [
        "theorem t : 1 = 1 := by sorry",
        "theorem t : 1 = 1 := by\n  sorry\n",
        "theorem t : 1 = 1 := sorry",
        "theorem t : 1 = 1 :=",
        "theorem t : 1 = 1 := by\n",
        "theorem t : 1 = 1 := by",
    ],
)
def test_statement_endings_are_normalised(text):
    assert normalise_statement(text) == "theorem t : 1 = 1 := by\n"


def test_statement_with_a_proof_or_without_assign_is_rejected():
    assert normalise_statement("theorem t : 1 = 1 := by rfl") is None
    assert normalise_statement("theorem t : 1 = 1") is None


def test_imports_inside_the_statement_move_to_the_header():
    row = {"formal_statement": "import Mathlib\nopen Real\n\ntheorem t : 1 = 1 := by sorry"}
    task = parse_lean_row(row)
    assert task.header == "import Mathlib\nopen Real\n\n"
    assert task.statement == "theorem t : 1 = 1 := by\n"
    assert task.id == "t"


def test_rows_without_statement_give_none():
    assert parse_lean_row({"name": "x", "formal_statement": ""}) is None
    assert parse_lean_row({"natural_language_statement": "only words"}) is None
    assert parse_lean_row("not a row") is None


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_loader_counts_skipped_rows_by_reason(tmp_path):
    source = _write_jsonl(
        tmp_path / "tasks.jsonl",
        [
            json.dumps(dict(WORKBOOK_ROW, split="train")),
            json.dumps({"natural_language_statement": "no formal one", "split": "train"}),
            "{this is not json",
            json.dumps(dict(MINIF2F_ROW, split="test")),
            json.dumps(dict(PROOFNET_ROW, split="train")),
        ],
    )
    tasks, report = load_lean_tasks(source, split="train")
    assert [t.id for t in tasks] == ["lean_workbook_7", "exercise_9_9"]
    assert report["rows"] == 5
    assert report["used"] == 2
    assert report["skipped"] == {"malformed JSON": 1, "split is not 'train'": 1, "no formal statement": 1}


def test_loader_drops_repeated_theorems_and_renames_ids_of_different_ones(tmp_path):
    other_theorem = dict(MINIF2F_ROW, formal_statement="theorem mathd_algebra_1 : (2 : ℕ) + 2 = 4 := by\n")
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps([MINIF2F_ROW, MINIF2F_ROW, other_theorem, PROOFNET_ROW, MINIF2F_ROW]), encoding="utf-8")
    tasks, report = load_lean_tasks(str(path), split="all")
    # the same theorem three times: kept once, the two repeats counted; a different theorem under the same id: renamed
    assert [t.id for t in tasks] == ["mathd_algebra_1", "mathd_algebra_1#2", "exercise_9_9"]
    assert "+ 2 = 4" in tasks[1].statement
    assert report == {"rows": 5, "used": 3, "skipped": {DUPLICATE_STATEMENT: 2}, "duplicate_ids": 1}
    tasks, report = load_lean_tasks(str(path), split="all", limit=2)
    assert [t.id for t in tasks] == ["mathd_algebra_1", "mathd_algebra_1#2"] and report["used"] == 2


def test_the_same_theorem_under_another_name_or_spacing_is_a_duplicate(tmp_path):
    base = "theorem lean_workbook_1 (x : ℝ) (h : 0 < x) : 0 < x ^ 2 := by\n"
    rows = [
        {"id": "lean_workbook_1", "formal_statement": base},
        {"id": "lean_workbook_2", "formal_statement": base.replace("lean_workbook_1", "lean_workbook_plus_77")},  # renamed
        {"id": "lean_workbook_3", "formal_statement": "theorem  lean_workbook_3 (x:ℝ)\n    (h : 0 <  x) :  0 < x ^ 2 := by\n"},
        {"id": "lean_workbook_4", "formal_statement": "lemma lean_workbook_4 ( x : ℝ ) ( h : 0 < x ) : 0 < x ^ 2 := by\n"},  # lemma
        {"id": "lean_workbook_5", "formal_statement": base.replace("x ^ 2", "x ^ 3")},  # another theorem
        {"id": "lean_workbook_6", "formal_statement": base.replace("0 < x ^ 2", "0 <x^2")},  # spaces inside a term: kept
    ]
    path = tmp_path / "workbook.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    tasks, report = load_lean_tasks(str(path), split="all")
    assert [t.id for t in tasks] == ["lean_workbook_1", "lean_workbook_5", "lean_workbook_6"]
    assert report["skipped"] == {DUPLICATE_STATEMENT: 3} and report["used"] == 3 and report["rows"] == 6


def test_loader_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_lean_tasks(str(tmp_path / "missing.jsonl"))
    only_test = _write_jsonl(tmp_path / "t.jsonl", [json.dumps(MINIF2F_ROW)])
    with pytest.raises(UserError, match="'test' \\(1 rows\\)"):
        load_lean_tasks(only_test, split="train")
    (tmp_path / "d.json").write_text('{"tasks": []}', encoding="utf-8")
    with pytest.raises(UserError, match="not a list"):
        load_lean_tasks(str(tmp_path / "d.json"))


def test_bundled_demo_set_loads_completely():
    tasks, report = load_lean_tasks("data/samples/lean_demo.jsonl")
    assert report == {"rows": 12, "used": 12, "skipped": {}, "duplicate_ids": 0}
    assert all(t.statement.endswith(":= by\n") and "sorry" not in t.statement for t in tasks)
    assert tasks[0].id == "lean_workbook_demo_1"


# ---------------------------------------------------------------- prompts

def test_raw_prompt_is_deepseek_v15_format():
    task = parse_lean_row(MINIF2F_ROW)
    assert build_prompt(task, "raw") == (
        "Complete the following Lean 4 code:\n\n```lean4\n"
        "import Mathlib\nimport Aesop\n\nset_option maxHeartbeats 0\n\nopen BigOperators Real Nat Topology Rat\n\n"
        "/-- What is $2+3$? Show that it is 5.-/\n"
        "theorem mathd_algebra_1 : (2 : ℕ) + 3 = 5 := by\n"
    )


def test_raw_prompt_wraps_plain_informal_text_and_uses_default_header():
    task = parse_lean_row(WORKBOOK_ROW)
    assert build_prompt(task, "raw") == (
        "Complete the following Lean 4 code:\n\n```lean4\n"
        + DEFAULT_HEADER
        + "/-- Show that $x^2 \\geq 0$ for real $x$. -/\n"
        + "theorem lean_workbook_7 (x : ℝ) : x ^ 2 ≥ 0 := by\n"
    )
    bare = LeanTask(id="t", statement="theorem t : True := by\n", header="", informal="")
    assert build_prompt(bare) == "Complete the following Lean 4 code:\n\n```lean4\n" + DEFAULT_HEADER + bare.statement


class TemplateTokenizer:
    """Just enough of a tokenizer: a chat template that shows its input plainly."""

    chat_template = "user/assistant"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


def test_chat_prompt_is_deepseek_v2_message_inside_the_template():
    task = parse_lean_row(PROOFNET_ROW)
    prompt = build_prompt(task, "chat", tokenizer=TemplateTokenizer())
    expected_message = (
        "Complete the following Lean 4 code:\n\n```lean4\n"
        + PROOFNET_HEADER
        + "/-- Prove that a group of order 4 is abelian.-/\n"
        + task.statement
        + "  sorry```\n\n"
        "Before producing the Lean 4 code to formally prove the given theorem, provide a detailed proof plan "
        "outlining the main proof steps and strategies.\n"
        "The plan should highlight key ideas, intermediate lemmas, and proof structures that will guide the "
        "construction of the final formal proof."
    )
    assert prompt == "<user>" + expected_message + "</user><assistant>"


def test_chat_prompt_with_a_real_tokenizer_template(tiny_chat_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    prompt = build_prompt(parse_lean_row(MINIF2F_ROW), "chat", tokenizer=tokenizer)
    assert prompt.startswith("<s>User: Complete the following Lean 4 code:")
    assert ":= by\n  sorry```" in prompt
    assert prompt.endswith("final formal proof.\n\nAssistant:")


def test_chat_prompt_without_template_is_a_user_error():
    """Checked once where a GRPO run starts (trainers/grpo.py: check_format), not for every prompt."""
    from twophase.data.prompts import GRPO_FORMATS, check_format

    with pytest.raises(UserError, match="chat template"):
        check_format("chat", GRPO_FORMATS, None)

    class NoTemplate:
        chat_template = None

    with pytest.raises(UserError, match="chat template"):
        check_format("chat", GRPO_FORMATS, NoTemplate())
    with pytest.raises(UserError, match="raw, chat"):
        check_format("fancy", GRPO_FORMATS, None)


# ---------------------------------------------------------------- answers

def test_raw_extraction_cuts_at_the_first_fence():
    assert STOP_STRING == "```"
    assert extract_proof("  norm_num\n```\nMore text ```", "raw") == "  norm_num\n"
    assert extract_proof("  simp", "raw") == "  simp"


CHAT_ANSWER = (
    "Plan: first try\n```lean4\ntheorem draft : 1 = 1 := by\n  sorry\n```\n"
    "Then the final proof:\n```lean4\ntheorem mathd_algebra_1 : (2 : ℕ) + 3 = 5 := by\n  norm_num\n```\nDone."
)


def test_chat_extraction_takes_the_last_lean4_block():
    assert extract_proof(CHAT_ANSWER, "chat") == "theorem mathd_algebra_1 : (2 : ℕ) + 3 = 5 := by\n  norm_num\n"
    assert extract_proof("no code here", "chat") == ""
    assert extract_proof("```lean4\ntheorem cut : True := by\n  triv", "chat") == "theorem cut : True := by\n  triv"


def test_program_to_check_raw_and_chat():
    task = parse_lean_row(MINIF2F_ROW)
    assert program_to_check(task, "  norm_num\n```", "raw") == DEFAULT_HEADER + task.statement + "  norm_num\n"
    assert program_to_check(task, CHAT_ANSWER, "chat") == (
        DEFAULT_HEADER + "theorem mathd_algebra_1 : (2 : ℕ) + 3 = 5 := by\n  norm_num\n"
    )
    own_header = "```lean4\nimport Mathlib\n\ntheorem mathd_algebra_1 : (2 : ℕ) + 3 = 5 := by\n  rfl\n```"
    assert program_to_check(task, own_header, "chat") == (
        "import Mathlib\n\ntheorem mathd_algebra_1 : (2 : ℕ) + 3 = 5 := by\n  rfl\n"
    )


def test_keeps_statement_ignores_layout_but_not_content():
    task = parse_lean_row(MINIF2F_ROW)
    assert keeps_statement(task, "theorem mathd_algebra_1 :\n    (2 : ℕ) + 3 = 5 := by\n  norm_num")
    assert not keeps_statement(task, "theorem mathd_algebra_1 : (2 : ℕ) + 3 = 6 := by\n  norm_num")


def test_hub_source_goes_through_datasets_with_the_hub_schema(monkeypatch):
    """A hub id (not a path) is loaded with `datasets`; rows in the hub's train-view schema parse."""
    import twophase.data.lean_workbook as lw

    calls = []
    hub_rows = [
        {"id": "lean_workbook_7", "natural_language_statement": "Show 1 + 1 = 2.", "answer": "", "tags": [],
         "formal_statement": "theorem lean_workbook_7 : (1 : ℕ) + 1 = 2 := by sorry", "split": "lean_workbook",
         "proof": [], "status": "proved", "tactic": "", "state_before": "", "state_after": ""},
        {"id": "lean_workbook_8", "natural_language_statement": "no statement", "formal_statement": ""},
    ]  # fmt: skip

    def fake_load(dataset_id, split, **kwargs):
        calls.append((dataset_id, split))
        return hub_rows

    monkeypatch.setattr(lw, "load_hub_dataset", fake_load)
    tasks, report = lw.load_lean_tasks("internlm/Lean-Workbook", split="train")
    assert calls == [("internlm/Lean-Workbook", "train")]
    assert [t.id for t in tasks] == ["lean_workbook_7"]
    assert tasks[0].statement == "theorem lean_workbook_7 : (1 : ℕ) + 1 = 2 := by\n"
    assert report["rows"] == 2 and report["used"] == 1 and sum(report["skipped"].values()) == 1


def test_a_missing_local_file_is_not_sent_to_the_hub(tmp_path):
    import pytest

    from twophase.data.base.errors import UserError
    from twophase.data.lean_workbook import load_lean_tasks

    with pytest.raises(UserError, match="no such file"):
        load_lean_tasks(str(tmp_path / "tasks.jsonl"))
