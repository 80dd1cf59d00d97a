"""FLUX.1 (dev and schnell) on tiny random FLUX-shaped models (issue 21). diffusers' FluxPipeline,
FluxImg2ImgPipeline and FluxInpaintPipeline, drawing their noise from the seed's CPU generator, are the
oracles for plain scenes and pictures; the shared reference loop, each prompt's velocity computed with
FluxPipeline's own encoding, packing and position ids, is the oracle for regions and panoramas. Then
samples per step, the dynamic shift of a view, loading (a folder, a BFL single file, the cache
listing), records, and what FLUX refuses. LoRAs: test_flux_lora.py."""
from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from multidiff_cli.catalog import FLUX, family_of_folder
from multidiff_cli.method.schedule import FlowSchedule
from multidiff_cli.models.loading import cached_models, load_model
from multidiff_cli.models.random_flux import build_tiny_flux_random
from multidiff_cli.models.random_weights import save_model
from multidiff_cli.output.png import read_metadata
from multidiff_cli.run.render import plan_render, render, scene_weights
from multidiff_cli.scene import load_scene
from reference import reference_multidiffusion

CPU = torch.device("cpu")
SMALL_WINDOW_PX = 64  # a tiny FLUX with 8-cell views: a 128 px canvas is a panorama of 3 views at a 32 px stride


def built(**kwargs):
    return build_tiny_flux_random(**kwargs).to(CPU, torch.float32)


@pytest.fixture(scope="module")
def dev():
    """tiny-flux-random (guidance embedded), native window 256 px. Read-only: LoRA tests copy it."""
    return built()


@pytest.fixture(scope="module")
def schnell():
    return built(schnell=True)


@pytest.fixture(scope="module")
def small_window():
    """tiny-flux-random's weights with a 64 px native window (the VAE's sample_size): views on small canvases."""
    model = built(native_px=SMALL_WINDOW_PX)
    assert model.native_cells == SMALL_WINDOW_PX // 8
    return model


def scene_of(write_scene, model, text: str, name: str = "scene.yaml"):
    """A scene file loaded as for this model (its family's defaults and checks)."""
    return load_scene(write_scene(text, name), default_model=model.model_id)


def seed_generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def flux_pipeline(model, kind: str = "text"):
    """diffusers' own FLUX pipeline on the model's parts, with the scheduler FLUX.1 ships (its config)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    cls = {"text": diffusers.FluxPipeline, "img2img": diffusers.FluxImg2ImgPipeline,
           "inpaint": diffusers.FluxInpaintPipeline}[kind]
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config), vae=model.vae,
               text_encoder=model.text_encoder, tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2,
               tokenizer_2=model.tokenizer_2, transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decoded(pipe, packed: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, Image.Image]:
    """A pipeline's packed output latents -> (unpacked latents, its picture), as FluxPipeline decodes them."""
    latents = pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)
    with torch.inference_mode():
        pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor,
                                 return_dict=False)[0]
    return latents, pipe.image_processor.postprocess(pixels, output_type="pil")[0]


def assert_pictures_within_one_level(ours: Image.Image, theirs: Image.Image) -> None:
    assert ours.size == theirs.size
    assert np.abs(np.asarray(ours).astype(int) - np.asarray(theirs).astype(int)).max() <= 1


@contextlib.contextmanager
def transformer_calls(model):
    """Every call of the model's transformer: (timestep as given, i.e. t/1000, samples in the call)."""
    calls: list[tuple[float, int]] = []

    def record(module, args, kwargs):
        calls.append((float(kwargs["timestep"][0]), kwargs["hidden_states"].shape[0]))

    handle = model.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def samples_per_step(calls: list[tuple[float, int]]) -> list[int]:
    per_step: dict[float, int] = {}
    for timestep, rows in calls:
        per_step[timestep] = per_step.get(timestep, 0) + rows
    return list(per_step.values())


# --- no regions: FluxPipeline from the same noise ------------------------------------------------------------

PLAIN = "prompt: a red sofa in a room\nwidth: 96\nheight: 64\nsteps: 2\nseed: 9\n"


@pytest.mark.parametrize("variant, extra, pipe_kwargs", [
    ("dev", "guidance_scale: 4.5\n", {"guidance_scale": 4.5}),
    ("dev", "guidance_scale: 4.5\nnegative_prompt: blurry\ntrue_cfg_scale: 3.0\n",
     {"guidance_scale": 4.5, "negative_prompt": "blurry", "true_cfg_scale": 3.0}),
    ("schnell", "", {}),
], ids=["dev-embedded-guidance", "dev-true-cfg", "schnell"])
def test_a_plain_scene_equals_diffusers_flux_pipeline_from_the_seed_s_noise(request, write_scene, variant, extra,
                                                                            pipe_kwargs, assert_close_batched):
    """The pipeline draws randn((1, 16, H/8, W/8)) from the generator it is given: the seed's CPU generator is
    the render's, so equal latents also show the render starts from that noise. Latents within the rounding
    of batched calls (true CFG multiplies it), pictures within one 8-bit level."""
    model = request.getfixturevalue(variant)
    ours = render(scene_of(write_scene, model, PLAIN + extra), model, seed=9)
    pipe = flux_pipeline(model)
    with torch.inference_mode():
        packed = pipe("a red sofa in a room", height=64, width=96, num_inference_steps=2, generator=seed_generator(9),
                      output_type="latent", **pipe_kwargs).images
    theirs, picture = decoded(pipe, packed, 64, 96)
    assert_close_batched(ours.latents, theirs, guidance=pipe_kwargs.get("true_cfg_scale", 0.0), steps=2)
    assert_pictures_within_one_level(ours.image, picture)


def test_embedded_guidance_and_true_cfg_each_change_the_picture(dev, write_scene):
    """So the equalities above would fail were either ignored."""
    def latents(extra):
        return render(scene_of(write_scene, dev, PLAIN + extra), dev, seed=9).latents

    base = latents("guidance_scale: 4.5\n")
    assert not torch.allclose(base, latents("guidance_scale: 1.5\n"), atol=1e-3)
    assert not torch.allclose(base, latents("guidance_scale: 4.5\nnegative_prompt: blurry\ntrue_cfg_scale: 3.0\n"),
                              atol=1e-3)


# --- pictures: FluxImg2ImgPipeline and FluxInpaintPipeline -----------------------------------------------------

PICTURE_PX = 64


@pytest.fixture
def picture_files(tmp_path, monkeypatch):
    """pic.png (random pixels) and keep.png (white = may change, on whole 16 px patches) in tmp_path; the
    pipelines encode pictures to their latents' mean, as the render does (they would draw a sample)."""
    import diffusers.pipelines.flux.pipeline_flux_img2img as img2img
    import diffusers.pipelines.flux.pipeline_flux_inpaint as inpaint

    pixels = np.random.default_rng(0).integers(0, 256, (PICTURE_PX, PICTURE_PX, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "pic.png")
    mask = Image.new("L", (PICTURE_PX, PICTURE_PX), 0)
    mask.paste(255, (16, 0, 48, 32))
    mask.save(tmp_path / "keep.png")
    for module in (img2img, inpaint):
        monkeypatch.setattr(module, "retrieve_latents", lambda output, generator=None, sample_mode="sample":
                            output.latent_dist.mode())
    return tmp_path / "pic.png", tmp_path / "keep.png"


PICTURE = ("prompt: a harbour\ninit_image: pic.png\nwidth: 64\nheight: 64\nstrength: {strength}\nsteps: {steps}\n"
           "guidance_scale: 3.0\nseed: 4\n")


def test_img2img_equals_diffusers_flux_img2img_pipeline(dev, write_scene, picture_files, assert_close_batched):
    """strength 0.6 of 4 steps runs 3 (FLUX's pipelines start at int(steps - steps * strength); SD's would run
    2), from the picture's latents with the VAE's shift factor, noised with the flow formula."""
    scene = scene_of(write_scene, dev, PICTURE.format(strength=0.6, steps=4))
    with transformer_calls(dev) as calls:
        ours = render(scene, dev, seed=4)
    assert len(calls) == 3
    pipe = flux_pipeline(dev, "img2img")
    with Image.open(picture_files[0]) as image, torch.inference_mode():
        packed = pipe("a harbour", image=image.convert("RGB"), height=64, width=64, strength=0.6,
                      num_inference_steps=4, guidance_scale=3.0, generator=seed_generator(4), output_type="latent").images
    theirs, picture = decoded(pipe, packed, 64, 64)
    assert_close_batched(ours.latents, theirs, steps=3)
    assert_pictures_within_one_level(ours.image, picture)


@pytest.mark.parametrize("strength, steps", [(0.6, 4), (1.0, 2)])
def test_a_keep_mask_equals_diffusers_flux_inpaint_pipeline(dev, write_scene, picture_files, strength, steps,
                                                             assert_close_batched):
    scene = scene_of(write_scene, dev, PICTURE.format(strength=strength, steps=steps) + "keep: keep.png\n")
    ours = render(scene, dev, seed=4)
    pipe = flux_pipeline(dev, "inpaint")
    with Image.open(picture_files[0]) as image, Image.open(picture_files[1]) as mask, torch.inference_mode():
        packed = pipe("a harbour", image=image.convert("RGB"), mask_image=mask.convert("L"), height=64, width=64,
                      strength=strength, num_inference_steps=steps, guidance_scale=3.0, generator=seed_generator(4),
                      output_type="latent").images
    theirs, _ = decoded(pipe, packed, 64, 64)
    assert_close_batched(ours.latents, theirs, steps=steps)
    kept = torch.ones(8, 8, dtype=torch.bool)
    kept[0:4, 2:6] = False
    # outside the mask the picture's latents themselves (its encoded mean, the shift factor taken off)
    mean = dev.vae.encode(torch.from_numpy(np.asarray(Image.open(picture_files[0]), dtype=np.float32) / 127.5 - 1)
                          .permute(2, 0, 1)[None]).latent_dist.mean
    clean = (mean - dev.vae.config.shift_factor) * dev.vae.config.scaling_factor
    torch.testing.assert_close(ours.latents[0][:, kept], clean[0][:, kept], atol=1e-5, rtol=0)


# --- regions and panoramas: the shared reference loop ----------------------------------------------------------


def background_latents(vae, generator: torch.Generator, steps: int, regions: int) -> torch.Tensor:
    """The authors' bootstrapping backgrounds (a flat random colour per step and region), encoded and scaled as
    FluxPipeline scales latents: (mean - shift_factor) * scaling_factor."""
    colours = torch.rand((steps * regions, 3, 1, 1), generator=generator) * 2 - 1
    with torch.inference_mode():
        mean = vae.encode(colours.expand(-1, -1, 64, 64)).latent_dist.mean
    latents = (mean - vae.config.shift_factor) * vae.config.scaling_factor
    return latents.mean(dim=(2, 3), keepdim=True).reshape(steps, regions, -1, 1, 1)


def flux_reference(model, scene, seed: int, views=None) -> torch.Tensor:
    """The paper's loop on FLUX (tests/reference.py): every prompt encoded by FluxPipeline.encode_prompt, its
    velocity on each view's crop computed by the transformer as FluxPipeline calls it (its own _pack_latents,
    _prepare_latent_image_ids and _unpack_latents; embedded guidance the prompt's guidance_scale; true CFG
    over the negative prompt), its own Euler step, then the weighted mean. The schedule is FluxPipeline's
    for a picture of one view's size."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe = flux_pipeline(model)
    h, w = scene.latent_hw
    generator = seed_generator(seed)
    noise = torch.randn((1, 16, h, w), generator=generator)
    backgrounds = (background_latents(model.vae, generator, scene.bootstrap_steps, len(scene.regions))
                   if scene.bootstrap_steps else None)
    view_h, view_w = (views[0].height, views[0].width) if views else (h, w)
    config = pipe.scheduler.config
    mu = calculate_shift((view_h // 2) * (view_w // 2), config.base_image_seq_len, config.max_image_seq_len,
                         config.base_shift, config.max_shift)
    schedule = FlowSchedule(pipe.scheduler)
    schedule.set_timesteps(scene.steps, sigmas=np.linspace(1.0, 1 / scene.steps, scene.steps), mu=mu)
    prompts = [(scene.prompt, scene.guidance_scale)] + [
        (r.prompt, scene.guidance_scale if r.guidance_scale is None else r.guidance_scale) for r in scene.regions]
    true_cfg = scene.true_cfg_scale or 1.0
    with torch.inference_mode():
        encoded = [pipe.encode_prompt(text, prompt_2=None, device=CPU) for text, _ in prompts]
        negative = pipe.encode_prompt(scene.negative_prompt, prompt_2=None, device=CPU) if true_cfg > 1 else None

        def velocity(p, x, t):
            vh, vw = x.shape[-2:]
            packed = pipe._pack_latents(x, 1, 16, vh, vw)
            ids = pipe._prepare_latent_image_ids(1, vh // 2, vw // 2, CPU, x.dtype)
            guidance = torch.full([1], prompts[p][1], dtype=torch.float32) if model.embedded_guidance else None

            def transformer(embeds, pooled, text_ids):
                return pipe.transformer(hidden_states=packed, timestep=t.expand(1) / 1000, guidance=guidance,
                                        pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                        img_ids=ids, return_dict=False)[0]

            v = transformer(*encoded[p])
            if negative is not None:
                u = transformer(*negative)
                v = u + true_cfg * (v - u)
            return pipe._unpack_latents(v, vh * 8, vw * 8, pipe.vae_scale_factor)

        return reference_multidiffusion(velocity, noise, schedule, scene_weights(scene), views=views,
                                        bootstrap_steps=scene.bootstrap_steps, backgrounds=backgrounds)


@pytest.fixture
def lamp_mask(tmp_path):
    """masks/lamp.png: a region mask PNG of the canvas's size, its white not on whole cells."""
    def make(width: int, height: int):
        (tmp_path / "masks").mkdir(exist_ok=True)
        mask = Image.new("L", (width, height), 0)
        mask.paste(255, (width - 44, 4, width - 4, height - 20))
        mask.save(tmp_path / "masks" / "lamp.png")
    return make


REGIONS = """
prompt: a living room
width: {width}
height: 64
steps: 2
bootstrap_steps: 1
guidance_scale: 4.0
seed: 11
{extra}regions:
  - prompt: a red sofa
    box: [0, 16, 48, 64]
    guidance_scale: 2.0
  - prompt: a lamp
    mask: masks/lamp.png
"""


@pytest.mark.parametrize("extra", ["", "negative_prompt: blurry\ntrue_cfg_scale: 2.5\n"], ids=["embedded", "true-cfg"])
def test_boxes_a_mask_and_region_guidance_equal_the_reference_loop(dev, write_scene, lamp_mask, extra,
                                                                   assert_close_batched):
    lamp_mask(96, 64)
    scene = scene_of(write_scene, dev, REGIONS.format(width=96, extra=extra))
    ours = render(scene, dev, seed=11).latents
    assert len(plan_render(scene, dev).views) == 1
    assert_close_batched(ours, flux_reference(dev, scene, 11), guidance=scene.true_cfg_scale or 0.0, steps=2)


@pytest.mark.parametrize("wrap", ["none", "horizontal"])
def test_a_canvas_wider_than_the_native_window_equals_the_reference_loop_over_views(small_window, write_scene,
                                                                                   lamp_mask, wrap,
                                                                                   assert_close_batched):
    lamp_mask(128, 64)
    scene = scene_of(write_scene, small_window,
                     REGIONS.format(width=128, extra=f"view_stride: 32\nwrap: {wrap}\n"))
    views = plan_render(scene, small_window).views
    assert [(v.left, v.width) for v in views][:3] == [(0, 8), (4, 8), (8, 8)]
    ours = render(scene, small_window, seed=11).latents
    assert_close_batched(ours, flux_reference(small_window, scene, 11, views), steps=2)


# --- samples per step, and the shift of a view ----------------------------------------------------------------

COUNTED = """
prompt: a street
width: 96
height: 64
steps: 2
bootstrap_steps: 0
max_batch: 64
{extra}regions:
  - prompt: a woman
    box: [0, 0, 32, 64]
  - prompt: a man
    box: [64, 0, 96, 64]
"""


@pytest.mark.parametrize("variant, extra, per_step", [
    ("dev", "", [2 + 1] * 2),
    ("dev", "negative_prompt: blurry\ntrue_cfg_scale: 2.0\n", [2 + 2] * 2),
    ("schnell", "few_step: false\n", [2 + 1] * 2),
    ("schnell", "", [1, 2 + 1]),
], ids=["dev", "dev-true-cfg", "schnell", "schnell-quantized-masks"])
def test_n_regions_cost_n_plus_1_samples_a_step_and_n_plus_2_with_true_cfg(request, write_scene, variant, extra,
                                                                           per_step):
    """Embedded guidance is one value per sample: no unconditional pass. True CFG's negative pass is shared by
    the prompts with the same negative prompt and guidance, as SD's unconditional sample is. schnell takes the
    few-step path by default: its quantized masks hold no region at sigma 1 (its first step), so that step is
    the global prompt's alone."""
    model = request.getfixturevalue(variant)
    scene = scene_of(write_scene, model, COUNTED.format(extra=extra))
    with transformer_calls(model) as calls:
        render(scene, model, seed=0)
    assert samples_per_step(calls) == per_step


def test_the_shift_comes_from_a_view_not_the_canvas(small_window, write_scene):
    """A 256x64 canvas in 64 px views runs FluxPipeline's timesteps for a 64x64 picture, not for 256x64."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    def pipeline_timesteps(height_px, width_px):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(small_window.scheduler_config)
        tokens = (height_px // 16) * (width_px // 16)
        mu = calculate_shift(tokens, scheduler.config.base_image_seq_len, scheduler.config.max_image_seq_len,
                             scheduler.config.base_shift, scheduler.config.max_shift)
        timesteps, _ = retrieve_timesteps(scheduler, 3, CPU, sigmas=np.linspace(1.0, 1 / 3, 3), mu=mu)
        return timesteps / 1000

    scene = scene_of(write_scene, small_window, "prompt: fjords\nwidth: 256\nheight: 64\nsteps: 3\n")
    assert len(plan_render(scene, small_window).views) > 1
    with transformer_calls(small_window) as calls:
        render(scene, small_window, seed=0)
    seen = torch.tensor(list(dict.fromkeys(timestep for timestep, _ in calls)))
    torch.testing.assert_close(seen, pipeline_timesteps(64, 64).float(), rtol=1e-6, atol=0)
    assert not torch.allclose(seen, pipeline_timesteps(64, 256).float(), rtol=1e-4, atol=0)


def test_a_4096_wide_canvas_s_own_shift_would_push_the_schedule_to_noise(dev):
    """Why (README, FLUX.1): FLUX.1-dev's shift for one 1024² view keeps half its steps below σ 0.8; the shift
    of a 4096x1024 canvas's 16384 tokens would leave three quarters of them above 0.9, and three below 0.8."""
    view = dev.make_schedule("euler", 28, (128, 128)).noise_levels()
    canvas = dev.make_schedule("euler", 28, (128, 512)).noise_levels()
    assert (view < 0.8).sum() >= 14
    assert (canvas > 0.9).sum() >= 21 and (canvas < 0.8).sum() <= 3


# --- loading: folders, the cache, single files in BFL layout ----------------------------------------------------


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory):
    """tiny-flux-random saved as a diffusers folder (safetensors) whose name says nothing of FLUX, with the
    model_index.json a FLUX repo has. Read-only."""
    folder = tmp_path_factory.mktemp("models") / "plain-model"
    save_model(build_tiny_flux_random(), folder)
    index = {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_a_flux_folder_is_told_by_its_model_index_and_renders_as_the_built_model(dev, dev_folder, write_scene):
    assert family_of_folder(dev_folder) is FLUX
    loaded = load_model(str(dev_folder), CPU, torch.float32)
    assert loaded.family == "flux" and loaded.embedded_guidance and not loaded.few_step_model
    scene = scene_of(write_scene, dev, "prompt: p\nwidth: 96\nheight: 64\nsteps: 2\nregions:\n"
                                       "  - prompt: q\n    box: [0, 0, 32, 32]\n")
    assert torch.equal(render(scene, loaded, seed=3).latents, render(scene, dev, seed=3).latents)


def test_models_lists_a_flux_folder_in_the_cache(cli, dev_folder, tmp_path):
    snapshot = tmp_path / "hub" / "models--me--tiny-flux" / "snapshots" / ("f" * 40)
    shutil.copytree(dev_folder, snapshot)
    (tmp_path / "hub" / "models--me--tiny-flux" / "refs").mkdir()
    (tmp_path / "hub" / "models--me--tiny-flux" / "refs" / "main").write_text("f" * 40)
    (row,) = cached_models(tmp_path / "hub").rows
    assert (row[0], row[3], row[4]) == ("me/tiny-flux", None, "flux")
    result = cli("models", "--cache-dir", tmp_path / "hub")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().split("\t")[3:] == ["flux", "ok"]
