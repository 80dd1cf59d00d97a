"""The SD family against diffusers' own StableDiffusionPipeline: a plain scene (no regions) renders the
pipeline's latents and picture from the same initial noise, on the tiny-random components."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from multidiff_cli.models.schedulers import make_scheduler
from multidiff_cli.run.render import render
from multidiff_cli.scene import load_scene
from reference import sd_pipeline


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_a_plain_scene_equals_diffusers_sd_pipeline(tiny, write_scene, scheduler, assert_close_batched):
    """Text to image with guidance and a negative prompt on a non-square canvas: the final latents within the
    rounding of batched UNet calls, the decoded pictures within one 8-bit level."""
    steps, guidance, seed = 3, 7.5, 9
    scene = load_scene(write_scene(
        f"prompt: a red sofa in a room\nnegative_prompt: blurry, low quality\nwidth: 96\nheight: 64\n"
        f"steps: {steps}\nguidance_scale: {guidance}\nscheduler: {scheduler}\nseed: {seed}\n"
    ))
    ours = render(scene, tiny, seed=seed)

    pipe = sd_pipeline(tiny, scheduler)
    noise = torch.randn((1, 4, 8, 12), generator=torch.Generator("cpu").manual_seed(seed))  # render's first draw
    with torch.inference_mode():
        theirs = pipe("a red sofa in a room", negative_prompt="blurry, low quality", height=64, width=96,
                      num_inference_steps=steps, guidance_scale=guidance, latents=noise, output_type="latent").images
        decoded = pipe.vae.decode(theirs / pipe.vae.config.scaling_factor, return_dict=False)[0]
        (picture,) = pipe.image_processor.postprocess(decoded, output_type="pil")
    assert_close_batched(ours.latents, theirs, guidance=guidance, steps=steps)
    assert ours.image.size == picture.size == (96, 64)
    ours_px, theirs_px = (np.asarray(image).astype(int) for image in (ours.image, picture))
    assert np.abs(ours_px - theirs_px).max() <= 1
