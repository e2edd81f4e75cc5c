"""pass@k and the sandboxed executor that HumanEval's verdicts rest on."""

import math
import time
from pathlib import Path

import pytest

from eval.benchmarks.humaneval import STOP_SEQUENCES, build_program, check_completion, check_completions, truncate_completion
from eval.execution import run_python
from eval.metrics import pass_at_k

# --------------------------------------------------------------------------- pass@k


def pass_at_k_by_definition(n, c, k):
    return 1 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20])
def test_pass_at_k_matches_the_binomial_definition(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(pass_at_k_by_definition(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_does_not_overflow():
    # C(1000, 500) is ~1e299 and C(1000, 600) overflows a float: the product form must not care.
    value = pass_at_k(1000, 3, 100)
    assert value == pytest.approx(1 - math.comb(997, 100) / math.comb(1000, 100), rel=1e-12)
    assert 0.0 < pass_at_k(1000, 1, 600) < 1.0
    assert pass_at_k(1000, 1, 600) == pytest.approx(0.6, abs=1e-12)  # one pass among n: k/n
    assert pass_at_k(1000, 500, 1) == pytest.approx(0.5, abs=1e-12)  # pass@1 is c/n


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 6, 5) == 1.0  # only 4 failures: any 5 samples hold a pass
    assert pass_at_k(10, 5, 5) < 1.0  # exactly 5 failures: all-fail draw possible
    for bad in [(5, 6, 1), (5, -1, 1), (5, 1, 0), (5, 1, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


# --------------------------------------------------------------------------- completion cutting


@pytest.mark.parametrize("stop", STOP_SEQUENCES)
def test_completion_is_cut_at_each_stop_sequence(stop):
    body = "    return a + b\n"
    assert truncate_completion(body + stop + " rest\n    more") == body
    assert truncate_completion(body) == body


def test_completion_is_cut_at_the_earliest_stop():
    text = "    x = 1\n# note\ndef g():\n    pass\nclass C: pass"
    assert truncate_completion(text) == "    x = 1"
    assert truncate_completion("    if a:\n        return 1\n    return 2") == "    if a:\n        return 1\n    return 2"


# --------------------------------------------------------------------------- the executor

ADD = {
    "task_id": "Test/0",
    "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
    "entry_point": "add",
    "canonical_solution": "    return a + b\n",
    "test": "\n\ndef check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
}


def verdict(completion, timeout=3.0):
    start = time.monotonic()
    passed, reason = check_completion(ADD, completion, timeout=timeout)
    return passed, reason, time.monotonic() - start


def test_program_layout_is_prompt_completion_test_check_then_sentinel():
    program = build_program(ADD, "    return a + b\n", "SENTINEL")
    expected = ADD["prompt"] + "    return a + b\n" + "\n" + ADD["test"] + "\n" + "check(add)" + "\n" + "print('SENTINEL', flush=True)\n"
    assert program == expected


def test_correct_completion_passes():
    passed, reason, seconds = verdict(ADD["canonical_solution"])
    assert (passed, reason) == (True, "passed")
    assert seconds < 2.0


def test_wrong_completion_fails_with_the_assertion():
    passed, reason, _ = verdict("    return a - b\n")
    assert not passed
    assert reason.startswith("failed: AssertionError")


def test_syntax_error_is_a_failure():
    passed, reason, _ = verdict("    return a +\n")
    assert not passed and reason.startswith("failed: SyntaxError")


def test_hanging_program_times_out_promptly():
    passed, reason, seconds = verdict("    while True:\n        pass\n", timeout=1.0)
    assert (passed, reason) == (False, "timed out after 1s")
    assert seconds < 3.0


def process_is_gone(pid: int, wait: float = 2.0) -> bool:
    """No such process, or only a zombie waiting to be reaped (killed all the same)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_timeout_kills_the_programs_children_too():
    program = "import subprocess, time\nchild = subprocess.Popen(['sleep', '30'])\nprint(child.pid, flush=True)\ntime.sleep(30)\n"
    start = time.monotonic()
    result = run_python(program, timeout=1.0)
    assert result.timed_out and time.monotonic() - start < 3.0
    child = int(result.stdout.split()[0])
    assert process_is_gone(child), "the program's child outlived the timeout"


@pytest.mark.parametrize("exit_code", ["import os; os._exit(0)", "import sys; sys.exit(0)", "exit()"])
def test_exiting_with_status_zero_before_the_checks_is_not_a_pass(exit_code):
    # Status 0 alone would count these as passed; the sentinel after check() does not.
    passed, reason, seconds = verdict("    return a - b\n" + exit_code + "\n")
    assert not passed
    assert reason == "exited with status 0 before the checks finished"
    assert seconds < 2.0


def test_nonzero_exit_is_reported_with_its_status():
    passed, reason, _ = verdict("    return a + b\nimport sys; sys.exit(3)\n")
    assert (passed, reason) == (False, "exited with status 3")


def test_program_killed_by_a_signal_is_a_failure():
    passed, reason, _ = verdict("    return a + b\nimport os, signal; os.kill(os.getpid(), signal.SIGKILL)\n")
    assert (passed, reason) == (False, "killed by signal SIGKILL")


def test_memory_hungry_program_hits_the_address_space_limit():
    passed, reason, seconds = verdict("    return a + b\nhog = bytearray(8 * 1024 ** 3)\n")
    assert (passed, reason) == (False, "failed: MemoryError")
    assert seconds < 2.0


def test_flood_of_output_is_stopped_by_the_file_size_limit():
    passed, reason, seconds = verdict("    return a + b\nwhile True:\n    print('x' * 100000)\n", timeout=5.0)
    assert not passed and "File too large" in reason
    assert seconds < 4.0


def test_program_reading_stdin_sees_end_of_file():
    passed, reason, _ = verdict("    return a + b\ninput()\n")
    assert (passed, reason) == (False, "failed: EOFError: EOF when reading a line")


def test_program_runs_in_a_fresh_directory_and_isolated_mode():
    # cwd is an empty temporary directory, and -I keeps the current directory off sys.path.
    completion = (
        "    return a + b\nimport os, sys\n"
        "assert sorted(os.listdir('.')) == ['program.py', 'stderr', 'stdout'], os.listdir('.')\n"
        "assert sys.flags.isolated == 1\n"
    )
    passed, reason, _ = verdict(completion)
    assert (passed, reason) == (True, "passed")


def test_checks_run_in_parallel_and_keep_their_order():
    completions = ["    return a + b\n", "    return a - b\n", "    while True: pass\n", "    return a + b\n"]
    start = time.monotonic()
    results = check_completions([ADD] * 4, completions, timeout=1.0, workers=4)
    assert [passed for passed, _ in results] == [True, False, False, True]
    assert results[2][1] == "timed out after 1s"
    assert time.monotonic() - start < 3.0
