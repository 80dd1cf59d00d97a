"""Hostile scene files: random and mutated YAML (property-based), inputs that once crashed, one line per
problem, unsafe YAML tags, several documents in one file, and Unicode prompts end to end.

Renders use the built-in tiny-random model on tiny canvases (96x64, 2 steps). The property-based tests keep
clear of the inputs that once crashed (KNOWN_CRASHERS below), which have tests of their own, so they stay
deterministic and focused.
"""
from __future__ import annotations

import copy
import json
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from multidiff_cli.errors import SceneError
from multidiff_cli.output.png import read_metadata
from multidiff_cli.scene import Region, Scene, load_scene


SCENE_KEYS = list(Scene.model_fields)


REGION_KEYS = list(Region.model_fields)


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


def lines(text: str) -> list[str]:
    return text.strip().splitlines()


def no_crash(result) -> bool:
    """The command ended through typer (exit code), not through an uncaught exception."""
    return (result.exception is None or isinstance(result.exception, SystemExit)) and "Traceback" not in result.output


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.png")) if folder.exists() else []


def write_mask(path: Path, size=(96, 64), white=(40, 8, 88, 56)) -> Path:
    mask = Image.new("L", size, 0)
    if white:
        mask.paste(255, white)
    mask.save(path)
    return path


# --- random and mutated scene files (property-based) ---------------------------------------------------


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


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=documents, allow_unicode=st.booleans())
def test_load_scene_on_random_yaml_values(document, allow_unicode):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "scene.yaml"
        path.write_text(yaml.safe_dump(document, allow_unicode=allow_unicode), encoding="utf-8")
        assert_scene_or_scene_error(path)


def test_a_scene_file_parsed_once_reads_as_yaml_safe_load_reads_it(tmp_path):
    from multidiff_cli.scene.yamlpos import parse_yaml

    text = ("base: &size {width: 96, height: 64}\nscene:\n  <<: *size\n  prompt: x\nagain: *size\nwhen: 2026-12-08\n"
            "raw: !!binary aGk=\nset: !!set {a, b}\nvalues: [1, 2.5, .nan, ~, yes, '007', 0x1f, 1e3, -.inf]\n")
    (tmp_path / "scene.yaml").write_text(text)
    data, root = parse_yaml(tmp_path / "scene.yaml")
    assert repr(data) == repr(yaml.safe_load(text)) and root.start_mark.line == 0
    assert data["again"] is data["base"]  # an alias is the same object, as safe_load builds it


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
def test_mutated_scenes_exit_0_or_2_in_load_scene_and_validate(cli, text):
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
        result = cli("validate", path)
        assert no_crash(result), (result.exception, result.output)
        assert result.exit_code == (0 if scene is not None else 2), result.output
        if result.exit_code == 2:
            assert lines(result.stderr), "exit 2 with nothing on stderr"
            assert lines(result.stderr)[0].startswith(str(path)), result.stderr
            assert result.stdout == ""
        else:
            assert result.stdout.startswith(f"{path}: ok")


# --- inputs that once crashed; one line per problem ----------------------------------------------------


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
def test_hostile_scenes_are_reported_not_crashed_on(cli, write_scene, text, field):
    path = write_scene(text)
    result = cli("validate", path)
    assert no_crash(result), repr(result.exception)
    assert result.exit_code == 2
    assert lines(result.stderr)[0].startswith(str(path)) and field in result.stderr


ONE_LINE_CASES = {
    "control-character": "prompt: a room\x1b[31m\n",
    "newline-in-unknown-key": 'prompt: a room\n"wid\\nth": 96\n',
    "newline-in-mask-path": 'prompt: a room\nregions:\n  - prompt: r\n    mask: "lamp\\n.png"\n',
}


@pytest.mark.parametrize("text", list(ONE_LINE_CASES.values()), ids=list(ONE_LINE_CASES))
def test_every_problem_is_one_line_naming_the_file(cli, write_scene, text):
    path = write_scene(text)
    result = cli("validate", path)
    assert result.exit_code == 2 and no_crash(result)
    assert all(re.match(rf"{re.escape(str(path))}:\d+: ", line) for line in lines(result.stderr)), result.stderr


# --- safe loading ---------------------------------------------------------------------------------------


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
def test_python_yaml_tags_are_refused_and_run_nothing(cli, tmp_path, monkeypatch, no_model_load, text, command):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    result = cli.render(path, "--output-dir", tmp_path / "out") if command == "render" else cli("validate", path)
    assert result.exit_code == 2 and no_crash(result), result.output
    assert not (tmp_path / "PWNED").exists()
    assert re.match(rf"{re.escape(str(path))}:\d+(:\d+)?: YAML error: .*python", lines(result.stderr)[0]), result.stderr
    assert no_model_load == [] and pngs(tmp_path) == []


# --- Unicode prompts ------------------------------------------------------------------------------------


PROMPTS = {
    "chinese": "一只猫坐在窗台上，水墨画",
    "emoji": "a cat astronaut 🐱🚀👩🏽‍🚀 on the moon 🌕",
    "arabic": "قطة على حافة النافذة",
    "hebrew-mixed": "חתול on a windowsill, שמש 123",
    "combining": "cafe\u0301 au lait, Å, ﬁne",
}


@pytest.mark.parametrize("prompt", list(PROMPTS.values()), ids=list(PROMPTS))
def test_unicode_prompts_render_and_round_trip_through_the_metadata(cli, tmp_path, prompt):
    scene = {
        "prompt": prompt, "negative_prompt": prompt[::-1], "style": f"《{prompt[:3]}》", "width": 96, "height": 64,
        "steps": 2, "seed": 5, "regions": [{"prompt": f"{prompt} — 区域", "box": [0, 0, 48, 64]}],
    }
    path = tmp_path / "场景 ✨.yaml"
    path.write_text(yaml.safe_dump(scene, allow_unicode=True), encoding="utf-8")
    out_dir = tmp_path / "out"
    result = cli.render(path, "--output-dir", out_dir)
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
    shown = cli("inspect", target, "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["scene"]["prompt"] == prompt


def test_a_lone_surrogate_in_a_prompt_is_a_scene_error(cli, write_scene, tmp_path):
    path = write_scene('prompt: "\\ud800 cat"\nwidth: 96\nheight: 64\nsteps: 2\nseed: 1\n')
    result = cli.render(path, "--output-dir", tmp_path / "out")
    assert no_crash(result), repr(result.exception)
    assert result.exit_code == 2 and lines(result.stderr)[0].startswith(f"{path}:1: prompt:"), result.stderr


# --- several YAML documents -----------------------------------------------------------------------------


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
def test_several_yaml_documents_exit_2_with_a_line_number(cli, write_scene, tmp_path, no_model_load, text, line, command):
    path = write_scene(text)
    result = cli.render(path, "--output-dir", tmp_path / "out") if command == "render" else cli("validate", path)
    assert result.exit_code == 2 and no_crash(result), result.output
    [problem] = lines(result.stderr)
    assert re.match(rf"{re.escape(str(path))}:{line}:\d+: YAML error: .*single document", problem), problem
    assert no_model_load == [] and result.stdout == ""


def test_one_explicit_document_is_fine(cli, write_scene):
    path = write_scene("---\n" + SMALL + "...\n")
    result = cli("validate", path)
    assert result.exit_code == 0, result.output
