"""WMDP: hazardous knowledge in biosecurity, chemical security and cybersecurity.

The Weapons of Mass Destruction Proxy (Li et al., 2024): 3,668 four-option
questions in three subsets (bio 1,273, chem 408, cyber 1,987). A lower score
means less hazardous knowledge, which is what unlearning aims for. Asked
zero-shot in MMLU's format (`eval.benchmarks.mmlu`) and answered by the
log-likelihood of the letters. Reported: accuracy per subset and overall,
the overall being total correct / total questions, so each subset weighs by
its size.
"""

from __future__ import annotations

from pathlib import Path

from twophase.data.base.errors import UserError
from twophase.data.base.hub import is_local, load_hub_dataset
from twophase.eval.benchmarks.base import Benchmark, EvalContext, read_local_file
from twophase.eval.benchmarks.mmlu import accuracy_by, format_question, header, interleave, make_question, score_lettered
from twophase.eval.benchmarks.metrics import Metric, proportion

# subset (the hub config name and the local file stem) -> the topic in the header, as
# lm-evaluation-harness's wmdp_bio / wmdp_chem / wmdp_cyber tasks write it
SUBSETS = {"wmdp-bio": "biology", "wmdp-chem": "chemistry", "wmdp-cyber": "cybersecurity"}


def build_prompt(item: dict) -> str:
    return header(SUBSETS[item["group"]]) + format_question(item)


def _local_file(root: Path, subset: str) -> Path | None:
    for suffix in (".jsonl", ".json"):
        if (root / f"{subset}{suffix}").exists():
            return root / f"{subset}{suffix}"
    return None


def _subset(rows, subset: str, where: str) -> list[dict]:
    return [
        make_question(f"{subset}/{i}", subset, row["question"], row["choices"], row["answer"], f"{where} row {i}")
        for i, row in enumerate(rows)
    ]


class WMDP(Benchmark):
    name = "wmdp"
    default_source = "cais/wmdp"  # configs wmdp-bio, wmdp-chem, wmdp-cyber
    split = "test"
    local_file = "wmdp"  # a directory of wmdp-bio.jsonl, wmdp-chem.jsonl, wmdp-cyber.jsonl
    description = "WMDP: zero-shot hazardous-knowledge multiple choice (bio, chem, cyber); lower is less hazardous knowledge"
    own_prompt_format = "raw"  # its own text, never a chat template

    def load(self, source: str | None, limit: int | None) -> list[dict]:
        """All three subsets from the hub, or whichever of wmdp-{bio,chem,cyber}.json(l) a directory holds."""
        source = source or self.default_source
        subsets = {}
        if is_local(source):
            root = Path(source).expanduser()
            for subset in SUBSETS:
                path = _local_file(root, subset)
                if path is not None:
                    subsets[subset] = _subset(read_local_file(path), subset, str(path))
            if not subsets:
                raise UserError(f"{source}: no WMDP files found (expected wmdp-bio.jsonl, wmdp-chem.jsonl, wmdp-cyber.jsonl)")
        else:
            for subset in SUBSETS:
                subsets[subset] = _subset(load_hub_dataset(source, "test", name=subset), subset, f"{source}/{subset}")
        return interleave(subsets, limit)

    def evaluate(self, items: list[dict], ctx: EvalContext) -> dict[str, Metric]:
        records = score_lettered(items, [build_prompt(item) for item in items], ctx, desc="wmdp")
        per_subset = accuracy_by(records, lambda r: r["group"])
        overall = proportion(sum(r["correct"] for r in records), len(records))
        return {"accuracy": overall, **{s.removeprefix("wmdp-"): per_subset[s] for s in SUBSETS if s in per_subset}}
