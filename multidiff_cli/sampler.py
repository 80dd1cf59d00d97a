"""MultiDiffusion (Bar-Tal et al., 2023) as a pure function of tensors, a scheduler and a denoiser.

The sampler knows nothing of UNets, text or files. Per step it asks the denoiser for every
prompt's guided prediction, fuses them per pixel with the region weights (Eq. 5), and takes one
scheduler step on the whole canvas. For schedulers whose step is affine in the model output
(DDIM, Euler, DPM-Solver, ...) this equals the paper's "step each prompt, then average", and it
keeps one scheduler state, so multistep solvers work unchanged.
"""
from __future__ import annotations

import inspect
from typing import Callable, Protocol

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""denoise(x, t) -> guided model outputs, shape (P, C, h, w), one per prompt.

`x` is (1, C, h, w) when every prompt sees the same latent, or (P, C, h, w), one input per
prompt, during bootstrapping. Inputs are already scaled by `scheduler.scale_model_input`.
"""

StepCallback = Callable[[int, int, torch.Tensor], None]
"""callback(step_index, total_steps, latents) after every scheduler step."""


class Scheduler(Protocol):
    """The part of a diffusers scheduler the sampler uses; `set_timesteps` is called by the caller."""

    timesteps: torch.Tensor
    init_noise_sigma: float | torch.Tensor
    order: int

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor: ...

    def step(self, model_output, timestep, sample, **kwargs): ...

    def add_noise(self, original_samples, noise, timesteps) -> torch.Tensor: ...


def fuse_predictions(predictions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """MultiDiffusion, Eq. 5: the per-pixel weighted mean of every prompt's prediction.

    predictions (P, C, h, w), weights (P, 1, h, w) -> (1, C, h, w). Where all weights are 0 the
    result is 0.
    """
    total = weights.sum(0, keepdim=True)
    fused = (weights * predictions).sum(0, keepdim=True)
    return torch.where(total > 0, fused / total.clamp(min=torch.finfo(total.dtype).tiny), torch.zeros_like(fused))


def bootstrap_inputs(x: torch.Tensor, region_masks: torch.Tensor, backgrounds: torch.Tensor) -> torch.Tensor:
    """Bootstrapping (paper, §4.3.1): region i sees x inside its mask and a noised flat colour outside.

    x (1, C, h, w), region_masks (N, 1, h, w), backgrounds (N, C, h, w) -> (N+1, C, h, w); the
    global prompt (index 0) is not bootstrapped and sees x.
    """
    regions = region_masks * x + (1 - region_masks) * backgrounds
    return torch.cat([x, regions])


def centering_shifts(region_masks: torch.Tensor) -> list[tuple[int, int]]:
    """Mask-centering bootstrapping (StreamMultiDiffusion, Lee et al. 2024): for each (1, h, w) mask,
    the whole-cell (dy, dx) that moves its bounding box's centre to the frame's centre."""
    h, w = region_masks.shape[-2:]
    shifts = []
    for mask in region_masks:
        rows = torch.nonzero(mask.reshape(h, w).sum(1) > 0).flatten()
        cols = torch.nonzero(mask.reshape(h, w).sum(0) > 0).flatten()
        if rows.numel() == 0:
            shifts.append((0, 0))
            continue
        centre_y = (int(rows[0]) + int(rows[-1]) + 1) // 2
        centre_x = (int(cols[0]) + int(cols[-1]) + 1) // 2
        shifts.append((h // 2 - centre_y, w // 2 - centre_x))
    return shifts


def roll_each(x: torch.Tensor, shifts: list[tuple[int, int]], sign: int = 1) -> torch.Tensor:
    """Roll x[i] (circularly) by sign * shifts[i] cells."""
    return torch.stack([torch.roll(xi, (sign * dy, sign * dx), dims=(-2, -1)) for xi, (dy, dx) in zip(x, shifts)])


def multidiffusion(
    noise: torch.Tensor,
    scheduler: Scheduler,
    denoise: Denoiser,
    weights: torch.Tensor,
    *,
    bootstrap_steps: int = 0,
    backgrounds: torch.Tensor | None = None,
    center_regions: bool = False,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Sample a canvas with MultiDiffusion; returns the final latents (1, C, h, w).

    noise: the initial unit Gaussian latent (1, C, h, w); also the noise that bootstrapping
        backgrounds are noised with, as in the authors' code, so a region's bootstrap input
        is continuous with the canvas' noise at its mask's edge.
    weights: (P, 1, h, w), index 0 the global prompt, 1..N the regions (masks.region_weights);
        or (steps, P, 1, h, w), one set per step (masks.quantized_weights).
    bootstrap_steps: the first steps in which regions are denoised against flat backgrounds.
    backgrounds: clean flat-colour latents, (bootstrap_steps, N, C, h|1, w|1): one per step and
        region, noised here to each step's level with the scheduler's own `add_noise`.
    center_regions: during bootstrapping, denoise each region shifted so its mask is centred in
        the frame, then shift its prediction back (StreamMultiDiffusion's mask-centering).
    generator: for stochastic schedulers (euler-a, ddpm); a CPU generator keeps devices equal.
    """
    per_step = weights.dim() == 5
    regions = weights.shape[-4] - 1
    bootstrapping = bootstrap_steps > 0 and regions > 0
    if bootstrapping and (backgrounds is None or backgrounds.shape[0] < bootstrap_steps):
        raise ValueError("bootstrap_steps > 0 needs one background latent per bootstrap step and region")

    x = noise * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    order = getattr(scheduler, "order", 1)  # Heun-type schedulers visit each step `order` times
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": generator} if generator is not None and takes_generator else {}
    for i, t in enumerate(timesteps):
        step = i // order
        step_weights = weights[min(step, weights.shape[0] - 1)] if per_step else weights
        shifts = None
        if bootstrapping and step < bootstrap_steps:
            noised = scheduler.add_noise(
                backgrounds[step].expand(regions, *x.shape[1:]), noise.expand(regions, *x.shape[1:]), t.reshape(1)
            )
            inputs = bootstrap_inputs(x, step_weights[1:], noised)
            if center_regions:
                shifts = [(0, 0)] + centering_shifts(step_weights[1:])
                inputs = roll_each(inputs, shifts)
        else:
            inputs = x
        predictions = denoise(scheduler.scale_model_input(inputs, t), t)
        if shifts is not None:
            predictions = roll_each(predictions, shifts, sign=-1)
        x = scheduler.step(fuse_predictions(predictions, step_weights), t, x, **step_kwargs).prev_sample
        if callback is not None:
            callback(i, len(timesteps), x)
    return x
