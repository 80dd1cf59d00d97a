"""validate and preview, which load no model: the layout drawn in place on a non-square canvas, warnings
(on stderr, at their lines, the same from both), several files at once, a multidiff PNG as input, and
no input file hashed for them."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from multidiff_cli.output.preview import CANVAS_RGB, CAPTION_RGB, LEGEND_PX, PALETTE, REGION_ALPHA


SMALL = """\
prompt: a cozy living room
width: 96
height: 64
steps: 2
seed: 3
regions:
  - prompt: a red sofa
    box: [16, 16, 80, 64]
"""


# A non-square canvas: a box (region 0) and a half-size mask PNG (region 1), apart from each other.
LAYOUT = """\
prompt: a wide landscape
width: 384
height: 256
regions:
  - prompt: a lake
    box: [32, 48, 160, 208]
  - prompt: a castle
    mask: masks/castle.png
"""


def blend(index: int) -> tuple[float, ...]:
    return tuple((1 - REGION_ALPHA) * c + REGION_ALPHA * p for c, p in zip(CANVAS_RGB, PALETTE[index]))


def close_to(actual, expected, tolerance: float = 2) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def write_castle_mask(folder: Path) -> Path:
    """192x128 (half the canvas): white at x 120..179, y 20..59 -> canvas x 240..359, y 40..119."""
    mask = Image.new("L", (192, 128), 0)
    mask.paste(255, (120, 20, 180, 60))
    path = folder / "masks" / "castle.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    mask.save(path)
    return path


@pytest.fixture
def layout_scene(write_scene, tmp_path):
    write_castle_mask(tmp_path)
    return write_scene(LAYOUT, name="layout.yaml")


# --- preview --------------------------------------------------------------------------------------------


def test_preview_draws_regions_in_their_colours_on_a_non_square_canvas(cli, layout_scene, tmp_path):
    out = tmp_path / "pics" / "x.png"
    result = cli("preview", layout_scene, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert result.stderr == ""  # a clean layout: no warning
    with Image.open(out) as image:
        assert image.mode == "RGB"
        width, height = image.size
        assert width == 384 + LEGEND_PX and height >= 256  # the canvas, and the legend beside it
        picture = image.load()
        # Inside the box [32, 48, 160, 208], near its bottom-right: away from outline and label.
        for xy in [(150, 198), (140, 180), (100, 190)]:
            assert close_to(picture[xy], blend(0)), (xy, picture[xy])
        # Inside the mask's white part (canvas x 240..359, y 40..119), near its bottom-right.
        for xy in [(350, 110), (330, 100), (300, 112)]:
            assert close_to(picture[xy], blend(1)), (xy, picture[xy])
        # Outside every region; (200, 100) would be inside the box were x and y swapped.
        # (230, 80) and (300, 130) are in the mask image but black there.
        for xy in [(5, 5), (200, 100), (120, 230), (10, 250), (375, 250), (200, 20), (250, 200), (370, 130),
                   (230, 80), (300, 130)]:
            assert close_to(picture[xy], CANVAS_RGB, 0), (xy, picture[xy])
        # Beside the canvas: the legend's background (its text starts after a margin and a colour swatch).
        for xy in [(width - 3, height - 3), (384 + 2, 5), (384 + 2, 250), (width - 3, 3)]:
            assert picture[xy] == CAPTION_RGB, (xy, picture[xy])


def test_preview_fills_a_half_white_mask_only_where_white(cli, write_scene, tmp_path):
    half = Image.new("L", (64, 64), 0)
    half.paste(255, (0, 0, 32, 64))  # white on the left half
    half.save(tmp_path / "half.png")
    path = write_scene("prompt: p\nwidth: 128\nheight: 96\nregions:\n  - prompt: left\n    mask: half.png\n")
    out = tmp_path / "half-layout.png"
    assert cli("preview", path, "-o", out).exit_code == 0
    with Image.open(out) as image:
        assert image.width == 128 + LEGEND_PX and image.height >= 96
        picture = image.load()
        assert close_to(picture[(55, 85)], blend(0))  # left half: the region
        assert close_to(picture[(100, 85)], CANVAS_RGB, 0)  # right half: canvas
        assert close_to(picture[(70, 85)], CANVAS_RGB, 0)


# --- warnings -------------------------------------------------------------------------------------------


WARNING_SCENES = {
    "overlap": ("  - prompt: a\n    box: [0, 0, 128, 128]\n  - prompt: b\n    box: [64, 64, 192, 192]\n",
                "regions[1]: overlaps regions[0]"),
    "tiny": ("  - prompt: a speck\n    box: [0, 0, 16, 8]\n", "under 1%"),
    "past-edge": ("  - prompt: a\n    box: [-32, 0, 64, 64]\n", "extends past the 384x256 canvas: clipped"),
    "whole": ("  - prompt: a\n    box: [0, 0, 384, 256]\n", "cover the whole canvas"),
}


@pytest.mark.parametrize("kind", list(WARNING_SCENES))
def test_validate_and_preview_warn_on_stderr_and_still_succeed(cli, write_scene, tmp_path, kind):
    regions, warning = WARNING_SCENES[kind]
    path = write_scene(f"prompt: p\nwidth: 384\nheight: 256\nregions:\n{regions}", name=f"{kind}.yaml")
    checked = cli("validate", path)
    assert checked.exit_code == 0, checked.output
    assert checked.stdout.strip().startswith(f"{path}: ok")
    assert f"warning: {path}:" in checked.stderr and warning in checked.stderr  # at its line, as render says it
    drawn = cli("preview", path, "-o", tmp_path / f"{kind}.png")
    assert drawn.exit_code == 0, drawn.output
    assert drawn.stderr == checked.stderr  # the same warnings, worded the same
    assert drawn.stdout.strip() == str(tmp_path / f"{kind}.png")


def test_clean_scene_gives_no_warning(cli, layout_scene, tmp_path):
    checked = cli("validate", layout_scene)
    assert checked.exit_code == 0 and checked.stderr == ""
    assert checked.stdout.strip() == f"{layout_scene}: ok (2 regions, 384x256)"


# --- several files; a PNG as input ----------------------------------------------------------------------


def test_validate_several_valid_files(cli, write_scene, layout_scene):
    a = write_scene(SMALL, name="a.yaml")
    b = write_scene("prompt: just text\n", name="b.yaml")
    result = cli("validate", a, b, layout_scene)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines == [f"{a}: ok (1 region, 96x64)", f"{b}: ok (0 regions, 512x512)", f"{layout_scene}: ok (2 regions, 384x256)"]


def test_validate_reports_the_broken_file_and_the_others(cli, write_scene):
    a = write_scene(SMALL, name="a.yaml")
    b = write_scene("prompt: p\nwidth: 100\n", name="b.yaml")
    c = write_scene("prompt: q\n", name="c.yaml")
    result = cli("validate", a, b, c)
    assert result.exit_code == 2
    assert re.search(rf"^{re.escape(str(b))}:2: width: must be a multiple of 8", result.stderr, re.M), result.stderr
    out_lines = result.stdout.strip().splitlines()
    assert [line.split(": ok")[0] for line in out_lines] == [str(a), str(c)]
    assert "Traceback" not in result.output


def test_validate_and_preview_accept_a_multidiff_png(cli, sofa_scene, tmp_path):
    cli.render(sofa_scene, "--output-dir", tmp_path / "out")
    png = tmp_path / "out" / "my_scene-7.png"
    checked = cli("validate", png)
    assert checked.exit_code == 0 and checked.stdout.strip() == f"{png}: ok (1 region, 96x64)"
    drawn = cli("preview", png, "-o", tmp_path / "layout.png")
    assert drawn.exit_code == 0, drawn.output
    with Image.open(tmp_path / "layout.png") as image:
        assert image.size[0] > 96  # the canvas and the legend beside it


def test_validate_and_preview_of_a_scene_file_hash_no_input_file(cli, sofa_scene, tmp_path, monkeypatch):
    """Hashing is for the record and --skip-existing: a check or a layout never reads a (GB-sized) LoRA for it."""
    from multidiff_cli.run import plan as plan_module

    def refuse(_scene):
        raise AssertionError("input files hashed")

    monkeypatch.setattr(plan_module, "input_hashes", refuse)
    assert cli("validate", sofa_scene).exit_code == 0
    assert cli("preview", sofa_scene, "-o", tmp_path / "layout.png").exit_code == 0


def test_a_warning_names_its_line_and_reads_the_same_from_validate_preview_and_render(cli, write_scene, tmp_path):
    path = write_scene("prompt: p\nwidth: 64\nheight: 64\nsteps: 1\nregions:\n  - prompt: a speck\n    box: [0, 0, 8, 8]\n")
    said = f"warning: {path}:6: regions[0]: covers 1.6% of the canvas"
    checked = cli("validate", path)
    drawn = cli("preview", path, "-o", tmp_path / "layout.png")
    rendered = cli.render(path, "-o", tmp_path / "picture.png")
    assert [checked.exit_code, drawn.exit_code, rendered.exit_code] == [0, 0, 0], rendered.output
    assert said not in checked.stderr  # 1.6% is over 1%: no warning at all
    small = write_scene("prompt: p\nwidth: 128\nheight: 128\nsteps: 1\nregions:\n  - prompt: a speck\n"
                        "    box: [0, 0, 8, 8]\n", name="small.yaml")
    warning = f"warning: {small}:6: regions[0]: covers 0.4% of the canvas (under 1%): it may be ignored"
    said = [cli("validate", small).stderr, cli("preview", small, "-o", tmp_path / "l2.png").stderr,
            cli.render(small, "-o", tmp_path / "p2.png").stderr]
    assert [[line for line in text.splitlines() if line.startswith("warning:")] for text in said] == [[warning]] * 3


@pytest.mark.parametrize("width, share", [(512, "0.024%"), (256, "0.098%"), (1024, "0.0061%")])
def test_a_tiny_box_s_share_is_printed_as_it_is_not_as_zero(cli, write_scene, width, share):
    """Under 0.1% a share keeps two figures: an 8x8 box on 512x512 is 0.024%, never 0.0%."""
    path = write_scene(f"prompt: p\nwidth: {width}\nheight: {width}\nregions:\n  - prompt: a dot\n    box: [0, 0, 8, 8]\n")
    checked = cli("validate", path)
    assert checked.exit_code == 0
    assert f"regions[0]: covers {share} of the canvas (under 1%)" in checked.stderr


# --- validate is as strict as render, without a model ---------------------------------------------------


@pytest.mark.parametrize("name, content, said", [
    ("fake.pt", None, "loras[0].path: no such file"),
    ("film.pt", b"\x80\x04pickled", "film.pt is a pickle (.pt), which can run code when loaded"),
    ("text.safetensors", b"hello, I am a text file\n", "text.safetensors is not a safetensors file"),
    ("cut.safetensors", b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":", "cut.safetensors is not a safetensors file"),
], ids=["missing", "pickle", "text", "cut-short"])
def test_validate_refuses_a_lora_render_would_refuse_without_loading_a_model(cli, write_scene, tmp_path, no_model_load,
                                                                             name, content, said):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    path = write_scene(f"prompt: p\nwidth: 64\nheight: 64\nloras: [{name}]\n")
    checked = cli("validate", path)
    assert checked.exit_code == 2 and checked.stdout == ""
    (line,) = checked.stderr.strip().splitlines()
    assert line.startswith(f"{path}:4: ") and said in line
    rendered = cli.render(path, "-o", tmp_path / "out.png")
    assert rendered.exit_code == 2 and said in rendered.stderr  # the same refusal, before any model
    assert no_model_load == [] and not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("name, content, said", [
    ("picture.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00junk", "{path}: not a scene file or a PNG written by multidiff: "
                                                            "it is a JPEG picture"),
    ("other.png", None, "error: {path}: holds no multidiff metadata (only PNGs written by multidiff do)"),
], ids=["jpeg", "foreign-png"])
def test_validate_of_a_picture_says_it_is_not_a_scene_or_a_multidiff_png(cli, tmp_path, name, content, said):
    path = tmp_path / name
    if content is None:
        Image.new("RGB", (8, 8)).save(path)
    else:
        path.write_bytes(content)
    checked = cli("validate", path)
    assert checked.exit_code == 2
    (line,) = checked.stderr.strip().splitlines()
    assert line.startswith(said.format(path=path)), line
    assert "UTF-8" not in line and "Traceback" not in checked.output
