"""A Hugging Face causal LM as judge, run in this process, on the same engines as the benchmarks."""

from __future__ import annotations

import math

import torch

from twophase.data.prompts import format_question
from twophase.data.tokens import encode_continuation, encode_prompt
from twophase.eval.engine.loglikelihood import LoglikelihoodEngine
from twophase.eval.engine.generation import GenerationEngine, GenerationRequest
from twophase.eval.judges.base import Judge
from twophase.eval.judges.scores import MIN_SCORE_MASS, SCORE_VALUES, JudgeScore, score_from_probs


class LocalJudge(Judge):
    """A Hugging Face causal LM as judge, run in this process.

    0-100 scores: p(k) for k = 0..100 at the answer position. When every number
    is one token, one forward gives them all. When the tokenizer splits numbers
    (e.g. one token per digit), p(k) is teacher-forced token by token and
    multiplied by the probability that the number ends there (no further digit
    token), so that p("8") does not also count the mass of "85". The forwards
    walk the tree of digit prefixes level by level, skipping prefixes with
    probability below `min_prefix_prob`, whose numbers together cannot hold
    more than that.
    """

    name = "local"
    can_score = True

    def __init__(self, model, tokenizer, batch_size: int | str = "auto", model_id: str = "local", min_prefix_prob: float = 1e-4,
                 min_mass: float = MIN_SCORE_MASS):
        super().__init__()
        self.min_mass = min_mass
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.scorer = LoglikelihoodEngine(model, tokenizer, batch_size=batch_size)
        self.generator = GenerationEngine(model, tokenizer, batch_size=batch_size)
        self.min_prefix_prob = min_prefix_prob
        self._candidates: dict[int, tuple[int, ...]] | None = None
        self._digit_tokens = None

    def describe(self) -> dict:
        return {"kind": "local", "model": self.model_id, "min_mass": self.min_mass}

    def format(self, prompt: str, system: str | None = None) -> str:
        return format_question(self.tokenizer, prompt, system, "auto")

    def ask(self, prompts: list[str], max_tokens: int = 512, system: str | None = None) -> list[str | None]:
        self.calls += len(prompts)
        requests = [GenerationRequest(self.format(p, system), max_new_tokens=max_tokens) for p in prompts]
        return [texts[0] for texts in self.generator.generate(requests, desc="judge")]

    def score_0_100(self, prompts: list[str], labels: tuple[str, ...] = ()) -> list[JudgeScore]:
        self.calls += len(prompts)
        prefixes = [encode_prompt(self.tokenizer, self.format(p)) for p in prompts]
        numbers, first_dists = self._number_probs(prefixes)
        out = []
        for probs, dist in zip(numbers, first_dists):
            label_probs = {label: self._label_prob(label, dist) for label in labels}
            out.append(score_from_probs(probs, label_probs, self.min_mass))
        return out

    # -- internals

    def candidates(self) -> dict[int, tuple[int, ...]]:
        """The token ids of each answer "0".."100", as the judge's tokenizer writes them."""
        if self._candidates is None:
            self._candidates = {k: tuple(encode_continuation(self.tokenizer, str(k))) for k in SCORE_VALUES}
        return self._candidates

    def digit_mask(self, size: int):
        """A boolean mask over `size` token ids: tokens whose text starts with a digit."""
        if self._digit_tokens is None or self._digit_tokens.numel() != size:
            known = min(size, len(self.tokenizer))
            texts = self.tokenizer.batch_decode([[i] for i in range(known)])
            mask = torch.zeros(size, dtype=torch.bool)
            mask[:known] = torch.tensor([t[:1].isdigit() for t in texts], dtype=torch.bool)
            self._digit_tokens = mask
        return self._digit_tokens

    def _label_prob(self, label: str, dist) -> float:
        # The first token of the label stands for the label: enough to name a reason.
        ids = encode_continuation(self.tokenizer, label)
        return math.exp(float(dist[ids[0]])) if ids else 0.0

    def _number_probs(self, prefixes: list[list[int]]):
        """p(k) for k = 0..100 after each prefix, and the distributions at the answer position."""
        cands = self.candidates()
        first = self.scorer.next_token_logprobs(prefixes, desc="judge")
        if all(len(seq) == 1 for seq in cands.values()):
            return [{k: math.exp(float(d[seq[0]])) for k, seq in cands.items()} for d in first], first
        return self._teacher_forced(prefixes, first), first

    def _teacher_forced(self, prefixes: list[list[int]], first) -> list[dict[int, float]]:
        """p(k) by walking the tree of the numbers' token prefixes, all prompts one level at a time."""
        cands = self.candidates()
        number_of = {seq: k for k, seq in cands.items()}
        children: dict[tuple[int, ...], set] = {}
        for seq in cands.values():
            for i in range(len(seq)):
                children.setdefault(seq[:i], set()).add(seq[: i + 1])

        probs: list[dict[int, float]] = [{} for _ in prefixes]
        level = [(i, (), 1.0, dist) for i, dist in enumerate(first)]  # (prompt, node, p(node), dist after node)
        while level:
            todo = []
            for i, node, p_node, dist in level:
                if node in number_of:  # a complete number: the answer must also end here
                    p_more = float(dist.exp()[self.digit_mask(dist.numel())].sum())
                    probs[i][number_of[node]] = p_node * max(0.0, 1.0 - p_more)
                for child in children.get(node, ()):
                    p_child = p_node * math.exp(float(dist[child[-1]]))
                    if p_child >= self.min_prefix_prob:
                        todo.append((i, child, p_child))
            dists = self.scorer.next_token_logprobs([prefixes[i] + list(c) for i, c, _ in todo], desc="judge") if todo else []
            level = [(i, c, p, d) for (i, c, p), d in zip(todo, dists)]
        return probs
