"""A step's network samples in calls: how many a call (`max_batch: auto`), and the calls themselves."""
from __future__ import annotations

from typing import Any, Callable

import torch

# `max_batch: auto` on the CPU: the activations one call may hold. Measured on a quiet 2-core x86 CPU
# with SD2's UNet in float32, freed memory kept for reuse (README, Benchmark): seconds per sample at
# 64x64 latents were within 1% from 4 to 6 samples a call (+2% at 2 and at 8, +7% at 1); at 32x32
# they fell all the way to 24 (+11% at 5, +2% at 16). A call's weights are read once for all its
# samples, so small calls cost more per sample. 6 samples of 64x64 latents of SD2's UNet (1.2 GiB by
# models/sd.py's estimate, 24 of 32x32) is at the fastest for both.
CPU_CALL_BYTES = 6 * 4096 * 320 * 4 * 40
FREE_MEMORY_SHARE = 0.8  # `max_batch: auto` fills at most this share of the free memory (the memory check refuses at 0.9)
FALLBACK_SAMPLES_PER_CALL = 16  # auto where free memory cannot be told (MPS): past this, GPUs gain little
MAX_SAMPLES_PER_CALL = 4096  # the scene's max_batch bound

ModelCall = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""forward(inputs (B, C, h, w), t, conditioning rows (B)) -> float outputs: one call of a family's network."""


def auto_samples_per_call(device_type: str, bytes_per_sample: int, free_bytes: int | None) -> int:
    """`max_batch: auto`: the network samples per call each device runs fastest.

    CPU: as many as fit CPU_CALL_BYTES of activations (the fastest size per sample, measured);
    CUDA: as many as FREE_MEMORY_SHARE of the free memory holds (GPUs gain from full batches; the
    chunked run still halves once on out-of-memory); elsewhere (MPS: free memory unknown) 16."""
    if device_type == "cpu":
        budget = CPU_CALL_BYTES if free_bytes is None else min(CPU_CALL_BYTES, FREE_MEMORY_SHARE * free_bytes)
    elif free_bytes is not None:
        budget = FREE_MEMORY_SHARE * free_bytes
    else:
        return FALLBACK_SAMPLES_PER_CALL
    return int(min(MAX_SAMPLES_PER_CALL, max(1, budget // bytes_per_sample)))


def call_bounds(samples: int, samples_per_call: int) -> list[tuple[int, int]]:
    """(start, end) of each call: the fewest calls of at most `samples_per_call`, their sizes as
    even as can be (7 in calls of at most 3: 3, 2, 2, not 3, 3, 1), so no call is left running a
    sample or two at a small call's higher cost per sample."""
    calls = -(-samples // samples_per_call)
    size, larger = divmod(samples, calls)
    ends = [0]
    for call in range(calls):
        ends.append(ends[-1] + size + (call < larger))
    return list(zip(ends, ends[1:]))


class ChunkedRun:
    """Runs a step's samples through `forward` in the fewest calls of at most `samples_per_call`, as
    even as can be (`call_bounds`); on CUDA out-of-memory, halves the largest call once and retries."""

    def __init__(self, forward: ModelCall, samples_per_call: int = FALLBACK_SAMPLES_PER_CALL,
                 warn: Callable[[str], None] | None = None, network: str = "UNet"):
        self.forward, self.samples_per_call, self.network = forward, samples_per_call, network
        self.warn = warn or (lambda _message: None)
        self.halved = False

    def __call__(self, inputs: torch.Tensor, t: torch.Tensor, conditioning: Any) -> torch.Tensor:
        while True:
            bounds = call_bounds(inputs.shape[0], self.samples_per_call)
            size = bounds[0][1] - bounds[0][0]  # the largest call
            try:
                return torch.cat([self.forward(inputs[start:end], t, conditioning[start:end]) for start, end in bounds])
            except torch.cuda.OutOfMemoryError:
                if self.halved or size == 1:
                    raise
                self.halved, self.samples_per_call = True, max(1, size // 2)
                torch.cuda.empty_cache()
                self.warn(f"out of GPU memory at {size} {self.network} samples per call: retrying with --max-batch {self.samples_per_call}")
