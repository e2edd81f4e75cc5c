"""Run a list of benchmarks on one model and write their results (what `twophase eval` does).

For each benchmark: work out its settings and their hash; skip it if DIR
already holds a finished result with the same hash (resume); otherwise load
its items, run it through the shared engines and the judge, and write its
result JSON and audit JSONL. A benchmark that raises (dataset unreachable,
judge down, out of memory) is recorded as failed with its reason, and the
others still run. The model is loaded only if some benchmark has to run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from twophase.data.base import distributed
from twophase.data.base.errors import UserError, reason_of
from twophase.data.base.hub import TRAINED_FILE, check_path_exists, how_trained
from twophase.data.base.progress import progress, say
from twophase.data.prompts import EVAL_FORMATS, check_format, format_question, resolved_format
from twophase.data.base.run_dir import owned
from twophase.eval.benchmarks import get_benchmark, local_source
from twophase.eval.engine.loglikelihood import LoglikelihoodEngine
from twophase.eval.engine.generation import GenerationEngine
from twophase.eval.judges import make_judge
from twophase.eval.results import (
    SUMMARY_FILE,
    AuditLog,
    audit_path,
    finished_result,
    read_json,
    result_path,
    source_digest,
    stable_hash,
    write_json_atomic,
)
from twophase.eval.sandbox.container import remove_stale_exec_folders
from twophase.eval.settings import EvalSettings


def run_evaluation(
    model: str,
    out_dir,
    settings: EvalSettings = EvalSettings(),
    *,
    run_name: str | None = None,
    model_obj=None,
    tokenizer_obj=None,
    sources: dict | None = None,
) -> dict:
    """Evaluate `model` (a path or hub id; or `model_obj`/`tokenizer_obj` already loaded) as `settings` say.

    sources: {benchmark: local path or hub id}, overriding settings.data_dir.
    Returns the run summary, also written to out_dir/summary.json.
    """
    settings = settings.checked()
    if model_obj is None:
        check_path_exists("model", model)
        settings = _asked_as_trained(settings, model)
    distributed.start()  # under torchrun: the ranks share the items of each benchmark (eval/engine/loglikelihood.py, eval/engine/generation.py)
    with owned(out_dir) as out:  # one writer per output directory (under torchrun, rank 0)
        remove_stale_exec_folders()
        runtime = _Runtime(model, model_obj, tokenizer_obj, settings.batch_size, settings.seed, settings.dtype)
        summary = _start_summary(out, model, run_name, settings.names)
        say(f"eval: {model} on {settings.benchmarks.replace(',', ', ')} -> {out}")
        with progress(total=len(settings.names), desc="eval", unit="benchmark") as bar:
            for kind, judge_options, names in settings.judge_groups():
                judge = make_judge(kind, judge_options)  # loaded once for the benchmarks it serves
                for name in names:
                    summary["benchmarks"][name] = _evaluate_one(name, out, model, run_name, judge, settings, sources, runtime)
                    write_json_atomic(out / SUMMARY_FILE, summary)
                    bar.update()
    distributed.barrier()  # every rank returns once rank 0's files exist
    failed = [n for n, e in summary["benchmarks"].items() if e["status"] == "failed"]
    say(f"eval: results in {out} ({SUMMARY_FILE}, <benchmark>.json, <benchmark>.jsonl)"
         + (f"; failed: {', '.join(failed)}" if failed else ""))  # fmt: skip
    return summary


def _asked_as_trained(settings: EvalSettings, model: str) -> EvalSettings:
    """prompt_format auto, for a model twophase trained: the format it was trained in (its twophase.json)."""
    if settings.prompt_format != "auto":
        return settings
    trained = how_trained(model) or {}
    asked = trained.get("eval_prompt_format")
    if asked in ("hh", "chat", "raw"):
        say(f"eval: asking in the {asked} format, the one {model} was trained in ({TRAINED_FILE}: {trained.get('phase')}); "
             f"--prompt-format overrides it")  # fmt: skip
        return dataclasses.replace(settings, prompt_format=asked)
    say("eval: asking in the chat template if the tokenizer has one, else with the bare question (--prompt-format auto)")
    return settings


def _evaluate_one(name, out, model, run_name, judge_obj, settings: EvalSettings, sources, runtime) -> dict:
    """Run one benchmark, or reuse its finished result; its summary entry. A failure is recorded, not raised."""
    benchmark = get_benchmark(name)
    bench_options = _options_for(name, settings.options)
    try:
        source = (sources or {}).get(name) or local_source(benchmark, settings.data_dir)
        described = {
            "benchmark": name,
            "model": model,
            "source": source or benchmark.default_source,
            "source_digest": source_digest(source),
            "limit": settings.limit,
            "judge": judge_obj.describe(),
            "prompt_format": benchmark.own_prompt_format or settings.prompt_format,
            "seed": settings.seed,
            "options": benchmark.settings(bench_options),
        }
        settings_hash = stable_hash(described)
        earlier = distributed.broadcast_from_main(finished_result(out, name, settings_hash))  # every rank decides alike
        if benchmark.needs_scoring_judge and not judge_obj.can_score:
            result = _no_judge_result(benchmark, described, out, run_name)
            say(f"  {name}: skipped, {NO_JUDGE} (it needs a 0-100 judge: --judge local --judge-model PATH)")
            return _summary_entry(result, out)
        if earlier is not None:
            say(f"  {name}: finished earlier with the same settings, reusing {result_path(out, name)}")
            return _summary_entry(earlier, out, resumed=True)
        result = _run_one(benchmark, source, described, settings_hash, runtime, judge_obj, out, settings, bench_options, run_name)
        say(f"  {name}: {_headline(result)}")
        return _summary_entry(result, out)
    except ModelUnavailable:  # every benchmark would fail the same way
        raise
    except Exception as err:  # noqa: BLE001 - one broken benchmark must not stop the others
        reason = _reason(err)
        failed = {
            "benchmark": name,
            "status": "failed",
            "reason": reason,
            "model": model,
            "run_name": run_name,
            "traceback": traceback.format_exc(limit=20),
            "finished_at": _now(),
        }
        _write_result_without_audit(out, name, failed)
        say(f"  {name}: FAILED - {reason}")
        runtime.free_memory()
        return _summary_entry(failed, out)


# --------------------------------------------------------------------------- one benchmark


def _run_one(benchmark, source, described, settings_hash, runtime, judge, out, settings: EvalSettings, options, run_name) -> dict:
    from twophase.eval.benchmarks.base import EvalContext

    start = time.perf_counter()
    items = benchmark.load(source, settings.limit)
    if not items:
        raise UserError(f"{benchmark.name}: no items to evaluate in {described['source']}")
    benchmark.check_ready(options)
    generator, scorer, tokenizer = runtime.engines()
    check_format(settings.prompt_format, EVAL_FORMATS, tokenizer)  # once, not per question: chat needs a template
    hasher = hashlib.sha256()
    generator.prompt_hasher = scorer.prompt_hasher = hasher
    gen_before, score_before = dict(generator.stats), dict(scorer.stats)
    generator.batch_rows.clear()
    scorer.batch_rows.clear()
    with AuditLog(audit_path(out, benchmark.name)) as audit:
        ctx = EvalContext(
            generator=generator,
            scorer=scorer,
            judge=judge,
            format_prompt=lambda user, system=None: format_question(tokenizer, user, system, settings.prompt_format),
            audit=audit.write,
            limit=settings.limit,
            seed=settings.seed,
            options=dict(options),
        )
        try:
            metrics = benchmark.evaluate(items, ctx)
        finally:
            generator.prompt_hasher = scorer.prompt_hasher = None
        audit_sha256 = audit.commit()  # the audit first, the result last (eval/results.py)
    result = {
        "benchmark": benchmark.name,
        "status": "ok",
        "model": described["model"],
        "run_name": run_name,
        "prompt_format": benchmark.own_prompt_format or resolved_format(tokenizer, settings.prompt_format),
        "metrics": {name: metric.to_dict() for name, metric in metrics.items()},
        "metric_labels": dict(benchmark.metric_labels),
        "details": ctx.details,
        "n_items": len(items),
        "prompt_hash": "sha256:" + hasher.hexdigest(),
        "settings": described,
        "settings_hash": settings_hash,
        "options_given": options,
        "audit_file": audit_path(out, benchmark.name).name,
        "audit_records": audit.records,
        "audit_sha256": audit_sha256,
        "seconds": round(time.perf_counter() - start, 3),
        "engine_stats": {
            "generation": _stats_delta(gen_before, generator.stats),
            "loglikelihood": _stats_delta(score_before, scorer.stats),
        },
        "batch_rows": {"generation": sorted(generator.batch_rows), "loglikelihood": sorted(scorer.batch_rows)},
        "finished_at": _now(),
        "versions": _versions(),
    }
    write_json_atomic(result_path(out, benchmark.name), result)
    return result


NO_JUDGE = "no judge configured"


def _no_judge_result(benchmark, described: dict, out: Path, run_name: str | None) -> dict:
    """The result of a benchmark that needs a 0-100 judge and has none: its rows say so in every table."""
    result = {
        "benchmark": benchmark.name,
        "status": "skipped",
        "reason": NO_JUDGE,
        "model": described["model"],
        "run_name": run_name,
        "prompt_format": described["prompt_format"],
        "metric_names": list(benchmark.metric_names),
        "metric_labels": dict(benchmark.metric_labels),
        "finished_at": _now(),
    }
    _write_result_without_audit(out, benchmark.name, result)
    return result


def _write_result_without_audit(out: Path, name: str, result: dict) -> None:
    """A failed or skipped result; an earlier audit file belonged to the result it replaces, so it goes too."""
    write_json_atomic(result_path(out, name), result)
    if distributed.is_main():
        audit_path(out, name).unlink(missing_ok=True)


class ModelUnavailable(UserError):
    """The model cannot be loaded: the evaluation stops (every benchmark would fail the same way)."""


class _Runtime:
    """The model, tokenizer and engines, loaded on first use and shared by all benchmarks."""

    def __init__(self, model, model_obj, tokenizer_obj, batch_size, seed, dtype):
        self.model_id, self.model, self.tokenizer = model, model_obj, tokenizer_obj
        self.batch_size, self.seed, self.dtype = batch_size, seed, dtype
        self._engines = None

    def engines(self):
        if self._engines is None:
            try:
                self._load()
            except UserError as err:
                raise ModelUnavailable(str(err)) from None
            self._engines = (
                GenerationEngine(self.model, self.tokenizer, batch_size=self.batch_size, seed=self.seed),
                LoglikelihoodEngine(self.model, self.tokenizer, batch_size=self.batch_size),
                self.tokenizer,
            )
        return self._engines

    def _load(self) -> None:
        import torch

        from twophase.data.base.hub import is_adapter_dir, load_adapter_model, load_causal_lm, load_tokenizer

        if self.model is None:
            cuda = torch.cuda.is_available()
            dtype = getattr(torch, self.dtype) if self.dtype else (torch.bfloat16 if cuda else None)
            device = str(distributed.local_device(torch.device("cuda"))) if cuda else None
            if is_adapter_dir(self.model_id):  # a LoRA adapter: its base model with the adapter unmerged
                say(f"eval: loading the adapter {self.model_id} on its base model ({'cuda' if cuda else 'cpu'}, {dtype or 'saved dtype'})")
                self.model, tokenizer = load_adapter_model(self.model_id, dtype=dtype, device=device)
                self.tokenizer = self.tokenizer or tokenizer
            else:
                say(f"eval: loading {self.model_id} ({'cuda' if cuda else 'cpu'}, {dtype or 'saved dtype'})")
                self.model = load_causal_lm(self.model_id, dtype=dtype, device=device)
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.model_id)
        self.model.eval()

    def free_memory(self) -> None:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - best effort after a failure
            pass


# --------------------------------------------------------------------------- helpers


def _options_for(name: str, options: dict) -> dict:
    """Plain keys, then `name.key` keys for this benchmark (which win); other benchmarks' keys dropped."""
    plain = {k: v for k, v in options.items() if "." not in k}
    mine = {k.split(".", 1)[1]: v for k, v in options.items() if k.startswith(name + ".")}
    return {**plain, **mine}


def _reason(err: Exception) -> str:
    if type(err).__name__ == "OutOfMemoryError":
        return reason_of(err)[:250] + "; lower --batch-size (or the pipeline's eval.batch_size)"
    return reason_of(err)


def _start_summary(out: Path, model: str, run_name: str | None, names: list[str]) -> dict:
    # Keep entries of benchmarks this call does not touch, so runs can be built up piecewise.
    earlier = read_json(out / SUMMARY_FILE) or {}
    entries = {k: v for k, v in (earlier.get("benchmarks") or {}).items() if k not in names}
    return {"model": model, "run_name": run_name or earlier.get("run_name"), "out_dir": str(out), "benchmarks": entries}


def _summary_entry(result: dict, out: Path, resumed: bool = False) -> dict:
    entry = {"status": result["status"], "result": str(result_path(out, result["benchmark"]))}
    if result["status"] == "ok":
        entry["metrics"] = {k: v.get("value") for k, v in result.get("metrics", {}).items()}
        entry["audit"] = str(audit_path(out, result["benchmark"]))
        entry["resumed"] = resumed
    else:
        entry["reason"] = result.get("reason")
    return entry


def _headline(result: dict) -> str:
    parts = []
    for name, m in result["metrics"].items():
        value = m.get("value")
        parts.append(f"{name}={'n/a' if value is None else format(value, '.3f')}")
    return f"done in {result['seconds']:.1f}s: " + ", ".join(parts)


def _stats_delta(before: dict, after: dict) -> dict:
    return {k: round(after[k] - before.get(k, 0), 3) for k in after}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
