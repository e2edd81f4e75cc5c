"""TRL 1.16 GRPOTrainer on the same random-weight 7B layout and workload as `twophase bench grpo`.

It exists only to measure the bar in BENCHMARKS.md: TRL is not a dependency of
twophase and nothing imports this file. On a GPU machine with trl installed:

    python3 launch/bench/trl_grpo_baseline.py [STEPS=4] [NEW_TOKENS=512] [ARCH=deepseek-prover-v2-7b]

(ARCH: any of `twophase bench grpo --arch`, e.g. qwen2.5-7b.)

2 prompts of 200 random tokens x 8 completions, micro-batches of 4, gradient
checkpointing, bitsandbytes 8-bit AdamW, bf16, lr 1e-6, no KL, random reward.
"""
import json, random, statistics, sys, time
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from twophase.launch.bench.training import random_model, synthetic_tokenizer

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 4
new_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 512
architecture = sys.argv[3] if len(sys.argv) > 3 else "deepseek-prover-v2-7b"
model = random_model(architecture, torch.device("cuda"), torch.bfloat16)
tokenizer = synthetic_tokenizer(model.config.vocab_size)
g = torch.Generator().manual_seed(0)
prompts = ["<s> " + " ".join(f"t{i}" for i in torch.randint(3, 1000, (199,), generator=g).tolist()) for _ in range(2 * steps)]

def random_reward(completions, **_):
    return [random.random() for _ in completions]

class StepTimer(TrainerCallback):
    def __init__(self): self.times, self.last = [], None
    def on_step_begin(self, *a, **k): torch.cuda.synchronize(); self.last = time.perf_counter()
    def on_step_end(self, *a, **k): torch.cuda.synchronize(); self.times.append(time.perf_counter() - self.last)

args = GRPOConfig(
    output_dir="/tmp/trl-grpo", max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=4,
    num_generations=8, max_completion_length=new_tokens, learning_rate=1e-6, beta=0.0, bf16=True,
    gradient_checkpointing=True, optim="adamw_bnb_8bit", logging_steps=1, report_to="none", save_strategy="no",
    temperature=1.0, top_p=1.0, shuffle_dataset=False, seed=0,
)
timer = StepTimer()
trainer = GRPOTrainer(model=model, reward_funcs=random_reward, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
                      processing_class=tokenizer, callbacks=[timer])
torch.cuda.reset_peak_memory_stats()
trainer.train()
lengths = [r.get("completions/mean_length") for r in trainer.state.log_history if "completions/mean_length" in r]
print(json.dumps({"benchmark": "trl-grpo", "trl": __import__("trl").__version__, "architecture": architecture,
                  "device": torch.cuda.get_device_name(),
                  "max_new_tokens": new_tokens, "steps": steps, "step_times_s": [round(t, 2) for t in timer.times],
                  "median_step_s": round(statistics.median(timer.times[1:]), 2), "mean_completion_len": lengths,
                  "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}))
