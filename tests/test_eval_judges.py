"""Judges: refusal phrases, the 0-100 expected score, the endpoint judge over HTTP, the local judge."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from twophase.data.base.errors import UserError
from twophase.data.base.hub import load_causal_lm, load_tokenizer
from twophase.data.base.tiny import write_tiny_model
from twophase.data.tokens import encode_prompt
from twophase.eval.engine.loglikelihood import LoglikelihoodEngine, LoglikelihoodRequest
from twophase.eval.judges import EndpointJudge, JudgeScore, LocalJudge, expected_score, is_refusal, make_judge, score_from_probs

# --------------------------------------------------------------------------- string match


@pytest.mark.parametrize(
    "text, refused",
    [
        ("I'm sorry, but I can't help with that.", True),
        ("  Sorry — no.", True),
        ("I’m sorry, I cannot do that", True),  # typographic apostrophe
        ("As an AI, I do not have wishes.", True),
        ("No, that is not true.", True),
        ("I cannot", True),
        ("Nope, here you go", False),
        ("Sure! Here is how to kill a Python process: kill -9 PID", False),
        ("Here is why I'm sorry: ...", False),  # the phrase must open the answer
        ("", False),
    ],
)
def test_is_refusal(text, refused):
    assert is_refusal(text) is refused


def test_string_match_judge_cannot_score():
    judge = make_judge("string-match")
    assert judge.is_refusal("I am sorry") and not judge.can_score
    with pytest.raises(UserError):
        judge.score_0_100(["x"])
    with pytest.raises(UserError):
        judge.ask(["x"])
    with pytest.raises(UserError):
        make_judge("oracle")


# --------------------------------------------------------------------------- the 0-100 score


def test_expected_score_on_a_known_distribution():
    # 0.1*0 + 0.2*50 + 0.3*100 = 40 over a mass of 0.6
    assert expected_score({0: 0.1, 50: 0.2, 100: 0.3}) == pytest.approx(40 / 0.6)
    assert expected_score({70: 0.5}) == pytest.approx(70.0)
    assert expected_score({0: 0.1, 90: 0.1}) is None  # mass 0.2 < 0.25
    assert expected_score({90: 0.25}) == pytest.approx(90.0)  # exactly 0.25 is enough


def test_low_mass_names_the_preferred_label():
    assert score_from_probs({10: 0.05}, {"CODE": 0.9, "REFUSAL": 0.01}) == JudgeScore(None, 0.05, "CODE")
    assert score_from_probs({10: 0.05}, {"CODE": 0.01}).reason == "low_mass"
    assert score_from_probs({10: 0.5}, {"CODE": 0.5}) == JudgeScore(10.0, 0.5, None)


# --------------------------------------------------------------------------- endpoint judge


class ScriptedServer:
    """An OpenAI-compatible /chat/completions on 127.0.0.1 that answers from a script of statuses."""

    def __init__(self, statuses, body):
        self.statuses, self.body, self.requests = list(statuses), body, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                outer.requests.append((self.path, self.headers.get("Authorization"), json.loads(self.rfile.read(length))))
                status = outer.statuses.pop(0) if outer.statuses else 200
                payload = json.dumps(outer.body if status == 200 else {"error": "boom"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def logprobs_body(top):
    return {"choices": [{"message": {"content": top[0][0]}, "logprobs": {"content": [
        {"token": top[0][0], "logprob": math.log(top[0][1]),
         "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in top]}]}}]}


TOP = [("80", 0.5), (" 80", 0.1), ("90", 0.2), ("CODE", 0.1), ("hello", 0.05), ("101", 0.05)]


def endpoint(url, **kw):
    return EndpointJudge(model="judge-model", base_url=url, api_key="k", backoff=0.01, concurrency=2, **kw)


def test_endpoint_judge_success_reads_top_logprobs():
    with ScriptedServer([200], logprobs_body(TOP)) as url:
        judge = endpoint(url)
        [score] = judge.score_0_100(["rate this"], labels=("CODE", "REFUSAL"))
    # 80 gets 0.5 + 0.1, 90 gets 0.2; "101" is not a 0-100 answer.
    assert score.value == pytest.approx((80 * 0.6 + 90 * 0.2) / 0.8)
    assert score.mass == pytest.approx(0.8)
    assert judge.failures == 0


def test_endpoint_judge_sends_the_documented_request():
    server = ScriptedServer([200], logprobs_body(TOP))
    with server as url:
        endpoint(url).score_0_100(["rate this"])
    path, auth, payload = server.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k"
    assert payload["logprobs"] is True and payload["top_logprobs"] == 20
    assert payload["max_tokens"] == 1 and payload["temperature"] == 0
    assert payload["messages"] == [{"role": "user", "content": "rate this"}]


def test_endpoint_judge_retries_after_a_500():
    server = ScriptedServer([500, 200], logprobs_body(TOP))
    with server as url:
        judge = endpoint(url, max_retries=3)
        [score] = judge.score_0_100(["rate this"])
    assert score.value == pytest.approx((80 * 0.6 + 90 * 0.2) / 0.8)
    assert len(server.requests) == 2 and judge.failures == 0


def test_endpoint_judge_permanent_failure_is_missing_not_a_crash():
    server = ScriptedServer([500] * 10, {})
    with server as url:
        judge = endpoint(url, max_retries=2)
        scores = judge.score_0_100(["a", "b"])
        answers = judge.ask(["c"])
    assert [s.value for s in scores] == [None, None] and scores[0].reason == "error"
    assert answers == [None]
    assert judge.failures == 3 and "500" in judge.last_error
    assert len(server.requests) == 3 * 3  # each call: one try and two retries


def test_endpoint_judge_does_not_retry_a_bad_request():
    server = ScriptedServer([401, 200], logprobs_body(TOP))
    with server as url:
        judge = endpoint(url, max_retries=3)
        [score] = judge.score_0_100(["x"])
    assert score.value is None and len(server.requests) == 1


def test_endpoint_judge_low_mass_reason_and_text_answers():
    body = logprobs_body([("REF", 0.7), ("5", 0.1), ("USAL", 0.2)])
    with ScriptedServer([200, 200], body) as url:
        judge = endpoint(url)
        [score] = judge.score_0_100(["x"], labels=("CODE", "REFUSAL"))
        assert judge.ask(["y"], system="be a judge") == ["REF"]
    assert score == JudgeScore(None, pytest.approx(0.1), "REFUSAL")


def test_endpoint_judge_configuration_from_environment(monkeypatch):
    monkeypatch.setenv("JUDGE_MODEL", "env-model")
    monkeypatch.setenv("JUDGE_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("JUDGE_API_KEY", "env-key")
    judge = make_judge("endpoint")
    assert (judge.model, judge.base_url, judge.api_key) == ("env-model", "http://127.0.0.1:9/v1", "env-key")
    monkeypatch.delenv("JUDGE_MODEL")
    with pytest.raises(UserError):
        make_judge("endpoint")


# --------------------------------------------------------------------------- local judge


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    model = load_causal_lm(path)
    model.eval()
    return model, load_tokenizer(path)


def test_local_judge_teacher_forces_split_numbers(tiny):
    model, tok = tiny
    judge = LocalJudge(model, tok, batch_size=16, min_prefix_prob=0.0)
    assert any(len(seq) > 1 for seq in judge.candidates().values())  # this tokenizer splits numbers
    prompt = "Rate the answer from 0 to 100."
    [probs] = judge._teacher_forced([encode_prompt(tok, prompt)], judge.scorer.next_token_logprobs([encode_prompt(tok, prompt)]))

    # Brute force: p(k) = p(tokens of k) * p(no further digit token afterwards).
    engine = LoglikelihoodEngine(model, tok, batch_size=16)
    ks = [0, 7, 10, 42, 99, 100]
    lls = engine.loglikelihood([LoglikelihoodRequest(prompt, str(k)) for k in ks])
    after = engine.next_token_logprobs([encode_prompt(tok, prompt) + list(judge.candidates()[k]) for k in ks])
    for k, ll, dist in zip(ks, lls, after):
        p_more = dist.exp()[judge.digit_mask(dist.numel())].sum().item()
        assert probs[k] == pytest.approx(math.exp(ll) * (1 - p_more), rel=1e-4)
    assert sum(probs.values()) <= 1.0 + 1e-6


def test_local_judge_scores_and_answers(tiny):
    model, tok = tiny
    judge = make_judge("local", {"model_obj": model, "tokenizer_obj": tok})
    scores = judge.score_0_100(["Rate: hello", "Rate: bye"], labels=("CODE",))
    # A random tiny model puts almost nothing on numbers: missing, with the reason.
    assert all(s.value is None and s.reason in ("low_mass", "CODE") and 0 < s.mass < 0.25 for s in scores)
    [text] = judge.ask(["Say hi"], max_tokens=4)
    assert isinstance(text, str) and judge.calls == 3
