"""IP-Adapters for the whole scene or for one region (models/reference.py), on the tiny random SD2- and
SDXL-shaped models with random IP-Adapters written in h94/IP-Adapter's layout (save_random_ip_adapter):

- scene-wide: diffusers' pipelines with `ip_adapter_image` at that scale, from the same noise;
- a region's reference: the per-prompt reference loop with image embeddings on that region's samples only,
  and the other prompts' predictions bit-identical to the render without it (no IP branch on them);
- samples per step; records, inspect, bad input.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multidiff_cli.models.random_weights import build_tiny_random, build_tiny_sdxl_random
from multidiff_cli.models.reference import RANDOM_WEIGHT, save_random_ip_adapter
from multidiff_cli.models.schedulers import make_scheduler
from multidiff_cli.output.png import read_metadata
from multidiff_cli.run.render import render, scene_prompts
from multidiff_cli.scene import load_scene
from reference import one_step, sd_pipeline, sd_region_reference

CPU = torch.device("cpu")


def picture(path: Path, size_wh=(40, 40), seed: int = 0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size_wh[1], size_wh[0], 3), dtype=np.uint8)).save(path)
    return path


def noise(seed: int, latent_hw) -> torch.Tensor:
    return torch.randn((1, 4, *latent_hw), generator=torch.Generator("cpu").manual_seed(seed))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Random IP-Adapter repos for the tiny SD and SDXL models: folder -> (the model's kind)."""
    root = tmp_path_factory.mktemp("ip")
    save_random_ip_adapter(build_tiny_random().unet, root / "sd")
    save_random_ip_adapter(build_tiny_sdxl_random().unet, root / "sdxl", seed=1, weight=XL_WEIGHT)
    return root


XL_WEIGHT = "sdxl_models/ip-adapter_random.safetensors"  # h94's folder for SDXL adapters


# --- A. scene-wide: diffusers' pipelines with ip_adapter_image ---------------------------------------------


def test_a_scene_wide_ip_adapter_equals_the_sd_pipeline_with_ip_adapter_image(adapters, write_scene, tmp_path,
                                                                              assert_close_batched):
    picture(tmp_path / "style.png")
    scene = load_scene(write_scene(
        f"prompt: a red sofa\nnegative_prompt: blurry\nwidth: 96\nheight: 64\nsteps: 3\n"
        f"reference: [{{model: {adapters / 'sd'}, weight: {RANDOM_WEIGHT}, image: style.png, scale: 0.6}}]\n"
    ))
    ours = render(scene, build_tiny_random(), seed=2).latents
    pipe = sd_pipeline(build_tiny_random())
    pipe.load_ip_adapter(str(adapters / "sd"), subfolder="models", weight_name=Path(RANDOM_WEIGHT).name)
    pipe.set_ip_adapter_scale(0.6)
    with torch.inference_mode():
        theirs = pipe("a red sofa", negative_prompt="blurry", ip_adapter_image=Image.open(tmp_path / "style.png"),
                      height=64, width=96, num_inference_steps=3, latents=noise(2, (8, 12)), output_type="latent").images
    assert_close_batched(ours, theirs, guidance=7.5, steps=3)
    plain = render(scene.model_copy(update={"reference": []}), build_tiny_random(), seed=2).latents
    assert (ours - plain).abs().max() > 10 * (ours - theirs).abs().max()  # the reference did something


def test_a_scene_wide_ip_adapter_equals_the_sdxl_pipeline_with_ip_adapter_image(adapters, write_scene, tmp_path,
                                                                                assert_close_batched):
    from diffusers import StableDiffusionXLPipeline

    picture(tmp_path / "style.png", seed=1)
    scene = load_scene(write_scene(  # a bare weight name: in h94's sdxl_models/ for SDXL
        f"model: tiny-sdxl-random\nprompt: a red sofa\nnegative_prompt: blurry\nwidth: 96\nheight: 64\nsteps: 3\n"
        f"guidance_scale: 5.0\nreference: [{{model: {adapters / 'sdxl'}, weight: {Path(XL_WEIGHT).name}, image: style.png}}]\n"
    ))
    ours = render(scene, build_tiny_sdxl_random(), seed=4).latents
    xl = build_tiny_sdxl_random()
    pipe = StableDiffusionXLPipeline(vae=xl.vae, text_encoder=xl.text_encoder, text_encoder_2=xl.text_encoder_2,
                                     tokenizer=xl.tokenizer, tokenizer_2=xl.tokenizer_2, unet=xl.unet,
                                     scheduler=make_scheduler("ddim", xl.scheduler_config), image_encoder=None,
                                     feature_extractor=None, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(adapters / "sdxl"), subfolder="sdxl_models", weight_name=Path(XL_WEIGHT).name)
    with torch.inference_mode():
        theirs = pipe("a red sofa", negative_prompt="blurry", ip_adapter_image=Image.open(tmp_path / "style.png"),
                      height=64, width=96, num_inference_steps=3, guidance_scale=5.0, latents=noise(4, (8, 12)),
                      output_type="latent").images
    assert_close_batched(ours, theirs, guidance=5.0, steps=3)


# --- B. a region's reference: exactly its own samples -----------------------------------------------------

REGION_SCENE = """prompt: a street
negative_prompt: blurry
width: 96
height: 64
steps: 2
bootstrap_steps: 0
regions:
  - prompt: a knight
    box: [0, 0, 48, 64]
    reference: [{{model: {root}, weight: {weight}, image: knight.png, scale: 0.8}}]
  - prompt: a horse
    box: [48, 0, 96, 64]
"""


def test_a_region_reference_equals_a_per_prompt_loop_with_image_embeddings_on_that_prompt_only(
        adapters, write_scene, tmp_path, assert_close_batched):
    picture(tmp_path / "knight.png", seed=3)
    scene = load_scene(write_scene(REGION_SCENE.format(root=adapters / "sd", weight=RANDOM_WEIGHT)))
    ours = render(scene, build_tiny_random(), seed=3).latents

    bare, with_ip = sd_pipeline(build_tiny_random()), sd_pipeline(build_tiny_random())
    with_ip.load_ip_adapter(str(adapters / "sd"), subfolder="models", weight_name=Path(RANDOM_WEIGHT).name)
    with_ip.set_ip_adapter_scale(0.8)
    with torch.inference_mode():
        (embeds,) = with_ip.prepare_ip_adapter_image_embeds(Image.open(tmp_path / "knight.png"), None, CPU, 1, True)
    negative_embeds, image_embeds = embeds.chunk(2)

    def unet_output(p, x, t, hidden, conditional):
        if p != 1:
            return bare.unet(x, t, encoder_hidden_states=hidden).sample
        image = {"image_embeds": [image_embeds if conditional else negative_embeds]}
        return with_ip.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=image).sample

    reference = sd_region_reference(scene, [bare, with_ip, bare], unet_output, seed=3)
    assert_close_batched(ours, reference, guidance=7.5, steps=2)


def test_no_ip_branch_on_the_other_prompts_their_predictions_are_exactly_the_plain_ones(adapters, write_scene, tmp_path):
    picture(tmp_path / "knight.png", seed=3)
    scene = load_scene(write_scene(REGION_SCENE.format(root=adapters / "sd", weight=RANDOM_WEIGHT)))
    model = build_tiny_random()
    referred, fused, weights = one_step(model, scene)
    plain_scene = scene.model_copy(update={"regions": [scene.regions[0].model_copy(update={"reference": []}),
                                                       scene.regions[1]]})
    plain, fused_plain, _ = one_step(build_tiny_random(), plain_scene)
    assert torch.equal(referred[[0, 2]], plain[[0, 2]])  # the global prompt and the other region
    assert not torch.equal(referred[1], plain[1])
    outside = weights[1, 0] == 0
    assert outside.any() and torch.equal(fused[..., outside], fused_plain[..., outside])
    # and the UNet is left bare: a plain render after it equals one on a model that never saw an IP-Adapter
    assert model.unet.encoder_hid_proj is None
    assert torch.equal(render(plain_scene, model, seed=1).latents, render(plain_scene, build_tiny_random(), seed=1).latents)


def test_one_region_reference_costs_its_own_unconditional_sample(adapters, write_scene, tmp_path):
    picture(tmp_path / "knight.png", seed=3)
    scene = load_scene(write_scene(REGION_SCENE.format(root=adapters / "sd", weight=RANDOM_WEIGHT)))
    model = build_tiny_random()
    prompts = scene_prompts(scene)
    assert prompts.references == [(), (), (0,), (0,), ()] and prompts.unconditional == [False, False, False, True, False]
    sizes = []
    model.unet.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    render(scene, model, seed=0)
    # the regions cover the canvas, so the global prompt has no weight: without the reference 3 samples a step
    # (two conditionals, one shared unconditional); with it, the region's own unconditional besides
    assert sizes == [2, 2] * 2  # two UNet calls a step: the region's two samples with the reference, two bare


# --- C. the command line: records, inspect, bad input ---------------------------------------------------


def test_cli_records_each_reference_and_warns_when_its_picture_changed(cli, adapters, write_scene, tmp_path):
    picture(tmp_path / "knight.png", seed=3)
    scene = write_scene("seed: 2\n" + REGION_SCENE.format(root=adapters / "sd", weight=RANDOM_WEIGHT))
    out = tmp_path / "out" / "street.png"
    result = cli.render(scene, "-o", out)
    assert result.exit_code == 0, result.output
    record = read_metadata(out)
    (entry,) = record["scene"]["regions"][0]["reference"]
    assert entry["image"] == "../knight.png" and entry["scale"] == 0.8
    assert {"../knight.png", f"{entry['model']}/{RANDOM_WEIGHT}"} <= set(record["inputs"])
    shown = cli("inspect", out).stdout
    assert f"regions[0] (a knight): {entry['model']} {RANDOM_WEIGHT} sha256:" in shown and "image ../knight.png sha256:" in shown
    picture(tmp_path / "knight.png", seed=8)
    again = cli.render(out, "--output-dir", tmp_path / "again")
    assert again.exit_code == 0 and "../knight.png changed since street.png was rendered" in again.stderr


def test_cli_bad_references_are_one_line_each_exit_2_nothing_written(cli, adapters, write_scene, tmp_path):
    scene = write_scene(
        "prompt: a street\nwidth: 96\nheight: 64\nsteps: 2\n"
        f"reference: [{{model: {adapters / 'sd'}, weight: models/nothing.safetensors, image: gone.png}},"
        " {model: ./nowhere, weight: a.safetensors, image: gone.png, sclae: 1}]\n"
    )
    result = cli.render(scene, "-o", tmp_path / "out.png")
    assert result.exit_code == 2 and not (tmp_path / "out.png").exists()
    assert "reference[1].sclae: unknown key; did you mean `scale`?" in result.stderr
    scene.write_text(scene.read_text().replace(", sclae: 1", ""))
    lines = cli.render(scene, "-o", tmp_path / "out.png").stderr.strip().splitlines()
    assert any("reference[0].image: no such file" in line for line in lines), lines
    assert any("reference[0].weight: no such file in" in line and "models/nothing.safetensors" in line for line in lines)
    assert any("reference[1].model: no such folder:" in line for line in lines), lines
    assert len(lines) == 4 and not (tmp_path / "out.png").exists()


def test_cli_an_ip_adapter_of_another_model_is_exit_2_one_line_before_sampling(cli, adapters, write_scene, tmp_path):
    picture(tmp_path / "knight.png")
    scene = write_scene(REGION_SCENE.format(root=adapters / "sdxl", weight=XL_WEIGHT))
    result = cli.render(scene, "-o", tmp_path / "out.png")
    assert result.exit_code == 2 and not (tmp_path / "out.png").exists()
    lines = [line for line in result.stderr.strip().splitlines() if "IP-Adapter" in line]
    assert len(lines) == 1 and "not an IP-Adapter for this model (tiny-random" in lines[0], result.stderr
    assert lines[0].startswith("error: IP-Adapter ") and "in the file, [" in lines[0] and lines[0].count("sdxl_models") == 1
