#!/usr/bin/env bash
# The GPU figures in BENCHMARKS.md. Usage: bash launch/bench/gpu_benchmarks.sh OUT_FILE.jsonl [train|shared|layouts|generation|all]
# Needs a CUDA GPU with ~80 GB; models are random-weight DeepSeek-Prover-V2-7B layouts (no download).
set -u
out=${1:-bench.jsonl}; part=${2:-all}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
tp() { python3 -m twophase.launch.cli "$@" --out "$out" 2>&1 | tr '\r' '\n' | grep -E '^\{|Error' ; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers, peft, bitsandbytes; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__)'
if [[ $part == train || $part == all ]]; then
  tp bench dpo --layout stacked --logprob-chunk-size 1024   # Phase 1: 4 x 4 pairs x 512 tokens, LoRA r64, checkpointing, 8-bit AdamW
  tp bench dpo --layout stacked --logprob-chunk-size 256
  tp bench dpo --layout stacked --precompute --logprob-chunk-size 256
  tp bench grpo --steps 5 --generation-cache static   # Phase 2: 2 prompts x 8 completions x 256 tokens, full FT
fi
if [[ $part == shared || $part == all ]]; then
  tp bench dpo --layout shared_prompt --logprob-chunk-size 1024   # each prompt once for both replies
  tp bench dpo --layout shared_prompt
  tp bench dpo --layout shared_prompt --precompute
fi
if [[ $part == layouts || $part == all ]]; then
  # Phase 1 on the real HH-RLHF length mix and on the fixed shape, every layout (README: DPO batch layouts)
  tp bench dpo --lengths hh-rlhf --steps 12 --warmup-steps 2 --layout stacked --layout shared_prompt --layout packed --layout packed_shared_prompt
  tp bench dpo --lengths hh-rlhf --steps 12 --warmup-steps 2 --layout packed_shared_prompt --tokens-per-pass 16384
  tp bench dpo --steps 6 --layout shared_prompt --layout packed --layout packed_shared_prompt
  tp bench dpo --steps 6 --layout packed_shared_prompt --tokens-per-pass 12288
fi
if [[ $part == generation || $part == all ]]; then
  timeout 200 python3 -m twophase.launch.cli bench grpo --steps 4 --max-new-tokens 1024 --generation-cache static --out "$out" 2>&1 | tr '\r' '\n' | grep -E '^\{|Error'
  timeout 150 python3 -m twophase.launch.cli bench grpo --steps 4 --generation-cache static --no-stochastic-rounding --out "$out" 2>&1 | tr '\r' '\n' | grep -E '^\{|Error'
  tp bench eval --loglik-batch-size 64 --gen-batch-size 256 --questions 512
fi
