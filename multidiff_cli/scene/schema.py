"""The scene schema: strict pydantic models of a scene and its regions, each default in one place."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..catalog import CELL_PX, SCHEDULER_NAMES, Family
from .paths import KEEP_WORDS, scene_path

MAX_SEED = 2**63 - 1  # the largest seed a scene or --seeds may give
BOOTSTRAP_FRACTION = 0.2  # default bootstrap_steps = steps / 5: 10 of 50, as the scene contract says
WINDOW_CONTEXT = 0.25  # a region window's margin: a quarter of the region's side (README, Region windows)
DEFAULT_STRENGTH = 0.8  # with an init image: diffusers' img2img default
KEEP_CHOICES = KEEP_WORDS  # or a mask path


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _whole_cells(value: int) -> int:
    if value % CELL_PX:
        lower = value // CELL_PX * CELL_PX
        raise ValueError(f"must be a multiple of {CELL_PX} (the VAE's {CELL_PX}x{CELL_PX} latent cells): try {lower or CELL_PX}")
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
SizePx = Annotated[int, Field(ge=64, le=8192), AfterValidator(_whole_cells)]
StridePx = Annotated[int, Field(ge=8, le=8192), AfterValidator(_whole_cells)]
Guidance = Annotated[float, Field(ge=0, le=50, allow_inf_nan=False)]
SchedulerName = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]


class Strict(BaseModel):
    """Unknown keys are errors, and YAML types are taken as written (no "512" -> 512, no true -> 1)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _empty(items: list) -> bool:  # an empty list is left out of a dump, so scenes without LoRAs dump as before
    return not items


LORA_SCALE_LIMIT = 10.0  # |scale| above this is surely a typo (A1111 users go up to about 2)


class Lora(Strict):
    """A LoRA file (diffusers/peft or kohya/A1111 layout) and the scale it is applied at; a bare path
    (`loras: [style.safetensors]`) means scale 1."""

    path: Text = Field(description="LoRA file, relative to the scene file (or absolute); .safetensors")
    scale: float = Field(1.0, ge=-LORA_SCALE_LIMIT, le=LORA_SCALE_LIMIT, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _bare_path(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


CONTROL_SCALE_LIMIT = 5.0  # a ControlNet's conditioning scale above this is surely a typo (A1111 offers up to 2)


class Control(Strict):
    """A ControlNet and its control image (depth, pose, edges, ...), for the whole scene or for one region."""

    model: Text = Field(description="ControlNet: hub id, diffusers folder or single file (relative to the scene file), "
                                    "or random-controlnet")
    image: Text = Field(description="control image, relative to the scene file; scene-wide: resized to the canvas; a "
                                    "region's: the canvas' size, or fitted to the region's box")
    scale: float = Field(1.0, ge=0, le=CONTROL_SCALE_LIMIT, allow_inf_nan=False, description="conditioning scale")
    start: float = Field(0.0, ge=0, le=1, allow_inf_nan=False, description="share of the steps before it starts")
    end: float = Field(1.0, ge=0, le=1, allow_inf_nan=False, description="share of the steps after which it stops")
    fit: Literal["canvas", "box"] | None = Field(
        None, exclude_if=lambda value: value is None,
        description="a region's image: over the whole canvas, or fitted to the region's box; absent: the canvas "
                    "where the image is the canvas' size (as written in the scene file), else the box")

    @model_validator(mode="after")
    def _start_before_end(self) -> Control:
        if self.start >= self.end:
            raise ValueError(f"start ({self.start:g}) must be before end ({self.end:g}): both are shares of the steps, "
                             "0 to 1")
        return self


class Reference(Strict):
    """An IP-Adapter and its reference picture (a subject, a style), for the whole scene or for one region."""

    model: Text = Field(description="the IP-Adapter's repo: hub id (h94/IP-Adapter) or a folder in its layout, "
                                    "relative to the scene file")
    weight: Text = Field(description="its weight file inside the repo, e.g. models/ip-adapter_sd15.safetensors; a bare "
                                     "name is looked for in models/ (SD 1.x/2.x) or sdxl_models/ (SDXL), as h94 lays it out")
    image: Text = Field(description="the reference picture, relative to the scene file")
    scale: float = Field(1.0, ge=0, le=CONTROL_SCALE_LIMIT, allow_inf_nan=False, description="IP attention scale")
    image_encoder: Text | None = Field(None, exclude_if=lambda value: value is None,
                                       description="the CLIP image encoder's folder inside the repo; absent: "
                                                   "image_encoder/ beside the weight file")


class Region(Strict):
    """One prompt that owns part of the canvas: a box in pixels or a mask image."""

    prompt: Text
    box: list[Coordinate] | None = Field(None, min_length=4, max_length=4, description="x0, y0, x1, y1 in pixels")
    mask: Text | None = Field(None, description="image path, relative to the scene file; white = region")
    negative_prompt: AnyText | None = None
    guidance_scale: Guidance | None = None
    loras: list[Lora] = Field(default_factory=list, exclude_if=_empty, description="added on this region's samples only")
    control: list[Control] = Field(default_factory=list, exclude_if=_empty,
                                   description="ControlNets on this region's samples only")
    reference: list[Reference] = Field(default_factory=list, exclude_if=_empty,
                                       description="IP-Adapter reference pictures on this region's samples only")
    window: Literal["canvas", "auto"] | list[Coordinate] | None = Field(
        None, exclude_if=lambda value: value is None, description="where this region's prompt runs: canvas, auto (its box grown by window_context), or "
                          "[x0, y0, x1, y1] in pixels; absent: the scene's region_windows"
    )

    @field_validator("window")
    @classmethod
    def _window_box(cls, window):
        if isinstance(window, list) and (len(window) != 4 or window[0] >= window[2] or window[1] >= window[3]):
            raise ValueError("a window box is [x0, y0, x1, y1] in pixels with x0 < x1 and y0 < y1 (or canvas, auto)")
        return window

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

    # `model_config` is also pydantic's name for a model's settings: the field is model_config_, the key model_config
    model_config = ConfigDict(**Strict.model_config, serialize_by_alias=True, protected_namespaces=())

    prompt: Text
    negative_prompt: AnyText = ""
    style: AnyText = Field("", description="appended to every prompt, e.g. 'oil painting, warm light'")
    width: SizePx = 512
    height: SizePx = 512
    steps: int | None = Field(None, ge=1, le=1000, description="absent: the model family's (SD, SDXL: 50; "
                                                             "FLUX.1: 28, schnell: 4)")
    bootstrap_steps: int | None = Field(
        None, ge=0, le=1000, validate_default=True, description="absent: steps / 5, rounded (10 of 50)"
    )
    guidance_scale: Guidance | None = Field(None, description="absent: the model family's (SD, SDXL: 7.5; FLUX.1: "
                                                               "3.5, its embedded guidance)")
    true_cfg_scale: Guidance | None = Field(None, description="FLUX.1: classifier-free guidance with the negative "
                                                              "prompt, as FluxPipeline's true_cfg_scale (> 1 adds a pass)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    scheduler: SchedulerName | None = Field(None, description="absent: the model family's (SD, SDXL: ddim)")
    model: Text | None = None
    model_config_: Text | None = Field(
        None, alias="model_config", description="diffusers folder or hub id with the configs of a single-file `model`"
    )
    vae: Text | None = Field(None, description="a diffusers VAE (folder or hub id) instead of the model's own")
    view_stride: StridePx = Field(64, description="pixels between panorama views (windows of the model's native size)")
    wrap: Literal["none", "horizontal"] = Field("none", description="horizontal: a 360-degree panorama")
    tiled_decode: bool | Literal["auto"] = Field("auto", description="decode in tiles; auto: above 1024x1024 px")
    few_step: bool | Literal["auto"] = Field(
        "auto", description="StreamMultiDiffusion's mask-centering bootstrapping and quantized masks; auto: on for few-step distilled models"
    )
    max_batch: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] | None = Field(
        None, description="UNet samples per call; absent or auto: the size this device runs fastest"
    )
    init_image: Text | None = Field(None, description="picture to start from, relative to the scene file")
    strength: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False, validate_default=True,
        description="how far to re-noise the init image (1: from pure noise); absent: 0.8",
    )
    keep: Text | None = Field(
        None, validate_default=True,
        description="none: all may change; outside_regions: only the regions change; a mask path: white may change",
    )
    loras: list[Lora] = Field(default_factory=list, exclude_if=_empty, description="on every prompt's samples")
    control: list[Control] = Field(default_factory=list, exclude_if=_empty, description="ControlNets on every prompt's samples")
    reference: list[Reference] = Field(default_factory=list, exclude_if=_empty,
                                       description="IP-Adapter reference pictures on every prompt's samples")
    region_windows: bool | Literal["auto"] = Field(
        False, exclude_if=lambda value: value is False, description="run each region's prompt on a window around it, not the whole canvas; auto: where "
                           "that saves samples (README, Region windows)"
    )
    window_context: float = Field(WINDOW_CONTEXT, ge=0, le=4, allow_inf_nan=False,
                                  exclude_if=lambda value: value == WINDOW_CONTEXT,
                                  description="a window's margin around its region, as a share of the region's side")
    window_unconditional: Literal["own", "canvas"] = Field(
        "own", exclude_if=lambda value: value == "own",
        description="own: a window samples its own unconditional (negative) prediction; canvas: it guides with the "
                    "canvas's on its cells, one sample a window instead of two (README, Region windows)")
    regions: list[Region] = Field(default_factory=list)

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _notes: list[str] = PrivateAttr(default_factory=list)
    _family: Family | None = PrivateAttr(None)
    _few_step_model: bool = PrivateAttr(False)
    _warnings: list[str] = PrivateAttr(default_factory=list)
    _window_pins: dict[int, list[int] | None] = PrivateAttr(default_factory=dict)

    @field_validator("bootstrap_steps")
    @classmethod
    def _bootstrap_within_steps(cls, value: int | None, info: ValidationInfo) -> int | None:
        if "steps" not in info.data:  # steps itself is invalid and already reported
            return value
        steps = info.data["steps"]
        if steps is None:  # the model family's steps decide it (for_family), and the bound
            return value
        if value is None:
            return round(steps * BOOTSTRAP_FRACTION)
        if value > steps:
            raise ValueError(f"must be <= steps ({steps})")
        return value

    @field_validator("strength", "keep")
    @classmethod
    def _needs_init_image(cls, value, info: ValidationInfo):
        if "init_image" not in info.data:  # init_image itself is invalid and already reported
            return value
        if info.data["init_image"] is None:
            if value is not None:
                raise ValueError("needs `init_image`: the picture to start from")
            return None
        if value is None:
            return DEFAULT_STRENGTH if info.field_name == "strength" else "none"
        return value

    @property
    def keep_mask(self) -> str | None:
        """`keep` when it names a mask file."""
        return self.keep if self.keep not in (None, *KEEP_CHOICES) else None

    @property
    def base_dir(self) -> Path:
        """The folder mask paths are relative to: the scene file's."""
        return self._base_dir

    @property
    def notes(self) -> list[str]:
        """What loading changed to fit the command line (a scaled bootstrap, scaled boxes), for the user."""
        return list(self._notes)

    @property
    def warnings(self) -> list[str]:
        """What loading found allowed but probably not meant, one `file:line: field: message` each
        (scene.warnings.scene_warnings)."""
        return list(self._warnings)

    @property
    def family(self) -> Family | None:
        """The family of the model this scene renders on, where loading could tell (catalog.detect_family)."""
        return self._family

    def for_family(self, family: Family, few_step: bool = False) -> Scene:
        """This scene on a model of `family` (a few-step one: few_step): the family's defaults where the
        scene leaves them out (scheduler, guidance, steps, and bootstrap_steps following the steps; a
        few-step model's own steps and guidance where the family has them: Z-Image-Turbo's 9 and 0)."""
        steps = self.steps or family_steps(family, few_step)
        guidance = family.few_step_guidance if few_step and family.few_step_guidance is not None else family.default_guidance
        update = {key: value for key, value in (("scheduler", family.default_scheduler),
                                                ("guidance_scale", guidance), ("steps", steps),
                                                ("bootstrap_steps", round(steps * BOOTSTRAP_FRACTION)))
                  if getattr(self, key) is None}
        scene = self.model_copy(update=update)
        scene._family = family
        return scene

    def window_choice(self, region: Region) -> bool | str | list:
        """Where a region's prompt runs, as asked: its own `window`, else the scene's `region_windows`."""
        return region.window if region.window is not None else self.region_windows

    @property
    def window_pins(self) -> dict[int, list[int] | None]:
        """A re-rendered PNG's `auto` regions, by prompt index: the window its render ran ([x0, y0, x1, y1] in
        pixels), or None for the canvas (run.plan.recorded_windows). Not part of the scene: its record keeps
        `auto`, so another canvas size lets auto decide again."""
        return dict(self._window_pins)

    def with_window_pins(self, pins: dict[int, list[int] | None]) -> Scene:
        scene = self.model_copy()
        scene._window_pins = dict(pins)
        return scene

    @property
    def few_step_model(self) -> bool:
        """Whether the model this scene renders on is a few-step distilled one, as far as its names tell."""
        return self._few_step_model

    @property
    def cell_px(self) -> int:
        """Pixels per latent cell: the family's, where it is known."""
        return self._family.cell_px if self._family is not None else CELL_PX

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.cell_px, self.width // self.cell_px

    def path_of(self, name: str) -> Path:
        """A file the scene names (a mask, the init image, a LoRA), relative to the scene file's folder."""
        return scene_path(self.base_dir, name)

    @property
    def init_image_path(self) -> Path | None:
        return None if self.init_image is None else self.path_of(self.init_image)

    @property
    def keep_mask_path(self) -> Path | None:
        return None if self.keep_mask is None else self.path_of(self.keep_mask)

    def lora_path(self, lora: Lora) -> Path:
        return self.path_of(lora.path)

    def controls(self) -> list[tuple[int | None, Control]]:
        """Every control of the scene, in the order renders number them: (None: scene-wide, or a region's
        index, the control)."""
        return [(None, c) for c in self.control] + [(i, c) for i, r in enumerate(self.regions) for c in r.control]

    def references(self) -> list[tuple[int | None, Reference]]:
        """Every reference of the scene, in the order renders number them (None: scene-wide, or a region's index)."""
        return [(None, r) for r in self.reference] + [(i, r) for i, g in enumerate(self.regions) for r in g.reference]

    def full_prompt(self, text: str) -> str:
        """A prompt with the scene's `style` appended."""
        return styled(text, self.style)


def family_steps(family: Family, few_step: bool = False) -> int:
    """The steps of a scene that gives none, on a model of `family` (its few-step models have their own)."""
    return family.few_step_steps if few_step and family.few_step_steps else family.default_steps


def styled(text: str, style: str) -> str:
    """A prompt as it is used: `style` appended, where there is one."""
    return f"{text}, {style}" if style.strip() else text

