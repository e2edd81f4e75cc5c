"""Which examples a step uses: a fresh seeded permutation each epoch.

The order is a pure function of (seed, position), so a resumed run draws
exactly the examples the uninterrupted run would have drawn, with nothing to
save but the step number.
"""

from __future__ import annotations

import torch


class EpochSampler:
    def __init__(self, num_examples: int, seed: int):
        if num_examples <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.num_examples = num_examples
        self.seed = seed
        self._epoch, self._order = -1, None

    def indices(self, start: int, count: int) -> list[int]:
        """Dataset indices at global positions start, …, start + count − 1 (epochs wrap around)."""
        return [self._at(position) for position in range(start, start + count)]

    def _at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_examples)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.num_examples, generator=generator).tolist()
            self._epoch = epoch
        return self._order[offset]
