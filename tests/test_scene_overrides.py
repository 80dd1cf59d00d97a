"""Command-line overrides over a scene's keys, the notes they leave, mask stretch warnings, and every
problem of a scene reported at once. Pure scene tests: YAML files and small PNGs, no model, no torch."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from multidiff_cli.errors import SceneError
from multidiff_cli.scene import load_scene, scene_from_dict


def write(folder: Path, text: str, name: str = "scene.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def make_mask(path: Path, size: tuple[int, int], white: tuple[int, int, int, int] | None = None) -> Path:
    """A grey PNG of `size` (width, height): black, the box `white` in white (all white when None)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("L", size, 0)
    image.paste(255, white or (0, 0, *size))
    image.save(path)
    return path


def problems_of(path: Path, overrides=None) -> list[str]:
    with pytest.raises(SceneError) as caught:
        load_scene(path, overrides)
    return caught.value.problems


# --- 1. --steps below the scene's bootstrap_steps ------------------------------------------------------------

LIVING_ROOM = "prompt: x\nsteps: 50\nbootstrap_steps: 10\n"


@pytest.mark.parametrize(
    "text, steps, bootstrap",
    [
        (LIVING_ROOM, 2, 1),  # round(0.4) = 0, but the scene wanted bootstrapping: 1
        (LIVING_ROOM, 8, 2),  # round(1.6)
        (LIVING_ROOM, 1, 1),  # never above the steps
        ("prompt: x\nbootstrap_steps: 25\n", 10, 5),  # the data's steps absent: the default 50
        ("prompt: x\nsteps: 20\nbootstrap_steps: 20\n", 5, 5),  # all steps bootstrapped stays all
    ],
)
def test_steps_below_the_scenes_bootstrap_scale_it_keeping_the_proportion(tmp_path, text, steps, bootstrap):
    scene = load_scene(write(tmp_path, text), {"steps": steps})
    assert (scene.steps, scene.bootstrap_steps) == (steps, bootstrap)
    assert len(scene.notes) == 1 and "--steps" in scene.notes[0]


def test_the_bootstrap_note_says_what_changed_and_how_to_set_it(tmp_path):
    scene = load_scene(write(tmp_path, LIVING_ROOM), {"steps": 2})
    assert scene.notes == ["bootstrap_steps 10 of 50 steps scaled to 1 of 2 "
                           "(--steps 2 is below it; --bootstrap-steps N sets it)"]


@pytest.mark.parametrize(
    "text, overrides, bootstrap",
    [
        (LIVING_ROOM, {"steps": 20}, 10),  # not below: kept as written
        (LIVING_ROOM, {"steps": 100}, 10),
        ("prompt: x\nsteps: 50\n", {"steps": 2}, 0),  # the default already follows steps
        ("prompt: x\nsteps: 50\nbootstrap_steps: 0\n", {"steps": 2}, 0),  # no bootstrapping stays none
        (LIVING_ROOM, {"steps": 2, "bootstrap_steps": 2}, 2),  # an explicit --bootstrap-steps wins
    ],
)
def test_bootstrap_without_a_note(tmp_path, text, overrides, bootstrap):
    scene = load_scene(write(tmp_path, text), overrides)
    assert (scene.bootstrap_steps, scene.notes) == (bootstrap, [])


def test_a_bootstrap_override_of_none_is_not_given(tmp_path):
    scene = load_scene(write(tmp_path, LIVING_ROOM), {"steps": 2, "bootstrap_steps": None})
    assert scene.bootstrap_steps == 1 and len(scene.notes) == 1


def test_a_bootstrap_override_over_the_steps_is_still_an_error_at_the_command_line(tmp_path):
    path = write(tmp_path, LIVING_ROOM)
    problems = problems_of(path, {"steps": 2, "bootstrap_steps": 5})
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: bootstrap_steps: must be <= steps (2)")
    assert "command line" in problems[0]


def test_a_scene_file_with_bootstrap_over_steps_stays_an_error(tmp_path):
    path = write(tmp_path, "prompt: x\nsteps: 10\nbootstrap_steps: 20\n")
    assert problems_of(path) == [f"{path}:3: bootstrap_steps: must be <= steps (10) (got 20)"]
    # the file contradicts itself; --steps does not paper over it, and the message says where steps came from
    (problem,) = problems_of(path, {"steps": 5})
    assert problem.startswith(f"{path}:3: bootstrap_steps: must be <= steps (5)") and "--steps" in problem


def test_a_png_rerender_scales_the_recorded_bootstrap_too(tmp_path):
    recorded = {"prompt": "x", "steps": 50, "bootstrap_steps": 30, "width": 512, "height": 512}
    scene = scene_from_dict(recorded, tmp_path / "old.png", base_dir=tmp_path, overrides={"steps": 5})
    assert scene.bootstrap_steps == 3 and len(scene.notes) == 1


def test_notes_survive_model_copy_and_cannot_be_changed_through_the_property(tmp_path):
    scene = load_scene(write(tmp_path, LIVING_ROOM), {"steps": 2})
    copy = scene.model_copy(update={"seed": 7})
    assert copy.seed == 7 and copy.notes == scene.notes and copy.base_dir == scene.base_dir
    assert scene.model_copy(deep=True).notes == scene.notes
    scene.notes.append("something else")
    assert len(scene.notes) == 1
    with pytest.raises(AttributeError):
        scene.notes = []


def test_a_scene_loaded_without_overrides_has_no_notes(tmp_path):
    assert load_scene(write(tmp_path, LIVING_ROOM)).notes == []


# --- 2. --size scales the boxes with the canvas --------------------------------------------------------------

BOXES = """\
prompt: x
regions:
  - prompt: a
    box: [128, 272, 384, 448]
  - prompt: b
    box: [15, 13, 129, 480]
"""


def test_a_new_canvas_scales_the_boxes(tmp_path):
    scene = load_scene(write(tmp_path, BOXES), {"width": 256, "height": 256})
    assert [r.box for r in scene.regions] == [[64, 136, 192, 224], [8, 7, 65, 240]]  # halves rounded up
    assert scene.notes == ["boxes scaled from 512x512 to 256x256 with the canvas (--size)"]
    assert not [w for w in scene.warnings if "extends past" in w]


def test_x_scales_with_the_width_and_y_with_the_height(tmp_path):
    text = "prompt: x\nwidth: 512\nheight: 256\nregions:\n  - prompt: a\n    box: [100, 100, 200, 200]\n"
    scene = load_scene(write(tmp_path, text), {"width": 1024, "height": 768})
    assert scene.regions[0].box == [200, 300, 400, 600]
    assert scene.notes == ["boxes scaled from 512x256 to 1024x768 with the canvas (--size)"]


@pytest.mark.parametrize(
    "text, overrides",
    [
        (BOXES, {"width": 512, "height": 512}),  # the same canvas
        (BOXES, {"steps": 20}),  # no canvas override
        ("prompt: x\nregions:\n  - prompt: a\n    mask: m.png\n", {"width": 256, "height": 256}),  # no box
    ],
)
def test_no_box_note_when_no_box_changes(tmp_path, text, overrides):
    make_mask(tmp_path / "m.png", (64, 64))
    scene = load_scene(write(tmp_path, text), overrides)
    assert scene.notes == []
    if "box" in text:
        assert scene.regions[0].box == [128, 272, 384, 448]


def test_a_box_collapsed_by_scaling_is_reported_at_its_line_saying_why(tmp_path):
    path = write(tmp_path, "prompt: x\nregions:\n  - prompt: a\n    box: [10, 10, 11, 100]\n")
    (problem,) = problems_of(path, {"width": 64, "height": 64})
    assert problem.startswith(f"{path}:4: regions[0].box: needs x0 < x1")
    assert "[10, 10, 11, 100]" in problem and "--size" in problem


def test_an_invalid_box_is_left_for_validation_to_report_as_written(tmp_path):
    path = write(tmp_path, "prompt: x\nregions:\n  - prompt: a\n    box: [10.5, 0, 100, 100]\n")
    (problem,) = problems_of(path, {"width": 256, "height": 256})
    assert problem.startswith(f"{path}:4: regions[0].box[0]: ") and "10.5" in problem


def test_a_png_rerender_at_a_new_size_scales_the_recorded_boxes(tmp_path):
    recorded = {"prompt": "x", "width": 512, "height": 512, "regions": [{"prompt": "a", "box": [0, 0, 256, 512]}]}
    scene = scene_from_dict(recorded, tmp_path / "old.png", base_dir=tmp_path, overrides={"width": 1024})
    assert scene.regions[0].box == [0, 0, 512, 512] and (scene.width, scene.height) == (1024, 512)
    assert recorded["regions"][0]["box"] == [0, 0, 256, 512]  # the caller's data is not changed


# --- 3. a mask of another shape than the canvas --------------------------------------------------------------


@pytest.mark.parametrize(
    "mask_size, canvas, warns",
    [
        ((300, 200), (512, 512), True),
        ((64, 64), (512, 512), False),
        ((64, 64), (768, 512), True),
        ((96, 64), (768, 512), False),
        ((515, 512), (512, 512), False),  # within 1%
        ((520, 512), (512, 512), True),  # 1.6% off
    ],
)
def test_a_mask_of_another_aspect_ratio_warns_that_it_is_stretched(tmp_path, mask_size, canvas, warns):
    make_mask(tmp_path / "masks" / "x.png", mask_size)
    text = (f"prompt: x\nwidth: {canvas[0]}\nheight: {canvas[1]}\nregions:\n"
            "  - prompt: a\n    box: [0, 0, 64, 64]\n  - prompt: b\n    box: [64, 0, 128, 64]\n"
            "  - prompt: c\n    mask: masks/x.png\n")
    stretched = [w for w in load_scene(write(tmp_path, text)).warnings if "stretched" in w]
    assert len(stretched) == warns
    if mask_size == (300, 200):
        assert stretched == [f"{tmp_path / 'scene.yaml'}:10: regions[2].mask: masks/x.png is 300x200 (aspect 1.50) "
                             "but the canvas is 512x512 (aspect 1.00): stretched to fit"]  # at the mask's line


def test_a_canvas_override_of_another_shape_warns_about_the_masks(tmp_path):
    make_mask(tmp_path / "m.png", (64, 64))
    scene = load_scene(write(tmp_path, "prompt: x\nregions:\n  - prompt: a\n    mask: m.png\n"),
                       {"width": 1024, "height": 512})
    assert [w for w in scene.warnings if "stretched" in w] == [
        f"{tmp_path / 'scene.yaml'}:4: regions[0].mask: m.png is 64x64 (aspect 1.00) but the canvas is 1024x512 "
        "(aspect 2.00): stretched to fit"
    ]


def test_boxes_past_the_edge_still_warn(tmp_path):
    scene = load_scene(write(tmp_path, "prompt: x\nregions:\n  - prompt: a\n    box: [-16, 0, 64, 64]\n"))
    assert any(w.startswith(f"{tmp_path / 'scene.yaml'}:4: regions[0].box:") and "clipped" in w for w in scene.warnings)


# --- 4. every problem at once ----------------------------------------------------------------------------------

THREE_PROBLEMS = """\
prompt: x
regions:
  - prompt: float box
    box: [10.5, 0, 100, 100]
  - prompt: off the canvas
    box: [600, 0, 700, 100]
  - prompt: missing mask
    mask: masks/missing.png
  - prompt: fine
    box: [0, 0, 64, 64]
"""


def test_a_bad_box_hides_no_other_problem(tmp_path):
    path = write(tmp_path, THREE_PROBLEMS)
    problems = problems_of(path)
    assert len(problems) == 3, problems
    assert problems[0].startswith(f"{path}:4: regions[0].box[0]: ")
    assert problems[1] == f"{path}:6: regions[1].box: box [600, 0, 700, 100] lies outside the 512x512 canvas"
    assert problems[2] == f"{path}:8: regions[2].mask: no such file: {tmp_path / 'masks' / 'missing.png'}"


@pytest.mark.parametrize("width, box_is_off", [(1024, False), (512, True)])
def test_the_region_checks_use_the_scenes_canvas_when_it_is_valid(tmp_path, width, box_is_off):
    text = f"prompt: x\nwidth: {width}\nsteps: 0\nregions:\n  - prompt: a\n    box: [600, 0, 700, 100]\n"
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert problems[0].startswith(f"{path}:3: steps: ")
    assert problems[1:] == ([f"{path}:6: regions[0].box: box [600, 0, 700, 100] lies outside the 512x512 canvas"]
                            if box_is_off else [])


def test_without_a_valid_canvas_only_the_file_checks_run(tmp_path):
    make_mask(tmp_path / "black.png", (64, 64), white=(0, 0, 0, 0))
    text = ("prompt: x\nwidth: 500\nregions:\n  - prompt: a\n    box: [600, 0, 700, 100]\n"
            "  - prompt: b\n    mask: black.png\n")
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert [p.split(": ")[0] for p in problems] == [f"{path}:2", f"{path}:7"]  # no word on the box
    assert "the mask is empty" in problems[1]


def test_problems_from_the_command_line_and_the_file_come_together(tmp_path):
    path = write(tmp_path, "prompt: x\nregions:\n  - prompt: a\n    mask: nowhere.png\n")
    problems = problems_of(path, {"steps": 0})
    assert len(problems) == 2
    assert problems[0].startswith(f"{path}: steps: ") and "command line" in problems[0]
    assert problems[1].startswith(f"{path}:4: regions[0].mask: no such file")
