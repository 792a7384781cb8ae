"""The per-step payload: a small float vector that rides in the masked allreduce's first bucket.

Everything every worker wants to know about a step (each task's loss, NaN flags, which task each
rank ran, how long it waited for data) is summed across workers in the same collective as the
gradients, so it costs no extra round trip. This object owns the vector's layout: components
register named slots before the first step and put values into them during a step; readers
take named views of the summed vector. Nobody else knows an offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slot:
    name: str
    offset: int
    size: int
    windowed: bool  # summed over a logging window (False: only meaningful per step)


class StepPayload:
    """Named slots of the per-step statistics vector.

    >>> p = StepPayload(); p.register("loss", 3); p.add("loss", 1, 0.5)
    >>> vec = p.build(torch.device("cpu")); p.view(vec, "loss").tolist()
    [0.0, 0.5, 0.0]
    """

    def __init__(self) -> None:
        self.slots: dict[str, Slot] = {}
        self.size = 0
        self._staged: list[tuple[int, float | torch.Tensor]] = []
        self._frozen = False

    def register(self, name: str, size: int, windowed: bool = True) -> Slot:
        """Add a slot of `size` floats. Every rank must register the same slots in the same order
        (the vector is summed element-wise), before the first step builds a vector."""
        if self._frozen:
            raise RuntimeError(f"payload slot {name!r} registered after the first step; register in setup")
        if name in self.slots:
            raise ValueError(f"payload slot {name!r} is already registered")
        if size < 1:
            raise ValueError(f"payload slot {name!r} needs size >= 1, got {size}")
        slot = Slot(name, self.size, size, windowed)
        self.slots[name] = slot
        self.size += size
        return slot

    def add(self, name: str, index: int, value: float | torch.Tensor) -> None:
        """Put `value` at `index` of slot `name` for the current step (added to what is there)."""
        slot = self.slots[name]
        if not 0 <= index < slot.size:
            raise IndexError(f"payload slot {name!r} has {slot.size} entries, index {index}")
        self._staged.append((slot.offset + index, value))

    def put(self, name: str, start: int, values: torch.Tensor) -> None:
        """Put a vector at entries start..start+len of slot `name` (added to what is there)."""
        slot = self.slots[name]
        n = values.numel()
        if not (0 <= start and start + n <= slot.size):
            raise IndexError(f"payload slot {name!r} has {slot.size} entries, got {n} at {start}")
        self._staged.append((slot.offset + start, values.detach().flatten()))

    def build(self, device: torch.device) -> torch.Tensor:
        """This step's vector (zeros where nothing was put); clears the staged values."""
        self._frozen = True
        vec = torch.zeros(self.size, device=device)
        for pos, value in self._staged:
            if torch.is_tensor(value) and value.dim() == 1:
                vec[pos : pos + value.numel()] += value.float().to(device)
            else:
                vec[pos] += value.detach().float() if torch.is_tensor(value) else float(value)
        self._staged.clear()
        return vec

    def view(self, vec: torch.Tensor, name: str) -> torch.Tensor:
        slot = self.slots[name]
        return vec[slot.offset : slot.offset + slot.size]

    def windowed_mask(self) -> torch.Tensor:
        """1 where a slot is summed over a window, 0 where it is per-step only."""
        mask = torch.zeros(self.size)
        for s in self.slots.values():
            if s.windowed:
                mask[s.offset : s.offset + s.size] = 1.0
        return mask
