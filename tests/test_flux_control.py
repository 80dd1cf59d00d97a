"""FLUX.1 ControlNets (models/flux.py) on tiny-flux-random with a random FLUX ControlNet shaped for it
(InstantX's kind: the control image's VAE latents as its input): scene-wide against diffusers'
FluxControlNetPipeline from the same noise, with the start/end window; a region's control exactly its own
samples; ControlNet samples per step."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from multidiff_cli.catalog import RANDOM_CONTROLNET
from multidiff_cli.models.flux import build_random_flux_controlnet
from multidiff_cli.models.random_flux import build_tiny_flux_random
from multidiff_cli.run.render import render
from reference import one_step, scene_of, seed_generator

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dev():
    return build_tiny_flux_random().to(CPU, torch.float32)


def picture(path, size_wh, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size_wh[1], size_wh[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("start, end", [(0.0, 1.0), (0.0, 0.5)])
def test_a_scene_wide_flux_controlnet_equals_diffusers_flux_controlnet_pipeline(dev, write_scene, tmp_path, monkeypatch,
                                                                                start, end, assert_close_batched):
    """The pipeline encodes the control image by drawing from the VAE's latent distribution; it is made to take
    its mean, as multidiff does (a control image is a condition, not something to sample)."""
    import diffusers.pipelines.flux.pipeline_flux_controlnet as module
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetPipeline

    monkeypatch.setattr(module, "retrieve_latents", lambda output, generator=None, sample_mode="sample":
                        output.latent_dist.mode())
    picture(tmp_path / "depth.png", (96, 64), 1)
    scene = scene_of(write_scene, dev, "prompt: a red sofa\nwidth: 96\nheight: 64\nsteps: 2\nguidance_scale: 4.0\n"
                     f"control: [{{model: {RANDOM_CONTROLNET}, image: depth.png, scale: 0.7, start: {start}, end: {end}}}]\n")
    ours = render(scene, dev, seed=3).latents
    pipe = FluxControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(dev.scheduler_config), vae=dev.vae,
        text_encoder=dev.text_encoder, tokenizer=dev.tokenizer, text_encoder_2=dev.text_encoder_2,
        tokenizer_2=dev.tokenizer_2, transformer=dev.transformer, controlnet=build_random_flux_controlnet(dev.transformer))
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        packed = pipe("a red sofa", control_image=Image.open(tmp_path / "depth.png"), height=64, width=96,
                      num_inference_steps=2, guidance_scale=4.0, controlnet_conditioning_scale=0.7,
                      control_guidance_start=start, control_guidance_end=end, generator=seed_generator(3),
                      output_type="latent").images
        theirs = pipe._unpack_latents(packed, 64, 96, pipe.vae_scale_factor)
        plain = render(scene.model_copy(update={"control": []}), dev, seed=3).latents
    assert_close_batched(ours, theirs, steps=2)
    assert (ours - plain).abs().max() > 10 * (ours - theirs).abs().max()  # the control did something


REGION_SCENE = """prompt: a street
width: 96
height: 64
steps: 2
bootstrap_steps: 0
guidance_scale: 4.0
regions:
  - prompt: a knight
    box: [0, 0, 48, 64]
    control: [{model: random-controlnet, image: pose.png}]
  - prompt: a horse
    box: [48, 0, 96, 64]
"""


def test_a_flux_region_control_touches_its_own_samples_only(dev, write_scene, tmp_path):
    picture(tmp_path / "pose.png", (48, 64), 2)
    scene = scene_of(write_scene, dev, REGION_SCENE)
    controlled, fused, weights = one_step(dev, scene)
    plain_scene = scene.model_copy(update={"regions": [scene.regions[0].model_copy(update={"control": []}),
                                                       scene.regions[1]]})
    plain, fused_plain, _ = one_step(dev, plain_scene)
    assert torch.equal(controlled[[0, 2]], plain[[0, 2]])
    assert not torch.equal(controlled[1], plain[1])
    outside = weights[1, 0] == 0
    assert outside.any() and torch.equal(fused[..., outside], fused_plain[..., outside])


def test_a_flux_region_controlnet_runs_on_its_region_s_sample_alone(dev, write_scene, tmp_path):
    """Embedded guidance, no unconditional pass: the controlled region's one sample a step, in one call."""
    picture(tmp_path / "pose.png", (48, 64), 2)
    scene = scene_of(write_scene, dev, REGION_SCENE)
    render(scene, dev, seed=0)  # loads and caches the random ControlNet
    (net,) = [net for key, (_, net) in dev.state.controlnets.items() if key.startswith(RANDOM_CONTROLNET)]
    sizes = []
    handle = net.register_forward_pre_hook(lambda _, args, kwargs: sizes.append(kwargs["hidden_states"].shape[0]),
                                           with_kwargs=True)
    try:
        render(scene, dev, seed=0)
    finally:
        handle.remove()
    assert sizes == [1, 1]
