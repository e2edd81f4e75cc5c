"""What tests/test_distributed.py runs under `torchrun --nproc-per-node 2`: several jobs in one launch.

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_job.py SPEC.json

SPEC.json: {"dpo": DPOConfig keys, "grpo": GRPOConfig keys, "eval": {"model", "out", "settings"}}, each optional;
or {"fail_on_rank": R}: rank R raises while the others wait in a collective (a dead rank must end the job).
"""

import json
import sys
from pathlib import Path

from twophase.data.base import distributed  # noqa: E402


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if "fail_on_rank" in spec:
        distributed.start()
        if distributed.rank() == spec["fail_on_rank"]:
            raise RuntimeError(f"rank {distributed.rank()} breaks on purpose")
        distributed.barrier()  # waits for a rank that will never come
        return
    from twophase.trainers.config import DPOConfig, GRPOConfig, make_config

    if "dpo" in spec:
        from twophase.trainers.dpo import run_dpo

        run_dpo(make_config(DPOConfig, spec["dpo"]))
    if "grpo" in spec:
        from twophase.trainers.grpo import run_grpo

        run_grpo(make_config(GRPOConfig, spec["grpo"]))
    if "eval" in spec:
        from twophase.eval.runner import run_evaluation
        from twophase.eval.settings import EvalSettings

        run_evaluation(spec["eval"]["model"], spec["eval"]["out"], EvalSettings(**spec["eval"]["settings"]))
    distributed.stop()


if __name__ == "__main__":
    main(sys.argv[1])
