"""Render batches and their output files (CLI, tiny-random): seeds, grids, several scenes at once, names
that never replace an earlier picture, --overwrite and -o, --skip-existing, write errors, overrides,
step previews and animation, and the progress events of a batch."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from multidiff_cli.errors import UsageError
from multidiff_cli.output.png import read_metadata
from multidiff_cli.run.plan import parse_seeds, parse_size


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


def lines_of(text: str) -> list[str]:
    return text.strip().splitlines()


def pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


def no_crash(result) -> bool:
    """The command ended through typer (exit code), not through an uncaught exception."""
    return (result.exception is None or isinstance(result.exception, SystemExit)) and "Traceback" not in result.output


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.png")) if folder.exists() else []


def temporaries(folder: Path) -> list[str]:
    """write_atomic's temporary files: .<name>.<random>.tmp"""
    return sorted(p.name for p in folder.rglob(".*.tmp")) if folder.exists() else []


# --- several seeds and scenes --------------------------------------------------------------------------


def test_seeds_render_one_png_per_seed(cli, write_scene, tmp_path):
    scene = write_scene(SMALL, name="room.yaml")
    out_dir = tmp_path / "out"
    result = cli.render(scene, "--seeds", "0-2,5", "--output-dir", out_dir)
    assert result.exit_code == 0, result.output
    expected = [out_dir / f"room-{seed}.png" for seed in (0, 1, 2, 5)]
    assert result.stdout.strip().splitlines() == [str(p) for p in expected]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in expected)
    for seed, path in zip((0, 1, 2, 5), expected):
        assert read_metadata(path)["scene"]["seed"] == seed
        assert read_metadata(path)["scene_file"] == "room.yaml"
    assert len({pixels(p) for p in expected}) == 4  # different seeds, different pictures
    assert "rendered 4 of 4" in result.stderr


def test_two_scene_files_at_once_with_a_grid(cli, write_scene, tmp_path):
    a = write_scene(SMALL, name="a.yaml")
    b = write_scene(SMALL.replace("seed: 3", "seed: 8").replace("width: 96", "width: 128"), name="b.yaml")
    out_dir = tmp_path / "out"
    result = cli.render(a, b, "--output-dir", out_dir, "--grid")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[:2] == [str(out_dir / "a-3.png"), str(out_dir / "b-8.png")]
    grid = out_dir / "batch-grid.png"
    assert lines[2:] == [str(grid)]
    with Image.open(out_dir / "b-8.png") as image:
        assert image.size == (128, 64)
    with Image.open(grid) as sheet:
        assert sheet.width > 128 and sheet.height > 64  # two thumbnails side by side, labelled


def test_grid_of_one_scene_is_named_after_it(cli, write_scene, tmp_path):
    scene = write_scene(SMALL, name="room.yaml")
    out_dir = tmp_path / "out"
    result = cli.render(scene, "--seeds", "1-2", "--output-dir", out_dir, "--grid")
    assert result.exit_code == 0, result.output
    grid = out_dir / "room-grid.png"
    assert result.stdout.strip().splitlines()[-1] == str(grid)
    with Image.open(grid) as sheet:
        assert sheet.width >= 2 * 96 and sheet.height > 64


def test_batch_with_a_broken_scene_renders_the_good_one(cli, write_scene, tmp_path):
    good = write_scene(SMALL, name="good.yaml")
    bad = write_scene(SMALL.replace("width: 96", "width: 90"), name="bad.yaml")
    out_dir = tmp_path / "out"
    result = cli.render(bad, good, "--output-dir", out_dir)
    assert result.exit_code == 2, result.output
    assert result.stdout.strip() == str(out_dir / "good-3.png")
    assert (out_dir / "good-3.png").exists()
    assert f"{bad}:2: width: must be a multiple of 8" in result.stderr
    assert "rendered 1 of 2" in result.stderr
    assert re.search(r"^\s*failed: bad\.yaml: ", result.stderr, re.M), result.stderr
    assert "Traceback" not in result.output


def test_batch_with_a_missing_model_exits_1(cli, write_scene, tmp_path):
    scene = write_scene(SMALL)
    out_dir = tmp_path / "out"
    result = cli("render", scene, "--seeds", "0-1", "--model", "./no/such/folder", "--output-dir", out_dir, "-q")
    assert result.exit_code == 1, result.output
    assert "no such folder" in result.stderr and "rendered 0 of 2" in result.stderr
    assert result.stdout == ""
    assert not out_dir.exists() or not any(out_dir.iterdir())


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--seeds", "0-1", "-o", "one.png"], "-o/--output one.png is for one picture, but this renders several: use --output-dir"),
        (["--seed", "1", "--seeds", "0-1"], "--seed and --seeds"),
        (["--seeds", "3-1"], "backwards"),
        (["--seeds", "a"], "--seeds"),
        (["--seeds", "1,,2"], "--seeds"),
        (["--animation"], "--preview-every"),
        (["--size", "96by64"], "--size"),
    ],
)
def test_bad_batch_options_exit_2_without_rendering(cli, write_scene, tmp_path, monkeypatch, args, text):
    monkeypatch.chdir(tmp_path)
    scene = write_scene(SMALL)
    result = cli.render(scene, "--output-dir", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert text in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "one.png").exists()


@pytest.mark.parametrize("huge", [str(2**63), str(2**64)])
def test_seeds_past_the_seed_limit_exit_2_like_seed(cli, write_scene, tmp_path, huge):
    scene = write_scene(SMALL)
    single = cli.render(scene, "--seed", huge, "--output-dir", tmp_path / "one")
    assert single.exit_code == 2 and "seed" in single.stderr  # --seed is checked: this part holds
    result = cli.render(scene, "--seeds", huge, "--output-dir", tmp_path / "out")
    assert result.exit_code == 2, (result.output, result.exception)
    assert "seed" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out" / f"scene-{huge}.png").exists()


def test_two_scenes_with_the_same_name_do_not_overwrite_each_other(cli, tmp_path):
    first, second = tmp_path / "a" / "room.yaml", tmp_path / "b" / "room.yaml"
    for path, prompt in ((first, "a room"), (second, "a hall")):
        path.parent.mkdir()
        path.write_text(SMALL.replace("a cozy living room", prompt))
    out_dir = tmp_path / "out"
    result = cli.render(first, second, "--output-dir", out_dir)
    assert result.exit_code == 0, result.output
    written = [out_dir / "room-3.png", out_dir / "room-3-2.png"]  # the second takes the next free name
    assert result.stdout.strip().splitlines() == [str(p) for p in written]
    assert [read_metadata(p)["scene"]["prompt"] for p in written] == ["a room", "a hall"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["room-3-2.png", "room-3.png"]


def test_two_scenes_with_the_same_name_and_overwrite_are_refused_before_rendering(cli, tmp_path, no_model_load):
    first, second = tmp_path / "a" / "room.yaml", tmp_path / "b" / "room.yaml"
    for path in (first, second):
        path.parent.mkdir()
        path.write_text(SMALL)
    out_dir = tmp_path / "out"
    result = cli.render(first, second, "--output-dir", out_dir, "--overwrite")
    assert result.exit_code == 2, result.output
    assert lines_of(result.stderr) == [
        f"error: two renders would write the same file ({out_dir / 'room-3.png'}): give them separate --output-dir"
    ]
    assert result.stdout == "" and not out_dir.exists() and no_model_load == []


def test_progress_reports_loading_encoding_and_each_step(sofa_scene, tmp_path):
    from multidiff_cli.run.batch import BatchRequest, RunSettings, run_batch

    events = []
    report = run_batch(BatchRequest([sofa_scene], {"model": "tiny-random"}, output_dir=tmp_path / "out"),
                       RunSettings(device="cpu"), events.append)
    assert report.exit_code == 0 and report.written == [(tmp_path / "out" / "my_scene-7.png", "my_scene · seed 7")]
    said = [(e.kind, e.text or (e.step, e.steps)) for e in events if e.kind in ("stage", "step")]
    assert said == [("stage", "loading tiny-random"), ("stage", "encoding prompts"), ("stage", "step 1/2"),
                    ("step", (1, 2)), ("step", (2, 2)), ("stage", "decoding")]
    assert [e.kind for e in events][-1] == "written"


# --- output names: never replacing a picture, --overwrite, -o, write errors ------------------------------


def test_re_rendering_never_replaces_an_earlier_picture(cli, sofa_scene, tmp_path):
    out = tmp_path / "outputs"
    assert cli.render(sofa_scene, "--output-dir", out).exit_code == 0
    first = (out / "my_scene-7.png").read_bytes()
    again = cli.render(out / "my_scene-7.png", "--steps", "1", "--output-dir", out)
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == str(out / "my_scene-7-again.png")
    assert cli.render(out / "my_scene-7-again.png", "--steps", "1", "--output-dir", out).stdout.strip() == str(
        out / "my_scene-7-again-2.png")  # the reported sequence wrote my_scene-7.png over the first picture
    assert cli.render(sofa_scene, "--output-dir", out).stdout.strip() == str(out / "my_scene-7-2.png")
    assert (out / "my_scene-7.png").read_bytes() == first
    assert sorted(p.name for p in out.glob("*.png")) == [
        "my_scene-7-2.png", "my_scene-7-again-2.png", "my_scene-7-again.png", "my_scene-7.png"]


def test_overwrite_and_o_replace_only_the_named_file(cli, sofa_scene, tmp_path):
    out = tmp_path / "outputs"
    cli.render(sofa_scene, "--output-dir", out)
    stamp = (out / "my_scene-7.png").stat().st_mtime_ns
    replaced = cli.render(sofa_scene, "--output-dir", out, "--overwrite", "--steps", "1")
    assert replaced.stdout.strip() == str(out / "my_scene-7.png")
    assert read_metadata(out / "my_scene-7.png")["scene"]["steps"] == 1
    assert not (out / "my_scene-7-2.png").exists()
    named = tmp_path / "named.png"
    named.write_bytes(b"old")
    assert cli.render(sofa_scene, "-o", named).exit_code == 0 and read_metadata(named)["scene"]["seed"] == 7
    refused = cli.render(out / "my_scene-7.png", "-o", out / "my_scene-7.png")
    assert refused.exit_code == 2 and "would replace the PNG being rendered again" in refused.output
    assert (out / "my_scene-7.png").stat().st_mtime_ns != stamp  # only --overwrite touched it


@pytest.mark.parametrize(("target", "says"), [
    ("afile/b.png", "afile is a file, not a folder"),
    ("adir", "must name a .png file"),
])
def test_write_errors_say_what_is_wrong_with_which_path(cli, sofa_scene, tmp_path, target, says):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    result = cli.render(sofa_scene, "-o", target, cwd=tmp_path)
    assert result.exit_code in (1, 2) and says in result.stderr, result.output
    assert "File exists" not in result.stderr


# --- --skip-existing ------------------------------------------------------------------------------------


def test_skip_existing_leaves_the_file_alone_and_loads_no_model(cli, write_scene, tmp_path, request):
    scene = write_scene(SMALL)
    out_dir = tmp_path / "out"
    target = out_dir / "scene-3.png"
    assert cli.render(scene, "--output-dir", out_dir).exit_code == 0
    before, stamp = target.read_bytes(), target.stat().st_mtime_ns

    loads = request.getfixturevalue("no_model_load")  # from here on, loading a model fails the test
    result = cli.render(scene, "--output-dir", out_dir, "--skip-existing")
    assert result.exit_code == 0 and no_crash(result), result.output
    assert loads == []
    assert f"skipped {target}: already rendered" in result.stderr
    assert target.read_bytes() == before and target.stat().st_mtime_ns == stamp
    assert pngs(out_dir) == ["scene-3.png"] and temporaries(out_dir) == []


def test_skip_existing_renders_again_when_the_settings_differ(cli, write_scene, tmp_path, render_calls):
    scene = write_scene(SMALL)
    out_dir = tmp_path / "out"
    target = out_dir / "scene-3.png"
    assert cli.render(scene, "--output-dir", out_dir).exit_code == 0
    assert read_metadata(target)["scene"]["steps"] == 2
    result = cli.render(scene, "--output-dir", out_dir, "--skip-existing", "--steps", "3")
    assert result.exit_code == 0 and no_crash(result), result.output
    assert "skipped" not in result.stderr
    again = out_dir / "scene-3-2.png"  # a free name: the earlier picture stays
    assert result.stdout.strip() == str(again)
    assert render_calls == [3, 3]
    assert read_metadata(again)["scene"]["steps"] == 3 and read_metadata(target)["scene"]["steps"] == 2


def test_skip_existing_in_a_batch_renders_only_the_missing_seeds(cli, write_scene, tmp_path, render_calls):
    scene = write_scene(SMALL)
    out_dir = tmp_path / "out"
    assert cli.render(scene, "--output-dir", out_dir, "--seed", "1").exit_code == 0
    middle = out_dir / "scene-1.png"
    before, stamp = middle.read_bytes(), middle.stat().st_mtime_ns
    render_calls.clear()

    result = cli.render(scene, "--output-dir", out_dir, "--seeds", "0-2", "--skip-existing")
    assert result.exit_code == 0 and no_crash(result), result.output
    assert render_calls == [0, 2]
    assert lines_of(result.stdout) == [str(out_dir / "scene-0.png"), str(out_dir / "scene-2.png")]
    assert f"skipped {middle}: already rendered" in result.stderr
    assert middle.read_bytes() == before and middle.stat().st_mtime_ns == stamp
    assert pngs(out_dir) == ["scene-0.png", "scene-1.png", "scene-2.png"]
    assert [read_metadata(out_dir / f"scene-{s}.png")["scene"]["seed"] for s in range(3)] == [0, 1, 2]


# --- parse_seeds / parse_size ---------------------------------------------------------------------------


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


# --- overrides ------------------------------------------------------------------------------------------


def test_overrides_are_applied_and_recorded(cli, write_scene, tmp_path):
    out = tmp_path / "o.png"
    result = cli.render(write_scene(SMALL), "--steps", "2", "--guidance-scale", "3.5", "--scheduler", "euler",
                    "--size", "128x64", "--bootstrap-steps", "1", "--seed", "9", "-o", out)
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.size == (128, 64)
    record = read_metadata(out)
    scene = record["scene"]
    assert (scene["steps"], scene["guidance_scale"], scene["scheduler"]) == (2, 3.5, "euler")
    assert (scene["width"], scene["height"], scene["bootstrap_steps"], scene["seed"]) == (128, 64, 1, 9)
    assert scene["model"] == "tiny-random" and record["scheduler"] == "euler"


def test_invalid_override_exits_2_naming_the_field(cli, write_scene, tmp_path):
    out = tmp_path / "o.png"
    result = cli.render(write_scene(SMALL), "--scheduler", "nope", "-o", out)
    assert result.exit_code == 2, result.output
    assert "scheduler" in result.stderr and "nope" in result.stderr and "command line" in result.stderr
    assert not out.exists()
    sized = cli.render(write_scene(SMALL), "--size", "100x64", "-o", out)
    assert sized.exit_code == 2 and "width" in sized.stderr and not out.exists()


# --- step previews and animation -----------------------------------------------------------------------


def test_preview_every_step_and_animation(cli, write_scene, tmp_path):
    out = tmp_path / "anim" / "x.png"
    result = cli.render(write_scene(SMALL), "--preview-every", "1", "--animation", "-o", out)
    assert result.exit_code == 0, result.output
    steps = out.with_suffix(".steps")
    assert sorted(p.name for p in steps.iterdir()) == ["step-001.png", "step-002.png"]
    for frame in steps.iterdir():
        with Image.open(frame) as image:
            assert image.size == (96, 64)
    with Image.open(out.with_suffix(".gif")) as gif:
        assert gif.format == "GIF" and gif.is_animated and gif.n_frames >= 3
        assert gif.size == (96, 64)
