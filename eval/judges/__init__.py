"""Judges: what decides whether an answer is a refusal, and how good or harmful it is.

Three judges share one interface (`Judge`, judges/base.py), chosen with `--judge`:

* `string-match` (default): refusal detection by the XSTest phrase list. It
  needs no model and cannot score or read rubrics.
* `local`: a Hugging Face causal LM loaded in this process.
* `endpoint`: any OpenAI-compatible HTTP server (OpenAI, vLLM, ...), called
  with the standard library only.

Every judge answers `is_refusal(response)` with the phrase list, so refusal
rates are comparable whichever judge is chosen. The model judges add:

* `score_0_100(prompts)`: a 0-100 score read from the judge's probabilities
  rather than its sampled text: score = sum_k k p(k) / sum_k p(k) over the
  answers k = 0..100 at the answer position, and missing when
  sum_k p(k) < 0.25 (the judge mostly wanted to say something else, e.g. CODE
  or REFUSAL, which is then given as the reason);
* `ask(prompts)`: the judge's greedy text answer, for rubrics that the
  benchmarks parse themselves (StrongREJECT, Do-Not-Answer).

A failed judge call gives a missing value (None), never an exception; each
judge counts its calls and failures so a benchmark can tell "the judge is down"
from "some answers were unscorable".
"""

from __future__ import annotations

import os

import torch

from twophase.data.base.errors import UserError
from twophase.data.base.hub import load_causal_lm, load_tokenizer
from twophase.eval.judges.base import Judge
from twophase.eval.judges.endpoint import EndpointJudge
from twophase.eval.judges.local import LocalJudge
from twophase.eval.judges.refusal import REFUSAL_PHRASES, is_refusal
from twophase.eval.judges.scores import MIN_SCORE_MASS, JudgeScore, expected_score, score_from_probs

__all__ = ["EndpointJudge", "JUDGE_KINDS", "Judge", "JudgeScore", "LocalJudge", "REFUSAL_PHRASES", "expected_score",
           "is_refusal", "make_judge", "score_from_probs"]


JUDGE_KINDS = ("string-match", "local", "endpoint")


def make_judge(kind: str = "string-match", options: dict | None = None) -> Judge:
    """Build the judge `kind` from options, falling back to the environment.

    local:    options model (path or hub id; or model_obj + tokenizer_obj), batch_size, min_mass
              (the least probability on the numbers 0-100 that counts as an answer, default 0.25).
    endpoint: options model / base_url / api_key, else $JUDGE_MODEL,
              $JUDGE_BASE_URL or $OPENAI_BASE_URL (default https://api.openai.com/v1),
              $JUDGE_API_KEY or $OPENAI_API_KEY; timeout, max_retries, backoff, concurrency.
    "local:PATH" is short for kind local with model PATH.
    """
    options = dict(options or {})
    if kind.startswith("local:"):
        kind, options["model"] = "local", kind.split(":", 1)[1]
    if kind == "string-match":
        return Judge()
    if kind == "local":
        return _make_local(options)
    if kind == "endpoint":
        return _make_endpoint(options)
    raise UserError(f"unknown judge '{kind}': choose one of {', '.join(JUDGE_KINDS)}")


def _make_local(options: dict) -> LocalJudge:
    model, tokenizer = options.get("model_obj"), options.get("tokenizer_obj")
    name = options.get("model")
    if model is None:
        if not name:
            raise UserError("the local judge needs a model: pass --judge-model PATH_OR_ID")
        cuda = torch.cuda.is_available()
        tokenizer = load_tokenizer(name)
        model = load_causal_lm(name, dtype=torch.bfloat16 if cuda else None, device="cuda" if cuda else None)
        model.eval()
    return LocalJudge(model, tokenizer, batch_size=options.get("batch_size") or "auto", model_id=str(name or "local"),
                      min_mass=float(_given(options, "min_mass", MIN_SCORE_MASS)))


def _make_endpoint(options: dict) -> EndpointJudge:
    model = options.get("model") or os.environ.get("JUDGE_MODEL")
    if not model:
        raise UserError("the endpoint judge needs a model name: pass --judge-model NAME or set JUDGE_MODEL")
    base_url = (
        options.get("base_url")
        or os.environ.get("JUDGE_BASE_URL")
        or os.environ.get("OPENAI_BASE_URL")
        or "https://api.openai.com/v1"
    )
    api_key = options.get("api_key") or os.environ.get("JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    return EndpointJudge(
        model=model,
        base_url=base_url,
        api_key=api_key,
        timeout=float(_given(options, "timeout", 60.0)),
        max_retries=int(_given(options, "max_retries", 5)),
        backoff=float(_given(options, "backoff", 1.0)),
        concurrency=int(_given(options, "concurrency", 8)),
    )


def _given(options: dict, key: str, default):
    """options[key] unless it is missing or None (the CLI passes None for options not given)."""
    value = options.get(key)
    return default if value is None else value
