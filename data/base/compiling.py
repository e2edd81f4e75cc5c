"""torch.compile with a way back: a function that runs compiled where it can and eagerly where it cannot.

Compiling fuses what eager PyTorch runs as many small kernels (RMSNorm's upcast, mean of
squares and scaling; RoPE's rotations; SiLU times the up projection) into few. It can fail
on a machine without a working Triton or C++ compiler, and on code the compiler cannot
handle; then the same function runs eagerly, once a warning has said so, and the numbers
are those of the eager function (up to the rounding of fused arithmetic).
"""

from __future__ import annotations

import warnings

import torch


def compiled_or_eager(fn, dynamic: bool | None = True, backend="inductor"):
    """`fn`, compiled on its first call; if compiling fails, `fn` itself from then on.

    `backend` is torch.compile's: the CPU tests pass one that runs the traced graph as it
    is, to check that tracing keeps every number to the bit.
    """
    warnings.filterwarnings("ignore", message="Online softmax is disabled")  # Inductor's note on log_softmax
    compiled = torch.compile(fn, dynamic=dynamic, backend=backend)
    state = {"fn": compiled}

    def call(*args, **kwargs):
        try:
            return state["fn"](*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as err:  # the compiler's failures, Inductor's included
            # Only those: other exceptions pass through, e.g. the one gradient checkpointing raises
            # inside a recomputed block to stop the recomputation early.
            if state["fn"] is fn:
                raise
            warnings.warn(f"torch.compile failed for {getattr(fn, '__name__', fn)} ({type(err).__name__}); running it eagerly")
            state["fn"] = fn
            return fn(*args, **kwargs)

    return call
