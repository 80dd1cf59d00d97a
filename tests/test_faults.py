"""Faults and hostile input: random and mutated scene files, Ctrl-C, unwritable folders, a full disk,
NaN latents, --skip-existing, pickle weights, the memory check, unsafe YAML tags, Unicode prompts.

Renders use the built-in tiny-random model on tiny canvases (96x64, 2-3 steps). Tests marked
xfail(strict=True) pin bugs found while writing this file: each one's reason says what goes wrong.
The property-based tests keep clear of those known crashers (see KNOWN_CRASHERS below), so they stay
deterministic; when a bug is fixed its xfail test passes, strict xfail fails, and the exclusion can go.
"""
from __future__ import annotations

import copy
import errno
import io
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

import multidiff_cli.models.random_weights as random_weights_module
import multidiff_cli.run.batch as batch_module
from multidiff_cli.cli import app
from multidiff_cli.errors import SceneError
from multidiff_cli.models.random_weights import build_tiny_random, save_model
from multidiff_cli.output.png import read_metadata, write_atomic
from multidiff_cli.run.memory import estimate_bytes
from multidiff_cli.scene import Region, Scene, load_scene

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

SCENE_KEYS = list(Scene.model_fields)
REGION_KEYS = list(Region.model_fields)


def run(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def render(*args: str | Path):
    return run("render", *args, "--model", "tiny-random", "-q")


def lines(text: str) -> list[str]:
    return text.strip().splitlines()


def no_crash(result) -> bool:
    """The command ended through typer (exit code), not through an uncaught exception."""
    return (result.exception is None or isinstance(result.exception, SystemExit)) and "Traceback" not in result.output


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.png")) if folder.exists() else []


def temporaries(folder: Path) -> list[str]:
    """write_atomic's temporary files: .<name>.<random>.tmp"""
    return sorted(p.name for p in folder.rglob(".*.tmp")) if folder.exists() else []


def write_mask(path: Path, size=(96, 64), white=(40, 8, 88, 56)) -> Path:
    mask = Image.new("L", size, 0)
    if white:
        mask.paste(255, white)
    mask.save(path)
    return path


@pytest.fixture
def render_calls(monkeypatch):
    """Spy on multidiff_cli.run.batch.render: the seeds actually rendered, in order."""
    seeds = []
    real = batch_module.render

    def spy(scene, components, seed, *args, **kwargs):
        seeds.append(seed)
        return real(scene, components, seed, *args, **kwargs)

    monkeypatch.setattr(batch_module, "render", spy)
    return seeds


# --- 1. property-based: random and mutated scene files ---------------------------------------------------

# Inputs that once crashed, kept out of the random inputs so the properties stay focused (each has its
# own test below): integers beyond float range in a box (OverflowError), a mask path starting with
# `~name` for an unknown user (RuntimeError), a mask path component over 255 bytes (OSError), nesting
# deeper than Python's recursion limit (RecursionError), a core type tag on a value that is not of
# that type (`!!int x`: ValueError, IndexError, KeyError or AttributeError from inside PyYAML).
BIG = 2**1000  # still convertible to float
CORE_TAG = re.compile(r"!!(int|float|bool|timestamp)|tag:yaml\.org,2002:(int|float|bool|timestamp)")


def no_unknown_user(text: str) -> bool:
    return not text.startswith("~")


def no_core_tag(content: str | bytes) -> bool:
    text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
    return not CORE_TAG.search(text)


texts = st.text(max_size=20).filter(no_unknown_user)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-300, 300),
    st.integers(-BIG, BIG),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
    st.sampled_from(["auto", "ddim", "euler", "horizontal", "none", "a red sofa", "", " ", "lamp.png"]),
)
keys = st.one_of(
    st.sampled_from(SCENE_KEYS + REGION_KEYS),
    texts,
    st.integers(-3, 3),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)),
    max_leaves=12,
)
documents = st.one_of(
    values,
    st.dictionaries(keys, values, max_size=6),
    st.fixed_dictionaries(
        {"prompt": st.one_of(texts, values)},
        optional={key: values for key in SCENE_KEYS if key != "prompt"}
        | {"regions": st.lists(st.dictionaries(st.sampled_from(REGION_KEYS), values, max_size=4), max_size=3)},
    ),
)
YAML_PIECES = [
    "prompt:", "prompt: a room", "regions:", "box:", "width: 96", "steps: 2", "- ", "  ", "\n", "\n", " ", ":",
    "[", "]", "{", "}", ",", "&a ", "*a", "*b", "!!str ", "!!python/name:os.system", "!custom ", "---",
    "...", "\t", '"', "'", "\\", "#", "|", ">", "?", "%YAML 1.1", "%TAG ! tag:x,2000:", "<<: ", "0x1F", "1e400",
    ".nan", "~", "null", "yes", "2001-12-14", "!!binary ", "!!null ", "!!map ", "!!seq ", "!!set ", "!!omap ",
    "\x00", "\x1b", "\ufeff", "\u2028", "é", "🐱",
]
raw_files = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300),
    st.lists(st.sampled_from(YAML_PIECES), max_size=40).map("".join),
).filter(no_core_tag)


def assert_scene_or_scene_error(path: Path):
    """load_scene(path) -> a Scene, or a SceneError whose every problem starts with the file's path."""
    try:
        scene = load_scene(path)
    except SceneError as exc:
        assert exc.problems, "a SceneError with no problem"
        for problem in exc.problems:
            assert isinstance(problem, str) and problem.startswith(str(path)), problem
        return None
    assert isinstance(scene, Scene)
    return scene


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=documents, allow_unicode=st.booleans())
def test_load_scene_on_random_yaml_values(document, allow_unicode):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "scene.yaml"
        path.write_text(yaml.safe_dump(document, allow_unicode=allow_unicode), encoding="utf-8")
        assert_scene_or_scene_error(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=raw_files)
def test_load_scene_on_random_text_and_bytes(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "scene.yaml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        assert_scene_or_scene_error(path)


BASE_SCENE = {
    "prompt": "a cozy living room",
    "width": 96,
    "height": 64,
    "steps": 2,
    "seed": 3,
    "regions": [
        {"prompt": "a red sofa", "box": [16, 16, 80, 64]},
        {"prompt": "a lamp", "mask": "lamp.png"},
    ],
}
MASKS = [
    "lamp.png", "black.png", "notes.txt", "folder", "folder/", "missing.png", "folder/missing.png",
    "lamp.png/inside.png", ".", "..", "", " ", "scene.yaml", "/", "/nonexistent/mask.png", "/dev/null",
    "~", "~/surely-not-here.png", "FOLDER_ABS", "LAMP_ABS",
]
box_items = st.one_of(
    st.integers(-200, 300), st.integers(-BIG, BIG), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), texts,
)
OPS = ["drop", "set", "unknown", "drop_region_key", "set_region", "unknown_region_key", "box", "mask",
       "box_and_mask", "regions", "append_region"]
RAW_SUFFIXES = ["", "", "", "prompt: twice\n", "---\nprompt: b\n", "width: 96\n", "regions: []\n", "\t\n", "%%%\n"]


@st.composite
def mutated_scenes(draw):
    """The valid BASE_SCENE with 1-3 random mutations, as YAML text."""
    scene = copy.deepcopy(BASE_SCENE)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(OPS))
        regions = scene.get("regions") if isinstance(scene, dict) else None
        dicts = [r for r in regions if isinstance(r, dict)] if isinstance(regions, list) else []
        region = draw(st.sampled_from(dicts)) if dicts else None
        if op == "drop" and scene:
            del scene[draw(st.sampled_from(list(scene)))]
        elif op == "set":
            scene[draw(st.sampled_from(SCENE_KEYS))] = draw(values)
        elif op == "unknown":
            typo = st.sampled_from(["widht", "promt", "region", "Prompt", "seeds"])
            scene[draw(st.one_of(texts, typo))] = draw(values)
        elif op == "regions":
            scene["regions"] = draw(values)
        elif op == "append_region":
            scene["regions"] = (regions if isinstance(regions, list) else []) + [
                draw(st.one_of(values, st.dictionaries(st.sampled_from(REGION_KEYS), values, max_size=4)))
            ]
        elif region is None:
            continue
        elif op == "drop_region_key" and region:
            del region[draw(st.sampled_from(list(region)))]
        elif op == "set_region":
            region[draw(st.sampled_from(REGION_KEYS))] = draw(values)
        elif op == "unknown_region_key":
            region[draw(texts)] = draw(values)
        elif op == "box":
            region["box"] = draw(st.one_of(
                st.lists(box_items, max_size=6),
                st.lists(st.integers(-200, 300), min_size=4, max_size=4),
            ))
        elif op == "mask":
            region["mask"] = draw(st.one_of(st.sampled_from(MASKS), texts))
        elif op == "box_and_mask":
            region["box"], region["mask"] = [0, 0, 48, 48], "lamp.png"
    return yaml.safe_dump(scene, allow_unicode=draw(st.booleans())) + draw(st.sampled_from(RAW_SUFFIXES))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=mutated_scenes())
def test_mutated_scenes_exit_0_or_2_in_load_scene_and_validate(text):
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        write_mask(folder / "lamp.png")
        write_mask(folder / "black.png", white=None)
        (folder / "notes.txt").write_text("not an image")
        (folder / "folder").mkdir()
        text = text.replace("FOLDER_ABS", str(folder / "folder")).replace("LAMP_ABS", str(folder / "lamp.png"))
        path = folder / "scene.yaml"
        path.write_text(text, encoding="utf-8")

        scene = assert_scene_or_scene_error(path)
        result = run("validate", path)
        assert no_crash(result), (result.exception, result.output)
        assert result.exit_code == (0 if scene is not None else 2), result.output
        if result.exit_code == 2:
            assert lines(result.stderr), "exit 2 with nothing on stderr"
            assert lines(result.stderr)[0].startswith(str(path)), result.stderr
            assert result.stdout == ""
        else:
            assert result.stdout.startswith(f"{path}: ok")


KNOWN_CRASHERS = {
    "box-int-beyond-float": (
        "prompt: p\nwidth: 96\nheight: 64\nregions:\n  - prompt: a\n    box: [0, 0, 1" + "0" * 400 + ", 50]\n",
        "regions[0].box",
    ),
    "box-negative-int-beyond-float": (
        "prompt: p\nwidth: 96\nheight: 64\nregions:\n  - prompt: a\n    box: [-1" + "0" * 400 + ", 0, 50, 50]\n",
        "regions[0].box",
    ),
    "deep-nesting": ("prompt: " + "[" * 5000 + "]" * 5000 + "\n", "YAML"),
    "mask-name-too-long": ("prompt: p\nregions:\n  - prompt: a\n    mask: " + "m" * 300 + ".png\n", "regions[0].mask"),
    "int-tag-on-text": ("prompt: p\nwidth: !!int 96px\n", "width"),
    "empty-int-tag": ("prompt: p\nseed: !!int\n", "seed"),
    "bool-tag-on-text": ("prompt: p\ntiled_decode: !!bool maybe\n", "tiled_decode"),
    "timestamp-tag-on-text": ("prompt: p\nseed: !!timestamp tomorrow\n", "seed"),
    "mask-unknown-user": ("prompt: p\nregions:\n  - prompt: a\n    mask: ~no-such-user-xyz/m.png\n", "regions[0].mask"),
}


@pytest.mark.parametrize("text, field", list(KNOWN_CRASHERS.values()), ids=list(KNOWN_CRASHERS))
def test_hostile_scenes_are_reported_not_crashed_on(write_scene, text, field):
    path = write_scene(text)
    result = run("validate", path)
    assert no_crash(result), repr(result.exception)
    assert result.exit_code == 2
    assert lines(result.stderr)[0].startswith(str(path)) and field in result.stderr


ONE_LINE_CASES = {
    "control-character": "prompt: a room\x1b[31m\n",
    "newline-in-unknown-key": 'prompt: a room\n"wid\\nth": 96\n',
    "newline-in-mask-path": 'prompt: a room\nregions:\n  - prompt: r\n    mask: "lamp\\n.png"\n',
}


@pytest.mark.parametrize("text", list(ONE_LINE_CASES.values()), ids=list(ONE_LINE_CASES))
def test_every_problem_is_one_line_naming_the_file(write_scene, text):
    path = write_scene(text)
    result = run("validate", path)
    assert result.exit_code == 2 and no_crash(result)
    assert all(re.match(rf"{re.escape(str(path))}:\d+: ", line) for line in lines(result.stderr)), result.stderr


# --- 2. Ctrl-C -------------------------------------------------------------------------------------------


def partial_then(exc: BaseException, monkeypatch):
    """Make PNG saving write half the file into its handle, then raise `exc` (Ctrl-C, a full disk)."""
    real_save = Image.Image.save

    def save(self, fp, format=None, **params):
        if not hasattr(fp, "write"):
            return real_save(self, fp, format, **params)
        buffer = io.BytesIO()
        real_save(self, buffer, format, **params)
        fp.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise exc

    monkeypatch.setattr(Image.Image, "save", save)


@pytest.mark.parametrize("where", ["before-writing", "while-writing", "second-of-a-batch"])
def test_ctrl_c_exits_130_and_leaves_no_partial_file(write_scene, tmp_path, monkeypatch, where):
    scene = write_scene(SMALL)
    out_dir = tmp_path / "out"
    if where == "while-writing":
        partial_then(KeyboardInterrupt(), monkeypatch)
    else:
        real, calls = batch_module.render, []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if where == "before-writing" or len(calls) == 2:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(batch_module, "render", interrupted)
    extra = ["--seeds", "0-1"] if where == "second-of-a-batch" else []
    result = render(scene, "--output-dir", out_dir, *extra)
    assert result.exit_code == 130, result.output
    assert no_crash(result)
    assert len(lines(result.stderr)) == 1 and "interrupted" in result.stderr, result.stderr
    assert temporaries(out_dir) == []
    if where == "second-of-a-batch":  # the finished picture stays, whole
        assert pngs(out_dir) == ["scene-0.png"] and read_metadata(out_dir / "scene-0.png")["scene"]["seed"] == 0
        assert result.stdout.strip() == str(out_dir / "scene-0.png")
    else:
        assert pngs(out_dir) == [] and result.stdout == ""


@pytest.mark.parametrize("existing", [False, True])
def test_ctrl_c_inside_write_atomic_leaves_no_temporary_and_no_target(tmp_path, existing):
    target = tmp_path / "pic.png"
    if existing:
        target.write_bytes(b"the old picture")

    def write(handle):
        handle.write(b"half a picture")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, write)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["pic.png"] if existing else [])
    if existing:
        assert target.read_bytes() == b"the old picture"


# --- 3. unwritable output --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["output-dir-under-a-file", "output-under-a-file"])
def test_unwritable_output_fails_before_the_model_loads(write_scene, tmp_path, no_model_load, how):
    scene = write_scene(SMALL)
    blocker = tmp_path / "a-file"
    blocker.write_text("I am a file, not a folder")
    if how == "output-dir-under-a-file":
        folder = blocker / "out"
        result = render(scene, "--output-dir", folder)
    else:
        folder = blocker  # the target's folder
        result = render(scene, "-o", blocker / "x.png")
    assert result.exit_code == 1, result.output
    assert no_crash(result)
    assert no_model_load == []
    [line] = lines(result.stderr)
    assert re.match(rf"error: .*{re.escape(str(folder))}: \S", line), line  # the path, then the reason
    assert result.stdout == ""
    assert blocker.read_text() == "I am a file, not a folder"


def test_read_only_output_dir_fails_before_the_model_loads(write_scene, tmp_path, no_model_load):
    scene = write_scene(SMALL)
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user (root?) can write to a 0o500 folder anyway")
        result = render(scene, "--output-dir", folder)
        assert result.exit_code == 1 and no_crash(result), result.output
        assert no_model_load == []
        [line] = lines(result.stderr)
        assert line.startswith("error:") and str(folder) in line and "Permission denied" in line, line
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


# --- 4. disk full ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["write", "fsync"])
@pytest.mark.parametrize("existing", [False, True])
def test_disk_full_exits_1_and_leaves_no_partial_file(write_scene, tmp_path, monkeypatch, where, existing):
    scene = write_scene(SMALL)
    out_dir = tmp_path / "out"
    target = out_dir / "scene-3.png"
    old = None
    if existing:
        assert render(scene, "--output-dir", out_dir).exit_code == 0
        old = target.read_bytes()
    full = OSError(errno.ENOSPC, "No space left on device")
    if where == "write":
        partial_then(full, monkeypatch)
    else:
        def fsync(fd):
            raise full

        monkeypatch.setattr(os, "fsync", fsync)
    # --overwrite: the new picture replaces the existing one (else it would take a free name beside it)
    result = render(scene, "--output-dir", out_dir, "--steps", "3", *(["--overwrite"] if existing else []))
    assert result.exit_code == 1 and no_crash(result), result.output
    [line] = lines(result.stderr)
    assert line.startswith(f"error: cannot write {target}: ") and "no space left on the device" in line, line
    assert result.stdout == ""
    assert temporaries(out_dir) == []
    if existing:
        assert pngs(out_dir) == ["scene-3.png"] and target.read_bytes() == old
    else:
        assert list(out_dir.iterdir()) == []


# --- 5. NaN latents --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_nan_latents_stop_at_their_step_and_write_nothing(write_scene, tmp_path, monkeypatch, unet_doubles, dtype):
    real = random_weights_module.build_tiny_random

    def nan_model(seed: int = 0):
        components = real(seed)
        components.unet = unet_doubles.NaN(components.unet, good_calls=1)  # one UNet call per step on this canvas
        return components

    monkeypatch.setattr(random_weights_module, "build_tiny_random", nan_model)  # what `--model tiny-random` loads
    scene = write_scene(SMALL)
    out_dir = tmp_path / "out"
    result = render(scene, "--output-dir", out_dir, "--steps", "3", "--dtype", dtype, "--preview-every", "2")
    assert result.exit_code == 1 and no_crash(result), result.output
    [line] = lines(result.stderr)
    assert line.startswith("error:") and "NaN" in line and "step 2 of 3" in line, line
    assert dtype in line and "Nothing was written" in line, line
    if dtype == "float16":
        assert "--dtype bfloat16 or float32" in line, line
    else:  # float32 does not overflow: a cause other than the dtype
        assert "weights" in line, line
    assert result.stdout == ""
    assert pngs(out_dir) == [] and temporaries(out_dir) == []  # no black picture, and no step-2 preview


# --- 6. --skip-existing ----------------------------------------------------------------------------------


def test_skip_existing_leaves_the_file_alone_and_loads_no_model(write_scene, tmp_path, request):
    scene = write_scene(SMALL)
    out_dir = tmp_path / "out"
    target = out_dir / "scene-3.png"
    assert render(scene, "--output-dir", out_dir).exit_code == 0
    before, stamp = target.read_bytes(), target.stat().st_mtime_ns

    loads = request.getfixturevalue("no_model_load")  # from here on, loading a model fails the test
    result = render(scene, "--output-dir", out_dir, "--skip-existing")
    assert result.exit_code == 0 and no_crash(result), result.output
    assert loads == []
    assert f"skipped {target}: already rendered" in result.stderr
    assert target.read_bytes() == before and target.stat().st_mtime_ns == stamp
    assert pngs(out_dir) == ["scene-3.png"] and temporaries(out_dir) == []


def test_skip_existing_renders_again_when_the_settings_differ(write_scene, tmp_path, render_calls):
    scene = write_scene(SMALL)
    out_dir = tmp_path / "out"
    target = out_dir / "scene-3.png"
    assert render(scene, "--output-dir", out_dir).exit_code == 0
    assert read_metadata(target)["scene"]["steps"] == 2
    result = render(scene, "--output-dir", out_dir, "--skip-existing", "--steps", "3")
    assert result.exit_code == 0 and no_crash(result), result.output
    assert "skipped" not in result.stderr
    again = out_dir / "scene-3-2.png"  # a free name: the earlier picture stays
    assert result.stdout.strip() == str(again)
    assert render_calls == [3, 3]
    assert read_metadata(again)["scene"]["steps"] == 3 and read_metadata(target)["scene"]["steps"] == 2


def test_skip_existing_in_a_batch_renders_only_the_missing_seeds(write_scene, tmp_path, render_calls):
    scene = write_scene(SMALL)
    out_dir = tmp_path / "out"
    assert render(scene, "--output-dir", out_dir, "--seed", "1").exit_code == 0
    middle = out_dir / "scene-1.png"
    before, stamp = middle.read_bytes(), middle.stat().st_mtime_ns
    render_calls.clear()

    result = render(scene, "--output-dir", out_dir, "--seeds", "0-2", "--skip-existing")
    assert result.exit_code == 0 and no_crash(result), result.output
    assert render_calls == [0, 2]
    assert lines(result.stdout) == [str(out_dir / "scene-0.png"), str(out_dir / "scene-2.png")]
    assert f"skipped {middle}: already rendered" in result.stderr
    assert middle.read_bytes() == before and middle.stat().st_mtime_ns == stamp
    assert pngs(out_dir) == ["scene-0.png", "scene-1.png", "scene-2.png"]
    assert [read_metadata(out_dir / f"scene-{s}.png")["scene"]["seed"] for s in range(3)] == [0, 1, 2]


# --- 7. --allow-pickle -----------------------------------------------------------------------------------


@pytest.fixture
def pickle_model(tmp_path):
    """A tiny diffusers folder whose UNet has only pickle (.bin) weights."""
    folder = tmp_path / "pickled-model"
    components = build_tiny_random()
    save_model(components, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    components.unet.save_pretrained(folder / "unet", safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").exists()
    return folder


def test_pickle_weights_are_refused_without_allow_pickle(write_scene, tmp_path, monkeypatch, pickle_model):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on a pickle"))
    scene = write_scene(SMALL)
    out_dir = tmp_path / "out"
    result = run("render", scene, "--model", pickle_model, "--output-dir", out_dir, "-q")
    assert result.exit_code == 1 and no_crash(result), result.output
    [line] = lines(result.stderr)
    assert line.startswith("error:") and str(pickle_model / "unet") in line, line
    assert "no .safetensors weights (only pickle weights: diffusion_pytorch_model.bin)" in line, line
    assert "--allow-pickle" in line, line
    assert pngs(out_dir) == [] and result.stdout == ""


def test_pickle_weights_load_with_allow_pickle(write_scene, tmp_path, pickle_model):
    scene = write_scene(SMALL)
    out_dir = tmp_path / "out"
    result = run("render", scene, "--model", pickle_model, "--output-dir", out_dir, "-q", "--allow-pickle")
    # Not no_crash(): diffusers logs an error while it looks for safetensors first (see the xfail test below),
    # and its log handler may hold the stderr of an earlier CliRunner call, closed by now ("Logging error").
    assert result.exit_code == 0 and result.exception is None, result.output
    assert result.stdout.strip() == str(out_dir / "scene-3.png")
    assert pngs(out_dir) == ["scene-3.png"]
    recorded = read_metadata(out_dir / "scene-3.png")["model"]  # relative to the picture's folder
    assert (out_dir / recorded).resolve() == Path(pickle_model).resolve() and not Path(recorded).is_absolute()


class LogRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_allow_pickle_renders_without_a_spurious_error_log(write_scene, tmp_path, pickle_model):
    scene = write_scene(SMALL)
    out_dir = tmp_path / "out"
    heard = LogRecords()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in loggers:  # diffusers' own loggers do not propagate to the root logger (caplog)
        logger.addHandler(heard)
    try:
        result = run("render", scene, "--model", pickle_model, "--output-dir", out_dir, "-q", "--allow-pickle")
    finally:
        for logger in loggers:
            logger.removeHandler(heard)
    assert result.exit_code == 0 and pngs(out_dir) == ["scene-3.png"]
    shown = [r.getMessage() for r in heard.records if r.levelno >= logging.ERROR]  # printed at verbosity "error"
    assert shown == []


# --- 8. memory estimate ----------------------------------------------------------------------------------


def canvas(width: int, height: int, **more) -> Scene:
    return Scene.model_validate({"prompt": "p", "width": width, "height": height, **more})


SIZES = [(128, 128), (256, 256), (512, 512), (1024, 512), (2048, 1024)]


def test_estimate_decode_grows_with_the_canvas_untiled_and_stays_flat_tiled(tiny):
    untiled = [estimate_bytes(canvas(w, h), tiny, 1, tiled=False)["decode"] for w, h in SIZES]
    tiled = [estimate_bytes(canvas(w, h), tiny, 1, tiled=True)["decode"] for w, h in SIZES]
    assert all(a < b for a, b in zip(untiled, untiled[1:])), untiled
    assert untiled[-1] == pytest.approx(untiled[0] * (2048 * 1024) / (128 * 128), rel=1e-3)  # per pixel
    assert len(set(tiled)) == 1 and tiled[0] > 0
    assert tiled[0] < untiled[-1]


def test_estimate_unet_grows_with_samples_per_call_not_with_the_canvas_past_one_view(tiny):
    unet = [estimate_bytes(canvas(512, 512), tiny, n, tiled=False)["unet"] for n in (1, 2, 4, 16)]
    assert unet == [unet[0] * n for n in (1, 2, 4, 16)] and unet[0] > 0
    by_size = [estimate_bytes(canvas(w, h), tiny, 4, tiled=True)["unet"] for w, h in SIZES]
    assert by_size[0] < by_size[1] < by_size[2] == by_size[3] == by_size[4]  # views are model-sized (512 px)


def test_not_enough_memory_exits_2_before_rendering(write_scene, tmp_path, monkeypatch, render_calls):
    # too little for even one UNet sample, however `max_batch: auto` (which reads the same free memory) splits
    monkeypatch.setattr("multidiff_cli.models.device.available_bytes", lambda device: 2**18)
    scene = write_scene(SMALL)
    out_dir = tmp_path / "out"
    result = render(scene, "--output-dir", out_dir)
    assert result.exit_code == 2 and no_crash(result), result.output
    [line] = lines(result.stderr)
    assert ("GiB" in line or "MiB" in line) and "--no-memory-check" in line and "96x64" in line, line
    assert render_calls == [] and pngs(out_dir) == [] and result.stdout == ""

    result = render(scene, "--output-dir", out_dir, "--no-memory-check")
    assert result.exit_code == 0 and no_crash(result), result.output
    assert render_calls == [3] and pngs(out_dir) == ["scene-3.png"]


def test_unknown_free_memory_does_not_block_a_render(write_scene, tmp_path, monkeypatch):
    monkeypatch.setattr("multidiff_cli.models.device.available_bytes", lambda device: None)  # as on MPS
    result = render(write_scene(SMALL), "--output-dir", tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_memory_check_counts_the_samples_a_step_really_runs(write_scene, tmp_path, monkeypatch, tiny):
    path = write_scene(SMALL)
    scene = load_scene(path)
    largest_real_call = estimate_bytes(scene, tiny, 4, tiled=False)  # cond + uncond for the global prompt and region
    free = 2 * max(largest_real_call.values())  # twice what the largest real call needs
    monkeypatch.setattr("multidiff_cli.models.device.available_bytes", lambda device: free)
    result = render(path, "--output-dir", tmp_path / "out")
    assert result.exit_code == 0, result.stderr


# --- 9. safe loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        'prompt: !!python/object/apply:os.system ["touch PWNED"]\n',
        'prompt: !!python/object/new:os.system ["touch PWNED"]\n',
        '!!python/object/apply:os.system ["touch PWNED"]\n',
        "prompt: a room\nregions:\n  - prompt: !!python/object/apply:subprocess.call [[touch, PWNED]]\n"
        "    box: [0, 0, 8, 8]\n",
        "prompt: !!python/name:os.system\n",
    ],
    ids=["apply", "new", "whole-document", "in-a-region", "name"],
)
@pytest.mark.parametrize("command", ["render", "validate"])
def test_python_yaml_tags_are_refused_and_run_nothing(tmp_path, monkeypatch, no_model_load, text, command):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    result = render(path, "--output-dir", tmp_path / "out") if command == "render" else run("validate", path)
    assert result.exit_code == 2 and no_crash(result), result.output
    assert not (tmp_path / "PWNED").exists()
    assert re.match(rf"{re.escape(str(path))}:\d+(:\d+)?: YAML error: .*python", lines(result.stderr)[0]), result.stderr
    assert no_model_load == [] and pngs(tmp_path) == []


# --- 10. Unicode prompts ---------------------------------------------------------------------------------

PROMPTS = {
    "chinese": "一只猫坐在窗台上，水墨画",
    "emoji": "a cat astronaut 🐱🚀👩🏽‍🚀 on the moon 🌕",
    "arabic": "قطة على حافة النافذة",
    "hebrew-mixed": "חתול on a windowsill, שמש 123",
    "combining": "cafe\u0301 au lait, Å, ﬁne",
}


@pytest.mark.parametrize("prompt", list(PROMPTS.values()), ids=list(PROMPTS))
def test_unicode_prompts_render_and_round_trip_through_the_metadata(tmp_path, prompt):
    scene = {
        "prompt": prompt, "negative_prompt": prompt[::-1], "style": f"《{prompt[:3]}》", "width": 96, "height": 64,
        "steps": 2, "seed": 5, "regions": [{"prompt": f"{prompt} — 区域", "box": [0, 0, 48, 64]}],
    }
    path = tmp_path / "场景 ✨.yaml"
    path.write_text(yaml.safe_dump(scene, allow_unicode=True), encoding="utf-8")
    out_dir = tmp_path / "out"
    result = render(path, "--output-dir", out_dir)
    assert result.exit_code == 0 and no_crash(result), result.output
    target = out_dir / "场景 ✨-5.png"
    assert result.stdout.strip() == str(target)
    recorded = read_metadata(target)["scene"]
    assert recorded["prompt"] == prompt
    assert recorded["negative_prompt"] == prompt[::-1]
    assert recorded["style"] == f"《{prompt[:3]}》"
    assert recorded["regions"][0]["prompt"] == f"{prompt} — 区域"
    with Image.open(target) as image:
        assert image.text["parameters"].splitlines()[0] == f"{prompt}, 《{prompt[:3]}》"  # as used: the style appended
    shown = run("inspect", target, "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["scene"]["prompt"] == prompt


def test_a_lone_surrogate_in_a_prompt_is_a_scene_error(write_scene, tmp_path):
    path = write_scene('prompt: "\\ud800 cat"\nwidth: 96\nheight: 64\nsteps: 2\nseed: 1\n')
    result = render(path, "--output-dir", tmp_path / "out")
    assert no_crash(result), repr(result.exception)
    assert result.exit_code == 2 and lines(result.stderr)[0].startswith(f"{path}:1: prompt:"), result.stderr


# --- 11. several YAML documents --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, line",
    [
        ("prompt: a room\n---\nprompt: a garden\n", 2),
        ("prompt: a room\nwidth: 96\n---\n", 3),
        ("---\nprompt: a room\n...\n---\nprompt: a garden\n", 4),
    ],
    ids=["two-documents", "trailing-separator", "explicit-ends"],
)
@pytest.mark.parametrize("command", ["render", "validate"])
def test_several_yaml_documents_exit_2_with_a_line_number(write_scene, tmp_path, no_model_load, text, line, command):
    path = write_scene(text)
    result = render(path, "--output-dir", tmp_path / "out") if command == "render" else run("validate", path)
    assert result.exit_code == 2 and no_crash(result), result.output
    [problem] = lines(result.stderr)
    assert re.match(rf"{re.escape(str(path))}:{line}:\d+: YAML error: .*single document", problem), problem
    assert no_model_load == [] and result.stdout == ""


def test_one_explicit_document_is_fine(write_scene):
    path = write_scene("---\n" + SMALL + "...\n")
    result = run("validate", path)
    assert result.exit_code == 0, result.output
