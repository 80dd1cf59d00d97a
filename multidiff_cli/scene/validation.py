"""A scene's problems, each at its field: pydantic's errors in plain words (one line per value), then the
checks that need the canvas, the files or the model's family."""
from __future__ import annotations

import difflib
import math
import re
import reprlib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..catalog import CELL_PX, PICKLE_SUFFIXES, SAFE_SUFFIXES, SCHEDULER_NAMES, Family, safetensors_header
from ..errors import SceneError
from . import grid, picture
from .controls import (adapter_root_problem, control_problems, controlnet_problem, picture_problem,
                       reference_problems)
from .geometry import canvas_of
from .paths import scene_path
from .schema import Control, Lora, Reference, Region, Scene, family_steps
from .yamlpos import field_path

Problem = tuple[tuple, str]  # (location in the scene, message)


def check_canvas(scene: Scene, allow_pickle: bool = False) -> list[Problem]:
    """Checks that need the canvas, the files or the family: boxes on the canvas, mask images readable
    and non-empty, the init image and keep mask, LoRA files, controls, and (where the scene's family is known)
    what its model needs (family_problems)."""
    canvas = (scene.width, scene.height)
    found = [_region_problem(i, region, scene.base_dir, canvas) for i, region in enumerate(scene.regions)]
    windows = [_window_problem(scene, i) for i, problem in enumerate(found) if problem is None]
    family = family_problems(scene, scene.family, scene.few_step_model) if scene.family is not None else []
    controls = control_problems(scene, allow_pickle) if not any(found) else []  # a control's box needs its region
    controls += reference_problems(scene)
    return (family + [problem for problem in found + windows if problem] + _picture_problems(scene)
            + lora_problems(scene, allow_pickle) + controls)


def _window_problem(scene: Scene, i: int) -> Problem | None:
    """A region's `window` box must lie on the canvas and hold every cell of its region (its prompt runs there
    alone: a cell outside would get none of it)."""
    from .geometry import box_window, region_cells

    window = scene.regions[i].window
    if not isinstance(window, list):
        return None
    x0, y0, x1, y1 = window
    if x0 < 0 or y0 < 0 or x1 > scene.width or y1 > scene.height:
        return ("regions", i, "window"), f"window {window} reaches past the {scene.width}x{scene.height} canvas"
    align = scene.family.align_px if scene.family is not None else scene.cell_px
    if any(value % align for value in window):
        label = f"{scene.family.label} models" if scene.family is not None else "the latent cells"
        return ("regions", i, "window"), f"window {window}: every corner must be a multiple of {align} px for {label}"
    top, left, height, width = box_window(scene, window) if grid.box_cells(window, scene.latent_hw, scene.cell_px).any() \
        else (0, 0, 0, 0)
    cells = region_cells(scene, i)
    inside = cells.copy()
    inside[top:top + height, left:left + width] = False
    if inside.any():
        rows, cols = inside.any(axis=1).nonzero()[0], inside.any(axis=0).nonzero()[0]
        cell = scene.cell_px
        reach = [int(cols[0]) * cell, int(rows[0]) * cell, (int(cols[-1]) + 1) * cell, (int(rows[-1]) + 1) * cell]
        return ("regions", i, "window"), (f"window {window} does not contain its region (it reaches {reach}): "
                                          "the region's prompt runs only inside its window")
    return None


def family_problems(scene: Scene, family: Family, few_step: bool = False) -> list[Problem]:
    """What a model of `family` cannot render: a scheduler it has none of, a canvas or view stride off
    its alignment (FLUX's 2x2 packing needs 16 px), bootstrap steps past its default steps, a key of
    another family's (true_cfg_scale), true CFG without a negative prompt."""
    problems = []
    steps = scene.steps or family_steps(family, few_step)
    if scene.bootstrap_steps is not None and scene.bootstrap_steps > steps:
        problems.append((("bootstrap_steps",), f"must be <= steps ({steps}): the {family.label} default steps"))
    if scene.true_cfg_scale is not None and not family.embedded_guidance:
        problems.append((("true_cfg_scale",), f"is for models with embedded guidance (FLUX.1); {family.label} models "
                                              "take guidance_scale, classifier-free guidance itself"))
    elif scene.true_cfg_scale is not None and scene.true_cfg_scale > 1 and not scene.negative_prompt.strip():
        problems.append((("true_cfg_scale",), "needs a negative_prompt: true CFG steers away from it (without one, "
                                              "leave true_cfg_scale out)"))
    if scene.scheduler is not None and scene.scheduler not in family.schedulers:
        problems.append((("scheduler",), f"{family.label} models take {', '.join(family.scheduler_names)}, "
                                         f"not {scene.scheduler!r}"))
    for key in ("width", "height", "view_stride"):
        value = getattr(scene, key)
        if value % family.align_px:
            lower = value // family.align_px * family.align_px
            problems.append(((key,), f"must be a multiple of {family.align_px} for {family.label} models: "
                                     f"try {lower or family.align_px}"))
    return problems


def checked_for(scene: Scene, family: Family, source: Path | str = "scene", few_step: bool = False) -> Scene:
    """The scene for a model of `family` (a few-step one: few_step) once it is loaded: its defaults filled;
    SceneError (one line per problem, `source: field: message`) where that family cannot render it."""
    problems = family_problems(scene, family, few_step)
    if problems:
        raise SceneError([f"{source}: {field_path(loc)}: {message}" for loc, message in problems])
    return scene.for_family(family, few_step)


def _picture_problems(scene: Scene) -> list[Problem]:
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


def lora_problems(scene: Scene, allow_pickle: bool = False) -> list[Problem]:
    """Every LoRA file of the scene and its regions exists and is a weights file render will load: a
    .safetensors file whose header reads, or a pickle with allow_pickle (what --allow-pickle says)."""
    owners = [(("loras",), scene.loras)] + [(("regions", i, "loras"), r.loras) for i, r in enumerate(scene.regions)]
    problems = []
    for loc, loras in owners:
        for k, lora in enumerate(loras):
            problem = lora_file_problem(scene.lora_path(lora), lora.path, allow_pickle)
            if problem:
                problems.append(((*loc, k, "path"), problem))
    return problems


def lora_file_problem(path: Path, name: str, allow_pickle: bool) -> str | None:
    suffix = path.suffix.lower()
    if suffix not in (*SAFE_SUFFIXES, *PICKLE_SUFFIXES):
        return f"{name}: a LoRA is a .safetensors file (or, with --allow-pickle, {'/'.join(PICKLE_SUFFIXES)})"
    if not path.is_file():
        return f"no such file: {path}" if not path.exists() else f"{path} is not a file"
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        return (f"{name} is a pickle ({suffix}), which can run code when loaded: use a .safetensors LoRA, or, for a "
                "file you trust, pass --allow-pickle")
    if suffix in SAFE_SUFFIXES and safetensors_header(path) is None:
        return f"{name} is not a safetensors file (its header does not read: a text file, or a download cut short?)"
    return None


def file_problems(data: dict, base_dir: Path, allow_pickle: bool = False) -> list[tuple[tuple, str]]:
    """After the scene failed validation: the file checks of each LoRA, control and reference that is valid on its
    own (a missing or unreadable picture, a missing model or weight file), so one typo hides nothing else."""
    regions = data.get("regions") if isinstance(data.get("regions"), list) else []
    owners = [((), data)] + [(("regions", i), r) for i, r in enumerate(regions) if isinstance(r, dict)]
    problems = []
    for loc, owner in owners:
        for key, model in (("loras", Lora), ("control", Control), ("reference", Reference)):
            for k, item in enumerate(owner.get(key) if isinstance(owner.get(key), list) else []):
                try:
                    entry = model.model_validate(item)
                except ValidationError:
                    continue  # pydantic reported it
                at = (*loc, key, k)
                if key == "loras":
                    found = [("path", lora_file_problem(scene_path(base_dir, entry.path), entry.path, allow_pickle))]
                elif key == "control":
                    found = [("image", picture_problem(base_dir, entry.image, "a control image")),
                             ("model", controlnet_problem(base_dir, entry.model, allow_pickle))]
                else:
                    found = [("image", picture_problem(base_dir, entry.image, "a reference picture")),
                             adapter_root_problem(base_dir, entry, None) or ("model", None)]
                problems += [((*at, field), problem) for field, problem in found if problem]
    return problems


def check_valid_regions(data: dict[str, Any], base_dir: Path) -> list[Problem]:
    """After the scene failed validation: the canvas and file checks of each region valid on its own,
    on the data's canvas if that is valid (else the checks that need no canvas)."""
    regions = data.get("regions")
    if not isinstance(regions, list):
        return []
    canvas, problems = canvas_of(data), []
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
                    canvas: tuple[int, int] | None) -> Problem | None:
    """Region `i`'s box on the canvas, or its mask file readable and non-empty; canvas None: file checks only."""
    latent_hw = (canvas[1] // CELL_PX, canvas[0] // CELL_PX) if canvas else None
    if region.box is not None:
        if canvas is None:
            return None
        x0, y0, x1, y1 = region.box
        width, height = canvas
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            return ("regions", i, "box"), f"box {region.box} lies outside the {width}x{height} canvas"
        if not grid.box_cells(region.box, latent_hw).any():
            return ("regions", i, "box"), f"box {region.box} is too small: it covers no {CELL_PX}x{CELL_PX}-pixel latent cell"
        return None
    problem = _check_mask_file(scene_path(base_dir, region.mask), latent_hw)
    return (("regions", i, "mask"), problem) if problem else None


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
        return f"{path}: the mask is too small: it covers no {CELL_PX}x{CELL_PX}-pixel latent cell of the canvas"
    return None


# pydantic's name for one alternative of a union field (`int | Literal["auto"]`), the last part of its error's loc
_UNION_BRANCH = re.compile(r"literal\[.*\]|constrained-\w+|int|float|bool|str")


def one_per_value(errors: list[dict]) -> list[dict]:
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


def pydantic_message(err: dict) -> str:
    """One pydantic error in the scene's words."""
    kind, loc, value = err["type"], err["loc"], err.get("input")
    if kind == "extra_forbidden":
        model = (Lora if "loras" in loc else Control if "control" in loc else Reference if "reference" in loc
                 else Region if "regions" in loc else Scene)
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
