"""PNG records: what a picture records (its scene, its inputs with their hashes, local paths relative to the
picture's own folder), `inspect`, rendering a PNG again (identically, from any folder, with a changed input
warned about), and malformed records (one clear line, never a traceback). CLI end to end on tiny-random."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from multidiff_cli.errors import MetadataError, MultidiffError
from multidiff_cli.output.png import read_metadata
from multidiff_cli.run.plan import load_source
from multidiff_cli.scene import load_scene


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


def pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


def write_castle_mask(folder: Path) -> Path:
    """192x128 (half the canvas): white at x 120..179, y 20..59 -> canvas x 240..359, y 40..119."""
    mask = Image.new("L", (192, 128), 0)
    mask.paste(255, (120, 20, 180, 60))
    path = folder / "masks" / "castle.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    mask.save(path)
    return path


def write_mask(path: Path, box=(16, 16, 80, 64), size=(96, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("L", size, 0)
    image.paste(255, box)
    image.save(path)
    return path


def read_png_text(path) -> str:
    """Every text chunk of a PNG, joined."""
    with Image.open(path) as image:
        return "\n".join(image.text.values())


# --- inspect --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(cli, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rendered")
    scene = folder / "room.yaml"
    scene.write_text(SMALL.replace("seed: 3", "seed: 5"))
    result = cli.render(scene, "--output-dir", folder / "out")
    assert result.exit_code == 0, result.output
    return folder / "out" / "room-5.png"


def test_inspect_prints_the_scene_as_yaml_and_the_run(cli, rendered):
    result = cli("inspect", rendered)
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


def test_inspect_json_equals_the_metadata(cli, rendered):
    result = cli("inspect", rendered, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == read_metadata(rendered)


def test_inspect_rejects_pngs_without_metadata_and_missing_files(cli, tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    no_meta = cli("inspect", plain)
    assert no_meta.exit_code == 2 and "no multidiff metadata" in no_meta.stderr
    missing = cli("inspect", tmp_path / "nope.png")
    assert missing.exit_code == 2 and "no such file" in missing.stderr
    text = tmp_path / "text.png"
    text.write_text("not a png")
    not_png = cli("inspect", text)
    assert not_png.exit_code == 2 and "Traceback" not in not_png.output


def test_inspect_saves_a_scene_that_renders_from_any_folder(cli, sofa_scene, tmp_path):
    cli.render(sofa_scene, "--output-dir", tmp_path / "out")
    png = tmp_path / "out" / "my_scene-7.png"
    saved = tmp_path / "elsewhere" / "deep" / "copy.yaml"
    result = cli("inspect", png, "--save-scene", saved)
    assert result.exit_code == 0 and f"scene written to {saved}" in result.stderr
    data = yaml.safe_load(saved.read_text())
    assert data["regions"][0]["mask"] == "../../masks/sofa.png"
    assert cli("validate", saved).exit_code == 0
    again = cli("render", saved, "-q", "-o", tmp_path / "copy.png")
    assert again.exit_code == 0, again.output
    with Image.open(png) as a, Image.open(tmp_path / "copy.png") as b:
        assert a.tobytes() == b.tobytes()


# --- render again from a PNG ----------------------------------------------------------------------------


def test_render_a_png_again_gives_identical_pixels(cli, write_scene, tmp_path):
    scene = write_scene(SMALL, name="room.yaml")
    first_dir, again_dir = tmp_path / "first", tmp_path / "again"
    assert cli.render(scene, "--output-dir", first_dir).exit_code == 0
    first = first_dir / "room-3.png"
    # No --model: the metadata names tiny-random.
    result = cli("render", first, "--output-dir", again_dir, "-q")
    assert result.exit_code == 0, result.output
    again = again_dir / "room-3-again.png"  # a re-render is named as one, in any folder
    assert result.stdout.strip() == str(again)
    assert pixels(again) == pixels(first)
    assert read_metadata(again)["scene"] == read_metadata(first)["scene"]
    assert read_metadata(again)["scene_file"] == "room.yaml"

    # Into the same folder: the source is never overwritten.
    before = first.read_bytes()
    same = cli("render", first, "--output-dir", first_dir, "-q")
    assert same.exit_code == 0, same.output
    assert same.stdout.strip() == str(first_dir / "room-3-again.png")
    assert first.read_bytes() == before
    assert pixels(first_dir / "room-3-again.png") == pixels(first)

    # Another seed: another picture, and the new seed recorded.
    reseeded = cli("render", first, "--seed", "4", "--output-dir", again_dir, "-q")
    assert reseeded.exit_code == 0, reseeded.output
    fourth = again_dir / "room-4-again.png"
    assert reseeded.stdout.strip() == str(fourth)
    assert pixels(fourth) != pixels(first)
    assert read_metadata(fourth)["scene"]["seed"] == 4


def test_render_a_mask_scene_png_again_from_another_folder(cli, tmp_path, monkeypatch):
    scenes = tmp_path / "scenes"
    mask = Image.new("L", (48, 32), 0)
    mask.paste(255, (0, 0, 24, 32))
    (scenes / "masks").mkdir(parents=True)
    mask.save(scenes / "masks" / "left.png")
    scene = scenes / "masked.yaml"
    scene.write_text(SMALL.replace("box: [16, 16, 80, 64]", "mask: masks/left.png"))
    first_dir = tmp_path / "out"
    assert cli.render(scene, "--output-dir", first_dir).exit_code == 0
    first = first_dir / "masked-3.png"
    assert read_metadata(first)["scene"]["regions"][0]["mask"] == "../scenes/masks/left.png"  # from the picture

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = cli("render", first, "--output-dir", "again", "-q")
    assert result.exit_code == 0, result.output
    again = elsewhere / "again" / "masked-3-again.png"
    assert pixels(again) == pixels(first)
    assert read_metadata(again)["scene"]["regions"][0]["mask"] == "../../scenes/masks/left.png"


def test_a_picture_moved_with_its_inputs_renders_again_from_its_new_place(cli, tmp_path, monkeypatch):
    project = tmp_path / "project"
    scenes = project / "scenes"
    write_castle_mask(scenes)
    scene = scenes / "wide.yaml"
    scene.write_text(SMALL.replace("box: [16, 16, 80, 64]", "mask: masks/castle.png"))
    out_dir = project / "out"
    assert cli.render(scene, "--output-dir", out_dir).exit_code == 0
    moved = shutil.move(project, tmp_path / "moved")  # another machine, another owner: the layout travels whole
    monkeypatch.chdir(tmp_path)
    first = Path(moved) / "out" / "wide-3.png"
    result = cli("render", first, "--output-dir", tmp_path / "again", "-q")
    assert result.exit_code == 0, result.output
    assert pixels(tmp_path / "again" / "wide-3-again.png") == pixels(first)


def test_render_a_png_without_metadata_fails_cleanly(cli, tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    result = cli.render(plain, "--output-dir", tmp_path / "out")
    assert result.exit_code == 2 and "no multidiff metadata" in result.stderr


def test_rendering_a_png_again_with_other_steps_lets_a_default_bootstrap_follow(cli, write_scene, tmp_path):
    first = tmp_path / "first.png"
    assert cli.render(write_scene(SMALL.replace("steps: 2", "steps: 10")), "-o", first).exit_code == 0
    assert read_metadata(first)["scene"]["bootstrap_steps"] == 2  # the default, steps / 5
    again = tmp_path / "again.png"
    result = cli.render(first, "--steps", "1", "-o", again)
    assert result.exit_code == 0, result.output
    assert read_metadata(again)["scene"]["bootstrap_steps"] == 0
    explicit = tmp_path / "explicit.png"
    assert cli.render(write_scene(SMALL.replace("steps: 2", "steps: 10\nbootstrap_steps: 5"), "x.yaml"), "-o",
                  explicit).exit_code == 0
    kept = cli.render(explicit, "--steps", "20", "-o", tmp_path / "kept.png")
    assert kept.exit_code == 0 and read_metadata(tmp_path / "kept.png")["scene"]["bootstrap_steps"] == 5


# --- inputs and paths in the record ---------------------------------------------------------------------


def test_a_changed_mask_is_recorded_warned_and_not_skipped(cli, sofa_scene, tmp_path):
    out = tmp_path / "outputs"
    cli.render(sofa_scene, "--output-dir", out)
    record = read_metadata(out / "my_scene-7.png")  # the mask as the picture's folder reaches it
    assert list(record["inputs"]) == ["../masks/sofa.png"] and record["inputs"]["../masks/sofa.png"].startswith("sha256:")
    skipped = cli.render(sofa_scene, "--output-dir", out, "--skip-existing")
    assert "skipped" in skipped.stderr and not (out / "my_scene-7-2.png").exists()

    write_mask(tmp_path / "masks" / "sofa.png", box=(0, 0, 48, 64))
    again = cli.render(out / "my_scene-7.png", "--output-dir", out)
    assert "warning: my_scene-7.png: ../masks/sofa.png changed since my_scene-7.png was rendered" in again.stderr
    resumed = cli.render(sofa_scene, "--output-dir", out, "--skip-existing")
    assert "skipped" not in resumed.stderr  # the earlier picture was made from the old mask, and a note says so
    assert ("my_scene-7.png records this render from other input files (../masks/sofa.png changed since): "
            "rendering it again as my_scene-7-2.png") in resumed.stderr
    assert resumed.stdout.strip() == str(out / "my_scene-7-2.png")


def test_a_model_folder_is_recorded_relative_to_the_picture_and_renders_again_from_anywhere(cli, tmp_path, sofa_scene):
    from multidiff_cli.models.random_weights import build_tiny_random, save_model

    save_model(build_tiny_random(), tmp_path / "localmodel")
    made = cli("render", sofa_scene, "--model", "./localmodel", "-q", "--output-dir", "out", cwd=tmp_path)
    assert made.exit_code == 0, made.output
    record = read_metadata(tmp_path / "out" / "my_scene-7.png")
    assert record["scene"]["model"] == record["model"] == "../localmodel"  # no absolute path in a picture
    assert str(tmp_path) not in read_png_text(tmp_path / "out" / "my_scene-7.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = cli("render", tmp_path / "out" / "my_scene-7.png", "-q", "-o", "again.png", cwd=elsewhere)
    assert again.exit_code == 0, again.output
    with Image.open(tmp_path / "out" / "my_scene-7.png") as a, Image.open(elsewhere / "again.png") as b:
        assert a.tobytes() == b.tobytes()


# --- malformed records ----------------------------------------------------------------------------------


def png_with_record(path: Path, text: str | None) -> Path:
    info = PngInfo()
    if text is not None:
        info.add_itxt("multidiff", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


scene_keys = st.sampled_from(["prompt", "steps", "bootstrap_steps", "width", "height", "regions", "seed", "mask"])


records = st.one_of(
    json_values.map(json.dumps),
    st.fixed_dictionaries({"scene": st.dictionaries(scene_keys, json_values, max_size=5)},
                          optional={"scene_dir": json_values, "inputs": json_values, "model": json_values,
                                    "scene_file": json_values}).map(json.dumps),
    st.text(max_size=40),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=records)
def test_any_malformed_record_is_one_clear_line_never_a_traceback(cli, tmp_path, text):
    path = png_with_record(tmp_path / "fuzz.png", text)
    try:
        loaded = load_source(path)
    except MultidiffError as exc:
        assert exc.exit_code == 2
        assert all(line.strip() for line in str(exc).splitlines())
    else:
        assert loaded.scene.prompt.strip()
    shown = cli("inspect", path)
    assert shown.exit_code in (0, 2) and shown.exception is None or isinstance(shown.exception, SystemExit)
    if shown.exit_code == 2:
        assert len(shown.stderr.splitlines()) == 1


@pytest.mark.parametrize(("text", "says"), [
    (None, "holds no multidiff metadata"),
    ('{"scene": {"prompt": "x"', "corrupt or truncated"),
    ("[1, 2]", "malformed: expected a JSON object"),
    ('{"scene": "x"}', "malformed: no `scene` object"),
    ('{"scene": {}, "scene_dir": 5}', "malformed: `scene_dir` is not text"),
])
def test_each_kind_of_bad_record_names_the_file_and_the_problem(cli, tmp_path, text, says):
    path = png_with_record(tmp_path / "bad.png", text)
    with pytest.raises(MetadataError, match=says):
        read_metadata(path)
    for command in ("inspect", "render", "validate", "preview"):
        result = cli(command, path)
        assert result.exit_code == 2, (command, result.output)
        assert says in result.stderr and "Traceback" not in result.output


def test_truncated_png_is_one_line(cli, tmp_path, sofa_scene):
    cli.render(sofa_scene, "--output-dir", tmp_path / "out")
    whole = (tmp_path / "out" / "my_scene-7.png").read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole[: len(whole) // 2])
    result = cli("inspect", cut)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
