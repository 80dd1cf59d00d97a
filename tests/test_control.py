"""ControlNets for the whole scene or for one region (models/control.py, scene/controls.py), on the tiny random
SD2- and SDXL-shaped models and random ControlNets shaped for them (`random-controlnet`):

- scene-wide, no regions: diffusers' StableDiffusion(XL)ControlNetPipeline from the same noise, with the
  start/end window;
- a region's control: the per-prompt reference loop with residuals on that region's samples only, and
  the fused prediction bit-identical where the region has no weight;
- sample and ControlNet calls per step;
- bad input, one line each, exit 2, before sampling; records, inspect and preview.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multidiff_cli.catalog import RANDOM_CONTROLNET
from multidiff_cli.models.control import build_random_controlnet, kept_timesteps, loaded_controlnets
from multidiff_cli.models.random_weights import build_tiny_random
from multidiff_cli.models.schedulers import make_scheduler
from multidiff_cli.output.png import read_metadata
from multidiff_cli.run.render import render
from multidiff_cli.scene import load_scene
from reference import one_step, sd_pipeline, sd_region_reference

CPU = torch.device("cpu")


def picture(path: Path, size_wh: tuple[int, int], seed: int) -> Path:
    """A noise-like RGB control image of size_wh."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size_wh[1], size_wh[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def noise(seed: int, latent_hw) -> torch.Tensor:
    """render's initial noise: the first draw of a CPU generator seeded with the render's seed."""
    return torch.randn((1, 4, *latent_hw), generator=torch.Generator("cpu").manual_seed(seed))


# --- A. scene-wide: diffusers' ControlNet pipelines from the same noise ------------------------------------


CASES = [("ddim", 0.0, 1.0), ("ddim", 0.25, 0.75), ("dpm++", 0.25, 0.75)]


@pytest.mark.parametrize("scheduler, start, end", CASES)
def test_a_scene_wide_controlnet_equals_diffusers_controlnet_pipeline(tiny, write_scene, tmp_path, scheduler, start, end,
                                                                      assert_close_batched):
    from diffusers import StableDiffusionControlNetPipeline

    picture(tmp_path / "depth.png", (96, 64), 1)
    scene = load_scene(write_scene(
        f"prompt: a red sofa in a room\nnegative_prompt: blurry\nwidth: 96\nheight: 64\nsteps: 4\nscheduler: {scheduler}\n"
        f"control: [{{model: {RANDOM_CONTROLNET}, image: depth.png, scale: 0.8, start: {start}, end: {end}}}]\n"
    ))
    ours = render(scene, tiny, seed=5)
    pipe = StableDiffusionControlNetPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
        controlnet=build_random_controlnet(tiny.unet), scheduler=make_scheduler(scheduler, tiny.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        theirs = pipe("a red sofa in a room", Image.open(tmp_path / "depth.png"), height=64, width=96,
                      num_inference_steps=4, guidance_scale=7.5, negative_prompt="blurry", latents=noise(5, (8, 12)),
                      controlnet_conditioning_scale=0.8, control_guidance_start=start, control_guidance_end=end,
                      output_type="latent").images
        plain = render(scene.model_copy(update={"control": []}), tiny, seed=5).latents
    assert_close_batched(ours.latents, theirs, guidance=7.5, steps=4)
    assert (ours.latents - plain).abs().max() > 10 * (ours.latents - theirs).abs().max()  # the control did something


def test_a_scene_wide_sdxl_controlnet_equals_diffusers_sdxl_controlnet_pipeline(tiny_xl, write_scene, tmp_path,
                                                                                assert_close_batched):
    from diffusers import StableDiffusionXLControlNetPipeline

    picture(tmp_path / "edges.png", (96, 64), 2)
    scene = load_scene(write_scene(
        "prompt: a red sofa in a room\nnegative_prompt: blurry\nwidth: 96\nheight: 64\nsteps: 3\nguidance_scale: 5.0\n"
        f"control: [{{model: {RANDOM_CONTROLNET}, image: edges.png, end: 0.7}}]\n"
    ))
    ours = render(scene, tiny_xl, seed=7).latents
    pipe = StableDiffusionXLControlNetPipeline(
        vae=tiny_xl.vae, text_encoder=tiny_xl.text_encoder, text_encoder_2=tiny_xl.text_encoder_2,
        tokenizer=tiny_xl.tokenizer, tokenizer_2=tiny_xl.tokenizer_2, unet=tiny_xl.unet,
        controlnet=build_random_controlnet(tiny_xl.unet), scheduler=make_scheduler("ddim", tiny_xl.scheduler_config),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        theirs = pipe("a red sofa in a room", image=Image.open(tmp_path / "edges.png"), height=64, width=96,
                      num_inference_steps=3, guidance_scale=5.0, negative_prompt="blurry", latents=noise(7, (8, 12)),
                      control_guidance_end=0.7, output_type="latent").images
    assert_close_batched(ours, theirs, guidance=5.0, steps=3)


def test_the_start_end_window_is_diffusers_controlnet_keep():
    timesteps = torch.tensor([900, 700, 500, 300, 100])
    assert kept_timesteps(timesteps, 0.0, 1.0) == {900.0, 700.0, 500.0, 300.0, 100.0}
    assert kept_timesteps(timesteps, 0.2, 0.6) == {700.0, 500.0}  # i/n >= 0.2 and (i+1)/n <= 0.6
    assert kept_timesteps(timesteps[2:], 0.0, 0.5) == {500.0}  # an img2img render counts from its first step


# --- B. a region's control: exactly its own samples ------------------------------------------------------

REGION_SCENE = """prompt: a street
negative_prompt: blurry
width: 96
height: 64
steps: 2
bootstrap_steps: 0
regions:
  - prompt: a knight
    box: [0, 0, 48, 64]
    control: [{{model: {net}, image: {image}, scale: 0.9}}]
  - prompt: a horse
    box: [48, 0, 96, 64]
"""


@pytest.mark.parametrize("size", [(96, 64), (48, 64)], ids=["canvas-sized", "fitted-to-its-box"])
def test_a_region_control_equals_a_per_prompt_loop_with_residuals_on_that_prompt_only(tiny, write_scene, tmp_path, size,
                                                                                       assert_close_batched):
    picture(tmp_path / "pose.png", size, 3)
    scene = load_scene(write_scene(REGION_SCENE.format(net=RANDOM_CONTROLNET, image="pose.png")))
    ours = render(scene, tiny, seed=3).latents

    net = build_random_controlnet(tiny.unet)
    image = torch.zeros((1, 3, 64, 96))
    with Image.open(tmp_path / "pose.png") as source:  # the oracle's placement: as given, or resized into the box
        pixels = np.asarray(source.convert("RGB").resize((48, 64), Image.Resampling.LANCZOS), dtype=np.float32) / 255
    image[0, :, :, :48] = torch.from_numpy(pixels).permute(2, 0, 1)
    if size == (96, 64):
        with Image.open(tmp_path / "pose.png") as source:
            image = torch.from_numpy(np.asarray(source.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    def unet_output(p, x, t, hidden, conditional):
        if p != 1:
            return tiny.unet(x, t, encoder_hidden_states=hidden).sample
        down, mid = net(x, t, encoder_hidden_states=hidden, controlnet_cond=image, conditioning_scale=0.9,
                        return_dict=False)
        return tiny.unet(x, t, encoder_hidden_states=hidden, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample

    reference = sd_region_reference(scene, [sd_pipeline(tiny)] * 3, unet_output, seed=3)
    assert_close_batched(ours, reference, guidance=7.5, steps=2)


def test_no_bleeding_where_the_controlled_region_has_no_weight_the_fused_prediction_is_exactly_the_plain_one(
        tiny, write_scene, tmp_path):
    picture(tmp_path / "pose.png", (48, 64), 3)
    scene = load_scene(write_scene(REGION_SCENE.format(net=RANDOM_CONTROLNET, image="pose.png")))
    controlled, fused, weights = one_step(tiny, scene)
    plain_scene = scene.model_copy(update={"regions": [scene.regions[0].model_copy(update={"control": []}),
                                                       scene.regions[1]]})
    plain, fused_plain, _ = one_step(tiny, plain_scene)
    assert torch.equal(controlled[[0, 2]], plain[[0, 2]])  # the global prompt and the other region
    assert not torch.equal(controlled[1], plain[1])  # the controlled region's own prediction changed
    outside = weights[1, 0] == 0
    assert outside.any() and torch.equal(fused[..., outside], fused_plain[..., outside])
    assert not torch.equal(fused[..., ~outside], fused_plain[..., ~outside])


# --- C. what a step costs ------------------------------------------------------------------------------


class CountingControlNet(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.inner, self.samples, self.calls = net, 0, 0

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def device(self):
        return self.inner.device

    @property
    def config(self):
        return self.inner.config

    def forward(self, sample, timestep, **kwargs):
        self.samples, self.calls = self.samples + sample.shape[0], self.calls + 1
        return self.inner(sample, timestep, **kwargs)


def counted(unet_doubles):
    """A fresh tiny model with a counting UNet, and a counting random ControlNet in its cache."""
    model = build_tiny_random()
    loaded_controlnets(model, [RANDOM_CONTROLNET])
    key = f"{RANDOM_CONTROLNET}@{model.model_id}"
    stamp, net = model.state.controlnets[key]
    model.state.controlnets[key] = (stamp, CountingControlNet(net))
    model.unet = unet_doubles.Counting(model.unet)
    return model, model.unet, model.state.controlnets[key][1]


@pytest.mark.parametrize("regions", [1, 3])
def test_one_region_control_costs_its_own_unconditional_sample_and_two_controlnet_samples_a_step(
        write_scene, tmp_path, unet_doubles, regions):
    """N regions, one with a control: N+1 conditional samples, the shared unconditional and the controlled region's
    own: N+3 UNet samples a step; the ControlNet runs on that region's two samples only, in one call."""
    picture(tmp_path / "pose.png", (32, 64), 3)
    boxes = "".join(f"  - prompt: thing {i}\n    box: [{i * 32}, 0, {i * 32 + 32}, 64]\n" for i in range(1, regions))
    scene = load_scene(write_scene(
        f"prompt: a street\nwidth: 128\nheight: 64\nsteps: 3\nbootstrap_steps: 0\nregions:\n"
        f"  - prompt: knight\n    box: [0, 0, 32, 64]\n    control: [{{model: {RANDOM_CONTROLNET}, image: pose.png}}]\n"
        f"{boxes}"
    ))
    model, unet, net = counted(unet_doubles)
    render(scene, model, seed=0)
    assert unet.samples == 3 * (regions + 3)
    assert net.samples == 3 * 2 and net.calls == 3


def test_a_scene_wide_control_shares_the_unconditional_sample_and_runs_only_in_its_window(write_scene, tmp_path,
                                                                                         unet_doubles):
    """Every prompt with the same control: N+2 UNet samples a step as without it, all of them through the
    ControlNet, and only in the steps between start and end (steps 2 and 3 of 4 here)."""
    picture(tmp_path / "depth.png", (128, 64), 4)
    scene = load_scene(write_scene(
        f"prompt: a street\nwidth: 128\nheight: 64\nsteps: 4\nbootstrap_steps: 0\n"
        f"control: [{{model: {RANDOM_CONTROLNET}, image: depth.png, start: 0.25, end: 0.75}}]\nregions:\n"
        "  - prompt: a\n    box: [0, 0, 48, 64]\n  - prompt: b\n    box: [64, 0, 112, 64]\n"
    ))
    model, unet, net = counted(unet_doubles)
    render(scene, model, seed=0)
    assert unet.samples == 4 * (2 + 2)
    assert net.samples == 2 * (2 + 2) and net.calls == 2


# --- D. from the command line: records, inspect, folders, bad input ----------------------------------------


CLI_SCENE = """prompt: a street
seed: 4
width: 96
height: 64
steps: 2
control: [{{model: {net}, image: control/depth.png, scale: 0.7}}]
regions:
  - prompt: a knight
    box: [0, 0, 48, 64]
    control: [{{model: {net}, image: control/pose.png, end: 0.5}}]
"""


def control_images(tmp_path: Path) -> None:
    (tmp_path / "control").mkdir(exist_ok=True)
    picture(tmp_path / "control" / "depth.png", (96, 64), 1)
    picture(tmp_path / "control" / "pose.png", (48, 64), 2)


def test_cli_render_records_each_control_and_warns_when_one_changed(cli, write_scene, tmp_path):
    control_images(tmp_path)
    out = tmp_path / "out" / "street.png"
    result = cli.render(write_scene(CLI_SCENE.format(net=RANDOM_CONTROLNET)), "-o", out)
    assert result.exit_code == 0, result.output
    record = read_metadata(out)  # paths relative to the picture's folder, out/
    assert record["scene"]["control"] == [{"model": RANDOM_CONTROLNET, "image": "../control/depth.png", "scale": 0.7,
                                           "start": 0.0, "end": 1.0}]
    assert record["scene"]["regions"][0]["control"][0]["image"] == "../control/pose.png"
    assert set(record["inputs"]) == {"../control/depth.png", "../control/pose.png"}

    shown = cli("inspect", out).stdout
    assert "every prompt: random-controlnet, image ../control/depth.png sha256:" in shown
    assert "regions[0] (a knight): random-controlnet, image ../control/pose.png sha256:" in shown
    assert "x1, steps 0-0.5" in shown

    again = cli.render(out, "--output-dir", tmp_path / "same")
    assert again.exit_code == 0 and "changed since" not in again.stderr
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(next((tmp_path / "same").glob("*.png")))))
    picture(tmp_path / "control" / "pose.png", (48, 64), 9)
    again = cli.render(out, "--output-dir", tmp_path / "again")
    assert again.exit_code == 0, again.output
    assert "../control/pose.png changed since street.png was rendered" in again.stderr


def test_a_controlnet_folder_renders_as_the_net_it_holds_and_its_weights_are_recorded(cli, tiny, write_scene, tmp_path):
    control_images(tmp_path)
    build_random_controlnet(tiny.unet).save_pretrained(tmp_path / "nets" / "depth", safe_serialization=True)
    built = cli.render(write_scene(CLI_SCENE.format(net=RANDOM_CONTROLNET), "built.yaml"), "-o", tmp_path / "built.png")
    folder = cli.render(write_scene(CLI_SCENE.format(net="nets/depth"), "folder.yaml"), "-o", tmp_path / "folder.png")
    assert built.exit_code == folder.exit_code == 0, folder.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "built.png")), np.asarray(Image.open(tmp_path / "folder.png")))
    inputs = read_metadata(tmp_path / "folder.png")["inputs"]
    assert inputs["nets/depth"].startswith("sha256:")  # the folder's diffusion_pytorch_model.safetensors


def test_cli_bad_controls_are_one_line_each_exit_2_all_at_once_nothing_written(cli, write_scene, tmp_path):
    control_images(tmp_path)
    picture(tmp_path / "control" / "wide.png", (300, 64), 3)
    scene = write_scene(
        "prompt: a street\nwidth: 96\nheight: 64\nsteps: 2\n"
        "control: [{model: random-controlnet, image: control/missing.png}, {model: random-controlnet, "
        "image: control/wide.png}, {model: random-controlnet, image: control/depth.png, start: 0.6, end: 0.4}]\n"
        "regions:\n  - prompt: a knight\n    box: [0, 0, 48, 64]\n"
        "    control: [{model: ./nets/none, image: control/depth.png, sclae: 2}]\n"
    )
    result = cli.render(scene, "-o", tmp_path / "out.png")
    assert result.exit_code == 2 and not (tmp_path / "out.png").exists()
    lines = result.stderr.strip().splitlines()
    assert any("control[2]: start (0.6) must be before end (0.4)" in line for line in lines), lines
    assert any("regions[0].control[0].sclae: unknown key; did you mean `scale`?" in line for line in lines), lines
    assert any("control[0].image: no such file:" in line for line in lines), lines  # a typo hides no missing file
    assert "Traceback" not in result.output

    fixed = scene.read_text().replace(", start: 0.6, end: 0.4", "").replace(", sclae: 2", "")
    scene.write_text(fixed)
    result = cli.render(scene, "-o", tmp_path / "out.png")
    assert result.exit_code == 2 and not (tmp_path / "out.png").exists()
    lines = result.stderr.strip().splitlines()
    assert any("control[0].image: no such file:" in line and "missing.png" in line for line in lines), lines
    assert any("control[1].image:" in line and "is 300x64 (aspect 4.69) but the canvas is 96x64" in line
               for line in lines), lines
    assert any("regions[0].control[0].model: no such folder or file:" in line for line in lines), lines
    assert len(lines) == 3


def test_cli_a_controlnet_of_another_family_is_exit_2_one_line_before_sampling(cli, tiny_xl, write_scene, tmp_path):
    control_images(tmp_path)
    build_random_controlnet(tiny_xl.unet).save_pretrained(tmp_path / "nets" / "xl", safe_serialization=True)
    result = cli.render(write_scene(CLI_SCENE.format(net="nets/xl")), "-o", tmp_path / "out.png")
    assert result.exit_code == 2 and not (tmp_path / "out.png").exists()
    lines = [line for line in result.stderr.strip().splitlines() if "ControlNet" in line]
    assert len(lines) == 1 and "an SDXL ControlNet, and this model is SD 1.x/2.x" in lines[0], result.stderr
    assert lines[0].startswith("error: ControlNet ")


def test_sd3_z_image_and_klein_take_no_controlnet_yet(cli, write_scene, tmp_path):
    control_images(tmp_path)
    result = cli("render", write_scene(CLI_SCENE.format(net=RANDOM_CONTROLNET)), "--model", "tiny-sd3-random",
                 "-o", tmp_path / "out.png")
    assert result.exit_code == 2 and not (tmp_path / "out.png").exists()
    assert "control[0]: SD3.5 models take no ControlNet in multidiff yet (SD 1.x/2.x, SDXL and FLUX.1 do)" in result.stderr


def test_preview_draws_a_region_control_image_faded_under_its_box_only(write_scene, tmp_path):
    from multidiff_cli.output.preview import draw_layout

    picture(tmp_path / "pose.png", (48, 64), 3)
    scene = load_scene(write_scene(REGION_SCENE.format(net=RANDOM_CONTROLNET, image="pose.png")))
    plain = scene.model_copy(update={"regions": [scene.regions[0].model_copy(update={"control": []}), scene.regions[1]]})
    drawn, without = (np.asarray(draw_layout(s))[:64, :96].astype(int) for s in (scene, plain))
    inside, outside = drawn[4:60, 4:44] - without[4:60, 4:44], drawn[:, 52:] - without[:, 52:]
    assert np.abs(inside).mean() > 10 and not outside.any()


def test_the_control_example_scene_renders_offline_once_random_adapters_are_written(cli, tmp_path):
    import importlib.util
    import shutil

    example = Path(__file__).resolve().parents[1] / "scenes" / "control"
    for name in ("knight_in_hall.yaml", "room_depth.png", "knight_pose.png", "knight_reference.png"):
        shutil.copy(example / name, tmp_path / name)
    scene = tmp_path / "knight_in_hall.yaml"
    missing = cli("validate", scene)
    assert missing.exit_code == 2 and missing.stderr.count("no such folder") == 3, missing.stderr
    spec = importlib.util.spec_from_file_location("random_adapters", example.parents[1] / "scripts" / "random_adapters.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(scene)]) == 0
    assert (tmp_path / "controlnets" / "sd15" / "openpose" / "config.json").is_file()
    assert (tmp_path / "ip-adapter" / "models" / "image_encoder" / "config.json").is_file()
    assert cli("validate", scene).exit_code == 0
    rendered = cli.render(scene, "--steps", "2", "--size", "128x128", "-o", tmp_path / "knight.png")
    assert rendered.exit_code == 0, rendered.output
    assert set(read_metadata(tmp_path / "knight.png")["inputs"]) == {
        "room_depth.png", "knight_pose.png", "controlnets/sd15/depth", "controlnets/sd15/openpose",
        "knight_reference.png", "ip-adapter/models/ip-adapter_sd15.safetensors"}


def test_a_region_controlnet_runs_once_a_step_on_both_its_samples_even_in_small_calls(write_scene, tmp_path,
                                                                                      unet_doubles):
    """Three controlled regions, calls of at most 4 samples: each ControlNet still sees its region's
    conditional and unconditional sample in one call (the rows are grouped by control set before chunking)."""
    picture(tmp_path / "pose.png", (32, 64), 3)
    regions = "".join(f"  - prompt: thing {i}\n    box: [{i * 32}, 0, {i * 32 + 32}, 64]\n"
                      f"    control: [{{model: {RANDOM_CONTROLNET}, image: pose.png}}]\n" for i in range(3))
    scene = load_scene(write_scene(f"prompt: a street\nwidth: 128\nheight: 64\nsteps: 2\nbootstrap_steps: 0\n"
                                   f"max_batch: 4\nregions:\n{regions}"))
    model, unet, net = counted(unet_doubles)
    render(scene, model, seed=0)
    assert unet.samples == 2 * (1 + 1 + 3 * 2) and max(unet.sizes) <= 4
    assert net.calls == 2 * 3 and net.samples == 2 * 3 * 2


def test_cli_a_control_whose_start_and_end_leave_it_no_step_is_a_warning(cli, write_scene, tmp_path):
    control_images(tmp_path)
    scene = write_scene(CLI_SCENE.format(net=RANDOM_CONTROLNET).replace("scale: 0.7}", "start: 0.1, end: 0.9}"))
    result = cli.render(scene, "-o", tmp_path / "out.png")  # 2 steps: 0/2 < 0.1 and 2/2 > 0.9
    assert result.exit_code == 0, result.output
    assert "control[0]: start 0.1 and end 0.9 leave it none of the 2 steps run" in result.stderr


def test_a_canvas_sized_region_control_stays_on_the_canvas_under_size_and_its_re_render(cli, write_scene, tmp_path):
    control_images(tmp_path)
    picture(tmp_path / "control" / "sheet.png", (96, 64), 5)  # the scene file's canvas size
    scene = write_scene(CLI_SCENE.format(net=RANDOM_CONTROLNET).replace("control/pose.png", "control/sheet.png"))
    out = tmp_path / "small.png"
    result = cli.render(scene, "--size", "192x128", "-o", out)
    assert result.exit_code == 0, result.output
    (entry,) = read_metadata(out)["scene"]["regions"][0]["control"]
    assert entry["fit"] == "canvas"  # decided at the scene file's size, and recorded so
    again = cli.render(out, "-o", tmp_path / "again.png")
    assert again.exit_code == 0, again.output
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "again.png")))


def test_a_missing_folder_beside_the_scene_is_not_taken_for_a_hub_id(cli, write_scene, tmp_path):
    control_images(tmp_path)
    (tmp_path / "controlnets").mkdir()
    result = cli("validate", write_scene(CLI_SCENE.format(net="controlnets/nope")))
    assert result.exit_code == 2
    assert "control[0].model: no such folder or file:" in result.stderr and "controlnets/nope" in result.stderr


def test_a_scene_moved_elsewhere_keeps_naming_its_control_and_reference_files(tmp_path):
    from multidiff_cli.scene.paths import named_files, rebase_paths

    (tmp_path / "nets" / "depth").mkdir(parents=True)
    scene = {"prompt": "x", "control": [{"model": "nets/depth", "image": "d.png"},
                                        {"model": "lllyasviel/control_v11p_sd15_openpose", "image": "p.png"}],
             "regions": [{"prompt": "y", "box": [0, 0, 8, 8], "reference": [{"model": RANDOM_CONTROLNET, "image": "r.png",
                                                                            "weight": "w.safetensors"}]}]}
    moved = rebase_paths(scene, tmp_path, tmp_path / "out")
    assert [c["image"] for c in moved["control"]] == ["../d.png", "../p.png"]
    assert [c["model"] for c in moved["control"]] == ["../nets/depth", "lllyasviel/control_v11p_sd15_openpose"]
    assert moved["regions"][0]["reference"][0]["image"] == "../r.png"
    assert moved["regions"][0]["reference"][0]["model"] == RANDOM_CONTROLNET  # not a local path: as written
    names = [name for name, _ in named_files(scene, tmp_path)]
    assert names == ["d.png", "nets/depth", "p.png", "r.png"]


def test_validate_model_checks_a_scene_for_the_model_it_will_render_on(cli, write_scene, tmp_path):
    control_images(tmp_path)
    scene = write_scene(CLI_SCENE.format(net=RANDOM_CONTROLNET))
    assert cli("validate", scene).exit_code == 0
    refused = cli("validate", scene, "--model", "tiny-sd3-random")
    assert refused.exit_code == 2 and "SD3.5 models take no ControlNet" in refused.stderr
