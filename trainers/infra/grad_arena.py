"""One flat buffer for all gradients, whose memory the rollout's KV cache borrows between updates.

In a GRPO step the gradients exist only during the update: the loop drops
them after `optimizer.step()`, and the next step starts by generating. Under
full fine-tuning they are as large as the weights (13.1 GiB for a 7B model in
bf16), far more than the KV cache of 16 completions needs (5.6 GiB at 768
columns). So instead of allocating the cache on top of weights, optimizer state
and gradients, the generation engine carves it out of this buffer while no
gradient is alive, and `attach()` zeroes the buffer and hands each parameter a
view of it as its `.grad` before the update. Peak memory is then that of the
update alone, and the cache's address never changes, so the engine's CUDA
graphs stay valid across steps.

Autograd accumulates into an existing `.grad` in place, so backward fills the
views; the loop's `zero_grad(set_to_none=True)` only drops the references.
"""

from __future__ import annotations

import torch


class GradientArena:
    def __init__(self, parameters: list[torch.nn.Parameter]):
        dtypes = {p.dtype for p in parameters}
        if len(dtypes) != 1:
            raise ValueError(f"a gradient arena needs parameters of one dtype, got {sorted(map(str, dtypes))}")
        self.parameters = list(parameters)
        first = self.parameters[0]
        self.buffer = torch.zeros(sum(p.numel() for p in self.parameters), dtype=first.dtype, device=first.device)

    def attach(self) -> None:
        """Zero the buffer and make every parameter's `.grad` a view into it."""
        self.buffer.zero_()
        offset = 0
        for p in self.parameters:
            p.grad = self.buffer[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
