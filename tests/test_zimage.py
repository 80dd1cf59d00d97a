"""Z-Image (Turbo and base) on a tiny random Z-Image-shaped model (issue 22): diffusers' ZImagePipeline, drawing its
noise from the seed's CPU generator, is the oracle for plain scenes; the shared reference loop, each prompt's velocity
computed as ZImagePipeline computes it (its own encode_prompt, the transformer on a list of latents with the
inverted timestep, the output negated, its guidance cond + g * (cond - uncond)), is the oracle for regions and
panoramas. Then each prompt's trimmed caption in a batch, samples per step, Turbo's defaults, loading, LoRAs and
what Z-Image refuses."""
from __future__ import annotations

import contextlib
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from multidiff_cli.catalog import ZIMAGE, detect_family, family_of_folder
from multidiff_cli.method.schedule import FlowSchedule
from multidiff_cli.models.loading import load_model
from multidiff_cli.models.random_flux import build_tiny_zimage_random
from multidiff_cli.models.random_weights import save_model
from multidiff_cli.output.png import read_metadata
from multidiff_cli.run.render import plan_render, render, scene_weights
from multidiff_cli.scene import load_scene
from reference import background_latents, reference_multidiffusion, samples_per_step, seed_generator

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def zimage():
    """tiny-zimage-random (the base model's stand-in: CFG), native window 256 px. Read-only: LoRA tests copy it."""
    return build_tiny_zimage_random()


@pytest.fixture(scope="module")
def turbo():
    return build_tiny_zimage_random(turbo=True)


@pytest.fixture(scope="module")
def small_window():
    """The same weights with a 64 px native window (the VAE's sample_size): views on small canvases."""
    model = build_tiny_zimage_random(native_px=64)
    assert model.native_cells == 8
    return model


def scene_of(write_scene, model, text: str, name: str = "scene.yaml"):
    return load_scene(write_scene(text, name), default_model=model.model_id)


def zimage_pipeline(model):
    """diffusers' own Z-Image pipeline on the model's parts, with the scheduler Z-Image-Turbo ships (its config)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = diffusers.ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config),
                                    vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                    transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decoded(pipe, latents: torch.Tensor) -> Image.Image:
    with torch.inference_mode():
        pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor,
                                 return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels, output_type="pil")[0]


@contextlib.contextmanager
def transformer_calls(model):
    """Every call of the model's transformer: (its timestep input, samples in the call)."""
    calls: list[tuple[float, int]] = []

    def record(module, args, kwargs):
        calls.append((float(args[1][0]), len(args[0])))

    handle = model.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


# --- no regions: ZImagePipeline from the same noise ----------------------------------------------------------

PLAIN = "prompt: a red sofa in a room\nwidth: 96\nheight: 64\nsteps: 3\nseed: 9\n"


@pytest.mark.parametrize("variant, extra, pipe_kwargs", [
    ("turbo", "", {"guidance_scale": 0.0, "num_inference_steps": 9}),
    ("zimage", "guidance_scale: 3.0\nnegative_prompt: blurry\n", {"guidance_scale": 3.0, "negative_prompt": "blurry"}),
    ("zimage", "guidance_scale: 4.0\n", {"guidance_scale": 4.0}),
], ids=["turbo-no-guidance", "base-cfg-negative", "base-cfg-empty-negative"])
def test_a_plain_scene_equals_diffusers_zimage_pipeline_from_the_seed_s_noise(request, write_scene, variant, extra,
                                                                              pipe_kwargs, assert_close_batched):
    """The pipeline draws randn((1, 16, H/8, W/8)) from the generator it is given. The scene's guidance_scale is
    the pipeline's (Z-Image guides as cond + g * (cond - uncond)); Turbo's defaults are 9 steps and none."""
    model = request.getfixturevalue(variant)
    text = PLAIN if variant != "turbo" else PLAIN.replace("steps: 3\n", "")
    pipe_kwargs = {"num_inference_steps": 3, **pipe_kwargs}
    scene = scene_of(write_scene, model, text + extra)
    assert (scene.steps, scene.guidance_scale) == (pipe_kwargs["num_inference_steps"], pipe_kwargs["guidance_scale"])
    ours = render(scene, model, seed=9)
    pipe = zimage_pipeline(model)
    with torch.inference_mode():
        theirs = pipe("a red sofa in a room", height=64, width=96, generator=seed_generator(9), output_type="latent",
                      **pipe_kwargs).images
    assert_close_batched(ours.latents, theirs, guidance=pipe_kwargs["guidance_scale"] + 1, steps=3)
    ours_pixels, their_pixels = np.asarray(ours.image).astype(int), np.asarray(decoded(pipe, theirs)).astype(int)
    assert np.abs(ours_pixels - their_pixels).max() <= 1


def test_guidance_and_the_negative_prompt_each_change_the_picture(zimage, write_scene):
    def latents(text):
        return render(scene_of(write_scene, zimage, PLAIN + text), zimage, seed=9).latents

    none, guided, negative = latents("guidance_scale: 0\n"), latents("guidance_scale: 3\n"), latents(
        "guidance_scale: 3\nnegative_prompt: blurry\n")
    assert (none - guided).abs().max() > 1e-2 and (guided - negative).abs().max() > 1e-2


def test_each_prompt_s_caption_is_trimmed_to_its_length_whatever_it_is_batched_with(zimage):
    """ZImagePipeline trims every prompt's hidden states to its true length: a short prompt's velocity is the same
    alone as in one call with a long one (the transformer pads them to one length inside, with a mask)."""
    texts = ["a cat", "a long prompt about a red sofa in a cozy living room by a window at night, warm light"]
    conditioning = zimage.encode_prompts(texts, (64, 64))
    lengths = conditioning.get("length").tolist()
    assert lengths[0] < lengths[1] < 512
    pipe = zimage_pipeline(zimage)
    with torch.inference_mode():
        expected, _ = pipe.encode_prompt(texts[0], device=CPU, do_classifier_free_guidance=False)
    torch.testing.assert_close(conditioning.get("hidden_states")[0, : lengths[0]], expected[0], rtol=0, atol=0)
    x = torch.randn((2, 16, 8, 8), generator=seed_generator(0))
    t = torch.tensor(700.0)
    with torch.inference_mode():
        together = zimage.forward(x, t, conditioning)
        alone = zimage.forward(x[:1], t, conditioning[[0]])
    torch.testing.assert_close(together[:1], alone, rtol=0, atol=1e-5)


# --- regions and panoramas: the shared reference loop ---------------------------------------------------------


def zimage_reference(model, scene, seed: int, views=None, pipes=None) -> torch.Tensor:
    """The paper's loop on Z-Image (tests/reference.py): every prompt encoded by ZImagePipeline.encode_prompt with
    the scene's negative prompt, its velocity on each view's crop as the pipeline computes it, its own Euler step
    on the pipeline's sigmas (1 .. 1/steps, statically shifted), then the weighted mean."""
    pipe = zimage_pipeline(model)
    pipes = pipes or [pipe] * (1 + len(scene.regions))
    h, w = scene.latent_hw
    generator = seed_generator(seed)
    noise = torch.randn((1, 16, h, w), generator=generator)
    backgrounds = (background_latents(model.vae, generator, scene.bootstrap_steps, len(scene.regions))
                   if scene.bootstrap_steps else None)
    schedule = FlowSchedule(pipe.scheduler)
    schedule.set_timesteps(scene.steps, sigmas=np.linspace(1.0, 1 / scene.steps, scene.steps), mu=0.0)
    prompts = [(scene.prompt, scene.guidance_scale)] + [
        (r.prompt, scene.guidance_scale if r.guidance_scale is None else r.guidance_scale) for r in scene.regions]
    with torch.inference_mode():
        encoded = [p.encode_prompt(text, device=CPU, do_classifier_free_guidance=True,
                                   negative_prompt=scene.negative_prompt) for p, (text, _) in zip(pipes, prompts)]

        def velocity(p, x, t):
            (cond,), (uncond,) = encoded[p]
            guidance = prompts[p][1]

            def transformer(caption):
                out = pipes[p].transformer([x[0].unsqueeze(1)], (1000 - t.expand(1)) / 1000, [caption],
                                           return_dict=False)[0]
                return out[0].squeeze(1)[None].float()

            v = transformer(cond)
            if guidance > 0:
                v = v + guidance * (v - transformer(uncond))
            return -v

        return reference_multidiffusion(velocity, noise, schedule, scene_weights(scene), views=views,
                                        bootstrap_steps=scene.bootstrap_steps, backgrounds=backgrounds)


REGIONS = """
prompt: a living room
negative_prompt: blurry
width: {width}
height: 64
steps: 2
bootstrap_steps: 1
guidance_scale: 3.0
seed: 11
{extra}regions:
  - prompt: a red sofa
    box: [0, 16, 48, 64]
    guidance_scale: 1.5
  - prompt: a lamp
    mask: masks/lamp.png
"""


def test_boxes_a_mask_and_region_guidance_equal_the_reference_loop(zimage, write_scene, lamp_mask,
                                                                   assert_close_batched):
    lamp_mask(96, 64)
    scene = scene_of(write_scene, zimage, REGIONS.format(width=96, extra=""))
    assert len(plan_render(scene, zimage).views) == 1
    ours = render(scene, zimage, seed=11).latents
    assert_close_batched(ours, zimage_reference(zimage, scene, 11), guidance=4.0, steps=2)


@pytest.mark.parametrize("wrap", ["none", "horizontal"])
def test_a_canvas_wider_than_the_native_window_equals_the_reference_loop_over_views(small_window, write_scene,
                                                                                   lamp_mask, wrap,
                                                                                   assert_close_batched):
    """128 px wide in 64 px views at a 32 px stride: each view is a picture of its own size to the transformer
    (its rotary positions count from the view's corner)."""
    lamp_mask(128, 64)
    scene = scene_of(write_scene, small_window, REGIONS.format(width=128, extra=f"view_stride: 32\nwrap: {wrap}\n"))
    views = plan_render(scene, small_window).views
    assert [(v.left, v.width) for v in views][:3] == [(0, 8), (4, 8), (8, 8)]
    ours = render(scene, small_window, seed=11).latents
    assert_close_batched(ours, zimage_reference(small_window, scene, 11, views), guidance=4.0, steps=2)


def test_a_view_must_start_on_a_whole_patch(small_window, write_scene):
    """The transformer patchifies 2x2 cells: a view_stride of 8 px (one cell) is one line, exit 2's error."""
    from multidiff_cli.errors import SceneError

    with pytest.raises(SceneError, match="view_stride"):
        scene_of(write_scene, small_window, "prompt: p\nwidth: 128\nheight: 64\nview_stride: 8\n")


# --- samples per step ------------------------------------------------------------------------------------------

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
    ("zimage", "guidance_scale: 4.0\n", [2 + 2] * 2),  # three conditional samples, one unconditional for all
    ("zimage", "guidance_scale: 0.0\n", [2 + 1] * 2),  # the pipeline's guidance 0: no unconditional sample
    ("turbo", "few_step: false\n", [2 + 1] * 2),  # Turbo's default guidance is 0
], ids=["base-cfg", "base-no-guidance", "turbo"])
def test_samples_per_step(request, write_scene, variant, extra, per_step):
    model = request.getfixturevalue(variant)
    scene = scene_of(write_scene, model, COUNTED.format(extra=extra))
    with transformer_calls(model) as calls:
        render(scene, model, seed=0)
    assert samples_per_step(calls) == per_step


# --- pictures: ZImageImg2ImgPipeline ----------------------------------------------------------------------------


@pytest.fixture
def picture_file(tmp_path, monkeypatch):
    """pic.png (random pixels) in tmp_path; the pipeline encodes it to its latents' mean, as the render does."""
    import diffusers.pipelines.z_image.pipeline_z_image_img2img as img2img

    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "pic.png")
    monkeypatch.setattr(img2img, "retrieve_latents", lambda output, generator=None, sample_mode="sample":
                        output.latent_dist.mode())
    return tmp_path / "pic.png"


def test_img2img_equals_diffusers_zimage_img2img_pipeline(zimage, write_scene, picture_file, assert_close_batched):
    """strength 0.6 of 4 steps runs 3, from the picture's latents with the VAE's shift factor, noised with the
    flow formula, as ZImageImg2ImgPipeline counts and noises them."""
    import diffusers

    scene = scene_of(write_scene, zimage, "prompt: a harbour\ninit_image: pic.png\nwidth: 64\nheight: 64\n"
                                          "strength: 0.6\nsteps: 4\nguidance_scale: 2.0\nseed: 4\n")
    with transformer_calls(zimage) as calls:
        ours = render(scene, zimage, seed=4)
    assert len(samples_per_step(calls)) == 3
    pipe = diffusers.ZImageImg2ImgPipeline(**zimage_pipeline(zimage).components)
    pipe.set_progress_bar_config(disable=True)
    with Image.open(picture_file) as image, torch.inference_mode():
        theirs = pipe("a harbour", image=image.convert("RGB"), height=64, width=64, strength=0.6,
                      num_inference_steps=4, guidance_scale=2.0, generator=seed_generator(4),
                      output_type="latent").images
    assert_close_batched(ours.latents, theirs, guidance=3.0, steps=3)


@pytest.mark.parametrize("strength, steps", [(0.6, 4), (1.0, 2)])
def test_a_keep_mask_equals_diffusers_zimage_inpaint_pipeline(zimage, write_scene, picture_file, monkeypatch,
                                                              strength, steps, assert_close_batched):
    import diffusers
    import diffusers.pipelines.z_image.pipeline_z_image_inpaint as inpaint

    monkeypatch.setattr(inpaint, "retrieve_latents", lambda output, generator=None, sample_mode="sample":
                        output.latent_dist.mode())
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 0, 48, 32))  # white: may change, on whole 16 px patches
    mask.save(picture_file.parent / "keep.png")
    scene = scene_of(write_scene, zimage, f"prompt: a harbour\ninit_image: pic.png\nwidth: 64\nheight: 64\n"
                                          f"strength: {strength}\nsteps: {steps}\nguidance_scale: 2.0\nseed: 4\n"
                                          "keep: keep.png\n")
    ours = render(scene, zimage, seed=4)
    pipe = diffusers.ZImageInpaintPipeline(**zimage_pipeline(zimage).components)
    pipe.set_progress_bar_config(disable=True)
    with Image.open(picture_file) as image, torch.inference_mode():
        theirs = pipe("a harbour", image=image.convert("RGB"), mask_image=mask, height=64, width=64,
                      strength=strength, num_inference_steps=steps, guidance_scale=2.0, generator=seed_generator(4),
                      output_type="latent").images
    assert_close_batched(ours.latents, theirs, guidance=3.0, steps=steps)


# --- loading, records, the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zimage_folder(zimage, tmp_path_factory):
    """tiny-zimage-random saved as a diffusers folder with the model_index.json ZImagePipeline writes."""
    folder = tmp_path_factory.mktemp("models") / "some-model"
    save_model(zimage, folder)
    index = {"_class_name": "ZImagePipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
             "transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_a_zimage_folder_is_told_by_its_model_index_and_renders_as_the_built_model(zimage, zimage_folder,
                                                                                   write_scene):
    assert family_of_folder(zimage_folder) is ZIMAGE and detect_family(str(zimage_folder)) is ZIMAGE
    assert detect_family("Tongyi-MAI/Z-Image-Turbo") is ZIMAGE
    loaded = load_model(str(zimage_folder), CPU, torch.float32)
    assert loaded.family == "zimage"
    scene = scene_of(write_scene, zimage, "prompt: p\nwidth: 64\nheight: 64\nsteps: 2\nguidance_scale: 2\nregions:\n"
                                          "  - prompt: q\n    box: [0, 0, 32, 64]\n")
    torch.testing.assert_close(render(scene, loaded, seed=3).latents, render(scene, zimage, seed=3).latents,
                               rtol=0, atol=1e-6)


def test_the_cli_renders_a_zimage_scene_and_records_the_family(cli, write_scene, tmp_path):
    scene = write_scene("prompt: a harbour\nwidth: 64\nheight: 64\nregions:\n  - prompt: a boat\n"
                        "    box: [0, 32, 64, 64]\n")
    result = cli("render", scene, "--model", "tiny-zimage-turbo-random", "--steps", "2", "-q",
                 "-o", tmp_path / "z.png")
    assert result.exit_code == 0, result.output
    record = read_metadata(tmp_path / "z.png")
    assert record["family"] == "zimage" and record["scene"]["guidance_scale"] == 0.0
    assert "few_step: auto is on" in result.stderr


@pytest.mark.parametrize("text, said", [
    ("prompt: p\nwidth: 72\nheight: 64\n", "width: must be a multiple of 16"),
    ("prompt: p\nwidth: 64\nheight: 64\nscheduler: ddim\n", "scheduler"),
], ids=["8-not-16", "ddpm-scheduler"])
def test_what_zimage_refuses_is_one_line_and_nothing_written(cli, write_scene, tmp_path, text, said):
    result = cli("render", write_scene(text), "--model", "tiny-zimage-random", "-q", "-o", tmp_path / "z.png")
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert said in line and not (tmp_path / "z.png").exists()


# --- LoRAs ------------------------------------------------------------------------------------------------------


def peft_lora(model, path, seed: int, rank: int = 2, strength: float = 0.4):
    """A LoRA file in the diffusers/peft layout (`transformer.<module>.lora_A.weight`) with random factors on
    every attention projection of the transformer (Z-Image's LoRAs adapt the transformer only)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, linear in sorted(model.transformer.named_modules()):
        if isinstance(linear, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn((rank, linear.in_features),
                                                                       generator=generator) * strength
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn((linear.out_features, rank),
                                                                       generator=generator) * strength
    assert len(tensors) > 8
    save_file(tensors, str(path))
    return path


def test_a_scene_lora_renders_as_diffusers_zimage_pipeline_with_that_lora(zimage, write_scene, tmp_path,
                                                                          assert_close_batched):
    (tmp_path / "loras").mkdir()
    style = peft_lora(zimage, tmp_path / "loras" / "style.safetensors", seed=1)
    scene = scene_of(write_scene, zimage, PLAIN + "guidance_scale: 3.0\nloras:\n  - path: loras/style.safetensors\n"
                                                  "    scale: 0.7\n")
    ours = render(scene, copy.deepcopy(zimage), seed=9).latents
    pipe = zimage_pipeline(copy.deepcopy(zimage))
    pipe.load_lora_weights(str(style), adapter_name="lora")
    pipe.set_adapters(["lora"], [0.7])
    with torch.inference_mode():
        theirs = pipe("a red sofa in a room", height=64, width=96, num_inference_steps=3, guidance_scale=3.0,
                      generator=seed_generator(9), output_type="latent").images
    bare = render(scene.model_copy(update={"loras": []}), zimage, seed=9).latents
    assert (bare - theirs).abs().max() > 100 * (ours - theirs).abs().max()  # the LoRA matters
    assert_close_batched(ours, theirs, guidance=4.0, steps=3)


def test_a_region_lora_is_exactly_separated(zimage, write_scene, tmp_path, assert_close_batched):
    """The woman's samples run with her LoRA and the street's and the man's without, in the same steps: the
    render equals the reference loop with the LoRA on her prompt's pipeline only."""
    (tmp_path / "loras").mkdir()
    alice = peft_lora(zimage, tmp_path / "loras" / "alice.safetensors", seed=2)
    scene = scene_of(write_scene, zimage, """
prompt: a street
negative_prompt: blurry
width: 96
height: 64
steps: 2
bootstrap_steps: 0
guidance_scale: 3.0
regions:
  - prompt: a woman with red hair
    box: [0, 0, 48, 64]
    loras:
      - path: loras/alice.safetensors
        scale: 0.9
  - prompt: a man
    box: [48, 0, 96, 64]
""")
    ours = render(scene, copy.deepcopy(zimage), seed=5).latents
    bare, with_alice = zimage_pipeline(zimage), zimage_pipeline(copy.deepcopy(zimage))
    with_alice.load_lora_weights(str(alice), adapter_name="alice")
    with_alice.set_adapters(["alice"], [0.9])
    expected = zimage_reference(zimage, scene, 5, pipes=[bare, with_alice, bare])
    everywhere = zimage_reference(zimage, scene, 5, pipes=[with_alice] * 3)
    assert_close_batched(ours, expected, guidance=4.0, steps=2)
    assert (everywhere - expected).abs().max() > 100 * (ours - expected).abs().max()


def original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ZImageTransformer2DModel's weights in the layout Z-Image's own checkpoints ship (the inverse of diffusers'
    convert_z_image_transformer_checkpoint_to_diffusers: q, k and v fused, the original module names)."""
    renames = {"all_final_layer.2-1.": "final_layer.", "all_x_embedder.2-1.": "x_embedder.",
               ".attention.to_out.0.": ".attention.out.", ".attention.norm_k.": ".attention.k_norm.",
               ".attention.norm_q.": ".attention.q_norm."}
    out = {}
    for key, value in state.items():
        if ".attention.to_k.weight" in key or ".attention.to_v.weight" in key:
            continue
        if ".attention.to_q.weight" in key:
            prefix = key.removesuffix(".attention.to_q.weight")
            out[f"{prefix}.attention.qkv.weight"] = torch.cat(
                [state[f"{prefix}.attention.to_{x}.weight"] for x in "qkv"])
            continue
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def test_a_single_transformer_file_loads_with_model_config_and_renders_as_its_folder(zimage, zimage_folder,
                                                                                    write_scene, tmp_path):
    """As Z-Image's transformer is published on its own (z_image_turbo_bf16.safetensors): the file is told by its
    keys, the other parts come from model_config."""
    from multidiff_cli.catalog import family_of_checkpoint

    single = tmp_path / "z_image_turbo.safetensors"
    save_file({k: v.contiguous() for k, v in original_layout(zimage.transformer.state_dict()).items()}, str(single))
    assert family_of_checkpoint(single) is ZIMAGE
    loaded = load_model(str(single), CPU, torch.float32, config=str(zimage_folder))
    assert loaded.family == "zimage"
    scene = scene_of(write_scene, zimage, "prompt: p\nwidth: 64\nheight: 64\nsteps: 2\nguidance_scale: 2\n")
    torch.testing.assert_close(render(scene, loaded, seed=3).latents, render(scene, zimage, seed=3).latents,
                               rtol=0, atol=1e-6)
