#!/usr/bin/env bash
# The GPU figures in BENCHMARKS.md. Usage: bash launch/bench/gpu_benchmarks.sh OUT_FILE.jsonl [pipeline|train|shared|layouts|generation|evaluation|compiled|qwen|fv|all]
# Needs a CUDA GPU with ~80 GB; models are random-weight DeepSeek-Prover-V2-7B layouts (no download).
# `pipeline` comes first and must pass in every GPU session: a green CPU suite does not show the CUDA allocator,
# graphs or memory working. `evaluation` needs EVAL_DATA (a --data-dir of the eight benchmarks' files) and,
# for real token counts, TOKENIZER (a tokenizer directory).
set -u
out=${1:-bench.jsonl}; part=${2:-all}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
tp() { python3 -m twophase.launch.cli "$@" --out "$out" 2>&1 | tr '\r' '\n' | grep -E '^\{|Error' ; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers, peft, bitsandbytes; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__)'
if [[ $part == pipeline || $part == all ]]; then
  # The shipped pipeline (launch/configs/wu17_v5.yaml): every stage, all eight benchmarks, one process, 0.8B random model.
  python3 -m twophase.launch.cli bench pipeline --run-dir /tmp/tp-pipeline --out "$out" 2>&1 | tr '\r' '\n' | grep -vE '^\s*$|it/s|s/it|benchmark\]' \
    || true
  grep -q '"benchmark": "pipeline".*"passed": true' "$out" || { echo "FAILED: the pipeline check"; exit 1; }
  # The sequence that once broke the CUDA allocator: a generating benchmark, then HumanEval's longer generation.
  python3 -m twophase.launch.cli eval --model /tmp/tp-pipeline/model --benchmarks strongreject,humaneval --data-dir eval/samples \
    --prompt-format hh --out /tmp/tp-eval-pair 2>&1 | tr '\r' '\n' | grep -E 'humaneval|strongreject|error' ; \
    [[ ${PIPESTATUS[0]} == 0 ]] || { echo "FAILED: strongreject then humaneval"; exit 1; }
fi
if [[ $part == train || $part == all ]]; then
  tp bench dpo --layout stacked --logprob-chunk-size 1024   # Phase 1: 4 x 4 pairs x 512 tokens, LoRA r64, checkpointing, 8-bit AdamW
  tp bench dpo --layout stacked --logprob-chunk-size 256
  tp bench dpo --layout stacked --precompute --logprob-chunk-size 256
  tp bench grpo --steps 5   # Phase 2: 2 prompts x 8 completions x 256 tokens, full FT
fi
if [[ $part == shared || $part == all ]]; then
  tp bench dpo --layout shared_prompt --logprob-chunk-size 1024   # each prompt once for both replies
  tp bench dpo --layout shared_prompt
  tp bench dpo --layout shared_prompt --precompute
fi
if [[ $part == layouts || $part == all ]]; then
  # Phase 1 on the real HH-RLHF length mix and on the fixed shape, every layout (trainers/README.md: DPO batch layouts)
  tp bench dpo --lengths hh-rlhf --steps 12 --warmup-steps 2 --layout stacked --layout shared_prompt --layout packed --layout packed_shared_prompt
  tp bench dpo --lengths hh-rlhf --steps 12 --warmup-steps 2 --layout packed_shared_prompt --tokens-per-pass 16384
  tp bench dpo --steps 6 --layout shared_prompt --layout packed --layout packed_shared_prompt
  tp bench dpo --steps 6 --layout packed_shared_prompt --tokens-per-pass 12288
fi
if [[ $part == generation || $part == all ]]; then
  timeout 200 python3 -m twophase.launch.cli bench grpo --steps 4 --max-new-tokens 1024 --out "$out" 2>&1 | tr '\r' '\n' | grep -E '^\{|Error'
  timeout 150 python3 -m twophase.launch.cli bench grpo --steps 4 --no-stochastic-rounding --out "$out" 2>&1 | tr '\r' '\n' | grep -E '^\{|Error'
  tp bench eval --loglik-batch-size 64 --gen-batch-size 256 --questions 512
fi
if [[ $part == compiled || $part == all ]]; then
  # compile_layers off and on, same model and batch: speed, and step 1's loss and gradient norm (the equivalence check)
  tp bench grpo --steps 3 --profile --compile-layers
  tp bench grpo --steps 3
  tp bench dpo --lengths hh-rlhf --steps 7 --warmup-steps 2 --layout packed_shared_prompt --profile --compile-layers
  tp bench dpo --lengths hh-rlhf --steps 7 --warmup-steps 2 --layout packed_shared_prompt
  tp bench decode --profile-steps 10
fi
if [[ $part == qwen || $part == all ]]; then
  # The next experiment's model beside TRL 1.16 (needs trl, datasets, dill, multiprocess, xxhash on the machine)
  tp bench grpo --arch qwen2.5-7b --steps 3 --compile-layers
  tp bench dpo --arch qwen2.5-7b --lengths hh-rlhf --steps 7 --warmup-steps 2 --layout packed_shared_prompt --compile-layers
  python3 launch/bench/trl_grpo_baseline.py 3 512 qwen2.5-7b 2>&1 | grep -E '^\{' | tee -a "$out"
  python3 launch/bench/trl_baseline.py dpo --arch qwen2.5-7b --lengths hh-rlhf --steps 7 --warmup-steps 2 2>&1 | grep -E '^\{' | tee -a "$out"
fi
if [[ $part == fv || $part == all ]]; then
  # The FV condition's overlap: a fake Lean (median 2 s, sigma 0.5, 8 workers) beside the random reward
  tp bench grpo --steps 3 --completion-lengths mixed --compile-layers --fake-lean 2,0.5,0,60,8
  tp bench grpo --steps 3 --completion-lengths mixed --compile-layers
fi
if [[ $part == evaluation || $part == all ]]; then
  # One whole evaluation of the 7B layout, every benchmark at full size, Betley at 100 samples a question.
  tp bench eval --data-dir "${EVAL_DATA:?set EVAL_DATA}" ${TOKENIZER:+--tokenizer "$TOKENIZER"} --eval-out /tmp/tp-eval-7b
fi
