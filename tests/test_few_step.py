"""The few-step path: distilled models (SD-Turbo-style config) and how they are known (by name, by their
configs), quantized masks, mask-centering."""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from multidiff_cli.models.schedulers import make_scheduler
from multidiff_cli.method.schedule import DiffusionSchedule
from multidiff_cli.method.weights import gaussian_blur, quantized_weights, region_weights
from multidiff_cli.models.family import LoadedState
from multidiff_cli.models.loading import is_few_step_model, load_folder, load_model
from multidiff_cli.models.random_weights import TINY_RANDOM, build_tiny_random, sd2_scheduler_config
from multidiff_cli.run.render import plan_render, render, scene_weights
from multidiff_cli.scene import load_scene

CPU = torch.device("cpu")
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


# --- few-step (distilled) models, known by name and configs --------------------------------------------


@pytest.mark.parametrize("model_id, few_step", [
    ("me/sd-turbo-copy", True),
    ("me/SDXL-Turbo", True),
    ("me/my-LCM_dreamshaper", True),
    ("me/sdxl-lightning-4step", True),
    ("me/Hyper-SD15", True),
    ("me/hyper_sd", True),
    ("./models/sd-turbo", True),
    (TINY_RANDOM, False),
    ("sd2-random", False),
    ("me/stable-diffusion-2-base", False),
    ("me/turbine-painter", False),
    ("/home/lcm-user/models/plain-sd", False),  # only the model's own name counts, not the folders above
])
def test_few_step_models_are_known_by_name(model_id, few_step):
    assert is_few_step_model(model_id) is few_step


def write_configs(folder: Path, model_index=None, scheduler=None) -> Path:
    (folder / "scheduler").mkdir(parents=True)
    if model_index is not None:
        (folder / "model_index.json").write_text(json.dumps(model_index))
    if scheduler is not None:
        text = scheduler if isinstance(scheduler, str) else json.dumps(scheduler)
        (folder / "scheduler" / "scheduler_config.json").write_text(text)
    return folder


@pytest.mark.parametrize("model_index, scheduler, few_step", [
    (None, None, False),
    ({"_class_name": "StableDiffusionPipeline"}, {"_class_name": "DDIMScheduler"}, False),
    ({"_name_or_path": "me/sd-turbo"}, None, True),
    (None, {"_class_name": "EulerDiscreteScheduler", "_name_or_path": "me/SDXL-Lightning"}, True),
    (None, {"_class_name": "LCMScheduler"}, True),
    (["not", "an", "object"], "{broken json", False),
])
def test_few_step_models_are_known_by_their_configs(tmp_path, model_index, scheduler, few_step):
    folder = write_configs(tmp_path / "plain", model_index, scheduler)
    assert is_few_step_model(str(folder), folder) is few_step


def test_a_hub_snapshot_is_known_by_its_repo_name(tmp_path):
    snapshot = write_configs(tmp_path / "hub" / "models--me--sd-turbo" / "snapshots" / ("f" * 40))
    assert is_few_step_model(str(snapshot), snapshot)
    other = write_configs(tmp_path / "hub" / "models--lcm-fans--plain-sd" / "snapshots" / ("f" * 40))
    assert not is_few_step_model(str(other), other)


def test_loading_sets_few_step_model(tiny_folder, tmp_path):
    assert LoadedState(model_id="x", scheduler_config={}).few_step_model is False
    assert load_model(TINY_RANDOM, CPU, torch.float32).few_step_model is False
    assert load_folder(tiny_folder, model_id=str(tiny_folder)).few_step_model is False
    turbo = shutil.copytree(tiny_folder, tmp_path / "tiny-turbo")
    assert load_folder(turbo, model_id=str(turbo)).few_step_model is True
    lcm = shutil.copytree(tiny_folder, tmp_path / "tiny-lcm-free")  # a name says so, the scheduler need not
    assert load_model(str(lcm), CPU, torch.float32).few_step_model is True
