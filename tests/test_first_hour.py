"""What a new user hit in their first hour: no file lost, re-renders that tell when an input changed,
messages that are true, one-line errors. CLI end to end on tiny-random."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from multidiff_cli import cli
from multidiff_cli.cli import app
from multidiff_cli.errors import MetadataError, MultidiffError
from multidiff_cli.output.png import read_metadata
from multidiff_cli.run import batch as batch_module
from multidiff_cli.run.plan import load_source

ROOT = Path(__file__).resolve().parents[1]
SCENE = """\
prompt: a room
width: 96
height: 64
steps: 2
seed: 7
regions:
  - prompt: a sofa
    mask: masks/sofa.png
"""


def run(*args, cwd: Path | None = None):
    old = Path.cwd()
    if cwd:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)


def render(*args, cwd: Path | None = None):
    return run("render", *args, "--model", "tiny-random", "-q", cwd=cwd)


def main_lines(monkeypatch, capsys, *args) -> tuple[int, list[str]]:
    """The console script itself (not CliRunner): exit code and stderr lines."""
    monkeypatch.setattr(sys, "argv", ["multidiff", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        cli.main()
    return done.value.code, capsys.readouterr().err.splitlines()


def write_mask(path: Path, box=(16, 16, 80, 64), size=(96, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("L", size, 0)
    image.paste(255, box)
    image.save(path)
    return path


@pytest.fixture
def scene(tmp_path) -> Path:
    write_mask(tmp_path / "masks" / "sofa.png")
    path = tmp_path / "my_scene.yaml"
    path.write_text(SCENE)
    return path


def test_re_rendering_never_replaces_an_earlier_picture(scene, tmp_path):
    out = tmp_path / "outputs"
    assert render(scene, "--output-dir", out).exit_code == 0
    first = (out / "my_scene-7.png").read_bytes()
    again = render(out / "my_scene-7.png", "--steps", "1", "--output-dir", out)
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == str(out / "my_scene-7-again.png")
    assert render(out / "my_scene-7-again.png", "--steps", "1", "--output-dir", out).stdout.strip() == str(
        out / "my_scene-7-again-2.png")  # the reported sequence wrote my_scene-7.png over the first picture
    assert render(scene, "--output-dir", out).stdout.strip() == str(out / "my_scene-7-2.png")
    assert (out / "my_scene-7.png").read_bytes() == first
    assert sorted(p.name for p in out.glob("*.png")) == [
        "my_scene-7-2.png", "my_scene-7-again-2.png", "my_scene-7-again.png", "my_scene-7.png"]


def test_overwrite_and_o_replace_only_the_named_file(scene, tmp_path):
    out = tmp_path / "outputs"
    render(scene, "--output-dir", out)
    stamp = (out / "my_scene-7.png").stat().st_mtime_ns
    replaced = render(scene, "--output-dir", out, "--overwrite", "--steps", "1")
    assert replaced.stdout.strip() == str(out / "my_scene-7.png")
    assert read_metadata(out / "my_scene-7.png")["scene"]["steps"] == 1
    assert not (out / "my_scene-7-2.png").exists()
    named = tmp_path / "named.png"
    named.write_bytes(b"old")
    assert render(scene, "-o", named).exit_code == 0 and read_metadata(named)["scene"]["seed"] == 7
    refused = render(out / "my_scene-7.png", "-o", out / "my_scene-7.png")
    assert refused.exit_code == 2 and "would replace the PNG being rendered again" in refused.output
    assert (out / "my_scene-7.png").stat().st_mtime_ns != stamp  # only --overwrite touched it


def read_png_text(path) -> str:
    """Every text chunk of a PNG, joined."""
    with Image.open(path) as image:
        return "\n".join(image.text.values())


def test_a_changed_mask_is_recorded_warned_and_not_skipped(scene, tmp_path):
    out = tmp_path / "outputs"
    render(scene, "--output-dir", out)
    record = read_metadata(out / "my_scene-7.png")  # the mask as the picture's folder reaches it
    assert list(record["inputs"]) == ["../masks/sofa.png"] and record["inputs"]["../masks/sofa.png"].startswith("sha256:")
    skipped = render(scene, "--output-dir", out, "--skip-existing")
    assert "skipped" in skipped.stderr and not (out / "my_scene-7-2.png").exists()

    write_mask(tmp_path / "masks" / "sofa.png", box=(0, 0, 48, 64))
    again = render(out / "my_scene-7.png", "--output-dir", out)
    assert "warning: my_scene-7.png: ../masks/sofa.png changed since my_scene-7.png was rendered" in again.stderr
    resumed = render(scene, "--output-dir", out, "--skip-existing")
    assert "skipped" not in resumed.stderr  # the earlier picture was made from the old mask
    assert resumed.stdout.strip() == str(out / "my_scene-7-2.png")


def test_a_model_folder_is_recorded_relative_to_the_picture_and_renders_again_from_anywhere(tmp_path, scene):
    from multidiff_cli.models.random_weights import build_tiny_random, save_model

    save_model(build_tiny_random(), tmp_path / "localmodel")
    made = run("render", scene, "--model", "./localmodel", "-q", "--output-dir", "out", cwd=tmp_path)
    assert made.exit_code == 0, made.output
    record = read_metadata(tmp_path / "out" / "my_scene-7.png")
    assert record["scene"]["model"] == record["model"] == "../localmodel"  # no absolute path in a picture
    assert str(tmp_path) not in read_png_text(tmp_path / "out" / "my_scene-7.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = run("render", tmp_path / "out" / "my_scene-7.png", "-q", "-o", "again.png", cwd=elsewhere)
    assert again.exit_code == 0, again.output
    with Image.open(tmp_path / "out" / "my_scene-7.png") as a, Image.open(elsewhere / "again.png") as b:
        assert a.tobytes() == b.tobytes()


def test_ctrl_c_says_which_step_previews_are_left(scene, tmp_path, monkeypatch):
    real = batch_module.render

    def interrupted(*args, callback=None, **kwargs):
        def stop_after_first(i, n, latents, denoised):
            callback(i, n, latents, denoised)
            raise KeyboardInterrupt

        return real(*args, callback=stop_after_first, **kwargs)

    monkeypatch.setattr(batch_module, "render", interrupted)
    result = render(scene, "--output-dir", tmp_path / "out", "--preview-every", "1")
    assert result.exit_code == 130
    assert "interrupted: the picture at hand was not written; 1 step preview remains in" in result.stderr
    assert (tmp_path / "out" / "my_scene-7.steps" / "step-001.png").exists()
    assert not (tmp_path / "out" / "my_scene-7.png").exists()
    monkeypatch.setattr(batch_module, "render", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert "interrupted: no partial file was left" in render(scene, "--output-dir", tmp_path / "o2").stderr


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
def test_any_malformed_record_is_one_clear_line_never_a_traceback(tmp_path, text):
    path = png_with_record(tmp_path / "fuzz.png", text)
    try:
        loaded = load_source(path)
    except MultidiffError as exc:
        assert exc.exit_code == 2
        assert all(line.strip() for line in str(exc).splitlines())
    else:
        assert loaded.scene.prompt.strip()
    shown = run("inspect", path)
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
def test_each_kind_of_bad_record_names_the_file_and_the_problem(tmp_path, text, says):
    path = png_with_record(tmp_path / "bad.png", text)
    with pytest.raises(MetadataError, match=says):
        read_metadata(path)
    for command in ("inspect", "render", "validate", "preview"):
        result = run(command, path)
        assert result.exit_code == 2, (command, result.output)
        assert says in result.stderr and "Traceback" not in result.output


def test_truncated_png_is_one_line(tmp_path, scene):
    render(scene, "--output-dir", tmp_path / "out")
    whole = (tmp_path / "out" / "my_scene-7.png").read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole[: len(whole) // 2])
    result = run("inspect", cut)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output


def test_validate_and_preview_accept_a_multidiff_png(scene, tmp_path):
    render(scene, "--output-dir", tmp_path / "out")
    png = tmp_path / "out" / "my_scene-7.png"
    checked = run("validate", png)
    assert checked.exit_code == 0 and checked.stdout.strip() == f"{png}: ok (1 region, 96x64)"
    drawn = run("preview", png, "-o", tmp_path / "layout.png")
    assert drawn.exit_code == 0, drawn.output
    with Image.open(tmp_path / "layout.png") as image:
        assert image.size[0] > 96  # the canvas and the legend beside it


def test_validate_and_preview_of_a_scene_file_hash_no_input_file(scene, tmp_path, monkeypatch):
    """Hashing is for the record and --skip-existing: a check or a layout never reads a (GB-sized) LoRA for it."""
    from multidiff_cli.run import plan as plan_module

    def refuse(_scene):
        raise AssertionError("input files hashed")

    monkeypatch.setattr(plan_module, "input_hashes", refuse)
    assert run("validate", scene).exit_code == 0
    assert run("preview", scene, "-o", tmp_path / "layout.png").exit_code == 0


def test_inspect_saves_a_scene_that_renders_from_any_folder(scene, tmp_path):
    render(scene, "--output-dir", tmp_path / "out")
    png = tmp_path / "out" / "my_scene-7.png"
    saved = tmp_path / "elsewhere" / "deep" / "copy.yaml"
    result = run("inspect", png, "--save-scene", saved)
    assert result.exit_code == 0 and f"scene written to {saved}" in result.stderr
    data = yaml.safe_load(saved.read_text())
    assert data["regions"][0]["mask"] == "../../masks/sofa.png"
    assert run("validate", saved).exit_code == 0
    again = run("render", saved, "-q", "-o", tmp_path / "copy.png")
    assert again.exit_code == 0, again.output
    with Image.open(png) as a, Image.open(tmp_path / "copy.png") as b:
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize(("target", "says"), [
    ("afile/b.png", "afile is a file, not a folder"),
    ("adir", "must name a .png file"),
])
def test_write_errors_say_what_is_wrong_with_which_path(scene, tmp_path, target, says):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    result = render(scene, "-o", target, cwd=tmp_path)
    assert result.exit_code in (1, 2) and says in result.stderr, result.output
    assert "File exists" not in result.stderr


def test_progress_reports_loading_encoding_and_each_step(scene, tmp_path):
    from multidiff_cli.run.batch import BatchRequest, RunSettings, run_batch

    events = []
    report = run_batch(BatchRequest([scene], {"model": "tiny-random"}, output_dir=tmp_path / "out"),
                       RunSettings(device="cpu"), events.append)
    assert report.exit_code == 0 and report.written == [(tmp_path / "out" / "my_scene-7.png", "my_scene · seed 7")]
    said = [(e.kind, e.text or (e.step, e.steps)) for e in events if e.kind in ("stage", "step")]
    assert said == [("stage", "loading tiny-random"), ("stage", "encoding prompts"), ("stage", "step 1/2"),
                    ("step", (1, 2)), ("step", (2, 2)), ("stage", "decoding")]
    assert [e.kind for e in events][-1] == "written"


def test_init_names_the_file_it_wrote(tmp_path):
    target = tmp_path / "my_scene.yaml"
    assert run("init", target).exit_code == 0
    assert f"Render it:  multidiff render {target}" in target.read_text()
    assert "multidiff render scene.yaml" not in target.read_text()


def test_help_shows_plain_argument_names(monkeypatch, capsys):
    for command in ("render", "validate", "init"):
        shown = run(command, "--help").stdout
        assert "<list[Path]>" not in shown and "{" not in shown.split("Options:")[0], shown


def test_out_of_range_options_are_one_line_errors(monkeypatch, capsys):
    code, lines = main_lines(monkeypatch, capsys, "render", "x.yaml", "--preview-every", "0")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: Invalid value for '--preview-every'") and "multidiff render --help" in lines[0]
    code, lines = main_lines(monkeypatch, capsys, "rendr")
    assert code == 2 and lines == ["error: No such command 'rendr'. Did you mean 'render'? (see: multidiff --help)"]


def test_a_failing_rank_ends_every_rank_and_rank_0_names_the_failed_job(tmp_path):
    (tmp_path / "room.yaml").write_text(SCENE.replace("    mask: masks/sofa.png", "    box: [16, 16, 80, 64]"))
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import os, sys\n"
        "import multidiff_cli.run.batch as b\n"
        "real = b.render\n"
        "def render(scene, *args, **kwargs):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise RuntimeError('boom on rank 1')\n"
        "    return real(scene, *args, **kwargs)\n"
        "b.render = render\n"
        "from multidiff_cli.cli import main\n"
        "sys.argv = ['multidiff', 'render', *sys.argv[1:]]\n"
        "main()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MULTIDIFF_DEVICE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
           "room.yaml", "--seeds", "0-1", "--model", "tiny-random", "-q", "--device", "cpu", "--output-dir", "out"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "rendered 1 of 2" in done.stderr
    assert "failed: room.yaml seed 1: RuntimeError: boom on rank 1" in done.stderr, done.stderr
    assert (tmp_path / "out" / "room-0.png").exists() and not (tmp_path / "out" / "room-1.png").exists()


def test_device_errors_name_where_the_value_came_from(scene, monkeypatch):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("MULTIDIFF_DEVICE", "cuda")
    from_env = render(scene)
    assert from_env.exit_code == 2
    assert from_env.stderr.startswith("error: $MULTIDIFF_DEVICE: 'cuda' asked for CUDA") and "--device" not in from_env.stderr
    given = render(scene, "--device", "gpu")
    assert given.exit_code == 2 and given.stderr.strip() == (
        "error: --device: 'gpu' is not a device; choose cpu, cuda, cuda:N or mps")


def test_model_not_found_advice_names_the_option_and_the_make_variable(scene):
    result = run("render", scene, "--model", "./no-such-model-folder", "-q")
    assert result.exit_code == 1
    assert "--model tiny-random (make render MODEL=tiny-random)" in result.stderr


def test_models_names_the_folder_it_searched_and_refuses_a_missing_one(tmp_path):
    missing = run("models", "--cache-dir", tmp_path / "nowhere")
    assert missing.exit_code == 2 and str(tmp_path / "nowhere") in missing.stderr
    (tmp_path / "home" / "hub").mkdir(parents=True)
    empty = run("models", "--cache-dir", tmp_path / "home")
    assert empty.exit_code == 0 and empty.stdout == ""
    assert f"searched {tmp_path / 'home' / 'hub'}: no diffusers models there" in empty.stderr


def test_without_a_terminal_stderr_gets_no_progress_and_no_blank_lines(scene, tmp_path):
    result = run("render", scene, "--model", "tiny-random", "--output-dir", tmp_path / "out")
    assert result.exit_code == 0 and result.stdout.strip() == str(tmp_path / "out" / "my_scene-7.png")
    assert result.stderr == "", repr(result.stderr)


def test_render_warns_about_clipped_boxes_and_stretched_masks(tmp_path):
    write_mask(tmp_path / "masks" / "wide.png", box=(0, 0, 100, 50), size=(200, 100))
    path = tmp_path / "edge.yaml"
    path.write_text("prompt: a room\nwidth: 96\nheight: 64\nsteps: 1\nseed: 1\nregions:\n"
                    "  - prompt: a sofa\n    box: [-16, 16, 80, 64]\n"
                    "  - prompt: a lamp\n    mask: masks/wide.png\n")
    result = render(path, "--output-dir", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"warning: {path}:8: regions[0].box: [-16, 16, 80, 64] extends past the 96x64 canvas: clipped" in result.stderr
    assert f"warning: {path}:10: regions[1].mask: masks/wide.png is 200x100 (aspect 2.00) but the canvas is 96x64" in result.stderr
