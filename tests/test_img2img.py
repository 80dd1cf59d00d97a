"""Composing over a picture (issue 14): img2img and repaint against diffusers' own pipelines, regions
from a noised picture against a per-prompt reference loop, the picture's canvas, files and metadata."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from multidiff_cli.method.schedule import DiffusionSchedule
from multidiff_cli.method.sampler import first_step, multidiffusion
from multidiff_cli.models.schedulers import make_scheduler
from multidiff_cli.method.weights import region_weights
from multidiff_cli.models.random_weights import sd2_scheduler_config
from multidiff_cli.run import render as render_module
from multidiff_cli.run.render import render
from multidiff_cli.scene import load_scene
from multidiff_cli.scene.grid import box_cells
from reference import reference_multidiffusion

SIZE_PX = 64  # 8x8 latent cells: one view, fast
STEPS, STRENGTH, GUIDANCE = 6, 0.5, 7.5


def save_picture(path, size=(SIZE_PX, SIZE_PX), seed=0, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
    return path


def cell_mask(path, size=(SIZE_PX, SIZE_PX), white=(16, 8, 48, 40)):
    """A keep mask aligned to the 8x8 cells (white = may change), so every resize rule agrees on it."""
    mask = Image.new("L", size, 0)
    mask.paste(255, white)
    mask.save(path)
    return path


def seed_noise(seed, hw=(SIZE_PX // 8, SIZE_PX // 8)):
    """The render's initial noise: the first draw of the seed's CPU generator."""
    return torch.randn((1, 4, *hw), generator=torch.Generator("cpu").manual_seed(seed))


def scene_text(scheduler="ddim", strength=STRENGTH, extra=""):
    return (f"prompt: a harbour\ninit_image: pic.png\nstrength: {strength}\nsteps: {STEPS}\nseed: 3\n"
            f"scheduler: {scheduler}\nguidance_scale: {GUIDANCE}\n{extra}")


@pytest.fixture
def picture_scene(write_scene, tmp_path, monkeypatch, tiny):
    """A scene over a 64x64 picture whose encoded latents are `latents` (the pipelines take them as such)."""
    save_picture(tmp_path / "pic.png")
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(11))
    monkeypatch.setattr(render_module, "picture_latents", lambda scene, components, plan: latents.clone())

    def make(**kwargs):
        return load_scene(write_scene(scene_text(**kwargs)))

    return make, latents


def pipeline(kind, tiny, scheduler_name, monkeypatch, noise):
    """diffusers' own pipeline on the tiny-random components, drawing `noise` where it draws its noise."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint

    module, cls = {"img2img": (img2img, img2img.StableDiffusionImg2ImgPipeline),
                   "inpaint": (inpaint, inpaint.StableDiffusionInpaintPipeline)}[kind]
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kwargs: noise.clone().reshape(shape))
    pipe = cls(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
               scheduler=make_scheduler(scheduler_name, tiny.scheduler_config), safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_no_regions_keep_none_is_diffusers_img2img(scheduler, tiny, picture_scene, monkeypatch, assert_close_batched):
    make, latents = picture_scene
    scene = make(scheduler=scheduler)
    ours = render(scene, tiny, seed=3).latents
    pipe = pipeline("img2img", tiny, scheduler, monkeypatch, seed_noise(3))
    theirs = pipe("a harbour", image=latents, strength=STRENGTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  output_type="latent").images
    assert_close_batched(ours, theirs, guidance=GUIDANCE, steps=STEPS * STRENGTH)


@pytest.mark.parametrize("scheduler,strength", [("ddim", STRENGTH), ("dpm++", STRENGTH), ("ddim", 1.0)])
def test_a_keep_mask_is_diffusers_inpaint_with_a_4_channel_unet(scheduler, strength, tiny, picture_scene, tmp_path,
                                                                monkeypatch, assert_close_batched):
    make, latents = picture_scene
    mask = cell_mask(tmp_path / "keep.png")
    scene = make(scheduler=scheduler, strength=strength, extra="keep: keep.png\n")
    ours = render(scene, tiny, seed=3).latents
    pipe = pipeline("inpaint", tiny, scheduler, monkeypatch, seed_noise(3))
    with Image.open(mask) as mask_image:
        theirs = pipe("a harbour", image=latents, mask_image=mask_image.convert("L"), masked_image_latents=latents,
                      height=SIZE_PX, width=SIZE_PX, strength=strength, num_inference_steps=STEPS,
                      guidance_scale=GUIDANCE, output_type="latent").images
    assert_close_batched(ours, theirs, guidance=GUIDANCE, steps=STEPS)
    kept = ~torch.from_numpy(np.asarray(Image.open(mask)) > 127)[4::8, 4::8]
    assert torch.equal(ours[0][:, kept], latents[0][:, kept])  # the kept cells end as the picture's latents


# --- regions over a picture, against a per-prompt reference loop ----------------------------------------------

H, W = 6, 10  # latent cells, non-square
BOXES = [(0, 0, 32, 48), (40, 8, 80, 40)]


def prompt_eps(p, x):
    return torch.tanh((0.6 + 0.1 * p) * x + 0.2 * p)


def per_request(inputs, t, requests):
    return torch.stack([prompt_eps(p, inputs[i]) for i, p in requests])


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_regions_over_a_picture_equal_the_per_prompt_reference_loop(scheduler, assert_close_batched):
    weights = region_weights([box_cells(b, (H, W)) for b in BOXES], (H, W))
    image = torch.randn((1, 4, H, W), generator=torch.Generator().manual_seed(1))
    noise = torch.randn((1, 4, H, W), generator=torch.Generator().manual_seed(2))
    backgrounds = torch.randn((2, len(BOXES), 4, 1, 1), generator=torch.Generator().manual_seed(3))
    start = first_step(STEPS, STRENGTH)
    assert start == 3

    def schedule():
        built = make_scheduler(scheduler, sd2_scheduler_config())
        built.set_timesteps(STEPS)
        return DiffusionSchedule(built)

    fused = multidiffusion(noise, schedule(), per_request, weights, bootstrap_steps=2, backgrounds=backgrounds,
                           start_step=start, init_latents=image)
    # the paper as written, started from the picture noised to the first step run; bootstrapping counts from it
    reference = reference_multidiffusion(lambda p, x, t: prompt_eps(p, x), noise, schedule(), weights,
                                         bootstrap_steps=2, backgrounds=backgrounds, start_step=start,
                                         init_latents=image)
    assert_close_batched(fused, reference, steps=STEPS - start)


def test_keep_outside_regions_holds_the_noised_picture_at_every_step(tiny, picture_scene, monkeypatch):
    make, latents = picture_scene
    scene = make(extra="keep: outside_regions\nbootstrap_steps: 1\nregions:\n  - prompt: a red boat\n"
                       "    box: [8, 16, 40, 48]\n")
    changeable = torch.from_numpy(box_cells([8, 16, 40, 48], (8, 8)))
    seen = []
    ours = render(scene, tiny, seed=3, callback=lambda i, n, x, denoised: seen.append(x.clone())).latents
    scheduler = make_scheduler("ddim", tiny.scheduler_config)
    scheduler.set_timesteps(STEPS)
    timesteps = scheduler.timesteps[first_step(STEPS, STRENGTH):]
    assert len(seen) == len(timesteps) == 3
    noise = seed_noise(3)
    for i, x in enumerate(seen[:-1]):
        known = scheduler.add_noise(latents, noise, timesteps[i + 1].reshape(1))
        assert torch.equal(x[0][:, ~changeable], known[0][:, ~changeable]), i
        assert not torch.equal(x[0][:, changeable], known[0][:, changeable])  # the region did change
    assert torch.equal(ours[0][:, ~changeable], latents[0][:, ~changeable])


def test_strength_counts_steps_as_diffusers_does_and_always_runs_one():
    assert [first_step(50, s) for s in (0.55, 0.3, 1.0)] == [50 - 27, 50 - 15, 0]
    assert first_step(1, 0.55) == 0  # int(0.55) = 0: one step still runs
    assert first_step(2, 0.3) == 1


def test_a_one_step_draft_starts_from_the_picture_not_from_noise():
    """Running all steps from a picture (strength < 1, int(steps * strength) = steps) is not strength 1."""
    image = torch.full((1, 4, H, W), 2.0)
    noise = torch.randn((1, 4, H, W), generator=torch.Generator().manual_seed(4))
    runs = []
    for init in (image, None):
        scheduler = make_scheduler("ddim", sd2_scheduler_config())
        scheduler.set_timesteps(1)
        runs.append(multidiffusion(noise, DiffusionSchedule(scheduler), per_request, region_weights([], (H, W)), init_latents=init))
    assert runs[0].mean() > 1.5 and runs[1].abs().mean() < 1.5  # one step at t=1 keeps the picture
