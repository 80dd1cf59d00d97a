"""The `multidiff` command line end to end (CliRunner and the console script, the built-in tiny-random model):
what render writes and prints, progress on stderr, one-line errors and their exit codes, help, version,
shell completion, and `init`."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from multidiff_cli.cli import main as console_main
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


def test_render_writes_a_png_whose_metadata_reads_back_to_the_scene(cli, write_scene, tmp_path):
    scene_path = write_scene(SCENE + "seed: 5\n")
    out = tmp_path / "out" / "living.png"
    result = cli("render", str(scene_path), "--model", "tiny-random", "-o", str(out), "-q")
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


def test_default_output_is_named_after_scene_and_seed_and_a_random_seed_is_recorded(cli, write_scene, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scene_path = write_scene(SCENE, name="room.yaml")
    result = cli("render", str(scene_path), "--model", "tiny-random", "-q")
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
def test_progress_goes_to_stderr_and_quiet_silences_it(cli, write_scene, tmp_path, terminal_stderr, quiet):
    out = tmp_path / "picture.png"
    result = cli("render", str(write_scene(SCENE)), "--model", "tiny-random", "-o", str(out), *(["-q"] if quiet else []))
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
def test_bad_options_and_missing_models_exit_with_one_clear_line(cli, write_scene, tmp_path, args, code, text):
    result = cli("render", str(write_scene(SCENE)), "-o", str(tmp_path / "x.png"), "-q", *args)
    assert result.exit_code == code, result.output
    assert text in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


def test_missing_scene_file_exits_2(cli):
    result = cli("render", "no-such-scene.yaml")
    assert result.exit_code == 2 and "no such scene file" in result.stderr


def run_in_a_terminal(args: list[str], cwd: Path, columns: int = 100) -> tuple[int, str]:
    """Run `python -m multidiff_cli ARGS` with stdout and stderr on one pseudo-terminal, as in a shell:
    the exit code and everything the terminal received."""
    pty = pytest.importorskip("pty")
    import fcntl
    import select
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "xterm-256color", "COLUMNS": str(columns)}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "multidiff_cli", *args], cwd=cwd, env=env,
                            stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    received = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(leader, 1 << 16)
            except OSError:  # the follower side closed: the process is done
                break
            if not chunk:
                break
            received += chunk
        elif proc.poll() is not None:
            break
    os.close(leader)
    return proc.wait(timeout=60), received.decode("utf-8", "replace")


@pytest.mark.slow
def test_the_example_scene_renders_offline_in_a_terminal_with_the_path_on_a_line_of_its_own(tmp_path):
    """The README's promise: the example scene renders offline with tiny-random (fewer steps here), through
    `python -m multidiff_cli` (what torchrun and accelerate launch), in a terminal as from a shell. Issue 26: the
    written path came glued to the finished progress line, and loading read `0/? -- it/s`."""
    code, screen = run_in_a_terminal(["render", str(ROOT / "scenes" / "living_room.yaml"), "--model", "tiny-random",
                                      "--steps", "2", "--bootstrap-steps", "1", "-o", "living_room.png"], tmp_path)
    assert code == 0, screen
    # what a terminal shows: each \r returns to the line's start, ESC[2K clears it, colours are not text
    lines = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line).split("\r")[-1] for line in screen.split("\r\n")]
    assert lines[-2:] == ["living_room.png", ""], lines[-3:]  # on its own line, and the last thing printed
    loading = [part for part in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen).split("\r") if "loading" in part]
    assert loading and all("0/?" not in part and "it/s" not in part for part in loading), loading[:2]
    assert "living_room.yaml seed" in loading[0] and "loading tiny-random" in loading[0]
    with Image.open(tmp_path / "living_room.png") as image:
        assert image.size == (512, 512)


def main_lines(monkeypatch, capsys, *args) -> tuple[int, list[str]]:
    """The console script itself (not CliRunner): exit code and stderr lines."""
    monkeypatch.setattr(sys, "argv", ["multidiff", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        console_main()
    return done.value.code, capsys.readouterr().err.splitlines()


def write_mask(path: Path, box=(16, 16, 80, 64), size=(96, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("L", size, 0)
    image.paste(255, box)
    image.save(path)
    return path


# --- messages -------------------------------------------------------------------------------------------


def test_help_shows_plain_argument_names(cli, monkeypatch, capsys):
    for command in ("render", "validate", "init"):
        shown = cli(command, "--help").stdout
        assert "<list[Path]>" not in shown and "{" not in shown.split("Options:")[0], shown


def test_out_of_range_options_are_one_line_errors(monkeypatch, capsys):
    code, lines = main_lines(monkeypatch, capsys, "render", "x.yaml", "--preview-every", "0")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: Invalid value for '--preview-every'") and "multidiff render --help" in lines[0]
    code, lines = main_lines(monkeypatch, capsys, "rendr")
    assert code == 2 and lines == ["error: No such command 'rendr'. Did you mean 'render'? (see: multidiff --help)"]


def test_model_not_found_advice_names_the_option_and_the_make_variable(cli, sofa_scene):
    result = cli("render", sofa_scene, "--model", "./no-such-model-folder", "-q")
    assert result.exit_code == 1
    assert "--model tiny-random (make render MODEL=tiny-random)" in result.stderr


def test_without_a_terminal_stderr_gets_no_progress_and_no_blank_lines(cli, sofa_scene, tmp_path):
    result = cli("render", sofa_scene, "--model", "tiny-random", "--output-dir", tmp_path / "out")
    assert result.exit_code == 0 and result.stdout.strip() == str(tmp_path / "out" / "my_scene-7.png")
    assert result.stderr == "", repr(result.stderr)


def test_render_warns_about_clipped_boxes_and_stretched_masks(cli, tmp_path):
    write_mask(tmp_path / "masks" / "wide.png", box=(0, 0, 100, 50), size=(200, 100))
    path = tmp_path / "edge.yaml"
    path.write_text("prompt: a room\nwidth: 96\nheight: 64\nsteps: 1\nseed: 1\nregions:\n"
                    "  - prompt: a sofa\n    box: [-16, 16, 80, 64]\n"
                    "  - prompt: a lamp\n    mask: masks/wide.png\n")
    result = cli.render(path, "--output-dir", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"warning: {path}:8: regions[0].box: [-16, 16, 80, 64] extends past the 96x64 canvas: clipped" in result.stderr
    assert f"warning: {path}:10: regions[1].mask: masks/wide.png is 200x100 (aspect 2.00) but the canvas is 96x64" in result.stderr


# --- init -----------------------------------------------------------------------------------------------


def test_init_writes_a_valid_scene_with_every_default(cli, tmp_path):
    path = tmp_path / "new" / "scene.yaml"
    result = cli("init", path)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(path)
    checked = cli("validate", path)
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


def test_init_refuses_to_overwrite_without_force(cli, tmp_path):
    path = tmp_path / "scene.yaml"
    path.write_text("prompt: mine\n")
    before = path.stat().st_mtime_ns
    result = cli("init", path)
    assert result.exit_code == 2
    assert "--force" in result.stderr
    assert path.read_text() == "prompt: mine\n" and path.stat().st_mtime_ns == before
    forced = cli("init", path, "--force")
    assert forced.exit_code == 0, forced.output
    assert path.read_text().startswith("# A multidiff scene") and load_scene(path).width == 512


def test_init_onto_a_directory_is_a_clean_error(cli, tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    result = cli("init", folder, "--force")
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output and folder.is_dir()


def test_init_names_the_file_it_wrote(cli, tmp_path):
    target = tmp_path / "my_scene.yaml"
    assert cli("init", target).exit_code == 0
    assert f"Render it:  multidiff render {target}" in target.read_text()
    assert "multidiff render scene.yaml" not in target.read_text()


# --- version and shell completion -----------------------------------------------------------------------


def test_version_and_help(cli):
    from multidiff_cli import __version__

    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"multidiff {__version__}"
    assert "render" in cli("--help").stdout


def test_shell_completion(cli):
    assert "--install-completion" in cli("--help").stdout
    # Typer detects the shell from the parent process: run under bash (`; true` keeps bash from exec-ing)
    proc = subprocess.run(["bash", "-c", f"'{sys.executable}' -m multidiff_cli --show-completion; true"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "complete" in proc.stdout and "multidiff" in proc.stdout
