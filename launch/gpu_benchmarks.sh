#!/usr/bin/env bash
# The GPU figures in BENCHMARKS.md, in one go. Usage: bash launch/gpu_benchmarks.sh OUT_FILE.jsonl
# Needs a CUDA GPU with ~80 GB; models are random-weight DeepSeek-Prover-V2-7B layouts (no download).
set -u
out=${1:-bench.jsonl}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
tp() { python3 -m launch.cli "$@" --out "$out" 2>&1 | grep -E '^\{|Error|error' ; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers, peft, bitsandbytes; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__)'
tp bench dpo                                   # Phase 1: 4 x 4 pairs x 512 tokens, LoRA r64, checkpointing, 8-bit AdamW
tp bench dpo --precompute                      # same, reference log-probs precomputed
tp bench dpo --micro-batch-size 8 --grad-accum-steps 2
tp bench grpo                                  # Phase 2: 2 prompts x 8 completions x 256 tokens, full fine-tuning
tp bench grpo --max-new-tokens 1024
tp bench eval                                  # eval engines: MMLU-shaped log-likelihood, StrongREJECT-shaped generation
