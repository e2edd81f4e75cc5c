"""A stand-in for `lake exe repl` that speaks the Lean REPL's JSON protocol.

Requests are JSON objects separated by blank lines; each answer is a
pretty-printed JSON object in the REPL's layout followed by a blank line, and
every answered command gets the next environment number. What it answers
depends only on the command text, so tests can drive every case:

* only `import` lines        → {"env": N}
* contains `CRASH`           → exits at once (status 1), after a note on stderr
* contains `HANG`            → never answers
* no "env" (Mathlib absent)  → an "unknown identifier" error
* unknown "env"              → {"message": "Unknown environment."}
* contains `FAIL`            → an error message, as Lean reports an unknown identifier
* contains `sorry`           → a `sorries` entry and the "declaration uses 'sorry'" warning
* anything else              → {"env": N} (the proof is accepted)
"""

import json
import sys
import time


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def render(response: dict, width: int = 80) -> str:
    """The REPL's layout: one line if it fits in `width`, else one key per line,
    with lists of objects and long values moved to the line below their key."""
    flat = _json(response)
    if len(flat) <= width:
        return flat
    parts = []
    for key, value in response.items():
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            items = ",\n  ".join(
                "{" + ",\n   ".join(f"{_json(k)}: {_json(v)}" for k, v in item.items()) + "}" for item in value
            )
            parts.append(f"{_json(key)}:\n [{items}]")
        elif len(f"{_json(key)}: {_json(value)}") + 2 > width:
            parts.append(f"{_json(key)}:\n {_json(value)}")
        else:
            parts.append(f"{_json(key)}: {_json(value)}")
    return "{" + ",\n ".join(parts) + "}"


def position(text: str, word: str) -> dict:
    """Line (from 1) and column (from 0) of `word` in `text`, as Lean reports positions."""
    before = text[: max(text.find(word), 0)]
    return {"line": before.count("\n") + 1, "column": len(before) - (before.rfind("\n") + 1)}


def span(text: str, word: str) -> tuple[dict, dict]:
    start = position(text, word)
    return start, {"line": start["line"], "column": start["column"] + len(word)}


def declaration_name(text: str) -> str:
    """The declared name, where Lean puts the "declaration uses 'sorry'" warning."""
    words = text.split()
    for keyword, name in zip(words, words[1:]):
        if keyword in ("theorem", "lemma", "def"):
            return name
    return words[0] if words else ""


def message(severity: str, text: str, word: str, data: str) -> dict:
    start, end = span(text, word)
    return {"severity": severity, "pos": start, "endPos": end, "data": data}


class FakeRepl:
    def __init__(self):
        self.next_env = 0
        self.next_proof_state = 0

    def new_env(self) -> int:
        self.next_env += 1
        return self.next_env - 1

    def answer(self, request: dict) -> dict:
        if "cmd" not in request:
            return {"message": "fake repl: only 'cmd' requests are supported"}
        cmd = request["cmd"]
        if "CRASH" in cmd:
            sys.stderr.write("fake repl: CRASH requested\n")
            sys.stderr.flush()
            sys.exit(1)
        if "HANG" in cmd:
            while True:
                time.sleep(3600)
        lines = [line for line in cmd.splitlines() if line.strip()]
        if lines and all(line.startswith("import ") for line in lines):
            return {"env": self.new_env()}
        if "env" not in request:
            word = cmd.split()[0] if cmd.split() else ""
            return {"messages": [message("error", cmd, word, "unknown identifier 'Mathlib' (no header imported)")],
                    "env": self.new_env()}
        if not (isinstance(request["env"], int) and 0 <= request["env"] < self.next_env):
            return {"message": "Unknown environment."}
        if "FAIL" in cmd:
            return {"messages": [message("error", cmd, "FAIL", "unknown identifier 'FAIL'")], "env": self.new_env()}
        if "sorry" in cmd:
            start, end = span(cmd, "sorry")
            state = self.next_proof_state
            self.next_proof_state += 1
            return {
                "sorries": [{"proofState": state, "pos": start, "goal": "⊢ fake goal", "endPos": end}],
                "messages": [message("warning", cmd, declaration_name(cmd), "declaration uses 'sorry'")],
                "env": self.new_env(),
            }
        return {"env": self.new_env()}


def requests(stream):
    """JSON requests separated by blank lines; the last one may end at end of input."""
    block: list[str] = []
    for line in stream:
        if line.strip():
            block.append(line)
        elif block:
            yield json.loads("".join(block))
            block = []
    if block:
        yield json.loads("".join(block))


def main() -> None:
    repl = FakeRepl()
    for request in requests(sys.stdin):
        sys.stdout.write(render(repl.answer(request)) + "\n\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
