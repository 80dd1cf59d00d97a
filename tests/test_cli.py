"""The `multidiff` command end to end, with CliRunner and the built-in tiny-random model."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from multidiff_cli.cli import app
from multidiff_cli.output.png import read_metadata
from multidiff_cli.scene import load_scene

ROOT = Path(__file__).resolve().parents[1]
SCENE = """\
prompt: a cozy living room
width: 96
height: 64
steps: 3
regions:
  - prompt: a red sofa
    box: [16, 16, 80, 64]
    guidance_scale: 9.0
"""


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_render_writes_a_png_whose_metadata_reads_back_to_the_scene(write_scene, tmp_path):
    scene_path = write_scene(SCENE + "seed: 5\n")
    out = tmp_path / "out" / "living.png"
    result = run("render", str(scene_path), "--model", "tiny-random", "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    with Image.open(out) as image:
        assert image.size == (96, 64) and image.mode == "RGB"
        assert "Seed: 5" in image.text["parameters"]
    record = read_metadata(out)
    expected = load_scene(scene_path, {"model": "tiny-random"})  # with the model's family's defaults
    assert record["scene"] == expected.model_dump(mode="json", exclude_none=True)
    assert record["scene"]["bootstrap_steps"] == 1  # the default, resolved: round(3 / 5)
    assert (record["model"], record["device"], record["dtype"], record["scheduler"]) == (
        "tiny-random", "cpu", "float32", "ddim",
    )
    assert {"torch", "diffusers", "transformers", "multidiff"} <= record["versions"].keys()
    assert not [p for p in out.parent.iterdir() if p.name != "living.png"]  # no temporary file left


def test_default_output_is_named_after_scene_and_seed_and_a_random_seed_is_recorded(write_scene, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scene_path = write_scene(SCENE, name="room.yaml")
    result = run("render", str(scene_path), "--model", "tiny-random", "-q")
    assert result.exit_code == 0, result.output
    written = Path(result.stdout.strip())
    seed = read_metadata(written)["scene"]["seed"]
    assert written == Path("outputs") / f"room-{seed}.png"


@pytest.fixture
def terminal_stderr(monkeypatch):
    """The progress display's console as a terminal (a bar is drawn only on one), writing into a buffer."""
    from rich.console import Console

    from multidiff_cli.output import console

    buffer = io.StringIO()
    monkeypatch.setattr(console, "err", Console(file=buffer, force_terminal=True, width=100, highlight=False))
    return buffer


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_goes_to_stderr_and_quiet_silences_it(write_scene, tmp_path, terminal_stderr, quiet):
    out = tmp_path / "picture.png"
    result = run("render", str(write_scene(SCENE)), "--model", "tiny-random", "-o", str(out), *(["-q"] if quiet else []))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)  # stdout holds only the written file's path
    drawn = terminal_stderr.getvalue()
    if quiet:
        assert drawn == ""
    else:  # the bar names the job and what it is doing
        assert "scene.yaml seed" in drawn and "loading tiny-random" in drawn and "decoding" in drawn, drawn


def test_the_progress_bar_counts_steps(terminal_stderr):
    from multidiff_cli.output.console import ProgressDisplay
    from multidiff_cli.run.batch import Event

    with ProgressDisplay() as display:
        display(Event("stage", "room.yaml seed 3", text="encoding prompts"))
        display(Event("step", "room.yaml seed 3", step=2, steps=3))
    drawn = terminal_stderr.getvalue()
    assert "room.yaml seed 3" in drawn and "2/3" in drawn, drawn


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["--model", "./no/such/model"], 1, "error: model './no/such/model': no such folder"),
        (["--model", "nobody-here/no-model"], 1, "not in the local Hugging Face cache"),
        (["--device", "toaster"], 2, "error: --device"),
        (["--dtype", "float64"], 2, "error: --dtype"),
        (["--bootstrap-steps", "4"], 2, "scene.yaml: bootstrap_steps: must be <= steps (3) (got 4) (given on the command line)"),
    ],
)
def test_bad_options_and_missing_models_exit_with_one_clear_line(write_scene, tmp_path, args, code, text):
    result = run("render", str(write_scene(SCENE)), "-o", str(tmp_path / "x.png"), "-q", *args)
    assert result.exit_code == code, result.output
    assert text in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


def test_missing_scene_file_exits_2():
    result = run("render", "no-such-scene.yaml")
    assert result.exit_code == 2 and "no such scene file" in result.stderr


@pytest.mark.parametrize("scene", sorted((ROOT / "scenes").glob("*.yaml")), ids=lambda p: p.name)
def test_example_scenes_are_valid(scene):
    loaded = load_scene(scene)
    assert loaded.prompt and (loaded.regions or loaded.width > 512)


def test_console_script_renders_the_example_scene_offline(tmp_path):
    """The README's promise: the example scene renders offline with tiny-random (fewer steps here),
    through `python -m multidiff_cli` (what torchrun and accelerate launch)."""
    out = tmp_path / "living_room.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "multidiff_cli", "render", str(ROOT / "scenes" / "living_room.yaml"),
         "--model", "tiny-random", "--steps", "2", "--bootstrap-steps", "1", "-o", str(out), "-q"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    with Image.open(out) as image:
        assert image.size == (512, 512)
