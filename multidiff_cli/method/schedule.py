"""Noise schedules: what the sampler asks of a diffusion process, whatever its parametrisation.

The sampler and the fusion weights call only these operations (ComfyUI's `model_sampling`,
k-diffusion's denoiser wrappers): the initial latent from unit noise; a clean latent noised to an
evaluation's level; what the network sees; one step; the noise level quantized masks read. Two
implementations cover every family:

- `DiffusionSchedule`: a diffusers DDPM-family scheduler (DDIM, Euler, DPM-Solver, ...), used as
  diffusers' own SD pipelines use it (ε- or v-prediction);
- `FlowSchedule`: flow matching (Lipman et al. 2023; FLUX, SD3): x_σ = σ·ε + (1 − σ)·x₀, the network
  predicts a velocity v ≈ ε − x₀, the clean estimate is x − σ·v.

Both are steps affine in the model output, so fusing predictions and stepping once is exact (Eq. 5).
The scheduler objects come in built (models/ builds them from a model's config); nothing here
imports diffusers. Evaluations are counted by index into `timesteps` (a Heun step is two).
"""
from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch


class NoiseSchedule(Protocol):
    """What the sampler and the weights ask of a schedule; indices count model evaluations."""

    timesteps: torch.Tensor  # the value each evaluation's network call is given, one per evaluation
    order: int  # evaluations per step (2 for Heun)

    def begin_at(self, index: int) -> None:
        """Start sampling at evaluation `index` (img2img), before the first noising or step."""

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        """The first latent of a text-to-image render, from unit Gaussian noise."""

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        """`clean` latents noised with `noise` to the level of evaluation `index`."""

    def model_input(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """What the network sees of x at evaluation `index`."""

    def step(self, output: torch.Tensor, index: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One step from x with the (fused) model output: (next x, clean estimate or None)."""

    def noise_levels(self) -> torch.Tensor:
        """Per step (not evaluation), its noise level in [0, 1]: 1 pure noise, 0 clean."""


def _step_kwargs(scheduler: Any, generator: torch.Generator | None) -> dict[str, Any]:
    """A generator for stochastic steps (euler-a, ddpm), where the scheduler's step takes one."""
    takes = "generator" in inspect.signature(scheduler.step).parameters
    return {"generator": generator} if generator is not None and takes else {}


class DiffusionSchedule:
    """A diffusers DDPM-family scheduler (`add_noise`, `scale_model_input`, `init_noise_sigma`,
    `alphas_cumprod`), called exactly as diffusers' SD pipelines call it.

    Noising at an evaluation passes that evaluation's timestep; schedulers that keep a step index
    (Euler, DPM-Solver) then read their own state, which is why noising must follow the same order
    of calls as the pipelines (before a step for its own level, after it for the next)."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler

    def set_timesteps(self, steps: int, device: torch.device | str | None = None) -> None:
        self.scheduler.set_timesteps(steps, device=device)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def order(self) -> int:
        return getattr(self.scheduler, "order", 1)

    def begin_at(self, index: int) -> None:
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(index)  # add_noise then finds the level of the step at hand

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        return noise * self.scheduler.init_noise_sigma

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        return self.scheduler.add_noise(clean, noise, self.timesteps[index].reshape(1))

    def model_input(self, x: torch.Tensor, index: int) -> torch.Tensor:
        return self.scheduler.scale_model_input(x, self.timesteps[index])

    def step(self, output, index, x, generator=None):
        out = self.scheduler.step(output, self.timesteps[index], x, **_step_kwargs(self.scheduler, generator))
        return out.prev_sample, getattr(out, "pred_original_sample", None)

    def noise_levels(self) -> torch.Tensor:
        """sqrt(1 - alphas_cumprod[t]) at each step's timestep."""
        alphas = self.scheduler.alphas_cumprod.cpu()
        timesteps = self.timesteps[:: self.order].cpu()
        return (1 - alphas[timesteps.round().long().clamp(0, len(alphas) - 1)]).sqrt()


class FlowSchedule:
    """Flow matching over a diffusers flow scheduler (FlowMatchEuler/Heun, or DPM-Solver and UniPC with
    flow sigmas): `scheduler.sigmas[i]` is evaluation i's σ (the last one 0), `scheduler.timesteps` the
    values the network is given (σ times the training steps; a family's denoiser rescales them).

    Noising is the flow formula, written as diffusers' `scale_noise` writes it (so a picture noised
    here equals the img2img pipelines' bit for bit); the model sees x itself; the clean estimate of a
    velocity v at σ is x − σ·v."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler

    def set_timesteps(self, steps: int, device: torch.device | str | None = None, **kwargs: Any) -> None:
        """kwargs: what the family's pipeline passes (FLUX: `sigmas` and the dynamic shift `mu`)."""
        self.scheduler.set_timesteps(steps, device=device, **kwargs)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def order(self) -> int:
        return getattr(self.scheduler, "order", 1)

    def sigma(self, index: int) -> torch.Tensor:
        return self.scheduler.sigmas[index]

    def begin_at(self, index: int) -> None:
        self.scheduler.set_begin_index(index)

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        return noise  # σ = 1 at the first evaluation of a whole schedule: pure noise

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        sigma = self.sigma(index).to(device=clean.device, dtype=clean.dtype)
        return sigma * noise + (1.0 - sigma) * clean

    def model_input(self, x: torch.Tensor, index: int) -> torch.Tensor:
        return x

    def step(self, output, index, x, generator=None):
        denoised = x - self.sigma(index).to(x.device, x.dtype) * output
        out = self.scheduler.step(output, self.timesteps[index], x, **_step_kwargs(self.scheduler, generator))
        return out.prev_sample, denoised

    def noise_levels(self) -> torch.Tensor:
        """σ at each step's first evaluation."""
        return self.scheduler.sigmas[: len(self.timesteps)][:: self.order].float().cpu()
