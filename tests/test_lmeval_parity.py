"""twophase's MMLU, WMDP, TruthfulQA and log-likelihood scorer against lm-evaluation-harness's recorded output.

tests/fixtures/lmeval_parity.json holds what lm-eval 0.4.x produced on small documents in the hub's
schemas (tests/fixtures/make_lmeval_fixtures.py, run once in a separate environment with lm-eval
installed): its prompt strings, its context/continuation token splits, its log-likelihoods on the
tests' tiny model and its predictions. Nothing here imports lm-eval.
"""

import json
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
import torch

from twophase.data.base.hub import load_causal_lm, load_tokenizer
from twophase.data.base.tiny import build_tiny_model
from twophase.eval.benchmarks.base import EvalContext
from twophase.eval.benchmarks.mmlu import MMLU, build_prompt as mmlu_prompt
from twophase.eval.benchmarks.truthfulqa import TruthfulQA, build_prompt as truthfulqa_prompt
from twophase.eval.benchmarks.wmdp import WMDP, build_prompt as wmdp_prompt
from twophase.data.tokens import encode_continuation
from twophase.eval.engine.loglikelihood import LoglikelihoodEngine, LoglikelihoodRequest, split_pair

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LMEVAL = json.loads((FIXTURES / "lmeval_parity.json").read_text(encoding="utf-8"))
TOLERANCE = 1e-4  # float32 forwards of different batch shapes


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir)
    model.eval()
    return model, load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def sentencepiece():
    tokenizer = load_tokenizer(str(FIXTURES / "sentencepiece_tokenizer"))
    torch.manual_seed(0)
    model = build_tiny_model(len(tokenizer), seed=0)
    model.eval()
    return model, tokenizer


def context_for(model, tokenizer):
    records = []
    ctx = EvalContext(generator=None, scorer=LoglikelihoodEngine(model, tokenizer, batch_size=4), judge=None,
                      format_prompt=None, audit=records.append, limit=None, seed=0, options={"num_shots": 2})
    return ctx, records


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# --------------------------------------------------------------------------- MMLU and WMDP


def test_mmlu_prompts_loglikelihoods_and_predictions_match_lm_eval(tiny, tmp_path):
    recorded = LMEVAL["mmlu"]
    # the hub's layout: test rows as parquet (as cais/mmlu stores them), dev rows as JSON lines
    (tmp_path / "all").mkdir()
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(recorded["test"]), tmp_path / "all" / "test-00000-of-00001.parquet")
    write_jsonl(tmp_path / "all" / "dev.jsonl", recorded["dev"])
    items = MMLU().load(str(tmp_path), None)
    assert [mmlu_prompt(item, item["shots"][:2]) for item in items] == recorded["prompts"]
    # questions are stripped, choices are not: " burning coal" keeps its space after "C."
    assert "\nC.  burning coal\n" in recorded["prompts"][0] and "\n\nWhat makes stars shine?\n" in recorded["prompts"][0]

    ctx, records = context_for(*tiny)
    MMLU().evaluate(items, ctx)
    scored = [r for r in records if "loglikelihoods" in r]
    for record, lls, prediction in zip(scored, recorded["loglikelihoods"], recorded["predictions"]):
        assert list(record["loglikelihoods"].values()) == pytest.approx(lls, abs=TOLERANCE)
        assert record["prediction"] == "ABCD"[prediction]


def test_wmdp_prompts_match_lm_eval(tmp_path):
    for subset, rows in LMEVAL["wmdp"]["docs"].items():
        write_jsonl(tmp_path / f"{subset}.jsonl", rows)
    items = WMDP().load(str(tmp_path), None)
    assert {item["group"]: wmdp_prompt(item) for item in items} == LMEVAL["wmdp"]["prompts"]


# --------------------------------------------------------------------------- TruthfulQA


def test_truthfulqa_prompts_mc1_and_mc2_match_lm_eval(tiny, tmp_path):
    recorded = LMEVAL["truthfulqa"]
    write_jsonl(tmp_path / "truthful_qa" / "multiple_choice" / "validation.jsonl", recorded["docs"])  # the hub's layout
    items = TruthfulQA().load(str(tmp_path / "truthful_qa"), None)
    assert [truthfulqa_prompt(item["question"]) for item in items] == recorded["prompts"]

    ctx, records = context_for(*tiny)
    metrics = TruthfulQA().evaluate(items, ctx)
    for record, mc1, mc2, correct, mass in zip(records, recorded["mc1_loglikelihoods"], recorded["mc2_loglikelihoods"],
                                               recorded["mc1_correct"], recorded["mc2"]):
        assert record["mc1"]["loglikelihoods"] == pytest.approx(mc1, abs=TOLERANCE)
        assert record["mc2"]["loglikelihoods"] == pytest.approx(mc2, abs=TOLERANCE)
        assert record["correct"] == correct
        assert record["mc2_true_mass"] == pytest.approx(mass, rel=1e-3)
    assert metrics["mc1"].k == sum(recorded["mc1_correct"])


# --------------------------------------------------------------------------- the log-likelihood tokenization


@pytest.mark.parametrize("tokenizer_kind", ["pairs_byte_bpe", "pairs_sentencepiece"])
def test_context_and_continuation_split_as_lm_eval_does(tiny, sentencepiece, tokenizer_kind):
    _, tokenizer = tiny if tokenizer_kind == "pairs_byte_bpe" else sentencepiece
    for case in LMEVAL[tokenizer_kind]["splits"]:
        context_ids, continuation_ids = split_pair(tokenizer, case["context"], case["continuation"])
        assert (context_ids, continuation_ids) == (case["context_ids"], case["continuation_ids"]), case


def test_sentencepiece_continuation_tokenized_alone_would_differ(sentencepiece):
    """Why the split is joint: alone, " A" gets SentencePiece's own space in front of it, ['▁', '▁A']."""
    _, tokenizer = sentencepiece
    alone = encode_continuation(tokenizer, " A")
    _, joint = split_pair(tokenizer, "Question: which one?\nAnswer:", " A")
    assert tokenizer.convert_ids_to_tokens(alone) == ["▁", "▁A"]
    assert tokenizer.convert_ids_to_tokens(joint) == ["▁A"]


def test_sentencepiece_loglikelihoods_match_lm_eval(sentencepiece):
    model, tokenizer = sentencepiece
    recorded = LMEVAL["pairs_sentencepiece"]
    requests = [LoglikelihoodRequest(case["context"], case["continuation"]) for case in recorded["splits"]]
    values = LoglikelihoodEngine(model, tokenizer, batch_size=3).loglikelihood(requests)
    assert values == pytest.approx(recorded["loglikelihoods"], abs=TOLERANCE)
