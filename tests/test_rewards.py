"""Reward functions and the Lean REPL client (against tests/fake_lean_repl.py)."""

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from twophase.data.base.errors import UserError
from twophase.data.lean_workbook import DEFAULT_HEADER, LeanTask
from twophase.trainers.infra.lean_repl import (
    LeanRepl,
    LeanReplPool,
    ReplCrashed,
    ReplTimeout,
    split_imports,
    verdict,
)
from twophase.trainers.rewards import build_reward

FAKE_REPL = [sys.executable, str(Path(__file__).resolve().parent / "fake_lean_repl.py")]

TASK = LeanTask(id="t1", statement="theorem t1 (x : ℕ) : x + 0 = x := by\n", header="", informal="")


def tasks(n):
    return [TASK] * n


# ---------------------------------------------------------------- simple rewards

def test_random_reward_is_reproducible_per_seed_and_step():
    reward = build_reward("random", {"seed": 3})
    first = reward(tasks(6), ["a"] * 6, step=5)
    assert all(0.0 <= r < 1.0 for r in first)
    assert len(set(first)) == 6
    assert build_reward("random", {"seed": 3})(tasks(6), ["b"] * 6, step=5) == first  # a resumed run
    assert reward(tasks(6), ["a"] * 6, step=6) != first
    assert build_reward("random", {"seed": 4})(tasks(6), ["a"] * 6, step=5) != first


def test_zero_reward():
    assert build_reward("zero")(tasks(3), ["x", "", "proof"], step=2) == [0.0, 0.0, 0.0]


def test_toy_reward_values_by_hand():
    toy = build_reward("toy")
    # "ab_C" → a, b, _ count (3 of 4); "  simp" → 4 of 6; "" → 0; "XYZ1" → 0
    assert toy(tasks(4), ["ab_C", "  simp", "", "XYZ1"]) == [0.75, 4 / 6, 0.0, 0.0]


def test_reward_rejects_mismatched_lengths():
    with pytest.raises(UserError, match=r"^reward toy raised ValueError: 2 tasks but 1 completions"):
        build_reward("toy")(tasks(2), ["a"])


def double_length(tasks, completions, *, step=0, scale=1.0):
    return [scale * 2 * len(c) for c in completions]


class CountingReward:
    def __init__(self, start=0):
        self.start = start

    def __call__(self, tasks, completions, *, step=0):
        return [float(self.start + i) for i in range(len(completions))]


def test_module_function_spec_with_and_without_options():
    plain = build_reward("tests.test_rewards:double_length")
    assert plain(tasks(2), ["ab", "abc"]) == [4.0, 6.0]
    scaled = build_reward("tests.test_rewards:double_length", {"scale": 0.5})
    assert scaled(tasks(2), ["ab", "abc"]) == [2.0, 3.0]
    counting = build_reward("tests.test_rewards:CountingReward", {"start": 10})
    assert counting(tasks(2), ["", ""]) == [10.0, 11.0]


def test_bad_specs_are_user_errors_naming_the_valid_ones():
    with pytest.raises(UserError, match="lean, random, toy, zero"):
        build_reward("lenient")
    with pytest.raises(UserError, match="cannot import module"):
        build_reward("no_such_module_xyz:fn")
    with pytest.raises(UserError, match="no callable 'missing'"):
        build_reward("tests.test_rewards:missing")
    with pytest.raises(UserError, match="takes: seed"):
        build_reward("random", {"sed": 1})
    with pytest.raises(UserError, match="project_dir"):
        build_reward("lean", {})


# ---------------------------------------------------------------- verdicts

def _message(severity, data):
    return {"severity": severity, "pos": {"line": 1, "column": 0}, "endPos": {"line": 1, "column": 5}, "data": data}


def test_verdict_rules():
    assert verdict({"env": 3}) == (True, "ok")
    assert verdict({"messages": [_message("info", "Try this: ring")], "env": 3}) == (True, "ok")
    assert verdict({"messages": [_message("warning", "unused variable `h`")], "env": 3}) == (True, "ok")
    assert verdict({"messages": [_message("error", "unsolved goals\nx : ℕ\n⊢ x = x")], "env": 3}) == (
        False,
        "error: unsolved goals",
    )
    assert verdict({"sorries": [{"proofState": 0}], "env": 3}) == (False, "uses sorry")
    assert verdict({"messages": [_message("warning", "declaration uses 'sorry'")]}) == (False, "uses sorry")
    assert verdict({"messages": [_message("warning", "declaration uses `sorry`")]}) == (False, "uses sorry")
    assert verdict({"message": "Unknown environment."}) == (False, "repl error: Unknown environment.")


def test_split_imports():
    imports, body = split_imports(DEFAULT_HEADER + TASK.statement + "  simp\n")
    assert imports == "import Mathlib\nimport Aesop"
    assert body.startswith("set_option maxHeartbeats 0\n\nopen BigOperators")
    assert body.endswith(TASK.statement + "  simp\n")
    assert split_imports("theorem t : True := trivial") == ("", "theorem t : True := trivial")


# ---------------------------------------------------------------- the REPL client

def program(proof: str) -> str:
    return DEFAULT_HEADER + TASK.statement + proof


def test_repl_imports_header_once_and_checks_on_top_of_it(tmp_path):
    with LeanRepl(tmp_path, command=FAKE_REPL) as repl:
        assert verdict(repl.check(program("  simp\n"), timeout=5)) == (True, "ok")
        assert verdict(repl.check(program("  exact FAIL\n"), timeout=5)) == (False, "error: unknown identifier 'FAIL'")
        assert verdict(repl.check(program("  sorry\n"), timeout=5)) == (False, "uses sorry")
        # One import for three proofs: environment 0 holds the header.
        assert repl.header_envs == {"import Mathlib\nimport Aesop": 0}
        # A different import block gets its own environment in the same process.
        assert verdict(repl.check("import Mathlib\n\n" + TASK.statement + "  simp\n", timeout=5)) == (True, "ok")
        assert repl.header_envs == {"import Mathlib\nimport Aesop": 0, "import Mathlib": 4}
        assert repl.restarts == 0


def test_repl_send_reads_multiline_answers(tmp_path):
    with LeanRepl(tmp_path, command=FAKE_REPL) as repl:
        assert repl.send({"cmd": "import Mathlib"}, timeout=5) == {"env": 0}
        answer = repl.send({"cmd": "theorem a : 1 = 1 := by sorry", "env": 0}, timeout=5)
        assert answer["env"] == 1
        assert answer["sorries"][0]["pos"] == {"line": 1, "column": 24}
        assert answer["messages"][0]["data"] == "declaration uses 'sorry'"


def test_repl_timeout_restarts_the_process(tmp_path):
    with LeanRepl(tmp_path, command=FAKE_REPL) as repl:
        started = time.monotonic()
        with pytest.raises(ReplTimeout, match="timeout after 1s"):
            repl.check(program("  HANG\n"), timeout=1.0)
        assert time.monotonic() - started < 5
        assert repl.restarts == 1
        assert verdict(repl.check(program("  simp\n"), timeout=5)) == (True, "ok")


def test_repl_crash_restarts_and_the_next_proof_is_checked(tmp_path):
    with LeanRepl(tmp_path, command=FAKE_REPL) as repl:
        with pytest.raises(ReplCrashed, match="repl crashed: it exited.*CRASH requested"):
            repl.check(program("  CRASH\n"), timeout=5)
        assert repl.restarts == 1
        assert verdict(repl.check(program("  simp\n"), timeout=5)) == (True, "ok")
        assert repl.header_envs == {"import Mathlib\nimport Aesop": 0}  # a fresh process imported again


def test_repl_is_recycled_after_its_quota(tmp_path):
    with LeanRepl(tmp_path, command=FAKE_REPL, recycle_after=2) as repl:
        for _ in range(3):
            assert verdict(repl.check(program("  simp\n"), timeout=5)) == (True, "ok")
        assert repl.restarts == 1


def test_a_closed_repl_starts_no_new_process(tmp_path):
    """A check still in flight when the reward closes (an interrupted step) must not leave a fresh REPL behind."""
    repl = LeanRepl(tmp_path, command=FAKE_REPL)
    repl.close()
    with pytest.raises(ReplCrashed, match="repl closed"):
        repl.check(program("  simp\n"), timeout=5)
    repl.restart()
    assert repl._process is None and repl.restarts == 0


def test_pool_of_two_scores_every_case_in_order(tmp_path):
    proofs = ["  simp\n", "  HANG\n", "  exact FAIL\n", "  CRASH\n", "  sorry\n", "  omega\n"]
    with LeanReplPool(tmp_path, size=2, timeout=1.0, command=FAKE_REPL) as pool:
        started = time.monotonic()
        results = pool.check([program(p) for p in proofs])
        assert time.monotonic() - started < 8
        assert pool.restarts == 2
        again = pool.check([program("  simp\n")] * 4)
    assert results[0] == (True, "ok")
    assert results[1] == (False, "timeout after 1s")
    assert results[2] == (False, "error: unknown identifier 'FAIL'")
    assert results[3][0] is False and results[3][1].startswith("repl crashed:")
    assert results[4] == (False, "uses sorry")
    assert results[5] == (True, "ok")
    assert again == [(True, "ok")] * 4


def test_setup_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        LeanReplPool(tmp_path / "nowhere", command=FAKE_REPL)
    with pytest.raises(UserError, match="not on PATH"):
        LeanReplPool(tmp_path, command=["definitely-not-lake-xyz", "exe", "repl"])
    with pytest.raises(UserError, match="at least 1"):
        LeanReplPool(tmp_path, size=0, command=FAKE_REPL)


def test_lean_reward_scores_and_explains(tmp_path):
    reward = build_reward("lean", {"project_dir": str(tmp_path), "pool_size": 2, "timeout": 5, "command": FAKE_REPL})
    try:
        scores = reward(tasks(4), ["  simp\n```", "  sorry\n```", "  exact FAIL\n", "  simp\naxiom cheat : False\n"])
        assert scores == [1.0, 0.0, 0.0, 0.0]
        assert [d["reason"] for d in reward.details] == [
            "ok",
            "uses sorry",
            "error: unknown identifier 'FAIL'",
            "declares an axiom",
        ]
    finally:
        reward.close()


def test_lean_reward_chat_style_screens_answers(tmp_path):
    options = {"project_dir": str(tmp_path), "pool_size": 1, "command": FAKE_REPL, "prompt_format": "chat"}
    reward = build_reward("lean", options)
    try:
        good = "Plan: induction.\n```lean4\ntheorem t1 (x : ℕ) : x + 0 = x := by\n  simp\n```"
        easier = "```lean4\ntheorem t1 (x : ℕ) : x = x := by\n  rfl\n```"
        assert reward(tasks(3), [good, easier, "I could not do it."]) == [1.0, 0.0, 0.0]
        assert [d["reason"] for d in reward.details] == ["ok", "statement changed", "no lean4 block"]
    finally:
        reward.close()


def test_grpo_recipe_gives_the_lean_reward_its_prompt_format(tmp_path):
    from twophase.trainers.config import GRPOConfig, make_config
    from twophase.trainers.grpo import build_rewards

    lean = {"project_dir": str(tmp_path), "pool_size": 1, "command": FAKE_REPL}
    config = make_config(GRPOConfig, {"reward": "lean", "prompt_format": "chat", "reward_options": {"lean": lean}})
    reward = build_rewards(config)["lean"]
    try:
        assert reward.prompt_format == "chat"
        # a chat answer: its last lean4 block is checked, not the text before it
        answer = "Plan: simp.\n```lean4\ntheorem t1 (x : ℕ) : x + 0 = x := by\n  simp\n```"
        assert reward(tasks(1), [answer]) == [1.0]
    finally:
        reward.close()
    config = make_config(GRPOConfig, {"reward": "lean", "prompt_format": "chat",
                                      "reward_options": {"lean": {**lean, "prompt_format": "raw"}}})
    with pytest.raises(UserError, match="the reward would check the wrong part"):
        build_rewards(config)


# ---------------------------------------------------------------- the real thing, when available

REAL_PROJECT = os.environ.get("TWOPHASE_LEAN_PROJECT")
# The REPL command in that project, e.g. "lake env /home/me/lean/repl/.lake/build/bin/repl" (default: lake exe repl).
REAL_COMMAND = os.environ.get("TWOPHASE_LEAN_COMMAND")


@pytest.mark.skipif(
    shutil.which("lake") is None or not REAL_PROJECT,
    reason="needs `lake` on PATH and TWOPHASE_LEAN_PROJECT set to a Mathlib project with the REPL",
)
@pytest.mark.parametrize("backend", ["local", "server"])
def test_real_lean_repl_accepts_a_proof_and_rejects_sorry_and_errors(backend):
    import shlex

    from twophase.trainers.infra.lean_server import LeanCheckServer

    task = LeanTask(id="demo", statement="theorem demo (a b : ℝ) : a ^ 2 + b ^ 2 ≥ 2 * a * b := by\n", header="", informal="")
    command = shlex.split(REAL_COMMAND) if REAL_COMMAND else None
    pool = LeanReplPool(REAL_PROJECT, size=1, timeout=120, command=command) if backend == "server" else None
    server = LeanCheckServer(pool, "127.0.0.1", 0) if pool else None
    if server:
        import threading

        threading.Thread(target=server.serve_forever, daemon=True).start()
    options = {"server": server.url} if server else {"project_dir": REAL_PROJECT, "command": command}
    reward = build_reward("lean", {**options, "pool_size": 1, "timeout": 120})
    try:
        scores = reward([task] * 3, ["  nlinarith [sq_nonneg (a - b)]\n```", "  sorry\n```", "  exact rfl\n```"])
        assert scores == [1.0, 0.0, 0.0], reward.details
        assert reward.details[1]["reason"] == "uses sorry"
        assert reward.details[2]["reason"].startswith("error:")
    finally:
        reward.close()
        if server:
            server.shutdown()
            server.server_close()
            pool.close()
