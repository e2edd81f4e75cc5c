"""The judge interface; the base class is also the string-match judge (refusals by phrase, no scores)."""

from __future__ import annotations

import threading

from twophase.data.base.errors import UserError
from twophase.eval.judges.refusal import is_refusal
from twophase.eval.judges.scores import JudgeScore


class Judge:
    """The interface; this base class is also the string-match judge."""

    name = "string-match"
    can_score = False  # True for judges that give 0-100 scores and rubric answers

    def __init__(self):
        self.calls = 0
        self.failures = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()  # the endpoint judge fails from worker threads

    def is_refusal(self, response: str) -> bool:
        return is_refusal(response)

    def score_0_100(self, prompts: list[str], labels: tuple[str, ...] = ()) -> list[JudgeScore]:
        """One 0-100 score per prompt; `labels` are non-numeric answers worth naming as the reason."""
        raise UserError(f"the {self.name} judge cannot give 0-100 scores: use --judge local or --judge endpoint")

    def ask(self, prompts: list[str], max_tokens: int = 512, system: str | None = None) -> list[str | None]:
        """The judge's greedy text answer to each prompt; None where the call failed."""
        raise UserError(f"the {self.name} judge cannot answer rubric questions: use --judge local or --judge endpoint")

    def describe(self) -> dict:
        """What identifies this judge's verdicts (goes into the settings hash)."""
        return {"kind": self.name}

    def _failed(self, reason: str) -> None:
        with self._lock:
            self.failures += 1
            self.last_error = reason
