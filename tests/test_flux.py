"""FLUX.1 (dev and schnell) on tiny random FLUX-shaped models (issue 21). diffusers' FluxPipeline,
FluxImg2ImgPipeline and FluxInpaintPipeline, drawing their noise from the seed's CPU generator, are the
oracles for plain scenes and pictures; the shared reference loop, each prompt's velocity computed with
FluxPipeline's own encoding, packing and position ids, is the oracle for regions and panoramas. Then
samples per step, the dynamic shift of a view, loading (a folder, a BFL single file, the cache
listing), and records (the PNG, inspect, upscale). LoRAs, what FLUX refuses and its memory check:
test_flux_lora.py."""
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
from reference import background_latents, flux_pipeline, reference_multidiffusion, samples_per_step, scene_of, seed_generator

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
                      num_inference_steps=4, guidance_scale=3.0, generator=seed_generator(4),
                      output_type="latent").images
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


# A diffusers FluxTransformer2DModel key -> its name in BFL's own files (flux1-dev.safetensors; ComfyUI's add
# model.diffusion_model.): the inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers.
BFL_LINEARS = {"time_text_embed.timestep_embedder": "time_in", "time_text_embed.text_embedder": "vector_in",
               "time_text_embed.guidance_embedder": "guidance_in"}
BFL_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "ff.net.0.proj": "img_mlp.0",
              "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
              "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj"}
BFL_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
FLUX1_WIDTH = 3072


def bfl_layout(transformer, prefix: str = "") -> dict[str, torch.Tensor]:
    """The transformer's weights as BFL saves FLUX.1: fused qkv (and single blocks' qkv + MLP in linear1),
    RMSNorm weights as .scale, the final AdaLN's (shift, scale) halves in BFL's order. Every key is used once."""
    state = dict(transformer.state_dict())
    out: dict[str, torch.Tensor] = {}

    def move(src: str, dst: str) -> None:
        out[dst] = state.pop(src)

    for p in ("weight", "bias"):
        for src, dst in BFL_LINEARS.items():
            for ours, theirs in (("linear_1", "in_layer"), ("linear_2", "out_layer")):
                if f"{src}.{ours}.{p}" in state:  # schnell has no guidance embedder
                    move(f"{src}.{ours}.{p}", f"{dst}.{theirs}.{p}")
        move(f"context_embedder.{p}", f"txt_in.{p}")
        move(f"x_embedder.{p}", f"img_in.{p}")
        move(f"proj_out.{p}", f"final_layer.linear.{p}")
        scale, shift = state.pop(f"norm_out.linear.{p}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
        for i in range(transformer.config.num_layers):
            ours, theirs = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            for src, dst in BFL_DOUBLE.items():
                move(f"{ours}{src}.{p}", f"{theirs}{dst}.{p}")
            out[f"{theirs}img_attn.qkv.{p}"] = torch.cat([state.pop(f"{ours}attn.to_{x}.{p}") for x in "qkv"])
            out[f"{theirs}txt_attn.qkv.{p}"] = torch.cat([state.pop(f"{ours}attn.add_{x}_proj.{p}") for x in "qkv"])
        for i in range(transformer.config.num_single_layers):
            ours, theirs = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            move(f"{ours}norm.linear.{p}", f"{theirs}modulation.lin.{p}")
            move(f"{ours}proj_out.{p}", f"{theirs}linear2.{p}")
            out[f"{theirs}linear1.{p}"] = torch.cat([state.pop(f"{ours}attn.to_{x}.{p}") for x in "qkv"]
                                                    + [state.pop(f"{ours}proj_mlp.{p}")])
    for i in range(transformer.config.num_layers):
        for src, dst in BFL_DOUBLE_NORMS.items():
            move(f"transformer_blocks.{i}.{src}.weight", f"double_blocks.{i}.{dst}.scale")
    for i in range(transformer.config.num_single_layers):
        move(f"single_transformer_blocks.{i}.attn.norm_q.weight", f"single_blocks.{i}.norm.query_norm.scale")
        move(f"single_transformer_blocks.{i}.attn.norm_k.weight", f"single_blocks.{i}.norm.key_norm.scale")
    assert not state, f"no BFL name for {sorted(state)}"
    return {prefix + key: value.contiguous() for key, value in out.items()}


@pytest.fixture
def any_width_conversion(monkeypatch):
    """diffusers' FLUX conversion cuts a single block's linear1 at FLUX.1's width (3072, written in it): a
    narrower file is padded with zero rows to that cut, converted by diffusers itself (every key's name is
    its), and its q, k, v and MLP rows cut back. The tiny transformer is 32 wide."""
    from diffusers.loaders import single_file_model

    entry = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    original = entry["checkpoint_mapping_fn"]

    def convert(checkpoint, **kwargs):
        checkpoint = {key.removeprefix("model.diffusion_model."): value for key, value in checkpoint.items()}
        width = checkpoint["img_in.weight"].shape[0]
        rows = (width,) * 3 + (4 * width,)
        singles = sorted({key.split(".")[1] for key in checkpoint if key.startswith("single_blocks.")})
        for i, p in ((i, p) for i in singles for p in ("weight", "bias")):
            parts = checkpoint[f"single_blocks.{i}.linear1.{p}"].split(rows)
            checkpoint[f"single_blocks.{i}.linear1.{p}"] = torch.cat([
                torch.cat([part, part.new_zeros((full - part.shape[0], *part.shape[1:]))])
                for part, full in zip(parts, (FLUX1_WIDTH,) * 3 + (4 * FLUX1_WIDTH,))])
        converted = original(checkpoint, **kwargs)
        for i, p in ((i, p) for i in singles for p in ("weight", "bias")):
            for name, n in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), rows):
                converted[f"single_transformer_blocks.{i}.{name}.{p}"] = converted[
                    f"single_transformer_blocks.{i}.{name}.{p}"][:n]
        return converted

    monkeypatch.setitem(entry, "checkpoint_mapping_fn", convert)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bfl", "comfyui"])
def test_a_bfl_single_file_transformer_loads_and_renders_as_its_folder(dev, dev_folder, any_width_conversion,
                                                                        write_scene, tmp_path, prefix):
    """The file holds the transformer alone, as flux1-dev.safetensors does: the model is told FLUX by its keys,
    the transformer is read from it (every weight equal), every other part comes from the configs' folder
    (model_config); it renders as the folder does (test above: as the built model), bit for bit."""
    from safetensors.torch import save_file

    from multidiff_cli.catalog import family_of_checkpoint

    single = tmp_path / "flux1-tiny.safetensors"
    save_file(bfl_layout(dev.transformer, prefix), str(single))
    assert family_of_checkpoint(single) is FLUX
    loaded = load_model(str(single), CPU, torch.float32, config=str(dev_folder))
    assert loaded.family == "flux" and loaded.embedded_guidance
    theirs = dev.transformer.state_dict()
    assert all(torch.equal(value, theirs[key]) for key, value in loaded.transformer.state_dict().items())
    scene = scene_of(write_scene, dev, "prompt: a red sofa\nwidth: 64\nheight: 64\nsteps: 1\nregions:\n"
                                       "  - prompt: a lamp\n    box: [0, 0, 32, 64]\n")
    assert torch.equal(render(scene, loaded, seed=3).latents, render(scene, dev, seed=3).latents)


def test_a_transformer_only_single_file_without_configs_says_how_to_get_the_other_parts(cli, dev, write_scene,
                                                                                        tmp_path, monkeypatch):
    """Offline with FLUX.1-dev not in the cache, the parts the file lacks can come from nowhere: one line (exit
    1, as for any model not here) naming model_config and a download of every part but the transformer, not
    diffusers' SingleFileComponentError traceback; nothing written."""
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    single = tmp_path / "flux1-tiny.safetensors"
    save_file(bfl_layout(dev.transformer), str(single))
    scene = write_scene("prompt: a room\nwidth: 64\nheight: 64\nsteps: 1\n")
    result = cli("render", scene, "--model", single, "-q", "--output-dir", tmp_path / "out")
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "flux1-tiny.safetensors" in line and "`model_config:`" in line and "FLUX.1, with its text encoders" in line
    assert line.endswith("hf download black-forest-labs/FLUX.1-dev --exclude 'transformer/*'"), line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- records and tools: the PNG, inspect, upscale ----------------------------------------------------------------


def test_a_flux_render_with_bootstrapping_is_recorded_as_flux_and_upscales(cli, write_scene, tmp_path):
    """A region scene with bootstrapping renders from the CLI; its PNG's record and `inspect` name the family;
    `upscale` re-renders it larger on the same model, its region box scaled, and records FLUX again."""
    scene = write_scene("prompt: a room\nwidth: 64\nheight: 64\nsteps: 2\nseed: 1\nbootstrap_steps: 1\nregions:\n"
                        "  - prompt: a lamp\n    box: [0, 0, 32, 64]\n", "room.yaml")
    result = cli("render", scene, "--model", "tiny-flux-random", "-q", "--output-dir", tmp_path / "out")
    assert result.exit_code == 0, result.output
    picture = tmp_path / "out" / "room-1.png"
    record = read_metadata(picture)
    assert (record["family"], record["model"], record["scene"]["bootstrap_steps"]) == ("flux", "tiny-flux-random", 1)
    assert record["scene"]["guidance_scale"] == FLUX.default_guidance
    shown = cli("inspect", picture)
    assert shown.exit_code == 0, shown.output
    assert "# family: flux" in shown.stdout.splitlines()

    upscaled = cli("upscale", picture, "--scale", "1.5", "--steps", "2", "--strength", "0.5", "--seed", "3", "-q",
                   "--output-dir", tmp_path / "up")
    assert upscaled.exit_code == 0, upscaled.output
    (larger,) = (tmp_path / "up").glob("*.png")
    with Image.open(larger) as image:
        assert image.size == (96, 96)
    record = read_metadata(larger)
    assert (record["family"], record["model"]) == ("flux", "tiny-flux-random")
    assert record["scene"]["regions"] == [{"box": [0, 0, 48, 96], "prompt": "a lamp"}]


def test_an_upscale_of_a_flux_picture_rounds_its_canvas_to_flux_s_16_px(cli, write_scene, tmp_path):
    """64 px times 1.375 is 88, a multiple of 8 but not of 16: the upscale's canvas is rounded to FLUX's 16 px
    (96), not refused as a canvas FLUX cannot render."""
    scene = write_scene("prompt: a room\nwidth: 64\nheight: 64\nsteps: 1\nseed: 1\n", "room.yaml")
    assert cli("render", scene, "--model", "tiny-flux-random", "-q", "-o", tmp_path / "room.png").exit_code == 0
    upscaled = cli("upscale", tmp_path / "room.png", "--scale", "1.375", "--steps", "1", "--seed", "2", "-q",
                   "--output-dir", tmp_path / "up")
    assert upscaled.exit_code == 0, upscaled.output
    (larger,) = (tmp_path / "up").glob("*.png")
    with Image.open(larger) as image:
        assert image.size == (96, 96)
