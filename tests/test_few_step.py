"""The few-step path: distilled models (SD-Turbo-style config), quantized masks, mask-centering."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from multidiff_cli.models.schedulers import make_scheduler
from multidiff_cli.method.schedule import DiffusionSchedule
from multidiff_cli.method.weights import gaussian_blur, quantized_weights, region_weights
from multidiff_cli.models.random_weights import build_tiny_random, sd2_scheduler_config
from multidiff_cli.run.render import plan_render, render, scene_weights
from multidiff_cli.scene import load_scene

H, W = 16, 24
TURBO = """\
prompt: a harbour at dusk
width: 192
height: 128
steps: {steps}
guidance_scale: 0.0
scheduler: {scheduler}
regions:
  - prompt: a lighthouse
    box: [16, 16, 80, 112]
  - prompt: a sailing boat
    box: [112, 48, 176, 112]
"""


def turbo_config():
    """SD-Turbo's scheduler config: Euler, trailing timesteps (so 1 step starts at t=999)."""
    return {**sd2_scheduler_config(), "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing"}


def test_blur_keeps_a_large_mask_s_interior_and_spreads_its_edge(box_mask, assert_close_batched):
    mask = box_mask((64, 32, 160, 96), (H, W))[None, None]
    blurred = gaussian_blur(mask, 1.0)
    assert blurred.shape == mask.shape
    assert torch.allclose(blurred[0, 0, 7:9, 11:13], torch.tensor(1.0), atol=1e-3)  # deep inside
    assert 0 < blurred[0, 0, 8, 7] < 0.5  # just outside the left edge (column 8 is the first inside)
    assert torch.equal(gaussian_blur(mask, 0), mask)
    # symmetric about the box's centre (rows 4..11, columns 8..19): mirrored cells sum the kernel's
    # products in mirrored order, so they may round differently
    assert_close_batched(blurred[0, 0, :, 8:20], blurred[0, 0, :, 8:20].flip(1))
    assert_close_batched(blurred[0, 0, 0:16], blurred[0, 0, 0:16].flip(0))


def test_quantized_masks_grow_from_the_core_to_the_blurred_outline_as_noise_falls(box_mask):
    masks = [box_mask((64, 32, 160, 96), (H, W)), box_mask((0, 0, 24, 24), (H, W))]
    levels = torch.tensor([0.9977, 0.9, 0.6, 0.3, 0.0])
    weights = quantized_weights(masks, levels)
    assert weights.shape == (5, 3, 1, H, W)
    assert set(weights.unique().tolist()) <= {0.0, 1.0}
    binary = region_weights(masks, (H, W))
    for region in (1, 2):
        areas = [int(weights[i, region].sum()) for i in range(5)]
        assert areas == sorted(areas) and areas[0] < areas[-1]  # grows monotonically as sigma falls
        core = weights[0, region].bool()
        assert core.any() and torch.all(binary[region].bool()[core])  # at pure noise: inside the mask only
        assert int(weights[-1, region].sum()) > int(binary[region].sum())  # at the end: past the hard edge
    # the background is what the regions leave, at every step (0/1 values: exact)
    assert torch.equal(weights[:, 0], (1 - weights[:, 1:].sum(1)).clamp(min=0))


def test_even_a_tiny_mask_keeps_its_core_at_pure_noise(box_mask):
    tiny_box = box_mask((40, 40, 48, 48), (H, W))  # one latent cell
    weights = quantized_weights([tiny_box], torch.tensor([0.9999]))
    assert torch.equal(weights[0, 1, 0], tiny_box)


@pytest.mark.parametrize(
    ("steps", "few_step_model", "setting", "on"),
    [(4, True, "auto", True), (50, True, "auto", True), (4, False, "auto", False), (50, False, "true", True),
     (2, True, "false", False)],
)
def test_few_step_is_on_for_few_step_models_unless_set(tiny, write_scene, steps, few_step_model, setting, on):
    scene = load_scene(write_scene(TURBO.format(steps=steps, scheduler="euler") + f"few_step: {setting}\n"))
    model = copy.copy(tiny)
    model.state = dataclasses.replace(tiny.state, few_step_model=few_step_model)
    plan = plan_render(scene, model)
    assert plan.few_step is on  # auto: the model decides (a distilled one), not the step count
    scheduler = make_scheduler("euler", turbo_config())
    scheduler.set_timesteps(steps)
    assert scene_weights(scene, DiffusionSchedule(scheduler), plan.few_step).dim() == (5 if on else 4)


@pytest.fixture(scope="module")
def turbo():
    """tiny-random as a distilled few-step model (what loading finds for SD-Turbo), with its scheduler config."""
    components = build_tiny_random()
    components.state.scheduler_config = turbo_config()
    components.state.few_step_model = True
    return components.to(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "euler-a"])
def test_one_step_turbo_render_starts_at_t999_without_guidance(turbo, write_scene, monkeypatch, unet_doubles, scheduler):
    counting = unet_doubles.Counting(turbo.unet)
    monkeypatch.setattr(turbo, "unet", counting)
    scene = load_scene(write_scene(TURBO.format(steps=1, scheduler=scheduler)))
    assert scene.bootstrap_steps == 0  # bootstrap scales with the step count: round(1 / 5)
    result = render(scene, turbo, seed=0)
    assert torch.isfinite(result.latents).all()
    assert counting.timesteps == [999.0]
    assert counting.samples == 3  # guidance 0: one conditional sample per prompt, no unconditional pass


def test_four_step_turbo_render_bootstraps_one_step_with_centering(turbo, write_scene, monkeypatch, unet_doubles):
    counting = unet_doubles.Counting(turbo.unet)
    monkeypatch.setattr(turbo, "unet", counting)
    scene = load_scene(write_scene(TURBO.format(steps=4, scheduler="euler")))
    assert (scene.bootstrap_steps, plan_render(scene, turbo).few_step) == (1, True)
    on = render(scene, turbo, seed=0)
    assert counting.timesteps == [999.0, 749.0, 499.0, 249.0]
    assert counting.samples == 3 * 4
    off = render(load_scene(write_scene(TURBO.format(steps=4, scheduler="euler") + "few_step: false\n")), turbo, seed=0)
    assert not torch.equal(on.latents, off.latents)
