"""Load a scene: parse YAML safely, validate, check files and the canvas; every problem points at its line."""
from __future__ import annotations

import difflib
import math
import reprlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from ..errors import SceneError
from ..method.schedulers import SCHEDULER_NAMES
from . import grid
from .schema import Region, Scene
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
    against `source`, at the lines of the YAML node tree `root` when there is one."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        scene = Scene.model_validate({**data, **overrides})
    except ValidationError as exc:
        problems = [(err["loc"], _message(err)) for err in exc.errors()]
        raise SceneError(report(source, root, problems, from_cli=set(overrides))) from None
    scene._base_dir = base_dir or Path(source).resolve().parent
    problems = check_canvas(scene)
    if problems:
        raise SceneError(report(source, root, problems))
    return scene


def check_canvas(scene: Scene) -> list[tuple[tuple, str]]:
    """Checks that need the canvas or the files: boxes on the canvas, mask images readable and non-empty."""
    problems: list[tuple[tuple, str]] = []
    for i, region in enumerate(scene.regions):
        if region.box is not None:
            x0, y0, x1, y1 = region.box
            if x1 <= 0 or y1 <= 0 or x0 >= scene.width or y0 >= scene.height:
                problems.append(
                    (("regions", i, "box"), f"box {region.box} lies outside the {scene.width}x{scene.height} canvas")
                )
            elif not grid.box_cells(region.box, scene.latent_hw).any():
                problems.append(
                    (("regions", i, "box"), f"box {region.box} is too small: it covers no 8x8-pixel latent cell")
                )
        else:
            problem = _check_mask_file(scene.mask_path(region), scene.latent_hw)
            if problem:
                problems.append((("regions", i, "mask"), problem))
    return problems


def scene_warnings(scene: Scene) -> list[str]:
    """Things that are allowed but probably not meant: boxes past the edge, overlaps, tiny regions,
    no background left for the global prompt."""
    notes = []
    for i, region in enumerate(scene.regions):
        if region.box is not None:
            x0, y0, x1, y1 = region.box
            if x0 < 0 or y0 < 0 or x1 > scene.width or y1 > scene.height:
                notes.append(f"regions[{i}].box {region.box} extends past the {scene.width}x{scene.height} canvas: clipped")
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


def _check_mask_file(path: Path, latent_hw: tuple[int, int]) -> str | None:
    from PIL import Image

    try:
        if not path.exists():
            return f"no such file: {path}"
        if path.is_dir():
            return f"{path} is a directory, not an image"
    except OSError as exc:
        return f"cannot open {path}: {exc.strerror or exc}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                pixel_mask = grid.pixel_mask(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"{path}: refused, too many pixels for a mask ({exc})"
    except (OSError, ValueError, SyntaxError) as exc:
        return f"{path} is not an image Pillow can read ({exc})"
    if not pixel_mask.any():
        return f"{path}: the mask is empty (no pixel is at least half-white; white = region)"
    if not grid.resize_nearest(pixel_mask, latent_hw).any():
        return f"{path}: the mask is too small: it covers no 8x8-pixel latent cell of the canvas"
    return None


def _message(err: dict) -> str:
    kind, loc, value = err["type"], err["loc"], err.get("input")
    if kind == "extra_forbidden":
        model = Region if "regions" in loc else Scene
        known = list(model.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else f"; known keys: {', '.join(known)}"
        return f"unknown key{hint}"
    if kind in ("too_short", "too_long") and loc[-1] == "box":
        return f"expected 4 numbers [x0, y0, x1, y1], got {len(value)}"
    if kind == "missing":
        return "required"
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
