"""The scene file: pydantic models, and load_scene(path) with errors that point at the YAML line."""
from __future__ import annotations

import difflib
import math
import reprlib
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import SceneError
from .layout import LATENT_PX
from .schedulers import SCHEDULER_NAMES
from .yamlpos import parse_yaml, report

FEW_STEPS = 8  # at most this many steps is a few-step (distilled-model) render
BOOTSTRAP_FRACTION = 0.2  # default bootstrap_steps = steps / 5: 10 of 50, as the scene contract says


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _multiple_of_8(value: int) -> int:
    if value % LATENT_PX:
        lower = value // LATENT_PX * LATENT_PX
        raise ValueError(f"must be a multiple of 8 (the VAE's 8x8 latent cells): try {lower or 8}")
    return value


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"holds a character that is not valid Unicode ({text[exc.start]!r})") from None
    return text


AnyText = Annotated[str, AfterValidator(_encodable)]
Text = Annotated[str, AfterValidator(_encodable), AfterValidator(_not_blank)]
Coordinate = Annotated[int, Field(ge=-65536, le=65536)]
SizePx = Annotated[int, Field(ge=64, le=8192), AfterValidator(_multiple_of_8)]
StridePx = Annotated[int, Field(ge=8, le=8192), AfterValidator(_multiple_of_8)]
Guidance = Annotated[float, Field(ge=0, le=50, allow_inf_nan=False)]
SchedulerName = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]


class Strict(BaseModel):
    """Unknown keys are errors, and YAML types are taken as written (no "512" -> 512, no true -> 1)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Region(Strict):
    """One prompt that owns part of the canvas: a box in pixels or a mask image."""

    prompt: Text
    box: list[Coordinate] | None = Field(None, min_length=4, max_length=4, description="x0, y0, x1, y1 in pixels")
    mask: Text | None = Field(None, description="image path, relative to the scene file; white = region")
    negative_prompt: AnyText | None = None
    guidance_scale: Guidance | None = None

    @field_validator("box")
    @classmethod
    def _ordered_corners(cls, box: list[int] | None) -> list[int] | None:
        if box is not None and (box[0] >= box[2] or box[1] >= box[3]):
            raise ValueError("needs x0 < x1 and y0 < y1 ([x0, y0, x1, y1], origin top-left)")
        return box

    @model_validator(mode="after")
    def _box_or_mask(self) -> Region:
        if (self.box is None) == (self.mask is None):
            raise ValueError("a region needs exactly one of `box: [x0, y0, x1, y1]` or `mask: file.png`")
        return self


class Scene(Strict):
    """A whole picture: the global prompt, the regions, and how to sample."""

    prompt: Text
    negative_prompt: AnyText = ""
    style: AnyText = Field("", description="appended to every prompt, e.g. 'oil painting, warm light'")
    width: SizePx = 512
    height: SizePx = 512
    steps: int = Field(50, ge=1, le=1000)
    bootstrap_steps: int | None = Field(
        None, ge=0, le=1000, validate_default=True, description="absent: steps / 5, rounded (10 of 50)"
    )
    guidance_scale: Guidance = 7.5
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    scheduler: SchedulerName = "ddim"
    model: Text | None = None
    view_stride: StridePx = Field(64, description="pixels between panorama views (windows of the model's native size)")
    wrap: Literal["none", "horizontal"] = Field("none", description="horizontal: a 360-degree panorama")
    tiled_decode: bool | Literal["auto"] = Field("auto", description="decode in tiles; auto: above 1024x1024 px")
    few_step: bool | Literal["auto"] = Field(
        "auto", description="StreamMultiDiffusion's mask-centering bootstrapping and quantized masks; auto: steps <= 8"
    )
    max_batch: int | None = Field(None, ge=1, le=4096, description="UNet samples per call; absent: all of a step")
    regions: list[Region] = Field(default_factory=list)

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @field_validator("bootstrap_steps")
    @classmethod
    def _bootstrap_within_steps(cls, value: int | None, info: ValidationInfo) -> int | None:
        steps = info.data.get("steps")
        if steps is None:  # steps itself is invalid and already reported
            return value
        if value is None:
            return round(steps * BOOTSTRAP_FRACTION)
        if value > steps:
            raise ValueError(f"must be <= steps ({steps})")
        return value

    @property
    def base_dir(self) -> Path:
        """The folder mask paths are relative to: the scene file's."""
        return self._base_dir

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // LATENT_PX, self.width // LATENT_PX

    @property
    def few_step_on(self) -> bool:
        """Whether the few-step stabilisation runs: `few_step`, or for `auto`, steps <= FEW_STEPS."""
        return self.steps <= FEW_STEPS if self.few_step == "auto" else self.few_step

    def mask_path(self, region: Region) -> Path:
        try:
            return self.base_dir / Path(region.mask).expanduser()
        except RuntimeError:  # ~someone who does not exist: taken literally, reported as missing
            return self.base_dir / region.mask

    def full_prompt(self, text: str) -> str:
        """A prompt with the scene's `style` appended."""
        return f"{text}, {self.style}" if self.style.strip() else text


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
    from . import layout

    problems: list[tuple[tuple, str]] = []
    for i, region in enumerate(scene.regions):
        if region.box is not None:
            x0, y0, x1, y1 = region.box
            if x1 <= 0 or y1 <= 0 or x0 >= scene.width or y0 >= scene.height:
                problems.append(
                    (("regions", i, "box"), f"box {region.box} lies outside the {scene.width}x{scene.height} canvas")
                )
            elif not layout.box_cells(region.box, scene.latent_hw).any():
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
    from . import layout

    region = scene.regions[index]
    if region.box is not None:
        return layout.box_cells(region.box, scene.latent_hw)
    return layout.resize_nearest(layout.read_mask_image(scene.mask_path(region)), scene.latent_hw)


def _check_mask_file(path: Path, latent_hw: tuple[int, int]) -> str | None:
    from PIL import Image

    from . import layout

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
                pixel_mask = layout.pixel_mask(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"{path}: refused, too many pixels for a mask ({exc})"
    except (OSError, ValueError, SyntaxError) as exc:
        return f"{path} is not an image Pillow can read ({exc})"
    if not pixel_mask.any():
        return f"{path}: the mask is empty (no pixel is at least half-white; white = region)"
    if not layout.resize_nearest(pixel_mask, latent_hw).any():
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
