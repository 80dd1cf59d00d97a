"""SDXL and SDXL-Turbo on a tiny random SDXL-shaped model: diffusers' StableDiffusionXLPipeline as the
oracle for prompt encoding and plain text-to-image, a per-prompt loop for regions, the shared
unconditional sample, panoramas and 360 degrees from the CLI, loading by folder contents, `vae:`."""
from __future__ import annotations

import copy
import json
import shutil
import types

import pytest
import torch
from PIL import Image

from multidiff_cli.method.schedule import DiffusionSchedule
from multidiff_cli.models.schedulers import make_scheduler
from multidiff_cli.models import sdxl as sdxl_module
from multidiff_cli.catalog import family_of_folder
from multidiff_cli.models.loading import cached_models, load_model
from multidiff_cli.models.random_weights import build_tiny_sdxl_random
from multidiff_cli.models.sd import unet_bytes_per_sample
from multidiff_cli.models.sdxl import time_ids
from multidiff_cli.output.png import read_metadata
from multidiff_cli.run.render import plan_render, render
from multidiff_cli.scene import load_scene
from reference import guided, reference_multidiffusion

CPU = torch.device("cpu")
NATIVE_PX = 128  # the tiny SDXL's native size here: 16 latent cells, so small canvases make panoramas


def replaced(model, **parts):
    """A shallow copy of a loaded model with some of its parts replaced (a double, another setting)."""
    out = copy.copy(model)
    out.__dict__.update(parts)
    return out


def pipeline(xl, scheduler):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=xl.vae, text_encoder=xl.text_encoder, text_encoder_2=xl.text_encoder_2, tokenizer=xl.tokenizer,
        tokenizer_2=xl.tokenizer_2, unet=xl.unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def initial_noise(seed: int, latent_hw) -> torch.Tensor:
    """render's initial noise: drawn on the CPU from the seed, first of the generator's draws."""
    return torch.randn((1, 4, *latent_hw), generator=torch.Generator("cpu").manual_seed(seed))


# --- A. diffusers' StableDiffusionXLPipeline gives the same picture ---------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("negative", ["", "blurry, low quality"], ids=["zeros", "negative"])
def test_a_plain_scene_equals_diffusers_sdxl_pipeline(tiny_xl, write_scene, scheduler, negative, assert_close_batched):
    scene = load_scene(write_scene(
        f"prompt: a red sofa in a room\nnegative_prompt: '{negative}'\nwidth: 96\nheight: 64\nsteps: 3\n"
        f"guidance_scale: 5.0\nscheduler: {scheduler}\nseed: 7\n"
    ))
    ours = render(scene, tiny_xl, seed=7).latents
    pipe = pipeline(tiny_xl, make_scheduler(scheduler, tiny_xl.scheduler_config))
    with torch.inference_mode():
        theirs = pipe(
            "a red sofa in a room", negative_prompt=negative or None, height=64, width=96, num_inference_steps=3,
            guidance_scale=5.0, latents=initial_noise(7, (8, 12)), output_type="latent",
        ).images
    assert_close_batched(ours, theirs, guidance=5.0, steps=3)


def test_the_zeros_rule_changes_the_picture(tiny_xl, write_scene):
    """An empty negative prompt is zeros on a force_zeros_for_empty_prompt model, an encoded "" otherwise."""
    scene = load_scene(write_scene("prompt: a red sofa\nwidth: 64\nheight: 64\nsteps: 1\nseed: 1\n"))
    zeros = render(scene, tiny_xl, seed=1).latents
    encoded = render(scene, replaced(tiny_xl, force_zeros_for_empty_prompt=False), seed=1).latents
    assert not torch.allclose(zeros, encoded)


# --- B. regions: the same latents as a per-prompt reference loop ------------------------------------------


REGIONS = """
prompt: a living room
negative_prompt: blurry
width: 96
height: 64
steps: 3
bootstrap_steps: 1
guidance_scale: 6.0
scheduler: ddim
seed: 11
regions:
  - prompt: a red sofa
    box: [0, 16, 48, 64]
  - prompt: a plant
    box: [64, 0, 96, 40]
    guidance_scale: 3.0
"""


def reference_loop(xl, scene, seed: int) -> torch.Tensor:
    """The authors' region loop on SDXL (the tests' reference loop): every prompt encoded by diffusers' own
    encode_prompt, its own unconditional and conditional UNet call and its own schedule step, then the
    mask-weighted mean."""
    from multidiff_cli.scene.grid import box_cells

    h, w = scene.latent_hw
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((1, 4, h, w), generator=generator)
    backgrounds = xl.codec.background_latents(generator, scene.bootstrap_steps, len(scene.regions))
    masks = torch.stack([torch.from_numpy(box_cells(r.box, (h, w))).float()[None] for r in scene.regions])
    weights = torch.cat([(1 - masks.sum(0, keepdim=True)).clamp(min=0), masks])
    scheduler = make_scheduler(scene.scheduler, xl.scheduler_config)
    schedule = DiffusionSchedule(scheduler)
    schedule.set_timesteps(scene.steps)
    pipe = pipeline(xl, scheduler)
    ids = pipe._get_add_time_ids((scene.height, scene.width), (0, 0), (scene.height, scene.width), torch.float32,
                                 text_encoder_projection_dim=xl.text_encoder_2.config.projection_dim)
    prompts = [(scene.prompt, scene.guidance_scale)] + [(r.prompt, r.guidance_scale or scene.guidance_scale)
                                                        for r in scene.regions]
    with torch.inference_mode():
        encoded = [pipe.encode_prompt(text, device=CPU, negative_prompt=scene.negative_prompt) for text, _ in prompts]

        def model_output(p, x, t):
            cond, uncond, pooled, uncond_pooled = encoded[p]

            def eps(hidden, text_embeds):
                return xl.unet(x, t, encoder_hidden_states=hidden,
                               added_cond_kwargs={"text_embeds": text_embeds, "time_ids": ids}).sample

            return guided(eps(uncond, uncond_pooled), eps(cond, pooled), prompts[p][1])

        return reference_multidiffusion(model_output, noise, schedule, weights, bootstrap_steps=scene.bootstrap_steps,
                                        backgrounds=backgrounds)


def test_a_region_scene_equals_the_per_prompt_reference_loop(tiny_xl, write_scene, assert_close_batched):
    scene = load_scene(write_scene(REGIONS))
    ours = render(scene, tiny_xl, seed=11).latents
    assert_close_batched(ours, reference_loop(tiny_xl, scene, 11), guidance=6.0, steps=3)


# --- C. the shared unconditional sample -------------------------------------------------------------------


@pytest.mark.parametrize("guidance, per_step", [(6.0, 2 + 2), (1.0, 2 + 1), (0.0, 2 + 1)])
def test_n_regions_cost_n_plus_2_samples_and_none_unconditional_without_guidance(
    tiny_xl, write_scene, unet_doubles, guidance, per_step
):
    scene = load_scene(write_scene(REGIONS.replace("bootstrap_steps: 1", "bootstrap_steps: 0")
                                   .replace("guidance_scale: 6.0", f"guidance_scale: {guidance}")
                                   .replace("    guidance_scale: 3.0\n", "")))
    counting = unet_doubles.Counting(tiny_xl.unet)
    render(scene, replaced(tiny_xl, unet=counting), seed=0)
    assert counting.sizes == [per_step] * scene.steps  # 2 regions: N+2 with guidance, N+1 without


# --- D. panoramas and 360 degrees from the CLI; the time ids of each view ---------------------------------


@pytest.fixture
def recorded_time_ids(monkeypatch):
    """Every time-ids row the UNet is given, recorded at the family's network call (SDXL.forward)."""
    seen = []
    original = sdxl_module.SDXL.forward

    def record(self, inputs, t, conditioning):
        seen.extend(tuple(int(v) for v in row) for row in conditioning.get("time_ids").tolist())
        return original(self, inputs, t, conditioning)

    monkeypatch.setattr(sdxl_module.SDXL, "forward", record)
    return seen


@pytest.mark.parametrize("wrap", ["none", "horizontal"])
def test_sdxl_panoramas_render_from_the_cli_with_whole_picture_time_ids_per_view(
    cli, tiny_xl_folder, write_scene, tmp_path, recorded_time_ids, wrap
):
    mask = tmp_path / "lake.png"
    Image.new("L", (32, 12)).save(mask)
    with Image.open(mask) as image:
        image.paste(255, (16, 4, 32, 12))
        image.save(mask)
    scene = write_scene(
        f"prompt: hills\nwidth: 320\nheight: 128\nsteps: 2\nbootstrap_steps: 1\nwrap: {wrap}\nscheduler: dpm++\n"
        "tiled_decode: true\n"
        "regions:\n  - prompt: a castle\n    box: [16, 32, 96, 128]\n  - prompt: a lake\n    mask: lake.png\n"
    )
    out = tmp_path / "pano.png"
    result = cli("render", str(scene), "--model", str(tiny_xl_folder), "-o", str(out), "-q",
                                      "--preview-every", "1")
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.size == (320, 128)
    assert read_metadata(out)["scene"]["wrap"] == wrap
    assert len(list(out.with_suffix(".steps").glob("*.png"))) == 2
    # README, SDXL: each view is a whole native-size picture: original size = target size = the view's, crop (0, 0)
    assert set(recorded_time_ids) == {tuple(time_ids((NATIVE_PX, NATIVE_PX)))} == {(128, 128, 0, 0, 128, 128)}


def test_an_sdxl_batch_renders_and_a_png_renders_again_identically(cli, tiny_xl_folder, write_scene, tmp_path):
    scene = write_scene("prompt: a room\nwidth: 64\nheight: 64\nsteps: 2\nregions:\n"
                        "  - prompt: a sofa\n    box: [0, 32, 64, 64]\n", name="room.yaml")
    out = tmp_path / "out"
    result = cli("render", str(scene), "--model", str(tiny_xl_folder), "--seeds", "0-1", "--grid",
                                      "--output-dir", str(out), "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["room-0.png", "room-1.png", "room-grid.png"]
    again = cli("render", str(out / "room-1.png"), "--output-dir", str(out), "-q")
    assert again.exit_code == 0, again.output
    with Image.open(out / "room-1.png") as first, Image.open(out / "room-1-again.png") as second:
        assert first.tobytes() == second.tobytes()


def test_a_canvas_smaller_than_a_view_is_conditioned_on_its_own_size(tiny_xl, write_scene, recorded_time_ids):
    scene = load_scene(write_scene("prompt: p\nwidth: 96\nheight: 64\nsteps: 1\n"))
    assert [(v.height, v.width) for v in plan_render(scene, tiny_xl).views] == [(8, 12)]
    render(scene, tiny_xl, seed=0)
    assert set(recorded_time_ids) == {(64, 96, 0, 0, 64, 96)}  # (height, width): what diffusers' pipeline sets


# --- E. loading: the family from the folder; SD2 unchanged ------------------------------------------------


def test_loading_picks_the_family_from_the_folder_not_its_name(tiny_xl_folder, tiny_folder, tmp_path, write_scene):
    sd_named_xl = shutil.copytree(tiny_folder, tmp_path / "my-sdxl-model")
    assert (family_of_folder(tiny_xl_folder).name, family_of_folder(sd_named_xl).name) == ("sdxl", "sd")
    loaded = load_model(str(tiny_xl_folder), CPU, torch.float32)
    assert loaded.family == "sdxl" and loaded.force_zeros_for_empty_prompt is True
    assert type(loaded.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert load_model(str(sd_named_xl), CPU, torch.float32).family == "sd"
    # the folder's weights are the built ones: the same picture, op for op
    scene = load_scene(write_scene("prompt: p\nwidth: 64\nheight: 64\nsteps: 2\nseed: 3\n"))
    built = build_tiny_sdxl_random(sample_size=NATIVE_PX // 8).to(CPU, torch.float32)
    assert torch.equal(render(scene, loaded, seed=3).latents, render(scene, built, seed=3).latents)


def test_force_zeros_is_read_from_model_index(tiny_xl_folder, tmp_path):
    folder = tmp_path / "no-zeros"
    shutil.copytree(tiny_xl_folder, folder)
    (folder / "model_index.json").write_text(json.dumps({"force_zeros_for_empty_prompt": False}))
    assert load_model(str(folder), CPU, torch.float32).force_zeros_for_empty_prompt is False


def test_an_sdxl_folder_without_its_second_text_encoder_weights_is_named(tiny_xl_folder, tmp_path):
    from multidiff_cli.errors import ModelError

    folder = tmp_path / "broken"
    shutil.copytree(tiny_xl_folder, folder)
    for weights in (folder / "text_encoder_2").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelError, match="text_encoder_2"):
        load_model(str(folder), CPU, torch.float32)


def test_models_lists_the_family(tiny_xl_folder, tmp_path):
    snapshot = tmp_path / "hub" / "models--me--tiny-xl" / "snapshots" / ("e" * 40)
    shutil.copytree(tiny_xl_folder, snapshot)
    refs = tmp_path / "hub" / "models--me--tiny-xl" / "refs"
    refs.mkdir()
    (refs / "main").write_text("e" * 40)
    (row,) = cached_models(tmp_path / "hub").rows
    assert (row[0], row[3], row[4]) == ("me/tiny-xl", None, "sdxl")


# tiny-random's latents of REGIONS, seed 11, before SDXL support (commit a219b1c): sum, sum of
# magnitudes, and the sum over channels at one cell. Identical here after; other CPUs round differently.
SD2_BEFORE = [-116.74807739257812, 1036.0904541015625, 1.9401962757110596]


def test_sd2_renders_exactly_as_before(tiny, write_scene, guided_atol):
    scene = load_scene(write_scene(REGIONS))
    latents = render(scene, tiny, seed=11).latents
    plan = plan_render(scene, tiny)  # max_batch: auto, the same for SD2 as before SDXL support
    assert plan.auto_batch and plan.samples_per_call == tiny.auto_samples_per_call(max(v.height * v.width for v in plan.views))
    per_value = guided_atol(latents, guidance=6.0, steps=3)
    for got, before, values in zip([latents.sum(), latents.abs().sum(), latents[0, :, 3, 5].sum()], SD2_BEFORE,
                                   [latents.numel(), latents.numel(), 4]):
        assert abs(float(got) - before) <= per_value * values


# --- F. SDXL-Turbo and `vae:` -----------------------------------------------------------------------------


def test_sdxl_turbo_takes_the_few_step_path_without_unconditional_samples(tiny_xl_folder, tmp_path, write_scene,
                                                                          unet_doubles):
    turbo = tmp_path / "tiny-sdxl-turbo"
    shutil.copytree(tiny_xl_folder, turbo)
    components = load_model(str(turbo), CPU, torch.float32)
    assert components.few_step_model and components.family == "sdxl"
    scene = load_scene(write_scene(REGIONS.replace("steps: 3\nbootstrap_steps: 1", "steps: 2")
                                   .replace("guidance_scale: 6.0", "guidance_scale: 0.0")
                                   .replace("scheduler: ddim", "scheduler: euler").replace("    guidance_scale: 3.0\n", "")))
    assert plan_render(scene, components).few_step
    counting = unet_doubles.Counting(components.unet)
    render(scene, replaced(components, unet=counting), seed=0)
    assert counting.samples == 2 * 3  # one per prompt per step


def test_a_vae_key_replaces_the_model_s_vae_and_an_fp16_safe_one_runs_in_the_render_dtype(cli, tiny_xl_folder, tmp_path,
                                                                                        write_scene):
    vae = build_tiny_sdxl_random(seed=5, sample_size=NATIVE_PX // 8).vae
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(tmp_path / "vae-fix", safe_serialization=True)
    own = load_model(str(tiny_xl_folder), CPU, torch.bfloat16)
    fixed = load_model(str(tiny_xl_folder), CPU, torch.bfloat16, vae=str(tmp_path / "vae-fix"))
    assert own.vae.dtype == torch.float32 and own.state.vae_id is None
    assert fixed.vae.dtype == torch.bfloat16 and fixed.state.vae_id == str(tmp_path / "vae-fix")
    scene = write_scene(f"prompt: p\nwidth: 64\nheight: 64\nsteps: 1\nvae: {tmp_path / 'vae-fix'}\n")
    out = tmp_path / "fixed.png"
    result = cli("render", str(scene), "--model", str(tiny_xl_folder), "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    assert read_metadata(out)["scene"]["vae"] == "vae-fix"  # relative to the picture's folder, tmp_path


# --- G. memory: UNet samples per call and the estimate fit SDXL's UNet ------------------------------------


@pytest.mark.parametrize("native_px, size_px", [(1024, 1024), (1024, 2048), (512, 512), (1024, 512)])
def test_sdxl_calls_follow_auto_with_sd2_s_activations_per_sample_as_the_bound(write_scene, native_px, size_px):
    components = build_tiny_sdxl_random(sample_size=native_px // 8)  # SDXL base's or SDXL-Turbo's view size
    scene = load_scene(write_scene(f"prompt: p\nwidth: {size_px}\nheight: {size_px}\n"))
    plan = plan_render(scene, components)
    cells = max(v.height * v.width for v in plan.views)
    assert plan.auto_batch and plan.samples_per_call == components.auto_samples_per_call(cells)
    as_sd = types.SimpleNamespace(block_out_channels=components.unet.config.block_out_channels)  # no text_time
    sdxl_bytes = unet_bytes_per_sample(components.unet.config, cells, torch.float32)
    assert sdxl_bytes == unet_bytes_per_sample(as_sd, cells, torch.float32)  # measured: SDXL holds no more
    explicit = load_scene(write_scene(f"prompt: p\nwidth: {size_px}\nheight: {size_px}\nmax_batch: 2\n"))
    assert plan_render(explicit, components).samples_per_call == 2


def test_an_sdxl_unet_without_a_second_text_encoder_is_named(tiny_xl_folder, tmp_path):
    from multidiff_cli.errors import ModelNotFound

    folder = tmp_path / "half"
    shutil.copytree(tiny_xl_folder, folder, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(ModelNotFound, match="text_encoder_2/config.json"):
        load_model(str(folder), CPU, torch.float32)


