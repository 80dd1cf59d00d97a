"""Pictures as input from the command line (issue 14): the canvas an init image gives, bad input files,
metadata and re-render warnings, previews, the memory check, and `multidiff upscale`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from multidiff_cli.errors import TooLarge
from multidiff_cli.models.random_weights import build_tiny_random
from multidiff_cli.output.png import read_metadata
from multidiff_cli.run import render as render_module
from multidiff_cli.run.memory import check_memory, estimate_bytes
from multidiff_cli.run.render import plan_render
from multidiff_cli.run.upscale import UpscaleRequest, write_upscale_scene
from multidiff_cli.scene import load_scene
from multidiff_cli.scene.picture import load_picture


def picture(path, size=(256, 192), mode="RGB", colour=None, seed=0):
    if colour is not None:
        Image.new(mode, size, colour).save(path)
    else:
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    return path


def files_in(folder):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


# --- the canvas --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keys,canvas", [
    ("", (200, 144)),  # the picture's size, rounded down to multiples of 8
    ("width: 400\n", (400, 288)),  # one side given: the other keeps the picture's shape
    ("height: 288\n", (400, 288)),
    ("width: 408\nheight: 296\n", (408, 296)),  # both: resized to them (within the aspect tolerance)
])
def test_the_canvas_follows_the_init_image(keys, canvas, write_scene, tmp_path):
    picture(tmp_path / "pic.png", (203, 147))
    scene = load_scene(write_scene(f"prompt: p\ninit_image: pic.png\n{keys}"))
    assert (scene.width, scene.height) == canvas
    assert (scene.strength, scene.keep) == (0.8, "none")  # the defaults with a picture


def test_exif_orientation_is_honoured_and_transparency_lies_on_white(tmp_path):
    image = Image.new("RGB", (128, 64), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 64, 64))  # blue left half
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter clockwise
    image.save(tmp_path / "turned.jpg", exif=exif, quality=100)
    upright = load_picture(tmp_path / "turned.jpg", (64, 128))
    assert upright.shape == (128, 64, 3)
    assert upright[8, 32, 2] > 0.9 and upright[120, 32, 0] > 0.9  # blue on top, red below: turned clockwise
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    clear.save(tmp_path / "clear.png")
    assert np.allclose(load_picture(tmp_path / "clear.png", (64, 64)), 1.0)  # white


# --- bad input: exit 2, one line, nothing written ------------------------------------------------------------------


def bad_files(tmp_path):
    picture(tmp_path / "pic.png")
    picture(tmp_path / "small.png", (48, 48), colour=(9, 9, 9))
    picture(tmp_path / "black.png", mode="L", colour=0)
    picture(tmp_path / "white.png", mode="L", colour=255)
    (tmp_path / "text.png").write_text("not a picture")
    (tmp_path / "cut.png").write_bytes((tmp_path / "pic.png").read_bytes()[:300])
    (tmp_path / "folder.png").mkdir()


BAD = [
    ("init_image: missing.jpg", "init_image: no such file"),
    ("init_image: folder.png", "is a directory"),
    ("init_image: text.png", "not an image Pillow can read"),
    ("init_image: cut.png", "not an image Pillow can read"),
    ("init_image: small.png", "48x48: too small to encode"),
    ("init_image: pic.png\nstrength: 0", "strength: must be more than 0 and at most 1"),
    ("init_image: pic.png\nstrength: 1.5", "strength: must be more than 0 and at most 1"),
    ("strength: 0.5", "strength: needs `init_image`"),
    ("keep: outside_regions", "keep: needs `init_image`"),
    ("init_image: pic.png\nkeep: outside_regions", "keep: outside_regions needs regions"),
    ("init_image: pic.png\nkeep: black.png", "the keep mask is empty"),
    ("init_image: pic.png\nkeep: white.png", "the keep mask is all white"),
    ("init_image: pic.png\nkeep: gone.png", "keep: no such file"),
    ("init_image: pic.png\nwidth: 256\nheight: 256", "aspect 1.33) but the canvas is 256x256 (aspect 1.00): give a canvas"),
]


@pytest.mark.parametrize("lines,message", BAD, ids=[message.split(":")[0] + str(i) for i, (_, message) in enumerate(BAD)])
def test_a_bad_picture_input_is_one_line_exit_2_and_writes_nothing(cli, lines, message, write_scene, tmp_path, no_model_load):
    bad_files(tmp_path)
    scene = write_scene(f"prompt: p\nsteps: 2\n{lines}\n")
    result = cli("render", scene, "--model", "tiny-random", "-q", "--output-dir", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_a_decompression_bomb_is_refused(cli, write_scene, tmp_path, monkeypatch, no_model_load):
    picture(tmp_path / "pic.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 256 * 192 // 4)  # Pillow's limit, lowered to this picture
    result = cli("render", write_scene("prompt: p\ninit_image: pic.png\n"), "-q", "--output-dir", tmp_path / "out")
    assert result.exit_code == 2 and "refused, too many pixels" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args,message", [
    (["missing.png", "--prompt", "p"], "no such file"),
    (["pic.png"], "holds no prompt of multidiff's: say what it shows with --prompt"),
    (["pic.png", "--prompt", "p", "--strength", "0"], "--strength 0.0: expected more than 0"),
    (["pic.png", "--prompt", "p", "--scale", "64"], "expected 1 to 16"),
    (["big.png", "--prompt", "p", "--scale", "16"], "640x480 picture would become 10240x7680, over the largest"),
    (["pic.png", "--prompt", "p", "-o", "out/up.jpg"], "must name a .png file"),
])
def test_a_bad_upscale_is_one_line_exit_2_and_writes_nothing(cli, args, message, tmp_path, monkeypatch, no_model_load):
    monkeypatch.chdir(tmp_path)
    picture(tmp_path / "pic.png")
    picture(tmp_path / "big.png", (640, 480), colour=(0, 0, 0))
    result = cli("upscale", *args, "-q", "--output-dir", "out")
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
    assert files_in(tmp_path / "out") == []


# --- metadata, re-renders, previews ------------------------------------------------------------------------------


def test_metadata_records_the_picture_and_a_changed_picture_warns_and_is_not_skipped(cli, write_scene, tmp_path, tiny,
                                                                                     monkeypatch):
    monkeypatch.setattr("multidiff_cli.models.loading.load_model", lambda *args, **kwargs: tiny)
    picture(tmp_path / "pic.png", (128, 96))
    Image.new("L", (128, 96), 0).save(tmp_path / "keep.png")
    mask = Image.open(tmp_path / "keep.png")
    mask.paste(255, (32, 32, 96, 80))
    mask.save(tmp_path / "keep.png")
    scene = write_scene("prompt: p\ninit_image: pic.png\nstrength: 0.5\nkeep: keep.png\nsteps: 2\nseed: 4\n")
    out = tmp_path / "out"
    assert cli("render", scene, "--model", "tiny-random", "-q", "--output-dir", out).exit_code == 0
    record = read_metadata(out / "scene-4.png")  # its paths are relative to the picture's folder, out/
    assert record["scene"]["init_image"] == "../pic.png" and record["scene"]["strength"] == 0.5
    assert record["scene"]["keep"] == "../keep.png" and (record["scene"]["width"], record["scene"]["height"]) == (128, 96)
    assert record["init_image"]["path"] == "../pic.png" and (record["init_image"]["width"], record["init_image"]["height"]) == (128, 96)
    assert record["init_image"]["sha256"] == record["inputs"]["../pic.png"] and "../keep.png" in record["inputs"]
    assert "Denoising strength: 0.5" in Image.open(out / "scene-4.png").text["parameters"]
    saved = cli("inspect", out / "scene-4.png", "--save-scene", tmp_path / "elsewhere" / "again.yaml")
    assert saved.exit_code == 0 and "init_image:" in saved.stdout
    moved = load_scene(tmp_path / "elsewhere" / "again.yaml")  # paths rewritten to work from its folder
    assert (moved.init_image, moved.keep) == ("../pic.png", "../keep.png")
    again = cli("render", scene, "--model", "tiny-random", "-q", "--output-dir", out, "--skip-existing")
    assert "skipped" in again.output and files_in(out) == ["scene-4.png"]

    picture(tmp_path / "pic.png", (128, 96), seed=1)  # the picture changes
    rerender = cli("render", out / "scene-4.png", "--model", "tiny-random", "-q", "--output-dir", out)
    assert rerender.exit_code == 0
    assert "warning: scene-4.png: ../pic.png changed since scene-4.png was rendered" in rerender.output
    resumed = cli("render", scene, "--model", "tiny-random", "-q", "--output-dir", out, "--skip-existing")
    assert "skipped" not in resumed.output and "scene-4-2.png" in files_in(out)


def test_preview_draws_the_init_image_under_the_boxes(cli, write_scene, tmp_path):
    picture(tmp_path / "pic.png", (128, 96), colour=(200, 40, 10))
    scene = write_scene("prompt: p\ninit_image: pic.png\nregions:\n  - prompt: a boat\n    box: [64, 48, 128, 96]\n")
    result = cli("preview", scene, "-o", tmp_path / "layout.png")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "layout.png") as layout:
        assert layout.getpixel((10, 10)) == (200, 40, 10)  # the picture, outside the box
        assert layout.getpixel((100, 80)) != (200, 40, 10)  # the box's colour over it


# --- memory ------------------------------------------------------------------------------------------------------


def test_the_memory_check_counts_the_encode_and_a_4096_upscale_tiles_both_ways(write_scene, tmp_path, tiny, monkeypatch):
    picture(tmp_path / "pic.png", (2048, 2048), colour=(1, 2, 3))
    big = load_scene(write_scene("prompt: p\ninit_image: pic.png\nwidth: 4096\nheight: 4096\n"))
    plan = plan_render(big, tiny)
    assert plan.tiled_decode  # auto: over 1024x1024
    parts = estimate_bytes(big, tiny, 2, plan.tiled_decode)
    untiled = estimate_bytes(big, tiny, 2, False)
    picture_bytes = 4096 * 4096 * 15  # the picture itself, as 8-bit and float32 RGB
    assert parts["encode"] - picture_bytes < 2 * parts["decode"]  # tiled: about one 512x512 tile's worth
    assert untiled["encode"] - picture_bytes == untiled["decode"] > 60 * parts["decode"]
    needed = max(estimate_bytes(big, tiny, plan.samples_per_call, True).values())
    monkeypatch.setattr("multidiff_cli.models.device.available_bytes", lambda device: int(needed / 0.85))
    check_memory(big, tiny, plan)  # tiled both ways: fits
    forced = load_scene(write_scene("prompt: p\ninit_image: pic.png\nwidth: 4096\nheight: 4096\ntiled_decode: false\n"))
    with pytest.raises(TooLarge, match="for its (encode|decode)"):
        check_memory(forced, tiny, plan_render(forced, tiny))

    tiling = []
    real_encode = tiny.vae.encode
    monkeypatch.setattr(tiny.vae, "encode", lambda pixels: tiling.append(tiny.vae.use_tiling) or real_encode(pixels))
    small = load_scene(write_scene("prompt: p\ninit_image: pic.png\nwidth: 64\nheight: 64\ntiled_decode: true\nsteps: 2\n"))
    render_module.picture_latents(small, tiny, plan_render(small, tiny))
    assert tiling == [True]


# --- upscale -----------------------------------------------------------------------------------------------------


@pytest.fixture
def small_window(monkeypatch):
    """tiny-random with a 32-cell (256 px) window, so a 512x384 canvas is covered by several views."""
    components = build_tiny_random().to(torch.device("cpu"), torch.float32)
    components.unet.register_to_config(sample_size=32)
    monkeypatch.setattr("multidiff_cli.models.loading.load_model", lambda *args, **kwargs: components)
    views = []
    real = render_module.multidiffusion
    monkeypatch.setattr(render_module, "multidiffusion", lambda *a, **k: views.append(k["views"]) or real(*a, **k))
    return views


def test_an_upscale_of_a_256x192_picture_renders_512x384_with_views_and_can_be_run_again(cli, tmp_path, monkeypatch,
                                                                                           small_window):
    monkeypatch.chdir(tmp_path)
    picture(tmp_path / "harbour.png")
    result = cli("upscale", "harbour.png", "--scale", "2", "--prompt", "a harbour", "--strength", "0.5",
                 "--steps", "2", "--seed", "7", "--model", "tiny-random", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == ["outputs/harbour-x2-7.png", "outputs/harbour-x2.yaml"]
    assert len(small_window[0]) == 15  # 3 rows x 5 columns of 32-cell views over 48x64 cells
    with Image.open(tmp_path / "outputs/harbour-x2-7.png") as image:
        assert image.size == (512, 384)
    record = read_metadata(tmp_path / "outputs/harbour-x2-7.png")
    assert record["scene"]["init_image"] == "../harbour.png" and record["scene"]["bootstrap_steps"] == 0
    assert (record["init_image"]["width"], record["init_image"]["height"]) == (256, 192)
    scene = load_scene(tmp_path / "outputs/harbour-x2.yaml")  # the scene beside it renders it again
    assert (scene.width, scene.height, scene.strength, scene.seed, scene.prompt) == (512, 384, 0.5, 7, "a harbour")

    # a PNG of multidiff's: its own prompts (regions' boxes scaled) and model, unless --prompt says otherwise
    reused = write_upscale_scene(UpscaleRequest(tmp_path / "outputs/harbour-x2-7.png", scale=1.5))
    assert reused.resolve() == tmp_path / "outputs/harbour-x2-7-x1.5.yaml"
    rescene = load_scene(reused)
    assert (rescene.prompt, rescene.model, rescene.width, rescene.height) == ("a harbour", "tiny-random", 768, 576)
    assert (rescene.init_image, rescene.strength, rescene.keep, rescene.bootstrap_steps) == ("harbour-x2-7.png", 0.3, "none", 0)


def test_an_upscale_keeps_a_multidiff_png_s_regions_scaled(cli, tmp_path, write_scene, tiny, monkeypatch):
    monkeypatch.setattr("multidiff_cli.models.loading.load_model", lambda *args, **kwargs: tiny)
    picture(tmp_path / "pic.png", (128, 96))
    scene = write_scene("prompt: p\ninit_image: pic.png\nsteps: 2\nseed: 1\nregions:\n  - prompt: a boat\n"
                        "    box: [8, 16, 64, 48]\n")
    assert cli("render", scene, "-q", "--model", "tiny-random", "-o", tmp_path / "boat.png").exit_code == 0
    upscaled = load_scene(write_upscale_scene(UpscaleRequest(tmp_path / "boat.png", scale=2, output_dir=tmp_path / "up")))
    assert [(r.prompt, r.box) for r in upscaled.regions] == [("a boat", [16, 32, 128, 96])]
    assert upscaled.init_image == "../boat.png" and upscaled.seed is not None  # a seed, so it renders the same again
    replaced = write_upscale_scene(UpscaleRequest(tmp_path / "boat.png", prompt="a ship", output_dir=tmp_path / "up"))
    assert replaced.name == "boat-x2-2.yaml"  # never replaces the scene written before
    assert (load_scene(replaced).prompt, load_scene(replaced).regions) == ("a ship", [])


def test_an_upscale_of_a_picture_whose_scene_uses_a_mask_file_renders_from_any_folder(cli, sofa_scene, tmp_path):
    """The trial's failure: the upscale scene names the mask relative to its own folder, and every check
    reads it from there, whatever the current folder (here neither the scene's nor the output's)."""
    assert cli.render(sofa_scene.name, "--output-dir", "outputs", cwd=tmp_path).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = cli("upscale", "../outputs/my_scene-7.png", "--scale", "2", "--steps", "1", "--model", "tiny-random",
                 "-q", cwd=elsewhere)
    assert result.exit_code == 0, result.output
    png, yaml_path = (elsewhere / line for line in result.stdout.split())  # into ./outputs, as render writes
    assert yaml_path == elsewhere / "outputs" / "my_scene-7-x2.yaml" and png.parent == yaml_path.parent
    upscaled = load_scene(yaml_path)
    assert upscaled.regions[0].mask == "../../masks/sofa.png"  # relative to the upscale scene's folder
    assert upscaled.path_of(upscaled.regions[0].mask) == tmp_path / "masks" / "sofa.png"
    with Image.open(png) as image:
        assert image.size == (192, 128)
