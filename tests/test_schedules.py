"""Noise schedules (method/schedule.py): flow matching against diffusers' flow schedulers stepped by hand,
the exact velocity's round trip, regions and bootstrapping against the reference loop, img2img starts
against diffusers' own noising, and the noise levels quantized masks read; DiffusionSchedule's levels.

Stand-in velocity models only: flow matching has no family yet, so no network is involved.
"""
from __future__ import annotations

import pytest
import torch

from multidiff_cli.catalog import FLOW_SCHEDULERS
from multidiff_cli.method.sampler import multidiffusion, start_latents
from multidiff_cli.method.schedule import DiffusionSchedule, FlowSchedule
from multidiff_cli.method.views import make_views
from multidiff_cli.method.weights import region_weights
from multidiff_cli.models.random_weights import sd2_scheduler_config
from multidiff_cli.models.schedulers import make_scheduler
from multidiff_cli.scene.grid import box_cells
from reference import reference_multidiffusion

# A flow model's scheduler config (SD3's, FLUX.1-schnell's): FlowMatchEuler and FlowMatchHeun read `shift`;
# DPM-Solver++ and UniPC with flow sigmas read the same setting as `flow_shift` (each ignores the other's).
FLOW_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "flow_shift": 3.0}
FLOW_NAMES = list(FLOW_SCHEDULERS)  # euler, heun, dpm++, unipc
H, W = 12, 20  # latent cells: non-square
BOXES = [(0, 0, 64, 96), (48, 16, 160, 64), (96, 56, 152, 96)]  # pixels; the first two overlap


def flow_scheduler(name: str, steps: int):
    scheduler = make_scheduler(name, FLOW_CONFIG, FLOW_SCHEDULERS)
    scheduler.set_timesteps(steps)
    return scheduler


def flow_schedule(name: str, steps: int) -> FlowSchedule:
    return FlowSchedule(flow_scheduler(name, steps))


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def towards(target: torch.Tensor):
    """A velocity model whose clean estimate is always `target`: v = ε̂ − x̂₀ with x̂₀ = target and
    ε̂ = (x − (1 − σ)·target) / σ, σ = t / 1000 (FlowMatchEuler's timesteps are σ times the training steps)."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = t / 1000
        return (x - (1 - sigma) * target) / sigma - target

    return velocity


def exact_velocity(noise: torch.Tensor, clean: torch.Tensor):
    """The velocity of the straight path from `noise` to `clean`: ε − x₀, whatever the input."""
    return lambda inputs, t, requests: torch.stack([(noise - clean)[0] for _ in requests])


# --- (a) one prompt: the sampler is a plain loop stepping diffusers' scheduler by hand -----------------------


@pytest.mark.parametrize("model", ["towards-a-target", "nonlinear"])
def test_one_prompt_equals_flow_match_euler_stepped_by_hand(model, prompt_eps, guided_atol):
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps = 6
    noise, target = randn(1, 4, H, W, seed=0), randn(4, H, W, seed=1)
    velocity = towards(target) if model == "towards-a-target" else (lambda x, t: prompt_eps(0, x))

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(steps)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, t), t, x).prev_sample

    schedule = FlowSchedule(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    schedule.set_timesteps(steps)
    ours = multidiffusion(noise, schedule, lambda inputs, t, requests: torch.stack([velocity(inputs[i], t) for i, _ in requests]),
                          region_weights([], (H, W)))
    assert torch.equal(ours, x)  # one prompt, weight 1: the fusion moves no bit
    if model == "towards-a-target":  # the estimate is exact along the straight path: Euler lands on it
        torch.testing.assert_close(ours[0], target, atol=guided_atol(target, steps=steps), rtol=0)


# --- (b) noising, then denoising with the exact velocity, recovers x0 ------------------------------------------


def test_one_euler_step_of_the_exact_velocity_goes_to_x0_from_any_level(guided_atol):
    clean, noise = randn(1, 4, 6, 10, seed=2), randn(1, 4, 6, 10, seed=3)
    single = flow_schedule("euler", 1)  # sigmas [1, 0]: from pure noise to clean in one step
    x, denoised = single.step(noise - clean, 0, single.noised(clean, noise, 0))
    torch.testing.assert_close(x, clean, atol=guided_atol(clean), rtol=0)
    schedule = flow_schedule("euler", 5)
    for index in range(5):  # at every level the clean estimate x − σ·v is x0
        _, denoised = schedule.step(noise - clean, index, schedule.noised(clean, noise, index))
        torch.testing.assert_close(denoised, clean, atol=guided_atol(clean), rtol=0)


@pytest.mark.parametrize("start_step", [0, 2])
@pytest.mark.parametrize("name", FLOW_NAMES)
def test_noising_then_sampling_with_the_exact_velocity_recovers_x0(name, start_step, guided_atol):
    """Every flow scheduler, from x0 noised to the first step run (all the way: start 0), over several steps."""
    clean, noise = randn(1, 4, 6, 10, seed=4), randn(1, 4, 6, 10, seed=5)
    schedule = flow_schedule(name, 5)
    seen = []
    out = multidiffusion(noise, schedule, exact_velocity(noise, clean), region_weights([], (6, 10)),
                         start_step=start_step, init_latents=clean,
                         callback=lambda i, n, x, denoised: seen.append(denoised))
    evaluations = len(schedule.timesteps) - start_step * schedule.order
    torch.testing.assert_close(out, clean, atol=guided_atol(clean, steps=evaluations), rtol=0)
    assert len(seen) == evaluations
    for denoised in seen:  # every step's clean estimate is x0 too
        torch.testing.assert_close(denoised, clean, atol=guided_atol(clean, steps=evaluations), rtol=0)


# --- (c) regions and bootstrapping: the fused flow step is the reference loop --------------------------------


@pytest.mark.parametrize("views", [None, "windows"])
@pytest.mark.parametrize("name", FLOW_NAMES)
def test_fused_flow_steps_equal_the_per_prompt_reference_loop(name, views, prompt_eps, per_request_denoiser,
                                                              assert_close_batched):
    weights = region_weights([box_cells(b, (H, W)) for b in BOXES], (H, W))
    windows = make_views((H, W), 8, 4) if views else None
    noise = randn(1, 4, H, W, seed=6)
    backgrounds = randn(2, len(BOXES), 4, 1, 1, seed=7)
    fused = multidiffusion(noise, flow_schedule(name, 6), per_request_denoiser, weights, views=windows,
                           bootstrap_steps=2, backgrounds=backgrounds)
    schedule = flow_schedule(name, 6)
    reference = reference_multidiffusion(lambda p, x, t: prompt_eps(p, x), noise, schedule, weights, views=windows,
                                         bootstrap_steps=2, backgrounds=backgrounds)
    assert_close_batched(fused, reference, steps=len(schedule.timesteps))


@pytest.mark.parametrize("name", ["euler", "dpm++"])
def test_fused_flow_steps_from_a_picture_equal_the_reference_loop(name, prompt_eps, per_request_denoiser,
                                                                  assert_close_batched):
    weights = region_weights([box_cells(b, (H, W)) for b in BOXES], (H, W))
    noise, picture = randn(1, 4, H, W, seed=8), randn(1, 4, H, W, seed=9)
    backgrounds = randn(2, len(BOXES), 4, 1, 1, seed=10)
    fused = multidiffusion(noise, flow_schedule(name, 6), per_request_denoiser, weights, bootstrap_steps=2,
                           backgrounds=backgrounds, start_step=3, init_latents=picture)
    reference = reference_multidiffusion(lambda p, x, t: prompt_eps(p, x), noise, flow_schedule(name, 6), weights,
                                         bootstrap_steps=2, backgrounds=backgrounds, start_step=3, init_latents=picture)
    assert_close_batched(fused, reference, steps=3)


# --- (d) an img2img start: diffusers' own noising at the same begin index --------------------------------------


@pytest.mark.parametrize("name", FLOW_NAMES)
def test_an_img2img_start_is_diffusers_noising_at_the_begin_index(name):
    """As diffusers' flow img2img pipelines start (SD3's: set_begin_index(t_start * order), then scale_noise of
    the picture at timesteps[t_start * order]); DPM-Solver and UniPC noise through add_noise."""
    clean, noise = randn(1, 4, 6, 10, seed=11), randn(1, 4, 6, 10, seed=12)
    steps = 4
    for start_step in range(steps):
        theirs_scheduler = flow_scheduler(name, steps)
        first = start_step * theirs_scheduler.order
        theirs_scheduler.set_begin_index(first)
        noising = getattr(theirs_scheduler, "scale_noise", None) or theirs_scheduler.add_noise
        at = theirs_scheduler.timesteps[first : first + 1]
        theirs = noising(clean, at, noise) if noising.__name__ == "scale_noise" else noising(clean, noise, at)

        schedule = flow_schedule(name, steps)
        schedule.begin_at(first)
        assert torch.equal(start_latents(noise, schedule, clean, first), theirs), start_step
        seen = []  # and what the sampler's first network call sees (the model sees x itself)
        multidiffusion(noise, flow_schedule(name, steps),
                       lambda inputs, t, requests: seen.append(inputs.clone()) or torch.zeros_like(inputs),
                       region_weights([], (6, 10)), start_step=start_step, init_latents=clean)
        assert torch.equal(seen[0], theirs), start_step


# --- (e) noise levels: each step's σ ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", FLOW_NAMES)
def test_flow_noise_levels_are_each_step_s_sigma(name):
    steps = 5
    schedule = flow_schedule(name, steps)
    levels = schedule.noise_levels()
    assert levels.shape == (steps,)
    assert torch.all(levels[1:] < levels[:-1]) and 0 < float(levels[-1]) and float(levels[0]) <= 1
    zeros, ones = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    for step, level in enumerate(levels):
        first = step * schedule.order  # a Heun step's first evaluation
        assert torch.equal(schedule.noised(zeros, ones, first), torch.full_like(zeros, float(level)))  # σ·ε + (1 − σ)·0
        assert float(level) == float(schedule.scheduler.sigmas[first])
        if name in ("euler", "heun"):  # their timesteps are σ times the training steps
            assert float(level) == pytest.approx(float(schedule.timesteps[first]) / 1000, abs=1e-6)


def test_diffusion_noise_levels_fall_from_almost_one_to_small():
    """sqrt(1 - alphas_cumprod[t]) at each step's timestep, on SD-Turbo's config (trailing: t = 999, 749, 499, 249)."""
    config = {**sd2_scheduler_config(), "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing"}
    scheduler = make_scheduler("ddim", config)
    scheduler.set_timesteps(4)
    levels = DiffusionSchedule(scheduler).noise_levels()
    alphas = scheduler.alphas_cumprod
    assert torch.equal(levels, (1 - alphas[[999, 749, 499, 249]]).sqrt())
    assert torch.all(levels[1:] < levels[:-1]) and 0.99 < levels[0] < 1


@pytest.mark.parametrize("name", ["dpm++", "unipc"])
def test_every_flow_scheduler_takes_the_model_s_shift(name):
    """A flow model's scheduler_config.json names its shift `shift` (FlowMatchEuler's word); DPM-Solver++ and
    UniPC read `flow_shift`: built from the model's config they run the model's shifted sigmas."""
    config = {"num_train_timesteps": 1000, "shift": 3.0}  # SD3's scheduler config, as its folder has it
    scheduler = make_scheduler(name, config, FLOW_SCHEDULERS)
    assert scheduler.config.flow_shift == 3.0
    unshifted = make_scheduler(name, {**config, "shift": 1.0}, FLOW_SCHEDULERS)
    for each in (scheduler, unshifted):
        each.set_timesteps(4)
    plain = unshifted.sigmas[:-1].double()
    assert torch.allclose(scheduler.sigmas[:-1].double(), 3 * plain / (1 + 2 * plain), atol=1e-6)
