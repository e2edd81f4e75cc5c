"""Your own data: each accepted row schema, detected per file, with malformed rows counted (data/preferences.py,
data/prompt_rows.py), and the three-row examples of trainers/README.md read as they are written."""

import json

import pytest


from twophase.data.hh_rlhf import PreferencePair
from twophase.data.preferences import CONVERSATIONAL, HH, IMPLICIT, PLAIN, load_preferences
from twophase.data.prompt_rows import LEAN, PROMPT, PromptTask, load_tasks, prompt_text
from twophase.data.prompts import format_transcript


def write_rows(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_plain_layout_with_malformed_rows_counted(tmp_path):
    path = write_rows(tmp_path, [
        {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."},
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": ""},
        "{not json",
        {"prompt": "Same?", "chosen": "yes", "rejected": "yes"},
        {"prompt": ["not", "text"], "chosen": "a", "rejected": "b"},
    ])
    pairs, report = load_preferences(path)
    assert report["schema"] == PLAIN
    assert (report["rows"], report["used"]) == (5, 1)
    assert report["skipped"] == {"empty rejected response": 1, "malformed JSON": 1, "chosen and rejected identical": 1,
                                 "fields of another schema": 1}
    assert pairs == [PreferencePair(({"role": "user", "content": "What is 2+2?"},), " 4.", " 5.")]
    assert format_transcript(pairs[0].prompt, "hh") == "\n\nHuman: What is 2+2?\n\nAssistant:"


def test_conversational_layout(tmp_path):
    path = write_rows(tmp_path, [
        {"prompt": [{"role": "system", "content": "Be brief."}, user("Hi?")], "chosen": [assistant("Hello.")],
         "rejected": [assistant("Go away.")]},
        {"prompt": [user("Two?")], "chosen": [assistant("a"), assistant("b")], "rejected": [assistant("c")]},
        {"prompt": [{"role": "robot", "content": "x"}], "chosen": [assistant("a")], "rejected": [assistant("c")]},
    ])
    pairs, report = load_preferences(path)
    assert report["schema"] == CONVERSATIONAL
    assert (report["rows"], report["used"]) == (3, 1)
    assert report["skipped"] == {"reply is not one assistant message": 1, "not a list of chat messages": 1}
    assert pairs[0].chosen == " Hello." and pairs[0].rejected == " Go away."
    assert format_transcript(pairs[0].prompt, "hh") == "\n\nHuman: Be brief.\n\nHi?\n\nAssistant:"


def test_conversational_layout_with_implicit_prompt(tmp_path):
    shared = [user("Help me?"), assistant("With what?"), user("A lock.")]
    path = write_rows(tmp_path, [
        {"chosen": shared + [assistant("I can't help.")], "rejected": shared + [assistant("Sure, first...")]},
        {"chosen": shared + [assistant("No.")], "rejected": [user("Other.")] + [assistant("Yes.")]},
        {"chosen": shared, "rejected": shared + [assistant("x")]},
    ])
    pairs, report = load_preferences(path)
    assert report["schema"] == IMPLICIT
    assert report["skipped"] == {"chosen and rejected prompts differ": 1, "no Assistant turn": 1}
    assert format_transcript(pairs[0].prompt, "hh") == (
        "\n\nHuman: Help me?\n\nAssistant: With what?\n\nHuman: A lock.\n\nAssistant:")
    assert pairs[0].chosen == " I can't help."


def test_hh_layout_is_detected_and_parsed_as_before(tmp_path):
    path = write_rows(tmp_path, [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}])
    pairs, report = load_preferences(path)
    assert report["schema"] == HH
    assert pairs == [PreferencePair("\n\nHuman: Hi\n\nAssistant:", " Hello", " Go")]


def test_prompt_only_grpo_rows(tmp_path):
    path = write_rows(tmp_path, [
        {"prompt": "What is 2+3?", "answer": "5"},
        {"id": "q2", "prompt": [user("Name a prime.")], "answer": "7"},
        {"prompt": ""},
        [1, 2],
    ])
    tasks, report = load_tasks(path)
    assert report == {"schema": PROMPT, "rows": 4, "used": 2, "skipped": {"no prompt": 1, "row is not an object": 1}}
    assert tasks[0] == PromptTask("row-1", "What is 2+3?", {"answer": "5"})
    assert tasks[1].id == "q2" and tasks[1].fields == {"id": "q2", "answer": "7"}
    assert prompt_text(tasks[0], "raw") == "What is 2+3?"


def test_lean_rows_keep_their_loader(tmp_path):
    from twophase.data.lean_workbook import LeanTask

    path = write_rows(tmp_path, [{"formal_statement": "theorem t : 1 = 1 := by sorry", "split": "train"}])
    tasks, report = load_tasks(path)
    assert report["schema"] == LEAN and isinstance(tasks[0], LeanTask)


REWARD_FILE = '''
def length_is_answer(tasks, completions, *, step=0, scale=1.0):
    return [scale * float(len(c) == len(t.fields["answer"])) for t, c in zip(tasks, completions)]
'''


def test_reward_from_a_file_path_and_from_the_working_directory(tmp_path, monkeypatch):
    from twophase.trainers.rewards import build_reward

    (tmp_path / "my_reward.py").write_text(REWARD_FILE)
    tasks = [PromptTask("a", "q", {"answer": "12"}), PromptTask("b", "q", {"answer": "1"})]
    by_path = build_reward(f"{tmp_path / 'my_reward.py'}:length_is_answer", {"scale": 2.0})
    assert by_path(tasks, ["ab", "ab"]) == [2.0, 0.0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    by_module = build_reward("my_reward:length_is_answer")
    assert by_module(tasks, ["x", "y"]) == [0.0, 1.0]


def test_dpo_and_grpo_train_on_own_data(tiny_chat_model_dir, tmp_path, capsys):
    from twophase.launch.cli import main

    dpo_data = write_rows(tmp_path, [{"prompt": [user(f"Question {i}?")], "chosen": [assistant("No.")],
                                      "rejected": [assistant(f"Sure {i}.")]} for i in range(3)] + ["oops"], "pairs.jsonl")
    common = ["--set", f"model={tiny_chat_model_dir}", "--set", "max_steps=1", "--set", "device=cpu",
              "--set", "precision=fp32", "--set", "optimizer=adamw", "--set", "save_every=0"]
    main(["dpo", "--set", f"dataset={dpo_data}", "--set", f"out_dir={tmp_path / 'dpo'}", "--set", "micro_batch_size=2",
          "--set", "grad_accum_steps=1", "--set", "merge_after=false", "--set", "prompt_format=chat", *common])
    out = capsys.readouterr().out + capsys.readouterr().err
    (tmp_path / "r.py").write_text(REWARD_FILE)
    grpo_data = write_rows(tmp_path, [{"prompt": "2+3?", "answer": "5"}, {"prompt": [user("4+4?")], "answer": "8"}], "prompts.jsonl")
    main(["grpo", "--set", f"dataset={grpo_data}", "--set", f"out_dir={tmp_path / 'grpo'}", "--set", "prompt_format=chat",
          "--set", f"reward={tmp_path / 'r.py'}:length_is_answer", "--set", "num_generations=2", "--set", "max_new_tokens=3",
          "--set", "prompts_per_step=2", *common])
    logged = out + capsys.readouterr().out
    assert f"{dpo_data} (schema: conversational): used 3 of 4 rows; skipped 1 malformed JSON" in logged
    assert f"{grpo_data} (schema: prompt): used 2 of 2 rows" in logged
    samples = [json.loads(line) for line in (tmp_path / "grpo" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    for sample in samples:
        answer = "5" if sample["task_id"] == "row-1" else "8"
        assert list(sample["rewards"].values()) == [float(len(sample["completion"]) == len(answer))]
    metrics = json.loads((tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert "reward/length_is_answer" in metrics and not any(str(tmp_path) in key for key in metrics)  # the function's name
    assert "used 2 of 2 rows; skipped none" in logged  # skip reasons as words, not a Python dict


def test_the_readme_examples_load_as_their_layouts(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "trainers" / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    blocks = [block.split("```", 1)[0] for block in section.split("```jsonl\n")[1:]]
    assert len(blocks) == 6
    for number, (block, layout) in enumerate(zip(blocks[:4], [HH, PLAIN, CONVERSATIONAL, IMPLICIT])):
        pairs, report = load_preferences(write_rows(tmp_path, block.strip().splitlines(), f"p{number}.jsonl"))
        assert (report["schema"], report["used"], report["rows"]) == (layout, 3, 3), layout
    for number, (block, layout) in enumerate(zip(blocks[4:], [LEAN, PROMPT])):
        tasks, report = load_tasks(write_rows(tmp_path, block.strip().splitlines(), f"t{number}.jsonl"))
        assert (report["schema"], report["used"], report["rows"]) == (layout, 3, 3), layout


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet"])
def test_one_row_reader_for_dpo_and_grpo_in_every_file_format(suffix, tmp_path):
    """The same rows in each format give the same pairs, tasks and skip counts (data/base/rows.py)."""
    import csv
    import gzip

    import pyarrow
    import pyarrow.parquet

    pairs_rows = [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
                  {"prompt": "2+2?", "chosen": "4", "rejected": "4"}]  # fmt: skip
    task_rows = [{"prompt": "Say hi."}, {"prompt": ""}]

    def write(rows, name):
        path = tmp_path / (name + suffix)
        if suffix == ".parquet":
            pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
        elif suffix == ".csv":
            with open(path, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        else:
            text = json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
            path.write_bytes(gzip.compress(text.encode()) if suffix.endswith(".gz") else text.encode())
        return str(path)

    pairs, report = load_preferences(write(pairs_rows, "pairs"))
    assert (report["schema"], report["rows"], report["used"], report["skipped"]) == (PLAIN, 2, 1, {"chosen and rejected identical": 1})
    assert (pairs[0].chosen, pairs[0].rejected) == (" Hello.", " Go away.")  # plain replies follow the HH layout
    tasks, report = load_tasks(write(task_rows, "tasks"))
    assert (report["schema"], report["rows"], report["used"], report["skipped"]) == (PROMPT, 2, 1, {"no prompt": 1})
