"""An OpenAI-compatible chat-completions endpoint as judge, with the standard library's HTTP client."""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from twophase.eval.judges.base import Judge
from twophase.eval.judges.scores import JudgeScore, score_from_probs


class EndpointJudge(Judge):
    """An OpenAI-compatible chat-completions endpoint as judge (urllib only).

    0-100 scores come from one generated token's top-20 log-probabilities: the
    probabilities of tokens that read as an integer 0..100 are summed per
    number. Calls run `concurrency` at a time; each is retried with exponential
    backoff on network errors, 429 and 5xx; a call that still fails is missing.
    """

    name = "endpoint"
    can_score = True
    TOP_LOGPROBS = 20

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        concurrency: int = 8,
    ):
        super().__init__()
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.concurrency = max(1, concurrency)

    def describe(self) -> dict:
        return {"kind": "endpoint", "model": self.model, "base_url": self.base_url}

    def score_0_100(self, prompts: list[str], labels: tuple[str, ...] = ()) -> list[JudgeScore]:
        def one(prompt: str) -> JudgeScore:
            response = self._chat(prompt, max_tokens=1, logprobs=True)
            if response is None:
                return JudgeScore(None, 0.0, "error")
            try:
                top = response["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            except (KeyError, IndexError, TypeError):
                self._failed("the endpoint returned no top_logprobs")
                return JudgeScore(None, 0.0, "error")
            return score_from_probs(*self._read_top(top, labels))

        return self._map(one, prompts)

    def ask(self, prompts: list[str], max_tokens: int = 512, system: str | None = None) -> list[str | None]:
        def one(prompt: str) -> str | None:
            response = self._chat(prompt, max_tokens=max_tokens, logprobs=False, system=system)
            try:
                return None if response is None else response["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                self._failed("the endpoint returned no message content")
                return None

        return self._map(one, prompts)

    @staticmethod
    def _read_top(top: list[dict], labels: tuple[str, ...]) -> tuple[dict[int, float], dict[str, float]]:
        numbers: dict[int, float] = {}
        label_probs = {label: 0.0 for label in labels}
        for entry in top:
            text = str(entry.get("token", "")).strip()
            p = math.exp(float(entry.get("logprob", -math.inf)))
            if re.fullmatch(r"\d{1,3}", text) and str(int(text)) == text and int(text) <= 100:
                numbers[int(text)] = numbers.get(int(text), 0.0) + p
                continue
            for label in labels:  # "REF" is how a tokenizer may begin "REFUSAL"
                if len(text) >= 2 and label.upper().startswith(text.upper()):
                    label_probs[label] += p
                    break
        return numbers, label_probs

    def _map(self, fn, prompts: list[str]) -> list:
        self.calls += len(prompts)
        if self.concurrency == 1 or len(prompts) < 2:
            return [fn(p) for p in prompts]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, prompts))

    def _chat(self, prompt: str, max_tokens: int, logprobs: bool, system: str | None = None) -> dict | None:
        messages = [{"role": "system", "content": system}] if system else []
        payload = {
            "model": self.model,
            "messages": messages + [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        if logprobs:
            payload.update(logprobs=True, top_logprobs=self.TOP_LOGPROBS)
        return self._post("/chat/completions", payload)

    def _post(self, path: str, payload: dict) -> dict | None:
        """POST with retries; the decoded JSON, or None after the last failure."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = json.dumps(payload).encode("utf-8")
        error = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(60.0, self.backoff * 2 ** (attempt - 1)))
            request = urllib.request.Request(self.base_url + path, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as err:
                error = f"HTTP {err.code} from {self.base_url}"
                if err.code != 429 and err.code < 500:
                    break  # a bad request or key does not get better by retrying
            except (urllib.error.URLError, TimeoutError, OSError, json.JSONDecodeError) as err:
                error = f"{type(err).__name__}: {err}"[:300]
        self._failed(error)
        return None
