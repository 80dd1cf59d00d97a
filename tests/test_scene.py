"""Scene files: what load_scene accepts, and the one `file:line: field: message` it prints for each mistake.

Every scene is written to a folder of its own and read with the CWD elsewhere, so a mask path
that is resolved against the CWD instead of the scene file's folder fails here.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from multidiff_cli.errors import SceneError
from multidiff_cli.scene import Scene, load_scene

DEFAULTS = {
    "prompt": "x",
    "negative_prompt": "",
    "style": "",
    "width": 512,
    "height": 512,
    "steps": 50,
    "bootstrap_steps": 10,  # round(50 / 5)
    "guidance_scale": 7.5,
    "true_cfg_scale": None,
    "seed": None,
    "scheduler": "ddim",
    "model": None,
    "model_config": None,  # configs of a single-file model; `loras` ([]) is left out of a dump when empty
    "vae": None,
    "view_stride": 64,
    "wrap": "none",
    "tiled_decode": "auto",
    "few_step": "auto",
    "max_batch": None,
    "init_image": None,  # no picture to start from: text-to-image
    "strength": None,
    "keep": None,
    "regions": [],
}

# Two regions, so an error in the second shows it is `regions[1]`, not the first one or `regions`.
# Line 5 is the second region's first line; its next key is on line 6.
TWO_REGIONS = """\
prompt: x
regions:
  - prompt: first
    box: [0, 0, 64, 64]
  - prompt: second
"""

FULL_SCENE = """\
prompt: a cozy living room
negative_prompt: blurry
style: oil painting
width: 768
height: 384
steps: 30
bootstrap_steps: 5
guidance_scale: 9.5
seed: 1234
scheduler: euler-a
model: tiny-random
regions:
  - prompt: a red sofa
    box: [0, 128, 384, 384]
    negative_prompt: a blue sofa
    guidance_scale: 5.0
  - prompt: a window
    mask: masks/left.png
"""


def make_mask(path: Path, size=(64, 64), white=None) -> Path:
    """A grey mask PNG: black, with the box `white` (x0, y0, x1, y1) in white."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("L", size, 0)
    if white:
        image.paste(255, white)
    image.save(path)
    return path


@pytest.fixture
def scene_dir(tmp_path, monkeypatch):
    """A scenes/ folder with mask files good and bad, and the CWD moved somewhere else."""
    scenes = tmp_path / "scenes"
    make_mask(scenes / "masks" / "left.png", white=(0, 0, 32, 64))
    make_mask(scenes / "masks" / "black.png")
    make_mask(scenes / "masks" / "speck.png", size=(512, 512), white=(0, 0, 1, 1))  # misses every cell centre
    (scenes / "masks" / "notes.png").write_text("not a PNG at all\n")
    (scenes / "masks" / "folder.png").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return scenes


@pytest.fixture
def scene_file(scene_dir):
    """Write a scene (str as UTF-8, bytes as they are) into scene_dir and return its path."""

    def write(content: str | bytes, name: str = "scene.yaml") -> Path:
        path = scene_dir / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    return write


def problems_of(path: Path, overrides=None) -> list[str]:
    with pytest.raises(SceneError) as caught:
        load_scene(path, overrides)
    assert caught.value.problems, "a SceneError must carry at least one problem line"
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def split_problem(path: Path, problem: str) -> tuple[str, str, str]:
    """`file:12: regions[1].box: message` -> ("12", "regions[1].box", "message")."""
    assert problem.startswith(f"{path}:"), problem
    line, field, message = problem.removeprefix(f"{path}:").split(": ", 2)
    return line, field, message


# --- good scenes ---------------------------------------------------------------------------------------------


def test_a_minimal_scene_gets_every_default(scene_file):
    scene = load_scene(scene_file("prompt: x\n"))
    assert scene.model_dump() == DEFAULTS


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param("prompt: x\n", DEFAULTS, id="minimal"),
        pytest.param(
            FULL_SCENE,
            {
                "prompt": "a cozy living room",
                "negative_prompt": "blurry",
                "style": "oil painting",
                "width": 768,
                "height": 384,
                "steps": 30,
                "bootstrap_steps": 5,
                "guidance_scale": 9.5,
                "true_cfg_scale": None,
                "seed": 1234,
                "scheduler": "euler-a",
                "model": "tiny-random",
                "regions": [
                    {"prompt": "a red sofa", "box": [0, 128, 384, 384], "negative_prompt": "a blue sofa", "guidance_scale": 5.0},
                    {"prompt": "a window", "mask": "masks/left.png"},
                ],
            },
            id="every-key",
        ),
        pytest.param(
            "prompt: 一只猫坐在窗台上\nregions:\n  - prompt: 红色的沙发\n    box: [0, 0, 256, 256]\n",
            {"prompt": "一只猫坐在窗台上", "regions": [{"prompt": "红色的沙发", "box": [0, 0, 256, 256]}]},
            id="chinese",
        ),
        pytest.param(
            "prompt: 🐱 on a 🛋️\nnegative_prompt: 🌧️\n",
            {"prompt": "🐱 on a 🛋️", "negative_prompt": "🌧️"},
            id="emoji",
        ),
        pytest.param("\ufeffprompt: x\n", {"prompt": "x"}, id="utf8-bom"),
        pytest.param("prompt: x\nbootstrap_steps: 0\n", {"steps": 50, "bootstrap_steps": 0}, id="bootstrap-0"),
        pytest.param("prompt: x\nsteps: 20\n", {"steps": 20, "bootstrap_steps": 4}, id="bootstrap-follows-steps"),
        pytest.param("prompt: x\nguidance_scale: 7\n", {"guidance_scale": 7.0}, id="int-guidance"),
        pytest.param("prompt: x\nseed: 0\n", {"seed": 0}, id="seed-0"),
        pytest.param("prompt: x\nwidth: 64\nheight: 8192\n", {"width": 64, "height": 8192}, id="size-limits"),
        pytest.param(
            "prompt: x\nregions:\n  - prompt: a window\n    mask: masks/left.png\n",
            {"regions": [{"prompt": "a window", "mask": "masks/left.png"}]},
            id="mask-relative-to-scene",
        ),
    ],
)
def test_good_scenes_load(scene_file, text, expected):
    scene = load_scene(scene_file(text))
    got = scene.model_dump(exclude_none=True)
    expected = {k: v for k, v in expected.items() if v is not None}
    assert {k: got.get(k) for k in expected} == expected
    assert isinstance(scene.guidance_scale, float)
    assert not [note for note in scene.warnings if "extends past" in note]  # nothing clipped


def test_mask_paths_resolve_against_the_scene_folder_not_the_cwd(scene_file, scene_dir):
    scene = load_scene(scene_file("prompt: x\nregions:\n  - prompt: a window\n    mask: masks/left.png\n"))
    assert Path.cwd() != scene_dir
    assert scene.base_dir == scene_dir.resolve()
    assert scene.path_of(scene.regions[0].mask) == scene_dir.resolve() / "masks" / "left.png"
    assert scene.path_of(scene.regions[0].mask).is_file()


@pytest.mark.parametrize("steps, bootstrap", [(50, 10), (20, 4), (1, 0), (3, 1), (8, 2), (13, 3), (1000, 200)])
def test_default_bootstrap_is_a_fifth_of_the_steps_rounded(scene_file, steps, bootstrap):
    assert load_scene(scene_file(f"prompt: x\nsteps: {steps}\n")).bootstrap_steps == bootstrap


# --- bad scenes ----------------------------------------------------------------------------------------------

REGION_TYPE = "a region needs exactly one of"


@pytest.mark.parametrize(
    "content, line, field, text",
    [
        # YAML itself: line:col, no field
        pytest.param("prompt: x\nsteps: [1, 2\nwidth: 64\n", "3:6", None, "YAML error", id="yaml-syntax"),
        pytest.param("prompt: x\n  steps: 3\n", "2:8", None, "mapping values are not allowed", id="yaml-indent"),
        pytest.param("prompt: x\n\tsteps: 3\n", "2:1", None, "'\\t'", id="yaml-tab"),
        pytest.param(
            'prompt: x\nseed: !!python/object/apply:os.system ["echo hi"]\n',
            "2:7", None, "could not determine a constructor", id="python-tag",
        ),
        pytest.param(b"prompt: caf\xe9\n", "1", None, "not UTF-8 text (byte 0xe9)", id="latin-1"),
        pytest.param(b"prompt: x\nstyle: ok\nnegative_prompt: caf\xe9\n", "3", None, "not UTF-8", id="latin-1-line-3"),
        # the document's shape
        pytest.param("- prompt: x\n", "1", None, "got a list", id="list-document"),
        pytest.param("just a sentence\n", "1", None, "got a str", id="string-document"),
        pytest.param("", None, None, "the scene is empty", id="empty"),
        pytest.param("# only a comment\n\n", None, None, "the scene is empty", id="only-comments"),
        pytest.param("prompt: x\nsteps: 3\nprompt: y\n", "3", "prompt", "more than once", id="duplicate-key"),
        pytest.param(
            TWO_REGIONS + "    box: [0, 0, 64, 64]\n    box: [0, 0, 32, 32]\n",
            "7", "regions[1].box", "more than once", id="duplicate-region-key",
        ),
        # types, taken as written
        pytest.param("steps: 3\n", "1", "prompt", "required", id="no-prompt"),
        pytest.param("prompt: '   '\n", "1", "prompt", "must not be empty", id="blank-prompt"),
        pytest.param("prompt: [a, b]\n", "1", "prompt", "valid string", id="list-prompt"),
        pytest.param("prompt: 2024\n", "1", "prompt", "valid string (got 2024)", id="int-prompt"),
        pytest.param('prompt: x\nsteps: "50"\n', "2", "steps", "valid integer (got '50')", id="string-steps"),
        pytest.param("prompt: x\nsteps: 12.5\n", "2", "steps", "valid integer", id="float-steps"),
        pytest.param("prompt: x\nseed: true\n", "2", "seed", "valid integer (got True)", id="bool-seed"),
        pytest.param("prompt: x\nseed: -1\n", "2", "seed", "greater than or equal to 0", id="negative-seed"),
        pytest.param("prompt: x\nguidance_scale: true\n", "2", "guidance_scale", "valid number", id="bool-guidance"),
        pytest.param("prompt: x\nguidance_scale: .nan\n", "2", "guidance_scale", "finite number, got nan", id="nan"),
        pytest.param("prompt: x\nguidance_scale: .inf\n", "2", "guidance_scale", "finite number, got inf", id="inf"),
        pytest.param("prompt: x\nguidance_scale: -.inf\n", "2", "guidance_scale", "finite number", id="minus-inf"),
        # ranges
        pytest.param("prompt: x\nwidth: 100\n", "2", "width", "multiple of 8 (the VAE's 8x8 latent cells): try 96", id="width-not-8"),
        pytest.param("prompt: x\nheight: 515\n", "2", "height", "try 512", id="height-not-8"),
        pytest.param("prompt: x\nwidth: -8\n", "2", "width", "greater than or equal to 64", id="negative-width"),
        pytest.param("prompt: x\nwidth: 0\n", "2", "width", "greater than or equal to 64", id="zero-width"),
        pytest.param("prompt: x\nheight: 8200\n", "2", "height", "less than or equal to 8192", id="huge-height"),
        pytest.param("prompt: x\nsteps: 0\n", "2", "steps", "greater than or equal to 1", id="steps-0"),
        pytest.param("prompt: x\nsteps: 100000\n", "2", "steps", "less than or equal to 1000", id="steps-100000"),
        pytest.param("prompt: x\nsteps: 20\nbootstrap_steps: 21\n", "3", "bootstrap_steps", "must be <= steps (20)", id="bootstrap-over-steps"),
        pytest.param("prompt: x\nbootstrap_steps: 51\n", "2", "bootstrap_steps", "must be <= steps (50)", id="bootstrap-over-default-steps"),
        pytest.param("prompt: x\nguidance_scale: 51\n", "2", "guidance_scale", "less than or equal to 50", id="guidance-51"),
        # regions
        pytest.param("prompt: x\nregions: [a]\n", "2", "regions[0]", "valid dictionary", id="region-not-a-mapping"),
        pytest.param(TWO_REGIONS + "    box: [0, 0, 64]\n", "6", "regions[1].box", "expected 4 numbers [x0, y0, x1, y1], got 3", id="box-3"),
        pytest.param(TWO_REGIONS + "    box: [0, 0, 64, 64, 1]\n", "6", "regions[1].box", "got 5", id="box-5"),
        pytest.param(TWO_REGIONS + "    box: [0, 0, 64.5, 64]\n", "6", "regions[1].box[2]", "valid integer", id="box-float"),
        pytest.param(TWO_REGIONS + "    box: [64, 0, 64, 64]\n", "6", "regions[1].box", "needs x0 < x1", id="box-x0-equals-x1"),
        pytest.param(TWO_REGIONS + "    box: [512, 0, 600, 64]\n", "6", "regions[1].box", "lies outside the 512x512 canvas", id="box-right-of-canvas"),
        pytest.param(TWO_REGIONS + "    box: [-100, -50, 0, 64]\n", "6", "regions[1].box", "lies outside", id="box-left-of-canvas"),
        pytest.param(TWO_REGIONS + "    box: [0, 0, 4, 4]\n", "6", "regions[1].box", "too small: it covers no 8x8-pixel latent cell", id="box-too-small"),
        pytest.param(TWO_REGIONS + "    box: [0, 0, 64, 64]\n    mask: masks/left.png\n", "5", "regions[1]", REGION_TYPE, id="box-and-mask"),
        pytest.param(TWO_REGIONS, "5", "regions[1]", REGION_TYPE, id="neither-box-nor-mask"),
        pytest.param(TWO_REGIONS + "    mask: masks/missing.png\n", "6", "regions[1].mask", "no such file", id="mask-missing"),
        pytest.param(TWO_REGIONS + "    mask: masks/folder.png\n", "6", "regions[1].mask", "is a directory, not an image", id="mask-is-a-directory"),
        pytest.param(TWO_REGIONS + "    mask: masks/notes.png\n", "6", "regions[1].mask", "is not an image Pillow can read", id="mask-not-an-image"),
        pytest.param(TWO_REGIONS + "    mask: masks/black.png\n", "6", "regions[1].mask", "the mask is empty", id="mask-all-black"),
        pytest.param(TWO_REGIONS + "    mask: masks/speck.png\n", "6", "regions[1].mask", "the mask is too small", id="mask-too-small"),
        pytest.param(TWO_REGIONS + "    mask: ''\n", "6", "regions[1].mask", "must not be empty", id="mask-empty-string"),
        pytest.param(
            TWO_REGIONS + "    box: [0, 0, 64, 64]\n    guidance_scale: .nan\n",
            "7", "regions[1].guidance_scale", "finite number", id="region-nan-guidance",
        ),
        # unknown names
        pytest.param("prompt: x\nsceduler: ddim\n", "2", "sceduler", "unknown key; did you mean `scheduler`?", id="key-typo"),
        pytest.param("prompt: x\nzzz: 1\n", "2", "zzz", "unknown key; known keys: prompt, negative_prompt", id="key-unknown"),
        pytest.param(TWO_REGIONS + "    bx: [0, 0, 64, 64]\n", "6", "regions[1].bx", "did you mean `box`?", id="region-key-typo"),
        pytest.param("prompt: x\nscheduler: euler_a\n", "2", "scheduler", "unknown scheduler 'euler_a'; choose one of ddim,", id="scheduler"),
    ],
)
def test_bad_scenes_give_one_problem_at_the_right_line_and_field(scene_file, content, line, field, text):
    path = scene_file(content)
    problems = problems_of(path)
    prefix = f"{path}:{line}:" if line else f"{path}: "
    wanted = [p for p in problems if p.startswith(prefix) and (field is None or f" {field}: " in p) and text in p]
    assert wanted, f"no problem starts with {prefix!r}, names {field!r} and says {text!r}:\n" + "\n".join(problems)
    assert len(problems) == 1, "one mistake, one problem (no cascade):\n" + "\n".join(problems)


@pytest.mark.parametrize("box", [[64, 0, 0, 64], [64, 0, 64, 64], [0, 64, 64, 0], [0, 64, 64, 64]])
def test_a_box_with_its_corners_swapped_or_empty_is_refused(scene_file, box):
    problems = problems_of(scene_file(TWO_REGIONS + f"    box: {box}\n"))
    assert len(problems) == 1 and "needs x0 < x1 and y0 < y1" in problems[0] and "regions[1]" in problems[0]


def test_a_missing_scene_file_or_a_folder_is_one_clear_problem(tmp_path):
    assert problems_of(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: no such scene file"]
    assert problems_of(tmp_path) == [f"{tmp_path}: is a directory, not a scene file"]


@contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in this (main) thread after `seconds` of wall time."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM")
def test_an_alias_bomb_is_refused_quickly(cli, scene_file):
    """10**9 strings if expanded, in unknown keys and in fields that are validated (regions, style)."""
    lines = ["prompt: x", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = scene_file("\n".join(lines) + "\nregions: [*a8]\nstyle: *a8\n")
    with time_limit(0.5):  # the fixed loader takes milliseconds
        problems = problems_of(path)
    assert all(problem.startswith(f"{path}:") for problem in problems), problems
    assert {"regions[0]", "style"} <= {split_problem(path, problem)[1] for problem in problems}
    result = cli("validate", str(path))
    assert result.exit_code == 2 and result.stderr.splitlines() == problems, result.output


# --- several problems ----------------------------------------------------------------------------------------


def test_every_problem_is_reported_in_file_order(scene_file):
    # The fields are deliberately in the reverse of the model's order, so pydantic's order is not file order.
    path = scene_file(
        "regions:\n"  # 1
        "  - prompt: a\n"  # 2
        "    box: [0, 0, 64]\n"  # 3
        "scheduler: foo\n"  # 4
        "steps: 0\n"  # 5
        "prompt: x\n"  # 6
        "width: 100\n"  # 7
        "sceduler: ddim\n"  # 8
        "guidance_scale: .nan\n"  # 9
    )
    got = [split_problem(path, p)[:2] for p in problems_of(path)]
    assert got == [
        ("3", "regions[0].box"),
        ("4", "scheduler"),
        ("5", "steps"),
        ("7", "width"),
        ("8", "sceduler"),
        ("9", "guidance_scale"),
    ]


def test_every_canvas_problem_is_reported_in_file_order(scene_file):
    path = scene_file(
        "prompt: x\n"  # 1
        "regions:\n"  # 2
        "  - prompt: a\n"  # 3
        "    mask: masks/black.png\n"  # 4
        "  - prompt: b\n"  # 5
        "    box: [600, 0, 700, 64]\n"  # 6
        "  - prompt: c\n"  # 7
        "    mask: masks/missing.png\n"  # 8
    )
    got = [split_problem(path, p) for p in problems_of(path)]
    assert [(line, field) for line, field, _ in got] == [("4", "regions[0].mask"), ("6", "regions[1].box"), ("8", "regions[2].mask")]
    assert ["empty" in got[0][2], "outside" in got[1][2], "no such file" in got[2][2]] == [True, True, True]


def test_duplicate_keys_are_all_reported(scene_file):
    path = scene_file("prompt: x\nsteps: 3\nsteps: 4\nregions:\n  - prompt: a\n    prompt: b\n    box: [0, 0, 8, 8]\n")
    got = [split_problem(path, p)[:2] for p in problems_of(path)]
    assert got == [("3", "steps"), ("6", "regions[0].prompt")]


# --- overrides (command-line values) -------------------------------------------------------------------------

FILE_WITH_VALUES = "prompt: x\nsteps: 30\nseed: 7\nmodel: from-file\n"


def test_overriding_steps_moves_the_default_bootstrap_with_it(scene_file):
    scene = load_scene(scene_file("prompt: x\n"), {"steps": 20})
    assert (scene.steps, scene.bootstrap_steps) == (20, 4)


def test_overrides_replace_the_files_values(scene_file):
    scene = load_scene(scene_file(FILE_WITH_VALUES), {"steps": 100, "seed": 3, "model": "tiny-random"})
    assert (scene.steps, scene.bootstrap_steps, scene.seed, scene.model) == (100, 20, 3, "tiny-random")


def test_none_overrides_are_ignored(scene_file):
    path = scene_file(FILE_WITH_VALUES)
    scene = load_scene(path, {"steps": None, "seed": None, "bootstrap_steps": None, "model": None})
    assert scene == load_scene(path)
    assert (scene.steps, scene.bootstrap_steps, scene.seed, scene.model) == (30, 6, 7, "from-file")


@pytest.mark.parametrize(
    "overrides, field, text",
    [
        ({"steps": 0}, "steps", "greater than or equal to 1"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"bootstrap_steps": 31}, "bootstrap_steps", "must be <= steps (30)"),
    ],
)
def test_a_bad_override_is_blamed_on_the_command_line_not_a_file_line(scene_file, overrides, field, text):
    path = scene_file(FILE_WITH_VALUES)
    problems = problems_of(path, overrides)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: {field}: "), problems[0]  # no line: the value is not in the file
    assert text in problems[0] and "command line" in problems[0]


# --- warnings ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "box, warns",
    [
        ([-16, 0, 64, 64], True),
        ([448, 448, 600, 520], True),
        ([0, 0, 512, 512], False),
        ([8, 8, 16, 16], False),
    ],
)
def test_a_box_past_the_canvas_edge_is_a_warning_not_an_error(scene_file, box, warns):
    scene = load_scene(scene_file(f"prompt: x\nregions:\n  - prompt: a\n    box: {box}\n"))
    notes = [note for note in scene.warnings if "extends past" in note]  # (tiny/full boxes warn otherwise)
    if warns:
        assert len(notes) == 1 and ": regions[0].box: " in notes[0] and "extends past the 512x512 canvas" in notes[0]
    else:
        assert notes == []


# --- full_prompt ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "style, expected",
    [("", "a red sofa"), ("   ", "a red sofa"), ("oil painting, warm light", "a red sofa, oil painting, warm light")],
)
def test_full_prompt_appends_the_style(style, expected):
    scene = Scene.model_validate({"prompt": "a room", "style": style})
    assert scene.full_prompt("a red sofa") == expected


# --- the command line ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, args, line_start, text",
    [
        pytest.param("prompt: x\nsteps: 0\n", [], "{path}:2: steps: ", "greater than or equal to 1", id="steps-0"),
        pytest.param(TWO_REGIONS + "    box: [0, 0, 64]\n", [], "{path}:6: regions[1].box: ", "expected 4 numbers", id="box-3"),
        pytest.param("prompt: x\nsceduler: ddim\n", [], "{path}:2: sceduler: ", "did you mean `scheduler`?", id="key-typo"),
        pytest.param("prompt: x\n", ["--steps", "0"], "{path}: steps: ", "command line", id="--steps-0"),
        pytest.param("prompt: x\nsteps: [1, 2\nwidth: 64\n", [], "{path}:3:6: ", "YAML error", id="yaml-syntax"),
        pytest.param(
            'prompt: x\nseed: !!python/object/apply:os.system ["echo hi"]\n', [], "{path}:2:7: ", "YAML error", id="python-tag"
        ),
        pytest.param(b"prompt: caf\xe9\n", [], "{path}:1: ", "not UTF-8", id="latin-1"),
    ],
)
def test_render_of_a_bad_scene_exits_2_with_the_line_and_no_traceback(cli, 
    scene_file, no_model_load, content, args, line_start, text
):
    path = scene_file(content)
    result = cli("render", str(path), *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert no_model_load == []  # a bad scene fails before any model is touched
    assert result.stdout == "" and not (Path.cwd() / "outputs").exists()  # nothing written
    lines = result.stderr.splitlines()
    assert any(line.startswith(line_start.format(path=path)) and text in line for line in lines), result.stderr
