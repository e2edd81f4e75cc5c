"""The Lean checker over HTTP (trainers/infra/lean_server.py), `twophase lean serve`, the check cache and
the streamed scoring of a rollout (trainers/infra/streamed_rewards.py), against tests/fake_lean_repl.py."""

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from twophase.data.base.errors import UserError
from twophase.trainers.infra.lean_repl import LeanReplPool
from twophase.trainers.infra.lean_server import LeanCheckServer, LeanServerClient
from twophase.trainers.infra.streamed_rewards import CheckCache
from twophase.trainers.infra.reward_calls import CheckedReward
from twophase.trainers.rewards import LeanReward, build_reward

from test_rewards import FAKE_REPL, TASK, program

PROTOCOL_PROOFS = ["  simp\n", "  HANG\n", "  exact FAIL\n", "  CRASH\n", "  sorry\n", "  omega\n"]


class Served:
    """A LeanCheckServer on a free localhost port, serving in a thread; `lines` are its log lines."""

    def __init__(self, pool, token=None, **limits):
        self.lines: list[str] = []
        self.server = LeanCheckServer(pool, "127.0.0.1", 0, token, log=self.lines.append, **limits)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = self.server.url

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served(tmp_path):
    with LeanReplPool(tmp_path, size=2, timeout=1.0, command=FAKE_REPL) as pool:
        running = Served(pool, max_snippets=4, max_body_bytes=20_000)
        yield running
        running.close()


def post(url, body, token=None, raw=None):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=raw if raw is not None else json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_remote_and_local_backends_give_the_same_rewards_on_the_replayed_protocol(tmp_path, served):
    completions = [proof + "```" for proof in PROTOCOL_PROOFS] + ["  simp\naxiom cheat : False\n```"]
    local = build_reward("lean", {"project_dir": str(tmp_path), "pool_size": 2, "timeout": 1.0, "command": FAKE_REPL})
    remote = build_reward("lean", {"server": served.url, "pool_size": 2, "timeout": 1.0, "retries": 0})
    try:
        scores = local([TASK] * 7, completions)
        assert remote([TASK] * 7, completions) == scores == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        assert remote.details == local.details  # the reasons too: "timeout after 1s", "error: unknown identifier 'FAIL'", ...
        assert local.details[3]["reason"].startswith("repl crashed: it exited") and local.details[6]["reason"] == "declares an axiom"
        assert remote.checker.version == local.checker.version == "lean unknown"
    finally:
        local.close()
        remote.close()


def test_the_api_is_the_kimina_servers(served):
    status, answer = post(served.url + "/api/check", {"snippets": [{"id": "a", "code": program("  sorry\n")},
                                                                   {"id": "b", "code": program("  HANG\n")}], "timeout": 1})
    assert status == 200 and [r["id"] for r in answer["results"]] == ["a", "b"]
    sorry = answer["results"][0]["response"]["sorries"][0]
    assert sorry["goal"] == "⊢ fake goal" and sorry["pos"] == {"line": 9, "column": 2}  # line 9 of the whole snippet
    assert answer["results"][1]["error"] == "Lean REPL command timed out in 1 seconds" and answer["results"][1]["time"] >= 1
    status, answer = post(served.url + "/verify", {"codes": [{"custom_id": 7, "proof": program("  simp\n")}], "timeout": 5})
    assert status == 200 and answer["results"][0]["custom_id"] == "7" and "time" in answer["results"][0]["response"]
    with urllib.request.urlopen(served.url + "/health", timeout=5) as health:
        assert json.loads(health.read()) == {"status": "ok", "version": "lean unknown"}


def test_bad_requests_are_refused_with_one_log_line_each(served):
    five = {"snippets": [{"id": str(i), "code": "x"} for i in range(5)]}
    assert post(served.url + "/api/check", five) == (413, {"detail": "5 snippets in one request; the limit is 4"})
    assert post(served.url + "/api/check", None, raw=b"x" * 30_000)[0] == 413
    assert post(served.url + "/api/check", None, raw=b"{not json")[0] == 422
    assert post(served.url + "/api/check", {"snippets": [{"id": "a", "code": "x"}, {"id": "a", "code": "y"}]})[0] == 422
    assert post(served.url + "/api/nothing", {})[0] == 404
    assert len(served.lines) == 5 and served.lines[0].startswith("lean serve: rejected POST /api/check from 127.0.0.1: 413")


def test_a_key_is_required_beyond_localhost_and_checked(tmp_path):
    with LeanReplPool(tmp_path, size=1, timeout=5, command=FAKE_REPL) as pool:
        with pytest.raises(UserError, match="listens beyond this machine: give it a key"):
            LeanCheckServer(pool, "0.0.0.0", 0, token=None)
        keyed = Served(pool, token="s3cret")
        try:
            body = {"snippets": [{"id": "a", "code": program("  simp\n")}]}
            assert post(keyed.url + "/api/check", body) == (401, {"detail": "Missing API key"})
            assert post(keyed.url + "/api/check", body, token="wrong") == (401, {"detail": "Invalid API key"})
            assert post(keyed.url + "/api/check", body, token="s3cret")[0] == 200
            with pytest.raises(UserError, match="refused the key .*HTTP 401"):
                LeanServerClient(keyed.url, token="wrong", retries=0).check_one(program("  simp\n"))
            assert LeanServerClient(keyed.url, token="s3cret").check_one(program("  simp\n")) == (True, "ok")
            assert len(keyed.lines) == 3 and "401 Invalid API key" in keyed.lines[1]
        finally:
            keyed.close()


def test_an_unreachable_server_fails_the_reward_in_one_line_not_with_zeros(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # the backoff's waits
    with pytest.raises(UserError, match=r"Lean server at http://127.0.0.1:9 cannot be reached \(.*3 tries\)"):
        build_reward("lean", {"server": "http://127.0.0.1:9", "retries": 2})
    with pytest.raises(UserError, match="exactly one of the options project_dir .* and server"):
        build_reward("lean", {"project_dir": str(tmp_path), "server": "http://127.0.0.1:9"})


def test_a_server_lost_mid_run_fails_the_step_and_the_next_ask_tries_again(tmp_path, monkeypatch):
    with LeanReplPool(tmp_path, size=1, timeout=5, command=FAKE_REPL) as pool:
        running = Served(pool)
        reward = build_reward("lean", {"server": running.url, "retries": 1, "pool_size": 2})
        assert reward([TASK], ["  simp\n```"]) == [1.0]
        running.close()
        monkeypatch.setattr(time, "sleep", lambda seconds: None)
        with pytest.raises(UserError, match="cannot be reached"):
            reward([TASK], ["  omega\n```"])
        assert reward.cache.checks == 2 and len(reward.cache._futures) == 1  # the failure is not kept as a verdict
        reward.close()


def test_the_url_file_carries_the_address_and_key(tmp_path):
    with LeanReplPool(tmp_path, size=1, timeout=5, command=FAKE_REPL) as pool:
        keyed = Served(pool, token="k")
        try:
            keyed.server.write_url_file(tmp_path / "lean.json")
            assert (tmp_path / "lean.json").stat().st_mode & 0o777 == 0o600
            reward = build_reward("lean", {"server": str(tmp_path / "lean.json")})
            assert reward([TASK] * 2, ["  simp\n```", "  sorry\n```"]) == [1.0, 0.0]
            reward.close()
        finally:
            keyed.close()


def test_warming_imports_the_header_in_every_repl_before_any_proof(tmp_path):
    with LeanReplPool(tmp_path, size=2, command=FAKE_REPL) as pool:
        pool.warm("import Mathlib\nimport Aesop")
        assert [repl.header_envs for repl in pool._repls] == [{"import Mathlib\nimport Aesop": 0}] * 2


def test_the_checker_version_is_the_projects_lean_and_mathlib(tmp_path):
    from twophase.trainers.infra.lean_repl import checker_version

    (tmp_path / "lean-toolchain").write_text("leanprover/lean4:v4.26.0\n")
    packages = [{"name": "mathlib", "rev": "abc123"}, {"name": "aesop", "rev": "def"}, {"name": "REPL", "rev": "77"}]
    (tmp_path / "lake-manifest.json").write_text(json.dumps({"packages": packages}))
    assert checker_version(tmp_path) == "leanprover/lean4:v4.26.0 mathlib@abc123 REPL@77"
    assert checker_version(tmp_path / "elsewhere") == "lean unknown"


def test_the_cache_checks_each_text_once_per_checker_version():
    asked = []
    cache = CheckCache(lambda text: asked.append(text) or (True, "ok"), version="v1", workers=2)
    assert [cache.submit(t).result() for t in ["a", "b", "a", "a"]] == [(True, "ok")] * 4
    assert sorted(asked) == ["a", "b"] and (cache.checks, cache.hits) == (2, 2)
    assert cache.key("a") != CheckCache(lambda text: None, version="v2", workers=1).key("a")
    cache.close()


# ---------------------------------------------------------------- streamed = sequential


class OutOfOrderChecker:
    """Passes a text by its hash; the earlier a check is asked for, the longer it takes, so answers come back out of order."""

    version = "fake"

    def __init__(self):
        self.asked, self.answered, self.lock = 0, [], threading.Lock()

    def close(self):
        pass

    def check_one(self, text):
        with self.lock:
            number, self.asked = self.asked, self.asked + 1
        time.sleep(max(0.0, 0.06 - 0.01 * number))
        with self.lock:
            self.answered.append(number)
        return hashlib.sha256(text.encode()).digest()[0] % 2 == 0, "fake"


def _lean_run(tiny_model_dir, out, streamed, monkeypatch):
    from twophase.trainers.grpo import GRPORecipe
    from twophase.trainers.infra.run import MetricsLog
    from twophase.trainers.loop import train
    from test_grpo_training import _config

    import twophase.trainers.grpo as grpo

    if not streamed:
        monkeypatch.setattr(grpo, "row_finished_callback", lambda rewards, tasks: None)
    config = _config(tiny_model_dir, out, max_steps=2, num_generations=4, max_new_tokens=10, reward="toy", seed=3,
                     temperature=1.5)  # fmt: skip
    torch.manual_seed(0)
    recipe = GRPORecipe(config, out)
    checker = OutOfOrderChecker()
    lean = CheckedReward("lean", LeanReward.around(checker, workers=4))
    calls = []  # (checks submitted when the reward is called, when it returns)

    class Recording:
        def __call__(self, *args, **keywords):
            before = lean.cache.checks
            values = lean(*args, **keywords)
            calls.append((before, lean.cache.checks))
            return values

        def __getattr__(self, name):
            return getattr(lean, name)

    recipe.rewards = {"lean": Recording()}
    try:
        train(recipe, config, out, final_checkpoint=False, callbacks=recipe.run_callbacks())
    finally:
        recipe.close()
    records = MetricsLog(out / "metrics.jsonl").read()
    parameters = torch.cat([p.detach().flatten() for p in recipe.model.parameters()])
    return records, parameters, checker, calls


def test_streamed_and_sequential_scoring_give_the_same_update(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    streamed = _lean_run(tiny_model_dir, tmp_path / "a" / "run", True, monkeypatch)
    sequential = _lean_run(tiny_model_dir, tmp_path / "b" / "run", False, monkeypatch)
    for key in ("loss", "grad_norm", "reward/mean", "reward/std"):
        assert [r[key] for r in streamed[0]] == [r[key] for r in sequential[0]], key
    assert 0 < streamed[0][0]["reward/mean"] < 1  # the fake checker passed some and failed some
    assert torch.equal(streamed[1], sequential[1])
    # streamed: every check was asked for while generating; sequential: each after generation, by the call
    assert len(streamed[3]) == 2 and all(before == after > 0 for before, after in streamed[3])
    assert all(before < after for before, after in sequential[3])
    assert streamed[2].answered != sorted(streamed[2].answered)  # the answers really came out of order


# ---------------------------------------------------------------- the pipeline's FV condition, end to end


def test_the_pipelines_fv_condition_checks_through_twophase_lean_serve(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`twophase lean serve` (a process, on the fake REPL) checks the proofs of a real grpo_fv stage of the pipeline;
    the stages around it are fakes."""
    import twophase.launch.experiment as experiment
    from test_pipeline import LEAN_DEMO, FakeStages, _run, _write_config

    project, url_file = tmp_path / "project", tmp_path / "lean_server.json"
    project.mkdir()
    serve = subprocess.Popen([sys.executable, "-m", "twophase.launch.cli", "lean", "serve", "--project-dir", str(project),
                              "--port", "0", "--workers", "2", "--command", " ".join(FAKE_REPL), "--url-file", str(url_file)],
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        real_grpo_stage = experiment.run_grpo_stage
        FakeStages(monkeypatch)
        monkeypatch.setattr(experiment, "run_grpo_stage", real_grpo_stage)

        def dpo_stage(settings, stage_dir, resume):  # Phase 1's merged model: the tiny one
            shutil.copytree(tiny_model_dir, stage_dir / "merged")
            return {"merged": str(stage_dir / "merged")}

        monkeypatch.setattr(experiment, "run_dpo_stage", dpo_stage)
        lean = {"server": str(url_file), "pool_size": 2, "timeout": 10}
        config = _write_config(tmp_path, model=str(tiny_model_dir),
                               grpo={"dataset": LEAN_DEMO,
                                     "max_steps": 2, "device": "cpu", "precision": "fp32", "num_generations": 2,
                                     "max_new_tokens": 8, "lora": False, "save_every": 0},
                               conditions={"fv": {"reward": "lean", "reward_options": {"lean": lean}}})  # fmt: skip
        code, out, err = _run(capsys, "pipeline", "--config", str(config))
        assert code == 0, err
    finally:
        serve.terminate()
        _, log = serve.communicate(timeout=30)
    samples = [json.loads(line) for line in (tmp_path / "run" / "grpo_fv" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 * 2 and {s["rewards"]["lean"] for s in samples} <= {0.0, 1.0}
    reasons = {s["details"]["lean"]["reason"] for s in samples}
    assert reasons and reasons <= {"ok", "uses sorry", "declares an axiom"} | {r for r in reasons if r.startswith("error:")}
    assert [s["rewards"]["lean"] == 1.0 for s in samples] == [s["details"]["lean"]["reason"] == "ok" for s in samples]
    assert "lean serve: http://127.0.0.1:" in log and not url_file.exists()  # the server removed its address on exit


def test_bench_lean_models_the_step_and_streaming_shortens_it():
    """Fixed 2 s checks on 4 workers: after generation, 16 checks are four waves (2.93 + 8 + 1.68 s); streamed, the
    8 rows that end early are checked while the others generate, so the step is shorter; random is 2.93 + 1.68 s."""
    from twophase.launch.bench.lean import bench_lean

    result = bench_lean(steps=2, workers=4, median=2.0, sigma=0.0, timeout_share=0.0, time_scale=0.03)
    assert result["random_step_s"] == pytest.approx(2.93 + 1.68, abs=0.3)
    assert result["after_step_s"] == pytest.approx(2.93 + 4 * 2.0 + 1.68, abs=0.5)
    assert 2.93 + 2 * 2.0 + 1.68 - 0.1 <= result["streamed_step_s"] < result["after_step_s"] - 1.0
    # over HTTP the same, but for the round trips' real milliseconds, which the time scale multiplies by 33
    assert result["streamed_step_s"] - 0.2 <= result["remote_step_s"] <= result["streamed_step_s"] + 1.0
