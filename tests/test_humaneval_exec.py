"""pass@k, the plain data that crosses the sandbox, and HumanEval verdicts that the program cannot forge.

The containment of the programs themselves (network, files, processes,
limits) is tested in test_sandbox.py.
"""

import math
import time
from collections import namedtuple

import pytest

from twophase.eval.benchmarks.humaneval import STOP_SEQUENCES, build_program, check_completion, check_completions, truncate_completion
from twophase.eval.benchmarks.metrics import pass_at_k
from twophase.eval.sandbox.plain_data import MAX_LINE_BYTES, UnreadableData, decode, encode, to_plain

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


# --------------------------------------------------------------------------- plain data


@pytest.fixture
def big_int_text():
    """Integers of any size as text, as the checker and the candidate server allow (Python >= 3.11 caps it)."""
    import sys

    if not hasattr(sys, "set_int_max_str_digits"):
        yield
        return
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    yield
    sys.set_int_max_str_digits(before)


def test_plain_data_round_trips_exactly_including_non_literal_floats(big_int_text):
    value = {
        "ints": [0, -7, 10**5000, True, False],
        "floats": (0.1, -0.0, 1e308, float("inf"), float("-inf")),
        "complex": [1 + 2j, complex(0, float("inf"))],
        "text": ["line\nbreak", "tab\t", "\u2028 and \x85", "héllo", "\ud800"],
        "bytes": b"\x00\n\xff",
        "nested": {(1, 2): {3, 4}, "empty": [set(), {}, (), ""]},
        None: None,
    }
    line = encode(to_plain(value))
    assert line.count(b"\n") == 1 and line.endswith(b"\n")  # one message, one line
    back = decode(line)
    assert back == value
    assert math.copysign(1.0, back["floats"][1]) == -1.0
    assert math.isnan(decode(encode(float("nan"))))


def test_to_plain_sends_the_plain_type_never_an_overridden_eq():
    class Yes(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    class Anything:
        def __eq__(self, other):
            return True

    point = namedtuple("Point", "x y")
    assert type(to_plain(Yes(0))) is int and to_plain(Yes(0)) == 0 and to_plain(Yes(0)) != 3
    assert type(to_plain(point(1, 2))) is tuple
    assert to_plain([frozenset({1})]) == [{1}]
    for value in (Anything(), [Anything()], iter([1]), range(3), print):
        with pytest.raises(TypeError, match="cannot be checked"):
            to_plain(value)


@pytest.mark.parametrize(
    "line",
    [
        b"__import__('os').system('true')\n",
        b"print\n",
        b"(lambda: 1)()\n",
        b"[1, 2\n",
        b"{[1]: 2}\n",  # unhashable key
        b"(1, 2)",  # no line end: cut off
        b"[" + b"0, " * (MAX_LINE_BYTES // 3) + b"]\n",  # over the size limit
        b"\xff\n",
    ],
)
def test_decode_reads_data_and_nothing_else(line):
    with pytest.raises(UnreadableData):
        decode(line)


# --------------------------------------------------------------------------- verdicts

ADD = {
    "task_id": "Test/0",
    "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
    "entry_point": "add",
    "canonical_solution": "    return a + b\n",
    "test": "\n\ndef check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
}


def verdict(completion, timeout=3.0, problem=ADD):
    start = time.monotonic()
    passed, reason = check_completion(problem, completion, timeout=timeout)
    return passed, reason, time.monotonic() - start


def test_program_is_the_prompt_then_the_completion():
    # The tests are not part of it: they run in the checker, outside the sandbox.
    assert build_program(ADD, "    return a + b\n") == ADD["prompt"] + "    return a + b\n" + "\n"


def test_correct_completion_passes():
    passed, reason, seconds = verdict(ADD["canonical_solution"])
    assert (passed, reason) == (True, "passed")
    assert seconds < 2.0


def test_wrong_completion_fails_with_the_assertion():
    passed, reason, _ = verdict("    return a - b\n")
    assert (passed, reason) == (False, "failed: AssertionError")


def test_syntax_error_is_a_failure():
    passed, reason, _ = verdict("    return a +\n")
    assert not passed and reason.startswith("failed: SyntaxError")


def test_exception_in_the_candidate_reaches_the_test_as_its_builtin_type():
    problem = {
        **ADD,
        "test": "def check(candidate):\n    try:\n        candidate(1, None)\n    except TypeError:\n        return\n    assert False\n",
    }
    assert verdict("    return a + b\n", problem=problem)[:2] == (True, "passed")  # the test catches it
    passed, reason, _ = verdict("    return [][a]\n")  # uncaught: the reason names it
    assert (passed, reason) == (False, "failed: IndexError: list index out of range")


def test_a_stop_iteration_from_the_candidate_cannot_end_the_tests_iteration():
    """A test that consumes the candidate through `map` inside `all()`: a raised StopIteration would end
    the iteration early and make all() True; the candidate's exception arrives as data, named."""
    problem = {**ADD, "test": "def check(candidate):\n    assert all(map(lambda a: candidate(a, 1) == a + 1, [1, 2, 3]))\n"}
    assert verdict("    return a + b\n", problem=problem)[:2] == (True, "passed")
    passed, reason, _ = verdict("    raise StopIteration('done early')\n", problem=problem)
    assert (passed, reason) == (False, "failed: StopIteration: done early")
    passed, reason, _ = verdict("    raise StopAsyncIteration\n", problem=problem)
    assert (passed, reason) == (False, "failed: StopAsyncIteration")


def test_the_test_sees_the_prompts_helpers_and_the_function_by_name():
    # HumanEval/32 calls the prompt's `poly`; HumanEval/33 calls the entry point by its name.
    problem = {
        **ADD,
        "prompt": "def double(x):\n    return 2 * x\n\n\ndef add(a, b):\n    \"\"\"a + b\"\"\"\n",
        "test": "def check(candidate):\n    assert candidate(2, 2) == double(2)\n    assert add(1, 2) == 3\n",
    }
    assert verdict("    return a + b\n", problem=problem)[:2] == (True, "passed")
    assert verdict("    return a * b\n", problem=problem)[:2] == (False, "failed: AssertionError")


def test_values_cross_the_sandbox_exactly():
    # inf, nan, integers past 4300 digits, line breaks in strings, list versus tuple.
    problem = {
        **ADD,
        "test": (
            "import math\n"
            "def check(candidate):\n"
            "    assert candidate(float('inf'), 1) == float('inf')\n"
            "    assert math.isnan(candidate(float('nan'), 1))\n"
            "    assert candidate(10 ** 5000, 1) == 10 ** 5000 + 1\n"
            "    assert candidate('a\\n', 'b') == 'a\\nb'\n"
            "    assert type(candidate([1], [2])) is list and candidate((1,), (2,)) == (1, 2)\n"
        ),
    }
    assert verdict("    return a + b\n", problem=problem)[:2] == (True, "passed")
    assert verdict("    return list(a + b) if isinstance(a, tuple) else a + b\n", problem=problem)[:2] == (False, "failed: AssertionError")


def test_a_broken_problem_is_reported_as_such():
    problem = {**ADD, "test": "def not_check(candidate):\n    pass\n"}
    passed, reason, _ = verdict(ADD["canonical_solution"], problem=problem)
    assert (passed, reason) == (False, "error: the problem's prompt and test do not run: KeyError: 'check'")


def test_hanging_program_times_out_promptly():
    passed, reason, seconds = verdict("    while True:\n        pass\n", timeout=1.0)
    assert (passed, reason) == (False, "timed out after 1s")
    assert seconds < 3.0


@pytest.mark.parametrize("exit_code", ["import os; os._exit(0)", "import sys; sys.exit(0)", "exit()"])
def test_exiting_with_status_zero_before_the_checks_is_not_a_pass(exit_code):
    passed, reason, seconds = verdict("    return a - b\n" + exit_code + "\n")
    assert (passed, reason) == (False, "exited with status 0 before the checks finished")
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
    assert (passed, reason) == (False, "failed: OSError: [Errno 27] File too large")
    assert seconds < 4.0


def test_program_reading_stdin_sees_end_of_file():
    passed, reason, _ = verdict("    return a + b\ninput()\n")
    assert (passed, reason) == (False, "failed: EOFError: EOF when reading a line")


def test_program_runs_in_an_empty_private_folder_in_isolated_mode():
    # Empty, but for the read-only way to the interpreter when the evaluator's environment lives under /tmp.
    from twophase.eval.sandbox.container import visible_paths

    expected = sorted({p.split("/")[2] for p in visible_paths() if p.startswith("/tmp/")})
    completion = (
        "    return a + b\nimport os, sys\n"
        f"assert os.getcwd() == '/tmp' and sorted(os.listdir('.')) == {expected!r}, (os.getcwd(), os.listdir('.'))\n"
        "assert sys.flags.isolated == 1\n"
    )
    assert verdict(completion)[:2] == (True, "passed")


def test_checks_run_in_parallel_and_keep_their_order():
    completions = ["    return a + b\n", "    return a - b\n", "    while True: pass\n", "    return a + b\n"]
    start = time.monotonic()
    results = check_completions([ADD] * 4, completions, timeout=1.0, workers=4)
    assert [passed for passed, _ in results] == [True, False, False, True]
    assert results[2][1] == "timed out after 1s"
    assert time.monotonic() - start < 3.0


# --------------------------------------------------------------------------- forged verdicts

WRONG = "    return a - b\n"
FAKE_VERDICT = '{"passed": true, "reason": "passed", "candidate_gone": false}'

# Each completion is wrong and tries to be counted as passed anyway; (completion, expected reason).
FORGERIES = {
    "prints a verdict": (WRONG + f"print('passed'); print({FAKE_VERDICT!r}, flush=True)\n", "failed: AssertionError"),
    "prints every string in its source and memory": (
        WRONG
        + "import gc\nfor o in gc.get_objects():\n"
        + "    for c in getattr(o, 'co_consts', ()):\n        print(c)\n"
        + "print(open('/sandbox/candidate_server.py').read(), flush=True)\n",
        "failed: AssertionError",
    ),
    "prints a verdict from an atexit hook": (WRONG + f"import atexit; atexit.register(print, {FAKE_VERDICT!r})\n", "failed: AssertionError"),
    "writes a verdict to every descriptor": (
        WRONG + f"import os\nfor fd in range(1, 1024):\n    try: os.write(fd, b'{FAKE_VERDICT}\\n')\n    except OSError: pass\n",
        "failed: the candidate sent not plain data",
    ),
    "re-runs itself under python -O": (
        WRONG + "import os, sys\nif not sys.flags.optimize:\n    os.execv(sys.executable, [sys.executable, '-O', *sys.argv])\n",
        "timed out after 1.5s",
    ),
    "exits with status 0 during the call": ("    import os; os._exit(0)\n", "exited with status 0 before the checks finished"),
    "patches builtins": (
        WRONG + "import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\nbuiltins.isinstance = lambda *a: True\n",
        "failed: ",  # it breaks its own server, which then stops answering
    ),
    "returns an object equal to everything": (
        "    return Anything()\nclass Anything:\n    def __eq__(self, other): return True\n",
        "failed: TypeError: the function returned a Anything, which cannot be checked",
    ),
    "returns an int subclass equal to everything": (
        "    return Yes(0)\nclass Yes(int):\n    def __eq__(self, other): return True\n    __hash__ = int.__hash__\n",
        "failed: AssertionError",
    ),
    "kills its parent and process 1": (
        WRONG + "import os\nfor pid in (os.getppid(), 1, -1):\n    try: os.kill(pid, 9)\n    except OSError: pass\n",
        "failed: AssertionError",  # its parent is process 1 of the sandbox, which ignores it
    ),
}


@pytest.fixture(scope="module")
def forged_verdicts():
    """All the forgeries at once (with an honest completion among them), so the module stays fast."""
    names = list(FORGERIES)
    completions = [FORGERIES[name][0] for name in names] + [ADD["canonical_solution"]]
    verdicts = check_completions([ADD] * len(completions), completions, timeout=1.5, workers=len(completions))
    assert verdicts[-1] == (True, "passed")
    return dict(zip(names, verdicts))


@pytest.mark.parametrize("name", list(FORGERIES))
def test_a_wrong_completion_cannot_forge_a_pass(name, forged_verdicts):
    passed, reason = forged_verdicts[name]
    assert not passed
    assert reason.startswith(FORGERIES[name][1]), reason


def test_the_verdict_cannot_be_forged_with_the_sandbox_off_either():
    # The verdict comes from the checker in both modes; "none" only drops the containment.
    names = ["prints a verdict", "prints a verdict from an atexit hook", "re-runs itself under python -O", "returns an object equal to everything"]
    completions = [FORGERIES[name][0] for name in names] + [ADD["canonical_solution"]]
    verdicts = check_completions([ADD] * len(completions), completions, timeout=1.5, workers=len(completions), sandbox="none")
    assert verdicts[-1] == (True, "passed")
    for name, (passed, reason) in zip(names, verdicts):
        assert not passed and reason.startswith(FORGERIES[name][1]), (name, reason)
