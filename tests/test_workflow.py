"""Workflow commands end to end: preview, validate, init, inspect, models, and render batches,
overrides and re-renders from a PNG's metadata (CliRunner, the built-in tiny-random model)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from multidiff_cli.cli import app
from multidiff_cli.errors import UsageError
from multidiff_cli.run.plan import parse_seeds, parse_size
from multidiff_cli.output.png import read_metadata
from multidiff_cli.output.preview import CANVAS_RGB, CAPTION_RGB, LEGEND_PX, PALETTE, REGION_ALPHA
from multidiff_cli.scene import load_scene

ROOT = Path(__file__).resolve().parents[1]

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


def run(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def render(*args: str | Path):
    return run("render", *args, "--model", "tiny-random", "-q")


def lines_of(text: str) -> list[str]:
    return text.strip().splitlines()


def pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


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


# --- 1. preview ----------------------------------------------------------------------------------------


def test_preview_draws_regions_in_their_colours_on_a_non_square_canvas(layout_scene, tmp_path):
    out = tmp_path / "pics" / "x.png"
    result = run("preview", layout_scene, "-o", out)
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


def test_preview_fills_a_half_white_mask_only_where_white(write_scene, tmp_path):
    half = Image.new("L", (64, 64), 0)
    half.paste(255, (0, 0, 32, 64))  # white on the left half
    half.save(tmp_path / "half.png")
    path = write_scene("prompt: p\nwidth: 128\nheight: 96\nregions:\n  - prompt: left\n    mask: half.png\n")
    out = tmp_path / "half-layout.png"
    assert run("preview", path, "-o", out).exit_code == 0
    with Image.open(out) as image:
        assert image.width == 128 + LEGEND_PX and image.height >= 96
        picture = image.load()
        assert close_to(picture[(55, 85)], blend(0))  # left half: the region
        assert close_to(picture[(100, 85)], CANVAS_RGB, 0)  # right half: canvas
        assert close_to(picture[(70, 85)], CANVAS_RGB, 0)


def test_preview_does_not_import_torch(layout_scene, tmp_path):
    out = tmp_path / "no-torch.png"
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from multidiff_cli.cli import app\n"
        f"r = CliRunner().invoke(app, ['preview', {str(layout_scene)!r}, '-o', {str(out)!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'torch' not in sys.modules, 'preview imported torch'\n"
        "print('clean')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "clean"
    assert out.exists()


# --- 2. warnings --------------------------------------------------------------------------------------


WARNING_SCENES = {
    "overlap": ("  - prompt: a\n    box: [0, 0, 128, 128]\n  - prompt: b\n    box: [64, 64, 192, 192]\n",
                "regions[1]: overlaps regions[0]"),
    "tiny": ("  - prompt: a speck\n    box: [0, 0, 16, 8]\n", "under 1%"),
    "past-edge": ("  - prompt: a\n    box: [-32, 0, 64, 64]\n", "extends past the 384x256 canvas: clipped"),
    "whole": ("  - prompt: a\n    box: [0, 0, 384, 256]\n", "cover the whole canvas"),
}


@pytest.mark.parametrize("kind", list(WARNING_SCENES))
def test_validate_and_preview_warn_on_stderr_and_still_succeed(write_scene, tmp_path, kind):
    regions, warning = WARNING_SCENES[kind]
    path = write_scene(f"prompt: p\nwidth: 384\nheight: 256\nregions:\n{regions}", name=f"{kind}.yaml")
    checked = run("validate", path)
    assert checked.exit_code == 0, checked.output
    assert checked.stdout.strip().startswith(f"{path}: ok")
    assert f"warning: {path}:" in checked.stderr and warning in checked.stderr  # at its line, as render says it
    drawn = run("preview", path, "-o", tmp_path / f"{kind}.png")
    assert drawn.exit_code == 0, drawn.output
    assert drawn.stderr == checked.stderr  # the same warnings, worded the same
    assert drawn.stdout.strip() == str(tmp_path / f"{kind}.png")


def test_clean_scene_gives_no_warning(layout_scene, tmp_path):
    checked = run("validate", layout_scene)
    assert checked.exit_code == 0 and checked.stderr == ""
    assert checked.stdout.strip() == f"{layout_scene}: ok (2 regions, 384x256)"


# --- 3. validate several files --------------------------------------------------------------------------


def test_validate_several_valid_files(write_scene, layout_scene):
    a = write_scene(SMALL, name="a.yaml")
    b = write_scene("prompt: just text\n", name="b.yaml")
    result = run("validate", a, b, layout_scene)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines == [f"{a}: ok (1 region, 96x64)", f"{b}: ok (0 regions, 512x512)", f"{layout_scene}: ok (2 regions, 384x256)"]


def test_validate_reports_the_broken_file_and_the_others(write_scene):
    a = write_scene(SMALL, name="a.yaml")
    b = write_scene("prompt: p\nwidth: 100\n", name="b.yaml")
    c = write_scene("prompt: q\n", name="c.yaml")
    result = run("validate", a, b, c)
    assert result.exit_code == 2
    assert re.search(rf"^{re.escape(str(b))}:2: width: must be a multiple of 8", result.stderr, re.M), result.stderr
    out_lines = result.stdout.strip().splitlines()
    assert [line.split(": ok")[0] for line in out_lines] == [str(a), str(c)]
    assert "Traceback" not in result.output


# --- 4. init ----------------------------------------------------------------------------------------------


def test_init_writes_a_valid_scene_with_every_default(tmp_path):
    path = tmp_path / "new" / "scene.yaml"
    result = run("init", path)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(path)
    checked = run("validate", path)
    assert checked.exit_code == 0, checked.output
    scene = load_scene(path)
    assert (scene.width, scene.height, scene.steps, scene.bootstrap_steps) == (512, 512, 50, 10)
    assert (scene.scheduler, scene.view_stride, scene.wrap) == ("ddim", 64, "none")
    assert (scene.few_step, scene.tiled_decode, scene.guidance_scale) == ("auto", "auto", 7.5)
    assert scene.negative_prompt == "" and scene.style == "" and scene.seed is None and scene.model is None
    assert scene.max_batch is None and len(scene.regions) == 1
    # Every key the file sets is a default: the scene is what the schema and the default model's family
    # (SD) give for prompt + regions alone.
    bare = load_scene(path).model_dump()
    text = yaml.safe_load(path.read_text())
    from multidiff_cli.catalog import SD
    from multidiff_cli.scene import Scene

    assert Scene.model_validate({"prompt": text["prompt"], "regions": text["regions"]}).for_family(SD).model_dump() == bare


def test_init_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "scene.yaml"
    path.write_text("prompt: mine\n")
    before = path.stat().st_mtime_ns
    result = run("init", path)
    assert result.exit_code == 2
    assert "--force" in result.stderr
    assert path.read_text() == "prompt: mine\n" and path.stat().st_mtime_ns == before
    forced = run("init", path, "--force")
    assert forced.exit_code == 0, forced.output
    assert path.read_text().startswith("# A multidiff scene") and load_scene(path).width == 512


def test_init_onto_a_directory_is_a_clean_error(tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    result = run("init", folder, "--force")
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output and folder.is_dir()


# --- 5. render batches ------------------------------------------------------------------------------------


def test_seeds_render_one_png_per_seed(write_scene, tmp_path):
    scene = write_scene(SMALL, name="room.yaml")
    out_dir = tmp_path / "out"
    result = render(scene, "--seeds", "0-2,5", "--output-dir", out_dir)
    assert result.exit_code == 0, result.output
    expected = [out_dir / f"room-{seed}.png" for seed in (0, 1, 2, 5)]
    assert result.stdout.strip().splitlines() == [str(p) for p in expected]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in expected)
    for seed, path in zip((0, 1, 2, 5), expected):
        assert read_metadata(path)["scene"]["seed"] == seed
        assert read_metadata(path)["scene_file"] == "room.yaml"
    assert len({pixels(p) for p in expected}) == 4  # different seeds, different pictures
    assert "rendered 4 of 4" in result.stderr


def test_two_scene_files_at_once_with_a_grid(write_scene, tmp_path):
    a = write_scene(SMALL, name="a.yaml")
    b = write_scene(SMALL.replace("seed: 3", "seed: 8").replace("width: 96", "width: 128"), name="b.yaml")
    out_dir = tmp_path / "out"
    result = render(a, b, "--output-dir", out_dir, "--grid")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[:2] == [str(out_dir / "a-3.png"), str(out_dir / "b-8.png")]
    grid = out_dir / "batch-grid.png"
    assert lines[2:] == [str(grid)]
    with Image.open(out_dir / "b-8.png") as image:
        assert image.size == (128, 64)
    with Image.open(grid) as sheet:
        assert sheet.width > 128 and sheet.height > 64  # two thumbnails side by side, labelled


def test_grid_of_one_scene_is_named_after_it(write_scene, tmp_path):
    scene = write_scene(SMALL, name="room.yaml")
    out_dir = tmp_path / "out"
    result = render(scene, "--seeds", "1-2", "--output-dir", out_dir, "--grid")
    assert result.exit_code == 0, result.output
    grid = out_dir / "room-grid.png"
    assert result.stdout.strip().splitlines()[-1] == str(grid)
    with Image.open(grid) as sheet:
        assert sheet.width >= 2 * 96 and sheet.height > 64


def test_batch_with_a_broken_scene_renders_the_good_one(write_scene, tmp_path):
    good = write_scene(SMALL, name="good.yaml")
    bad = write_scene(SMALL.replace("width: 96", "width: 90"), name="bad.yaml")
    out_dir = tmp_path / "out"
    result = render(bad, good, "--output-dir", out_dir)
    assert result.exit_code == 2, result.output
    assert result.stdout.strip() == str(out_dir / "good-3.png")
    assert (out_dir / "good-3.png").exists()
    assert f"{bad}:2: width: must be a multiple of 8" in result.stderr
    assert "rendered 1 of 2" in result.stderr
    assert re.search(r"^\s*failed: bad\.yaml: ", result.stderr, re.M), result.stderr
    assert "Traceback" not in result.output


def test_batch_with_a_missing_model_exits_1(write_scene, tmp_path):
    scene = write_scene(SMALL)
    out_dir = tmp_path / "out"
    result = run("render", scene, "--seeds", "0-1", "--model", "./no/such/folder", "--output-dir", out_dir, "-q")
    assert result.exit_code == 1, result.output
    assert "no such folder" in result.stderr and "rendered 0 of 2" in result.stderr
    assert result.stdout == ""
    assert not out_dir.exists() or not any(out_dir.iterdir())


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--seeds", "0-1", "-o", "one.png"], "--output-dir"),
        (["--seed", "1", "--seeds", "0-1"], "--seed and --seeds"),
        (["--seeds", "3-1"], "backwards"),
        (["--seeds", "a"], "--seeds"),
        (["--seeds", "1,,2"], "--seeds"),
        (["--animation"], "--preview-every"),
        (["--size", "96by64"], "--size"),
    ],
)
def test_bad_batch_options_exit_2_without_rendering(write_scene, tmp_path, monkeypatch, args, text):
    monkeypatch.chdir(tmp_path)
    scene = write_scene(SMALL)
    result = render(scene, "--output-dir", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert text in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "one.png").exists()


@pytest.mark.parametrize("huge", [str(2**63), str(2**64)])
def test_seeds_past_the_seed_limit_exit_2_like_seed(write_scene, tmp_path, huge):
    scene = write_scene(SMALL)
    single = render(scene, "--seed", huge, "--output-dir", tmp_path / "one")
    assert single.exit_code == 2 and "seed" in single.stderr  # --seed is checked: this part holds
    result = render(scene, "--seeds", huge, "--output-dir", tmp_path / "out")
    assert result.exit_code == 2, (result.output, result.exception)
    assert "seed" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out" / f"scene-{huge}.png").exists()


def test_two_scenes_with_the_same_name_do_not_overwrite_each_other(tmp_path):
    first, second = tmp_path / "a" / "room.yaml", tmp_path / "b" / "room.yaml"
    for path, prompt in ((first, "a room"), (second, "a hall")):
        path.parent.mkdir()
        path.write_text(SMALL.replace("a cozy living room", prompt))
    out_dir = tmp_path / "out"
    result = render(first, second, "--output-dir", out_dir)
    assert result.exit_code == 0, result.output
    written = [out_dir / "room-3.png", out_dir / "room-3-2.png"]  # the second takes the next free name
    assert result.stdout.strip().splitlines() == [str(p) for p in written]
    assert [read_metadata(p)["scene"]["prompt"] for p in written] == ["a room", "a hall"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["room-3-2.png", "room-3.png"]


def test_two_scenes_with_the_same_name_and_overwrite_are_refused_before_rendering(tmp_path, no_model_load):
    first, second = tmp_path / "a" / "room.yaml", tmp_path / "b" / "room.yaml"
    for path in (first, second):
        path.parent.mkdir()
        path.write_text(SMALL)
    out_dir = tmp_path / "out"
    result = render(first, second, "--output-dir", out_dir, "--overwrite")
    assert result.exit_code == 2, result.output
    assert lines_of(result.stderr) == [
        f"error: two renders would write the same file ({out_dir / 'room-3.png'}): give them separate --output-dir"
    ]
    assert result.stdout == "" and not out_dir.exists() and no_model_load == []


# --- 6. parse_seeds / parse_size ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "seeds"),
    [("0-3,7", [0, 1, 2, 3, 7]), ("5", [5]), ("3,1,3,2-4", [3, 1, 2, 4]), (" 2 - 3 , 9 ", [2, 3, 9]), ("4-4", [4]),
     ("0-2,1-3", [0, 1, 2, 3])],
)
def test_parse_seeds(spec, seeds):
    assert parse_seeds(spec) == seeds


@pytest.mark.parametrize("spec", ["3-1", "a", "", "1,,2", "-1", "1-", "1.5", "0-20000"])
def test_parse_seeds_rejects(spec):
    with pytest.raises(UsageError):
        parse_seeds(spec)


@pytest.mark.parametrize(("spec", "size"), [("768x512", (768, 512)), ("64X128", (64, 128)), (" 96 x 64 ", (96, 64))])
def test_parse_size(spec, size):
    assert parse_size(spec) == size


@pytest.mark.parametrize("spec", ["768", "x512", "768x", "axb", "768x512x3", "-8x8", "", "7.5x8"])
def test_parse_size_rejects(spec):
    with pytest.raises(UsageError):
        parse_size(spec)


# --- 7. overrides -------------------------------------------------------------------------------------------


def test_overrides_are_applied_and_recorded(write_scene, tmp_path):
    out = tmp_path / "o.png"
    result = render(write_scene(SMALL), "--steps", "2", "--guidance-scale", "3.5", "--scheduler", "euler",
                    "--size", "128x64", "--bootstrap-steps", "1", "--seed", "9", "-o", out)
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.size == (128, 64)
    record = read_metadata(out)
    scene = record["scene"]
    assert (scene["steps"], scene["guidance_scale"], scene["scheduler"]) == (2, 3.5, "euler")
    assert (scene["width"], scene["height"], scene["bootstrap_steps"], scene["seed"]) == (128, 64, 1, 9)
    assert scene["model"] == "tiny-random" and record["scheduler"] == "euler"


def test_invalid_override_exits_2_naming_the_field(write_scene, tmp_path):
    out = tmp_path / "o.png"
    result = render(write_scene(SMALL), "--scheduler", "nope", "-o", out)
    assert result.exit_code == 2, result.output
    assert "scheduler" in result.stderr and "nope" in result.stderr and "command line" in result.stderr
    assert not out.exists()
    sized = render(write_scene(SMALL), "--size", "100x64", "-o", out)
    assert sized.exit_code == 2 and "width" in sized.stderr and not out.exists()


# --- 8. inspect -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rendered")
    scene = folder / "room.yaml"
    scene.write_text(SMALL.replace("seed: 3", "seed: 5"))
    result = render(scene, "--output-dir", folder / "out")
    assert result.exit_code == 0, result.output
    return folder / "out" / "room-5.png"


def test_inspect_prints_the_scene_as_yaml_and_the_run(rendered):
    result = run("inspect", rendered)
    assert result.exit_code == 0, result.output
    record = read_metadata(rendered)
    scene_part, run_part = result.stdout.split("# run", 1)
    assert yaml.safe_load(scene_part) == record["scene"]
    assert re.search(r"^# seed: 5$", run_part, re.M)
    assert re.search(r"^# model: tiny-random$", run_part, re.M)
    # The scene part is a scene file: saved, it validates and loads to the same scene.
    assert load_scene_text(scene_part, rendered.parent).model_dump(mode="json", exclude_none=True) == record["scene"]


def load_scene_text(text: str, folder: Path):
    path = folder / "from-inspect.yaml"
    path.write_text(text)
    return load_scene(path)


def test_inspect_json_equals_the_metadata(rendered):
    result = run("inspect", rendered, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == read_metadata(rendered)


def test_inspect_rejects_pngs_without_metadata_and_missing_files(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    no_meta = run("inspect", plain)
    assert no_meta.exit_code == 2 and "no multidiff metadata" in no_meta.stderr
    missing = run("inspect", tmp_path / "nope.png")
    assert missing.exit_code == 2 and "no such file" in missing.stderr
    text = tmp_path / "text.png"
    text.write_text("not a png")
    not_png = run("inspect", text)
    assert not_png.exit_code == 2 and "Traceback" not in not_png.output


# --- 9. render again from a PNG ---------------------------------------------------------------------------


def test_render_a_png_again_gives_identical_pixels(write_scene, tmp_path):
    scene = write_scene(SMALL, name="room.yaml")
    first_dir, again_dir = tmp_path / "first", tmp_path / "again"
    assert render(scene, "--output-dir", first_dir).exit_code == 0
    first = first_dir / "room-3.png"
    # No --model: the metadata names tiny-random.
    result = run("render", first, "--output-dir", again_dir, "-q")
    assert result.exit_code == 0, result.output
    again = again_dir / "room-3-again.png"  # a re-render is named as one, in any folder
    assert result.stdout.strip() == str(again)
    assert pixels(again) == pixels(first)
    assert read_metadata(again)["scene"] == read_metadata(first)["scene"]
    assert read_metadata(again)["scene_file"] == "room.yaml"

    # Into the same folder: the source is never overwritten.
    before = first.read_bytes()
    same = run("render", first, "--output-dir", first_dir, "-q")
    assert same.exit_code == 0, same.output
    assert same.stdout.strip() == str(first_dir / "room-3-again.png")
    assert first.read_bytes() == before
    assert pixels(first_dir / "room-3-again.png") == pixels(first)

    # Another seed: another picture, and the new seed recorded.
    reseeded = run("render", first, "--seed", "4", "--output-dir", again_dir, "-q")
    assert reseeded.exit_code == 0, reseeded.output
    fourth = again_dir / "room-4-again.png"
    assert reseeded.stdout.strip() == str(fourth)
    assert pixels(fourth) != pixels(first)
    assert read_metadata(fourth)["scene"]["seed"] == 4


def test_render_a_mask_scene_png_again_from_another_folder(tmp_path, monkeypatch):
    scenes = tmp_path / "scenes"
    mask = Image.new("L", (48, 32), 0)
    mask.paste(255, (0, 0, 24, 32))
    (scenes / "masks").mkdir(parents=True)
    mask.save(scenes / "masks" / "left.png")
    scene = scenes / "masked.yaml"
    scene.write_text(SMALL.replace("box: [16, 16, 80, 64]", "mask: masks/left.png"))
    first_dir = tmp_path / "out"
    assert render(scene, "--output-dir", first_dir).exit_code == 0
    first = first_dir / "masked-3.png"
    assert read_metadata(first)["scene"]["regions"][0]["mask"] == "../scenes/masks/left.png"  # from the picture

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = run("render", first, "--output-dir", "again", "-q")
    assert result.exit_code == 0, result.output
    again = elsewhere / "again" / "masked-3-again.png"
    assert pixels(again) == pixels(first)
    assert read_metadata(again)["scene"]["regions"][0]["mask"] == "../../scenes/masks/left.png"


def test_a_picture_moved_with_its_inputs_renders_again_from_its_new_place(tmp_path, monkeypatch):
    project = tmp_path / "project"
    scenes = project / "scenes"
    write_castle_mask(scenes)
    scene = scenes / "wide.yaml"
    scene.write_text(SMALL.replace("box: [16, 16, 80, 64]", "mask: masks/castle.png"))
    out_dir = project / "out"
    assert render(scene, "--output-dir", out_dir).exit_code == 0
    moved = shutil.move(project, tmp_path / "moved")  # another machine, another owner: the layout travels whole
    monkeypatch.chdir(tmp_path)
    first = Path(moved) / "out" / "wide-3.png"
    result = run("render", first, "--output-dir", tmp_path / "again", "-q")
    assert result.exit_code == 0, result.output
    assert pixels(tmp_path / "again" / "wide-3-again.png") == pixels(first)


def test_render_a_png_without_metadata_fails_cleanly(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    result = render(plain, "--output-dir", tmp_path / "out")
    assert result.exit_code == 2 and "no multidiff metadata" in result.stderr


# --- 10. step previews and animation ---------------------------------------------------------------------


def test_preview_every_step_and_animation(write_scene, tmp_path):
    out = tmp_path / "anim" / "x.png"
    result = render(write_scene(SMALL), "--preview-every", "1", "--animation", "-o", out)
    assert result.exit_code == 0, result.output
    steps = out.with_suffix(".steps")
    assert sorted(p.name for p in steps.iterdir()) == ["step-001.png", "step-002.png"]
    for frame in steps.iterdir():
        with Image.open(frame) as image:
            assert image.size == (96, 64)
    with Image.open(out.with_suffix(".gif")) as gif:
        assert gif.format == "GIF" and gif.is_animated and gif.n_frames >= 3
        assert gif.size == (96, 64)


# --- 11. models ----------------------------------------------------------------------------------------------


def _snapshot(cache: Path, repo: str, sha: str) -> Path:
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(sha)
    return repo_dir / "snapshots" / sha


def test_models_lists_the_cache_and_what_cannot_load(tiny, tmp_path):
    from multidiff_cli.models.random_weights import save_model

    cache = tmp_path / "hub"
    good_sha, bad_sha = "a" * 40, "0123456789abcdef" * 2 + "01234567"
    good = _snapshot(cache, "me/tiny-sd", good_sha)
    save_model(tiny, good)
    (good / "model_index.json").write_text("{}")
    bad = _snapshot(cache, "me/pickled-sd", bad_sha)
    shutil.copytree(good, bad)
    for weights in (bad / "unet").glob("*.safetensors"):
        weights.unlink()
    (bad / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    # A non-diffusers model is not listed.
    other = _snapshot(cache, "me/a-text-model", "b" * 40)
    other.mkdir(parents=True)
    (other / "config.json").write_text("{}")

    result = run("models", "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout
    # Fields: repo id, revision (12 hex), size "N.N GB", family, status.
    by_repo = {fields[0]: fields for fields in (line.split(None, 5) for line in lines)}
    assert sorted(by_repo) == ["me/pickled-sd", "me/tiny-sd"]
    repo, revision, size, unit, family, status = by_repo["me/tiny-sd"]
    assert (revision, unit, family, status) == (good_sha[:12], "GB", "sd", "ok") and float(size) >= 0
    repo, revision, size, unit, family, status = by_repo["me/pickled-sd"]
    assert revision == bad_sha[:12]
    assert status.startswith("cannot load") and "safetensors" in status and "diffusion_pytorch_model.bin" in status


@pytest.fixture
def tiny_cache(tiny, tmp_path):
    from multidiff_cli.models.random_weights import save_model

    good = _snapshot(tmp_path / "hub", "me/tiny-sd", "c" * 40)
    save_model(tiny, good)
    (good / "model_index.json").write_text("{}")
    return tmp_path / "hub"


def test_models_output_is_tab_separated(tiny_cache):
    """For cut -f / awk -F'\\t': the fields are joined by tabs, not padded with spaces."""
    result = run("models", "--cache-dir", tiny_cache)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().split("\t") == ["me/tiny-sd", "c" * 12, "0.0 GB", "sd", "ok"]


def test_models_with_an_empty_cache_prints_nothing_on_stdout(tmp_path):
    cache = tmp_path / "empty-hub"
    cache.mkdir()
    result = run("models", "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "no diffusers models" in result.stderr


def test_models_with_a_missing_cache_folder_is_a_usage_error(tmp_path):
    cache = tmp_path / "no-such-hub"
    result = run("models", "--cache-dir", cache)
    assert result.exit_code == 2, result.output
    assert lines_of(result.stderr) == [f"error: --cache-dir: no such folder: {cache}"] and result.stdout == ""


# --- 12. version and shell completion --------------------------------------------------------------------------


def test_version_and_help():
    from multidiff_cli import __version__

    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"multidiff {__version__}"
    assert "render" in run("--help").stdout


def test_shell_completion():
    assert "--install-completion" in run("--help").stdout
    # Typer detects the shell from the parent process: run under bash (`; true` keeps bash from exec-ing)
    proc = subprocess.run(["bash", "-c", f"'{sys.executable}' -m multidiff_cli --show-completion; true"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "complete" in proc.stdout and "multidiff" in proc.stdout


def test_rendering_a_png_again_with_other_steps_lets_a_default_bootstrap_follow(write_scene, tmp_path):
    first = tmp_path / "first.png"
    assert render(write_scene(SMALL.replace("steps: 2", "steps: 10")), "-o", first).exit_code == 0
    assert read_metadata(first)["scene"]["bootstrap_steps"] == 2  # the default, steps / 5
    again = tmp_path / "again.png"
    result = render(first, "--steps", "1", "-o", again)
    assert result.exit_code == 0, result.output
    assert read_metadata(again)["scene"]["bootstrap_steps"] == 0
    explicit = tmp_path / "explicit.png"
    assert render(write_scene(SMALL.replace("steps: 2", "steps: 10\nbootstrap_steps: 5"), "x.yaml"), "-o",
                  explicit).exit_code == 0
    kept = render(explicit, "--steps", "20", "-o", tmp_path / "kept.png")
    assert kept.exit_code == 0 and read_metadata(tmp_path / "kept.png")["scene"]["bootstrap_steps"] == 5
