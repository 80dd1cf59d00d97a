"""Load a scene: parse YAML safely, apply command-line overrides, validate, check files and the canvas;
every problem points at its line, and all of a scene's problems come at once."""
from __future__ import annotations

import difflib
import math
import re
import reprlib
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError

from ..errors import SceneError
from ..catalog import SCHEDULER_NAMES
from . import grid, picture
from .schema import Lora, Region, Scene, SizePx, mask_path
from .yamlpos import parse_yaml, report


def load_scene(path: Path, overrides: dict[str, Any] | None = None) -> Scene:
    """Read, parse and validate a scene file; SceneError lists the problems as `file:line: field: message`.

    `overrides` (command-line values) replace the file's keys before validation, so defaults
    that depend on them (bootstrap_steps on steps) follow.
    """
    path = Path(path)
    data, root = parse_yaml(path)
    return scene_from_dict(data, path, overrides=overrides, root=root)


def scene_from_dict(data: dict[str, Any], source: Path, base_dir: Path | None = None,
                    overrides: dict[str, Any] | None = None, root: Any = None) -> Scene:
    """Validate a scene given as a dict (a parsed file, or a PNG's metadata); problems are reported
    against `source`, at the lines of the YAML node tree `root` when there is one. What the overrides
    changed beyond their own keys is in the scene's `notes`."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    base_dir = base_dir or Path(source).resolve().parent
    data = {**data, **_canvas_of_picture(data, base_dir, source, root)}
    merged, notes, hints = apply_overrides(data, overrides)
    try:
        scene = Scene.model_validate(merged)
    except ValidationError as exc:
        problems = [(err["loc"], _message(err)) for err in _one_per_value(exc.errors())]
        problems += _check_valid_regions(merged, base_dir)  # all at once: one bad box hides nothing else
        raise SceneError(report(source, root, _with_hints(problems, hints), from_cli=set(overrides))) from None
    scene._base_dir = base_dir
    scene._notes = notes
    problems = check_canvas(scene)
    if problems:
        raise SceneError(report(source, root, _with_hints(problems, hints)))
    return scene


def _canvas_of_picture(data: dict[str, Any], base_dir: Path, source: Path, root: Any) -> dict[str, Any]:
    """A scene with an init image and no width/height takes the picture's canvas (before overrides, so
    --size scales its boxes from there); an unusable picture is the scene's one problem."""
    name = data.get("init_image") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name.strip():
        return {}  # absent, or validation says why
    try:
        return picture.canvas_from_picture(data, mask_path(base_dir, name))
    except picture.PictureError as exc:
        raise SceneError(report(source, root, [(("init_image",), str(exc))])) from None


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict]:
    """The data with the overrides over it, and what follows from them: an explicit bootstrap_steps
    scaled with a lower --steps, boxes scaled with a new canvas. Returns (data, notes for the user,
    hints: loc -> text appended to a problem there, so an error says the command line caused it)."""
    notes: list[str] = []
    hints: dict[tuple, str] = {}
    merged = {**data, **overrides}
    merged.update(_bootstrap_following_steps(data, overrides, notes, hints))
    merged.update(_boxes_following_canvas(data, overrides, notes, hints))
    return merged, notes, hints


def _bootstrap_following_steps(data, overrides, notes, hints) -> dict[str, Any]:
    """--steps below the scene's own bootstrap_steps scales it, keeping the scene's proportion
    (a default bootstrap_steps already follows steps; an explicit --bootstrap-steps wins)."""
    if "steps" not in overrides or "bootstrap_steps" in overrides or "bootstrap_steps" not in data:
        return {}
    new, bootstrap = overrides["steps"], data["bootstrap_steps"]
    old = data.get("steps", Scene.model_fields["steps"].default)
    if not (_is_int(new, 1) and _is_int(old, 1) and _is_int(bootstrap, 0)) or bootstrap <= new:
        return {}
    if bootstrap > old:  # the scene contradicts itself: its own error, whatever --steps says
        hints[("bootstrap_steps",)] = f"steps {new} is from --steps"
        return {}
    scaled = min(new, max(1, round(bootstrap * new / old)))
    notes.append(f"bootstrap_steps {bootstrap} of {old} steps scaled to {scaled} of {new} "
                 f"(--steps {new} is below it; --bootstrap-steps N sets it)")
    return {"bootstrap_steps": scaled}


def _boxes_following_canvas(data, overrides, notes, hints) -> dict[str, Any]:
    """A new canvas (--size) keeps the layout: boxes scale with it, as mask images already do."""
    old, new = _canvas(data), _canvas({**data, **overrides})
    regions = data.get("regions")
    if not {"width", "height"} & overrides.keys() or None in (old, new) or old == new or not isinstance(regions, list):
        return {}
    scaled_regions, any_scaled = [], False
    for i, region in enumerate(regions):
        box = region.get("box") if isinstance(region, dict) else None
        if isinstance(box, list) and len(box) == 4 and all(_is_int(v) for v in box):  # else validation says why
            scaled = [scale_px(v, new[k % 2], old[k % 2]) for k, v in enumerate(box)]
            hints[("regions", i, "box")] = f"the scene's {box} scaled to the {new[0]}x{new[1]} canvas by --size"
            region, any_scaled = {**region, "box": scaled}, True
        scaled_regions.append(region)
    if not any_scaled:
        return {}
    notes.append(f"boxes scaled from {old[0]}x{old[1]} to {new[0]}x{new[1]} with the canvas (--size)")
    return {"regions": scaled_regions}


def scale_px(value: int, new: int, old: int) -> int:
    """value * new / old rounded half up, in exact integers (so x0 and x1 round alike)."""
    return (2 * value * new + old) // (2 * old)


def _is_int(value: Any, least: int | None = None) -> bool:
    """An int as YAML wrote it (not a bool), at least `least` when given."""
    return isinstance(value, int) and not isinstance(value, bool) and (least is None or value >= least)


_SIZE_PX = TypeAdapter(SizePx)


def _canvas(data: dict[str, Any]) -> tuple[int, int] | None:
    """(width, height) the data asks for, the schema's defaults where absent; None if either is invalid."""
    try:
        return tuple(_SIZE_PX.validate_python(data.get(key, Scene.model_fields[key].default), strict=True)
                     for key in ("width", "height"))
    except ValidationError:
        return None


def _with_hints(problems: list[tuple[tuple, str]], hints: dict[tuple, str]) -> list[tuple[tuple, str]]:
    """Problems at a value the overrides changed say so (the deepest hinted part of each location)."""
    out = []
    for loc, message in problems:
        hint = next((hints[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in hints), None)
        out.append((loc, f"{message}; {hint}" if hint else message))
    return out


def check_canvas(scene: Scene) -> list[tuple[tuple, str]]:
    """Checks that need the canvas or the files: boxes on the canvas, mask images readable and non-empty."""
    canvas = (scene.width, scene.height)
    found = (_region_problem(i, region, scene.base_dir, canvas) for i, region in enumerate(scene.regions))
    return [problem for problem in found if problem] + _picture_problems(scene) + lora_problems(scene)


def _picture_problems(scene: Scene) -> list[tuple[tuple, str]]:
    """The init image fits the canvas; `keep` has something to keep and something to change."""
    if scene.init_image is None:
        return []
    problems = []
    try:
        problem = picture.aspect_problem(scene.init_image_path, (scene.width, scene.height))
    except picture.PictureError as exc:
        problem = str(exc)
    if problem:
        problems.append((("init_image",), problem))
    if scene.keep == "outside_regions" and not scene.regions:
        problems.append((("keep",), "outside_regions needs regions: without any, nothing may change"))
    if scene.keep_mask is not None:
        try:
            picture.keep_cells(scene.keep_mask_path, scene.latent_hw)
        except picture.PictureError as exc:
            problems.append((("keep",), str(exc)))
    return problems


def changeable_cells(scene: Scene) -> np.ndarray | None:
    """Boolean (h, w): the latent cells `keep` lets change, or None where everything may."""
    if scene.keep == "outside_regions":
        return np.logical_or.reduce([region_cells(scene, i) for i in range(len(scene.regions))])
    if scene.keep_mask is not None:
        return picture.keep_cells(scene.keep_mask_path, scene.latent_hw)
    return None


LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")  # the pickle ones load only with --allow-pickle


def lora_problems(scene: Scene) -> list[tuple[tuple, str]]:
    """Every LoRA file of the scene and its regions exists and is a weights file."""
    owners = [(("loras",), scene.loras)] + [(("regions", i, "loras"), r.loras) for i, r in enumerate(scene.regions)]
    problems = []
    for loc, loras in owners:
        for k, lora in enumerate(loras):
            path = scene.lora_path(lora)
            if path.suffix.lower() not in LORA_SUFFIXES:
                problems.append(((*loc, k, "path"), f"{lora.path}: a LoRA is a .safetensors file (or, with "
                                 "--allow-pickle, .pt/.ckpt/.bin)"))
            elif not path.is_file():
                problems.append(((*loc, k, "path"), f"no such file: {path}" if not path.exists()
                                 else f"{path} is not a file"))
    return problems


def _check_valid_regions(data: dict[str, Any], base_dir: Path) -> list[tuple[tuple, str]]:
    """After the scene failed validation: the canvas and file checks of each region valid on its own,
    on the data's canvas if that is valid (else the checks that need no canvas)."""
    regions = data.get("regions")
    if not isinstance(regions, list):
        return []
    canvas, problems = _canvas(data), []
    for i, item in enumerate(regions):
        try:
            region = Region.model_validate(item)
        except ValidationError:
            continue  # pydantic reported it
        problem = _region_problem(i, region, base_dir, canvas)
        if problem:
            problems.append(problem)
    return problems


def _region_problem(i: int, region: Region, base_dir: Path,
                    canvas: tuple[int, int] | None) -> tuple[tuple, str] | None:
    """Region `i`'s box on the canvas, or its mask file readable and non-empty; canvas None: file checks only."""
    latent_hw = (canvas[1] // grid.LATENT_PX, canvas[0] // grid.LATENT_PX) if canvas else None
    if region.box is not None:
        if canvas is None:
            return None
        x0, y0, x1, y1 = region.box
        width, height = canvas
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            return ("regions", i, "box"), f"box {region.box} lies outside the {width}x{height} canvas"
        if not grid.box_cells(region.box, latent_hw).any():
            return ("regions", i, "box"), f"box {region.box} is too small: it covers no 8x8-pixel latent cell"
        return None
    problem = _check_mask_file(mask_path(base_dir, region.mask), latent_hw)
    return (("regions", i, "mask"), problem) if problem else None


def scene_warnings(scene: Scene) -> list[str]:
    """Things that are allowed but probably not meant: boxes past the edge, masks stretched to another
    shape, overlaps, tiny regions, no background left for the global prompt."""
    notes = []
    for i, region in enumerate(scene.regions):
        if region.box is not None:
            x0, y0, x1, y1 = region.box
            if x0 < 0 or y0 < 0 or x1 > scene.width or y1 > scene.height:
                notes.append(f"regions[{i}].box {region.box} extends past the {scene.width}x{scene.height} canvas: clipped")
        else:
            notes += _stretch_warning(scene, i, region)
    cells = [region_cells(scene, i) for i in range(len(scene.regions))]
    total = scene.latent_hw[0] * scene.latent_hw[1]
    for i, area in enumerate(cells):
        if area.sum() < 0.01 * total:
            notes.append(f"regions[{i}] covers {area.sum() / total:.1%} of the canvas (under 1%): it may be ignored")
        for j in range(i + 1, len(cells)):
            shared = (area & cells[j]).sum()
            if shared:
                notes.append(f"regions[{i}] and regions[{j}] overlap on {shared / total:.1%} of the canvas: "
                             "there they are averaged")
    if cells and np.logical_or.reduce(cells).all():
        notes.append("the regions cover the whole canvas: the global prompt has no background of its own left")
    return notes


def region_cells(scene: Scene, index: int) -> np.ndarray:
    """Boolean (h, w): the latent cells region `index` covers."""
    region = scene.regions[index]
    if region.box is not None:
        return grid.box_cells(region.box, scene.latent_hw)
    return grid.resize_nearest(grid.read_mask_image(scene.mask_path(region)), scene.latent_hw)


def _stretch_warning(scene: Scene, i: int, region: Region) -> list[str]:
    """A mask image of another aspect ratio than the canvas (over 1% off) is stretched to fit it."""
    mask_w, mask_h = grid.image_size_px(scene.mask_path(region))
    mask_aspect, canvas_aspect = mask_w / mask_h, scene.width / scene.height
    if abs(mask_aspect / canvas_aspect - 1) <= 0.01:
        return []
    return [f"regions[{i}].mask {region.mask} is {mask_w}x{mask_h} (aspect {mask_aspect:.2f}) but the canvas is "
            f"{scene.width}x{scene.height} (aspect {canvas_aspect:.2f}): stretched to fit"]


def _check_mask_file(path: Path, latent_hw: tuple[int, int] | None) -> str | None:
    """A mask file's problem, if any; the 'covers no latent cell' check only with a canvas (latent_hw)."""
    try:
        with picture.open_image(path, "a mask") as image:
            pixel_mask = grid.pixel_mask(image)
    except picture.PictureError as exc:
        return str(exc)
    except (OSError, ValueError, SyntaxError) as exc:  # what reading the pixels found past opening
        return f"{path} is not an image Pillow can read ({exc})"
    if not pixel_mask.any():
        return f"{path}: the mask is empty (no pixel is at least half-white; white = region)"
    if latent_hw and not grid.resize_nearest(pixel_mask, latent_hw).any():
        return f"{path}: the mask is too small: it covers no 8x8-pixel latent cell of the canvas"
    return None


# pydantic's name for one alternative of a union field (`int | Literal["auto"]`), the last part of its error's loc
_UNION_BRANCH = re.compile(r"literal\[.*\]|constrained-\w+|int|float|bool|str")


def _one_per_value(errors: list[dict]) -> list[dict]:
    """A value that fits none of a field's alternatives is one problem naming them all, at the field
    (`max_batch: Input should be greater than or equal to 1, or 'auto'`), not one line per alternative."""
    merged: dict[tuple, dict] = {}
    out = []
    for err in errors:
        loc = err["loc"]
        if len(loc) > 1 and isinstance(loc[-1], str) and _UNION_BRANCH.fullmatch(loc[-1]):
            if loc[:-1] in merged:
                merged[loc[:-1]]["msg"] += ", or " + err["msg"].removeprefix("Input should be ")
                continue
            err = merged[loc[:-1]] = {**err, "loc": loc[:-1]}
        out.append(err)
    return out


def _message(err: dict) -> str:
    kind, loc, value = err["type"], err["loc"], err.get("input")
    if kind == "extra_forbidden":
        model = Lora if "loras" in loc else Region if "regions" in loc else Scene
        known = [field.alias or name for name, field in model.model_fields.items()]
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else f"; known keys: {', '.join(known)}"
        return f"unknown key{hint}"
    if kind in ("too_short", "too_long") and loc[-1] == "box":
        return f"expected 4 numbers [x0, y0, x1, y1], got {len(value)}"
    if kind == "missing":
        return "required"
    if kind in ("greater_than", "less_than_equal") and loc == ("strength",):
        return f"must be more than 0 and at most 1 (1: from pure noise), got {value}"
    if kind == "model_type" and "loras" in loc:
        return f"a LoRA is a file path, or {{path: FILE, scale: NUMBER}} (got {_short.repr(value)})"
    if kind == "literal_error" and loc[-1] == "scheduler":
        return f"unknown scheduler {value!r}; choose one of {', '.join(SCHEDULER_NAMES)}"
    message = err["msg"].removeprefix("Value error, ")
    if kind == "finite_number" or (isinstance(value, float) and not math.isfinite(value)):
        return f"must be a finite number, got {value}"
    if isinstance(value, (bool, int, float, str, list)):
        return f"{message} (got {_short.repr(value)})"
    return message


_short = reprlib.Repr()  # bounded, so an aliased YAML bomb cannot blow up a message
_short.maxlist, _short.maxstring, _short.maxlevel = 6, 60, 2
