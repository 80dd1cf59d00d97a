"""SD3.5 (issue 22) on a tiny random SD3-shaped model. diffusers' StableDiffusion3Pipeline, -Img2ImgPipeline
and -InpaintPipeline, drawing their noise from the seed's CPU generator, are the oracles for plain scenes and
pictures; the shared reference loop, each prompt's velocity computed with the pipeline's own encode_prompt
and transformer call, is the oracle for regions and panoramas; diffusers' own load_lora_weights is the
oracle for LoRAs. Then samples per step, loading a folder, and what SD3 refuses (kohya LoRAs, another
family's LoRA, a canvas off its 16 px grid)."""
from __future__ import annotations

import contextlib
import copy
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from multidiff_cli.catalog import SD3, family_of_folder
from multidiff_cli.method.schedule import FlowSchedule
from multidiff_cli.models.loading import cached_models, load_model
from multidiff_cli.models.random_flux import build_tiny_sd3_random
from multidiff_cli.models.random_weights import save_model
from multidiff_cli.output.png import read_metadata
from multidiff_cli.run.render import plan_render, render, scene_weights
from multidiff_cli.scene import load_scene
from reference import background_latents, guided, reference_multidiffusion, samples_per_step, seed_generator

CPU = torch.device("cpu")
NATIVE_PX = 256  # tiny-sd3-random's window: canvases up to 256 px are one view, wider ones panoramas


@pytest.fixture(scope="module")
def sd3():
    """tiny-sd3-random on the CPU (float32), with T5. Read-only: LoRA tests deep-copy it."""
    model = build_tiny_sd3_random().to(CPU, torch.float32)
    assert model.native_cells * 8 == NATIVE_PX
    return model


@pytest.fixture(scope="module")
def no_t5(sd3):
    """The same weights without T5 (SD3 renders without it: zeros in its place, as the pipeline pads)."""
    return replaced(sd3, text_encoder_3=None, tokenizer_3=None)


def replaced(model, **parts):
    """A shallow copy of a model with some of its parts replaced."""
    out = copy.copy(model)
    out.__dict__.update(parts)
    return out


def scene_of(write_scene, model, text: str, name: str = "scene.yaml"):
    """A scene file loaded as for this model (its family's defaults and checks)."""
    return load_scene(write_scene(text, name), default_model=model.model_id)


def sd3_pipeline(model, kind: str = "text"):
    """diffusers' own SD3 pipeline on the model's parts, with the scheduler SD3.5 ships (its config)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    cls = {"text": diffusers.StableDiffusion3Pipeline, "img2img": diffusers.StableDiffusion3Img2ImgPipeline,
           "inpaint": diffusers.StableDiffusion3InpaintPipeline}[kind]
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config), vae=model.vae,
               text_encoder=model.text_encoder, tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2,
               tokenizer_2=model.tokenizer_2, text_encoder_3=model.text_encoder_3, tokenizer_3=model.tokenizer_3,
               transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decoded(pipe, latents: torch.Tensor) -> Image.Image:
    """A pipeline's output latents -> its picture, as StableDiffusion3Pipeline decodes them."""
    with torch.inference_mode():
        pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor,
                                 return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels, output_type="pil")[0]


def assert_pictures_within_one_level(ours: Image.Image, theirs: Image.Image) -> None:
    assert ours.size == theirs.size
    assert np.abs(np.asarray(ours).astype(int) - np.asarray(theirs).astype(int)).max() <= 1


@contextlib.contextmanager
def transformer_calls(model):
    """Every call of the model's transformer: (timestep as given, samples in the call)."""
    calls: list[tuple[float, int]] = []

    def record(module, args, kwargs):
        calls.append((float(kwargs["timestep"][0]), kwargs["hidden_states"].shape[0]))

    handle = model.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


# --- no regions: StableDiffusion3Pipeline from the same noise --------------------------------------------------

PLAIN = "prompt: a red sofa in a room\nwidth: 96\nheight: 64\nsteps: 2\nguidance_scale: 5.0\nseed: 9\n"


@pytest.mark.parametrize("variant, extra, negative", [
    ("sd3", "", None),
    ("sd3", "negative_prompt: blurry, low quality\n", "blurry, low quality"),
    ("no_t5", "negative_prompt: blurry\n", "blurry"),
], ids=["no-negative", "negative", "without-t5"])
def test_a_plain_scene_equals_diffusers_sd3_pipeline_from_the_seed_s_noise(request, write_scene, variant, extra,
                                                                           negative, assert_close_batched):
    """The pipeline draws randn((1, 16, H/8, W/8)) from the generator it is given, the render from the seed's
    CPU generator: equal latents show the same start, the same prompt joining (both CLIPs' penultimate
    states padded to T5's width, T5 after; zeros without T5), guidance and schedule. A scene without a
    negative prompt is the pipeline's default, an encoded ""."""
    model = request.getfixturevalue(variant)
    ours = render(scene_of(write_scene, model, PLAIN + extra), model, seed=9)
    pipe = sd3_pipeline(model)
    with torch.inference_mode():
        theirs = pipe("a red sofa in a room", negative_prompt=negative, height=64, width=96, num_inference_steps=2,
                      guidance_scale=5.0, generator=seed_generator(9), output_type="latent").images
    assert_close_batched(ours.latents, theirs, guidance=5.0, steps=2)
    assert_pictures_within_one_level(ours.image, decoded(pipe, theirs))


def test_the_negative_prompt_and_t5_each_change_the_picture(sd3, no_t5, write_scene):
    """So the equalities above would fail were either ignored (an empty negative prompt is not zeros on SD3)."""
    def latents(model, text=PLAIN):
        return render(scene_of(write_scene, model, text), model, seed=9).latents

    base = latents(sd3)
    assert not torch.allclose(base, latents(sd3, PLAIN + "negative_prompt: blurry\n"), atol=1e-3)
    assert not torch.allclose(base, latents(no_t5), atol=1e-3)
    assert not torch.allclose(base, latents(sd3, PLAIN.replace("guidance_scale: 5.0", "guidance_scale: 2.0")),
                              atol=1e-3)


# --- regions and panoramas: the shared reference loop ----------------------------------------------------------


def sd3_reference(model, scene, seed: int, views=None, pipe=None, pipes=None) -> torch.Tensor:
    """The paper's loop on SD3 (tests/reference.py): every prompt encoded by StableDiffusion3Pipeline.encode_prompt
    with the scene's negative prompt, its unconditional and conditional velocities on each view's crop from the
    transformer as the pipeline calls it (the timestep itself, the latents unpatchified), guided as the pipeline
    guides, its own Euler step, then the weighted mean. pipes: one pipeline per prompt (a region's LoRA)."""
    pipe = pipe or sd3_pipeline(model)
    pipes = pipes or [pipe] * (1 + len(scene.regions))
    h, w = scene.latent_hw
    generator = seed_generator(seed)
    noise = torch.randn((1, 16, h, w), generator=generator)
    backgrounds = (background_latents(model.vae, generator, scene.bootstrap_steps, len(scene.regions))
                   if scene.bootstrap_steps else None)
    schedule = FlowSchedule(pipe.scheduler)
    schedule.set_timesteps(scene.steps)
    prompts = [(scene.prompt, scene.guidance_scale)] + [
        (r.prompt, scene.guidance_scale if r.guidance_scale is None else r.guidance_scale) for r in scene.regions]
    with torch.inference_mode():
        encoded = [p.encode_prompt(text, None, None, device=CPU, negative_prompt=scene.negative_prompt)
                   for p, (text, _) in zip(pipes, prompts)]

        def velocity(p, x, t):
            cond, uncond, pooled, uncond_pooled = encoded[p]

            def transformer(embeds, pooled_embeds):
                return pipes[p].transformer(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=embeds,
                                            pooled_projections=pooled_embeds, return_dict=False)[0]

            return guided(transformer(uncond, uncond_pooled), transformer(cond, pooled), prompts[p][1])

        return reference_multidiffusion(velocity, noise, schedule, scene_weights(scene), views=views,
                                        bootstrap_steps=scene.bootstrap_steps, backgrounds=backgrounds)


REGIONS = """
prompt: a living room
negative_prompt: blurry
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


def test_boxes_a_mask_and_region_guidance_equal_the_reference_loop(sd3, write_scene, lamp_mask, assert_close_batched):
    lamp_mask(96, 64)
    scene = scene_of(write_scene, sd3, REGIONS.format(width=96, extra=""))
    assert len(plan_render(scene, sd3).views) == 1
    ours = render(scene, sd3, seed=11).latents
    assert_close_batched(ours, sd3_reference(sd3, scene, 11), guidance=4.0, steps=2)


@pytest.mark.parametrize("wrap", ["none", "horizontal"])
def test_a_canvas_wider_than_the_native_window_equals_the_reference_loop_over_views(sd3, write_scene, lamp_mask, wrap,
                                                                                   assert_close_batched):
    """384 px wide in 256 px views at a 64 px stride: each view is conditioned as a picture of its own size
    (the transformer crops its position embedding to the input), so the reference calls it on the crop."""
    lamp_mask(384, 64)
    scene = scene_of(write_scene, sd3, REGIONS.format(width=384, extra=f"view_stride: 64\nwrap: {wrap}\n"))
    views = plan_render(scene, sd3).views
    assert [(v.left, v.width) for v in views][:3] == [(0, 32), (8, 32), (16, 32)]
    ours = render(scene, sd3, seed=11).latents
    assert_close_batched(ours, sd3_reference(sd3, scene, 11, views), guidance=4.0, steps=2)


# --- samples per step -------------------------------------------------------------------------------------------

COUNTED = """
prompt: a street
width: 96
height: 64
steps: 2
bootstrap_steps: 0
max_batch: 64
guidance_scale: {guidance}
regions:
  - prompt: a woman
    box: [0, 0, 32, 64]
    guidance_scale: {region_guidance}
  - prompt: a man
    box: [64, 0, 96, 64]
"""


@pytest.mark.parametrize("guidance, region_guidance, per_step", [
    (5.0, 3.0, 2 + 2),  # the street's, the woman's and the man's conditional samples, one unconditional for all
    (1.0, 1.0, 2 + 1),  # no guidance anywhere: no unconditional sample (the pipeline's guidance_scale > 1)
], ids=["cfg", "no-cfg"])
def test_n_regions_cost_n_plus_2_samples_a_step_the_unconditional_shared(sd3, write_scene, guidance, region_guidance,
                                                                         per_step):
    """The unconditional sample is shared though the woman's guidance differs: guidance is applied after the
    call, to each prompt's pair of outputs."""
    scene = scene_of(write_scene, sd3, COUNTED.format(guidance=guidance, region_guidance=region_guidance))
    with transformer_calls(sd3) as calls:
        render(scene, sd3, seed=0)
    assert samples_per_step(calls) == [per_step] * 2


# --- pictures: StableDiffusion3Img2ImgPipeline and -InpaintPipeline ---------------------------------------------

PICTURE_PX = 64


@pytest.fixture
def picture_files(tmp_path, monkeypatch):
    """pic.png (random pixels) and keep.png (white = may change, on whole 16 px patches) in tmp_path; the
    pipelines encode pictures to their latents' mean, as the render does (they would draw a sample)."""
    import diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img as img2img
    import diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_inpaint as inpaint

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


def test_img2img_equals_diffusers_sd3_img2img_pipeline(sd3, write_scene, picture_files, assert_close_batched):
    """strength 0.6 of 4 steps runs 3 (the flow pipelines start at int(steps - steps * strength); SD's would
    run 2), from the picture's latents with the VAE's shift factor, noised with the flow formula."""
    scene = scene_of(write_scene, sd3, PICTURE.format(strength=0.6, steps=4))
    with transformer_calls(sd3) as calls:
        ours = render(scene, sd3, seed=4)
    assert len(samples_per_step(calls)) == 3
    pipe = sd3_pipeline(sd3, "img2img")
    with Image.open(picture_files[0]) as image, torch.inference_mode():
        theirs = pipe("a harbour", image=image.convert("RGB"), height=64, width=64, strength=0.6,
                      num_inference_steps=4, guidance_scale=3.0, generator=seed_generator(4),
                      output_type="latent").images
    assert_close_batched(ours.latents, theirs, guidance=3.0, steps=3)
    assert_pictures_within_one_level(ours.image, decoded(pipe, theirs))


@pytest.mark.parametrize("strength, steps", [(0.6, 4), (1.0, 2)])
def test_a_keep_mask_equals_diffusers_sd3_inpaint_pipeline(sd3, write_scene, picture_files, strength, steps,
                                                            assert_close_batched):
    scene = scene_of(write_scene, sd3, PICTURE.format(strength=strength, steps=steps) + "keep: keep.png\n")
    ours = render(scene, sd3, seed=4)
    pipe = sd3_pipeline(sd3, "inpaint")
    with Image.open(picture_files[0]) as image, Image.open(picture_files[1]) as mask, torch.inference_mode():
        theirs = pipe("a harbour", image=image.convert("RGB"), mask_image=mask.convert("L"), height=64, width=64,
                      strength=strength, num_inference_steps=steps, guidance_scale=3.0, generator=seed_generator(4),
                      output_type="latent").images
    assert_close_batched(ours.latents, theirs, guidance=3.0, steps=steps)
    kept = torch.ones(8, 8, dtype=torch.bool)
    kept[0:4, 2:6] = False
    # outside the mask the picture's latents themselves (its encoded mean, the shift factor taken off)
    with Image.open(picture_files[0]) as image, torch.inference_mode():
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        mean = sd3.vae.encode(pixels).latent_dist.mean
    clean = (mean - sd3.vae.config.shift_factor) * sd3.vae.config.scaling_factor
    torch.testing.assert_close(ours.latents[0][:, kept], clean[0][:, kept], atol=1e-5, rtol=0)


# --- LoRAs: diffusers/peft files, exactly separated per region; kohya files refused --------------------------------

TRANSFORMER_TARGETS = (".attn.to_q", ".attn.to_k", ".attn.to_v", ".attn.to_out.0")
TEXT_TARGETS = (".q_proj", ".k_proj", ".v_proj", ".out_proj")
PARTS = (("transformer", TRANSFORMER_TARGETS), ("text_encoder", TEXT_TARGETS), ("text_encoder_2", TEXT_TARGETS))


def peft_lora(model, path, seed: int, rank: int = 2, strength: float = 0.4):
    """A LoRA file in the diffusers/peft layout (`<part>.<module>.lora_A.weight`, `lora_B.weight`) with random
    factors on every attention projection of the transformer and both CLIP encoders."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for part, suffixes in PARTS:
        for name, linear in sorted(getattr(model, part).named_modules()):
            if isinstance(linear, torch.nn.Linear) and name.endswith(suffixes):
                tensors[f"{part}.{name}.lora_A.weight"] = torch.randn((rank, linear.in_features),
                                                                      generator=generator) * strength
                tensors[f"{part}.{name}.lora_B.weight"] = torch.randn((linear.out_features, rank),
                                                                      generator=generator) * strength
    assert len(tensors) > 8
    save_file(tensors, str(path))
    return path


@pytest.fixture
def lora_dir(tmp_path):
    (tmp_path / "loras").mkdir()
    return tmp_path / "loras"


def with_lora(model, path, scale: float):
    """diffusers' own SD3 pipeline on a fresh copy of the model, the LoRA loaded by load_lora_weights."""
    pipe = sd3_pipeline(copy.deepcopy(model))
    pipe.load_lora_weights(str(path), adapter_name="lora")
    pipe.set_adapters(["lora"], [scale])
    return pipe


def test_a_scene_lora_renders_as_diffusers_sd3_pipeline_with_that_lora(sd3, write_scene, lora_dir,
                                                                       assert_close_batched):
    style = peft_lora(sd3, lora_dir / "style.safetensors", seed=1)
    scene = scene_of(write_scene, sd3, PLAIN + "negative_prompt: blurry\nloras:\n  - path: loras/style.safetensors\n"
                                               "    scale: 0.7\n")
    ours = render(scene, copy.deepcopy(sd3), seed=9).latents
    pipe = with_lora(sd3, style, 0.7)
    with torch.inference_mode():
        theirs = pipe("a red sofa in a room", negative_prompt="blurry", height=64, width=96, num_inference_steps=2,
                      guidance_scale=5.0, generator=seed_generator(9), output_type="latent").images
    bare = render(scene.model_copy(update={"loras": []}), sd3, seed=9).latents
    assert (bare - theirs).abs().max() > 100 * (ours - theirs).abs().max()  # the LoRA matters
    assert_close_batched(ours, theirs, guidance=5.0, steps=2)


REGION_LORA = """
prompt: a street
negative_prompt: blurry
width: 96
height: 64
steps: 2
bootstrap_steps: 0
guidance_scale: 5.0
regions:
  - prompt: a woman with red hair
    box: [0, 0, 48, 64]
    loras:
      - path: loras/alice.safetensors
        scale: 0.9
  - prompt: a man
    box: [48, 0, 96, 64]
"""


def test_a_region_lora_equals_a_per_prompt_loop_with_the_lora_on_that_prompt_only(sd3, write_scene, lora_dir,
                                                                                   assert_close_batched):
    """The woman's samples (her text, encoded with the CLIPs' LoRA halves on, and her conditional and
    unconditional transformer samples) run with the LoRA; the street's and the man's, in the same step, without.
    The oracle: the bare pipeline for those two, a pipeline with the LoRA loaded by diffusers for her."""
    alice = peft_lora(sd3, lora_dir / "alice.safetensors", seed=2)
    scene = scene_of(write_scene, sd3, REGION_LORA)
    ours = render(scene, copy.deepcopy(sd3), seed=3).latents
    bare, hers = sd3_pipeline(sd3), with_lora(sd3, alice, 0.9)
    expected = sd3_reference(sd3, scene, 3, pipe=bare, pipes=[bare, hers, bare])
    assert_close_batched(ours, expected, guidance=5.0, steps=2)
    everywhere = sd3_reference(sd3, scene, 3, pipe=bare, pipes=[hers, hers, hers])
    assert (everywhere - expected).abs().max() > 100 * (ours - expected).abs().max()  # not on every prompt


def kohya_sd3_lora(path):
    """A LoRA as kohya's sd-scripts write SD3's: `lora_unet_joint_blocks_…` and `lora_te1_…` keys."""
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(96, 2),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(2.0),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 16),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(16, 2)},
              str(path))
    return path


def sd_unet_lora(path):
    """A diffusers/peft LoRA of an SD UNet (`unet.` keys)."""
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 2)},
              str(path))
    return path


@pytest.mark.parametrize("make, says", [
    (kohya_sd3_lora, "it is a kohya LoRA, and diffusers has no kohya conversion for SD3"),
    (sd_unet_lora, "it names a UNet (unet. layers): a LoRA of an SD or SDXL model"),
], ids=["kohya", "sd-unet"])
def test_cli_a_kohya_or_sd_lora_on_sd3_is_one_line_exit_2_nothing_written(cli, write_scene, lora_dir, tmp_path, make,
                                                                          says):
    make(lora_dir / "other.safetensors")
    scene_path = write_scene("prompt: a\nwidth: 64\nheight: 64\nsteps: 1\nloras: [loras/other.safetensors]\n")
    out = tmp_path / "out"
    result = cli("render", scene_path, "--model", "tiny-sd3-random", "--output-dir", out, "-q")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "other.safetensors: not a LoRA for this model (tiny-sd3-random, SD3-shaped" in lines[0]
    assert says in lines[0]
    assert not list(out.glob("*.png"))


def test_cli_a_canvas_off_the_16_px_grid_is_one_line_exit_2(cli, write_scene):
    scene_path = write_scene("prompt: a\nmodel: stabilityai/stable-diffusion-3.5-medium\nwidth: 72\nheight: 64\n")
    result = cli("validate", scene_path)
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.endswith("scene.yaml:3: width: must be a multiple of 16 for SD3.5 models: try 64"), line


# --- loading: a diffusers folder ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """tiny-sd3-random saved as a diffusers folder (safetensors) whose name says nothing of SD3, with the
    model_index.json an SD3.5 repo has. Read-only."""
    folder = tmp_path_factory.mktemp("models") / "plain-model"
    model = build_tiny_sd3_random()
    save_model(model, folder)
    if not (folder / "tokenizer_3").is_dir():  # save_model writes tokenizer and tokenizer_2 only
        model.tokenizer_3.save_pretrained(folder / "tokenizer_3")
    index = {"_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


FOLDER_SCENE = "prompt: a sofa\nwidth: 96\nheight: 64\nsteps: 2\nregions:\n  - prompt: a lamp\n    box: [0, 0, 32, 64]\n"


def test_an_sd3_folder_is_told_by_its_model_index_and_renders_as_the_built_model(sd3, sd3_folder, write_scene):
    assert family_of_folder(sd3_folder) is SD3
    loaded = load_model(str(sd3_folder), CPU, torch.float32)
    assert loaded.family == "sd3" and loaded.text_encoder_3 is not None
    scene = scene_of(write_scene, sd3, FOLDER_SCENE)
    assert torch.equal(render(scene, loaded, seed=3).latents, render(scene, sd3, seed=3).latents)


def test_cli_renders_an_sd3_folder_and_records_its_family(cli, sd3_folder, write_scene, tmp_path):
    out = tmp_path / "room.png"
    result = cli("render", write_scene(FOLDER_SCENE), "--model", sd3_folder, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    record = read_metadata(out)
    assert record["family"] == "sd3" and record["scene"]["scheduler"] == "euler"
    with Image.open(out) as image:
        assert image.size == (96, 64)


def test_models_lists_an_sd3_folder_in_the_cache(cli, sd3_folder, tmp_path):
    snapshot = tmp_path / "hub" / "models--me--tiny-sd3" / "snapshots" / ("f" * 40)
    shutil.copytree(sd3_folder, snapshot)
    (tmp_path / "hub" / "models--me--tiny-sd3" / "refs").mkdir()
    (tmp_path / "hub" / "models--me--tiny-sd3" / "refs" / "main").write_text("f" * 40)
    (row,) = cached_models(tmp_path / "hub").rows
    assert (row[0], row[3], row[4]) == ("me/tiny-sd3", None, "sd3")
    result = cli("models", "--cache-dir", tmp_path / "hub")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().split("\t")[3:] == ["sd3", "ok"]


def sai_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD3Transformer2DModel's weights in Stability's own layout (sd3.5_medium.safetensors, under
    model.diffusion_model.): the inverse of diffusers' convert_sd3_transformer_checkpoint_to_diffusers for a
    transformer without qk norms or dual attention (the last block's context half is pre-only)."""
    s, out = dict(state), {}

    def pair(old, new):
        for suffix in ("weight", "bias"):
            out[f"{new}.{suffix}"] = s.pop(f"{old}.{suffix}")

    def swapped(tensor):  # diffusers stores (scale, shift) where Stability stores (shift, scale)
        scale, shift = tensor.chunk(2)
        return torch.cat([shift, scale])

    out["pos_embed"] = s.pop("pos_embed.pos_embed")
    for old, new in (("pos_embed.proj", "x_embedder.proj"), ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
                     ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"), ("context_embedder", "context_embedder"),
                     ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
                     ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"), ("proj_out", "final_layer.linear")):
        pair(old, new)
    layers = sorted({int(k.split(".")[1]) for k in s if k.startswith("transformer_blocks.")})
    for i in layers:
        d, b, last = f"transformer_blocks.{i}", f"joint_blocks.{i}", i == layers[-1]
        for suffix in ("weight", "bias"):
            out[f"{b}.x_block.attn.qkv.{suffix}"] = torch.cat([s.pop(f"{d}.attn.to_{x}.{suffix}") for x in "qkv"])
            out[f"{b}.context_block.attn.qkv.{suffix}"] = torch.cat([s.pop(f"{d}.attn.add_{x}_proj.{suffix}")
                                                                     for x in "qkv"])
            context_mod = s.pop(f"{d}.norm1_context.linear.{suffix}")
            out[f"{b}.context_block.adaLN_modulation.1.{suffix}"] = swapped(context_mod) if last else context_mod
        pair(f"{d}.attn.to_out.0", f"{b}.x_block.attn.proj")
        pair(f"{d}.norm1.linear", f"{b}.x_block.adaLN_modulation.1")
        pair(f"{d}.ff.net.0.proj", f"{b}.x_block.mlp.fc1")
        pair(f"{d}.ff.net.2", f"{b}.x_block.mlp.fc2")
        if not last:
            pair(f"{d}.attn.to_add_out", f"{b}.context_block.attn.proj")
            pair(f"{d}.ff_context.net.0.proj", f"{b}.context_block.mlp.fc1")
            pair(f"{d}.ff_context.net.2", f"{b}.context_block.mlp.fc2")
    for suffix in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = swapped(s.pop(f"norm_out.linear.{suffix}"))
    assert not s, f"unmapped: {sorted(s)[:5]}"
    return {f"model.diffusion_model.{key}": value.contiguous() for key, value in out.items()}


def test_a_single_file_in_stability_s_layout_loads_with_model_config_and_renders_as_its_folder(sd3, sd3_folder,
                                                                                              write_scene, tmp_path):
    from multidiff_cli.catalog import family_of_checkpoint

    single = tmp_path / "sd3.5_tiny.safetensors"
    save_file(sai_layout(sd3.transformer.state_dict()), str(single))
    assert family_of_checkpoint(single) is SD3
    loaded = load_model(str(single), CPU, torch.float32, config=str(sd3_folder))
    assert loaded.family == "sd3"
    scene = scene_of(write_scene, sd3, FOLDER_SCENE)
    torch.testing.assert_close(render(scene, loaded, seed=3).latents, render(scene, sd3, seed=3).latents,
                               rtol=0, atol=1e-6)
