"""`multidiff upscale`: a picture -> the scene that renders it larger (init image, low strength, views),
written beside the output so the upscale can be edited and run again."""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..catalog import DEFAULT_MODEL, detect_family
from ..errors import MetadataError, UsageError
from ..output import OUTPUT_DIR
from ..output.png import read_metadata, record_base_dir, write_atomic
from ..scene import scene_from_dict
from ..scene.geometry import scale_px
from ..scene.paths import rebase_paths
from ..scene.picture import multiple_of_cell, upright_size
from ..scene.schema import MAX_SEED
from . import UPSCALE_SCALE, UPSCALE_STRENGTH
from .plan import SEED_RANGE, free_path
MAX_CANVAS_PX = 8192  # the scene's largest width or height
# what an upscale keeps of a multidiff PNG's scene besides its regions: what it shows and how it was sampled
CARRIED = ("prompt", "negative_prompt", "style", "guidance_scale", "scheduler", "model", "wrap")


@dataclass(frozen=True)
class UpscaleRequest:
    image: Path
    scale: float = UPSCALE_SCALE
    prompt: str | None = None
    strength: float = UPSCALE_STRENGTH
    steps: int | None = None
    seed: int | None = None
    model: str | None = None
    output: Path | None = None
    output_dir: Path = OUTPUT_DIR


def upscale_canvas(size_wh: tuple[int, int], scale: float, align_px: int = 8) -> tuple[int, int]:
    """The picture's size times `scale`, each side rounded to a multiple of the latent cell (of align_px, the
    model family's alignment: 16 px for FLUX and the other transformers that patchify 2x2 cells)."""
    if not 1 <= scale <= 16:
        raise UsageError(f"--scale {scale}: expected 1 to 16 (2 doubles width and height)")
    canvas = tuple(multiple_of_cell(side * scale, cell=align_px) for side in size_wh)
    if max(canvas) > MAX_CANVAS_PX:
        raise UsageError(f"--scale {scale}: a {size_wh[0]}x{size_wh[1]} picture would become {canvas[0]}x{canvas[1]}, "
                         f"over the largest canvas side, {MAX_CANVAS_PX} px")
    return canvas


def own_scene(image: Path, folder: Path) -> dict[str, Any] | None:
    """The scene of a PNG made by multidiff (mask paths rewritten to work from `folder`), or None."""
    if image.suffix.lower() != ".png":
        return None
    try:
        record = read_metadata(image)
    except MetadataError:
        return None
    return rebase_paths(record["scene"], record_base_dir(record, image), folder)


def upscale_scene(request: UpscaleRequest, folder: Path) -> dict[str, Any]:
    """The scene of the upscale, its paths relative to `folder` (where the scene file goes)."""
    if not 0 < request.strength <= 1:
        raise UsageError(f"--strength {request.strength}: expected more than 0 and at most 1")
    size = upright_size(request.image)
    own = own_scene(request.image, folder) or {}
    family = detect_family(request.model or own.get("model") or DEFAULT_MODEL)
    width, height = upscale_canvas(size, request.scale, family.align_px if family is not None else 8)
    scene = {key: own[key] for key in CARRIED if key in own}
    if request.prompt is not None:
        scene["prompt"] = request.prompt
    if not str(scene.get("prompt", "")).strip():
        raise UsageError(f"{request.image} holds no prompt of multidiff's: say what it shows with --prompt TEXT")
    if request.model is not None:
        scene["model"] = request.model
    scene.update({
        "init_image": _relative(request.image, folder), "strength": request.strength, "keep": "none",
        "width": width, "height": height, "bootstrap_steps": 0,
        "seed": request.seed if request.seed is not None else secrets.randbelow(SEED_RANGE),
    })
    if request.steps is not None:
        scene["steps"] = request.steps
    regions = [_scaled_region(r, own, (width, height)) for r in own.get("regions", []) if isinstance(r, dict)]
    if regions and request.prompt is None:  # the picture's own region prompts, where they were
        scene["regions"] = regions
    return scene


def _scaled_region(region: dict[str, Any], own: dict[str, Any], canvas: tuple[int, int]) -> dict[str, Any]:
    box = region.get("box")
    old = (own.get("width"), own.get("height"))
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) for v in (*box, *old))):
        return region
    return {**region, "box": [scale_px(v, canvas[k % 2], old[k % 2]) for k, v in enumerate(box)]}


def _relative(path: Path, folder: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(folder).resolve())


def write_upscale_scene(request: UpscaleRequest) -> Path:
    """Write the upscale's scene beside where its picture goes (a free name: no file is replaced)."""
    if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
        raise UsageError(f"--seed {request.seed}: expected 0 to {MAX_SEED}")
    if request.output is not None and request.output.suffix.lower() != ".png":
        raise UsageError(f"-o/--output: {request.output} must name a .png file (for a folder, use --output-dir)")
    folder = request.output.parent if request.output else request.output_dir
    base = request.output.with_suffix(".yaml") if request.output else folder / f"{request.image.stem}-x{request.scale:g}.yaml"
    target = free_path(base, set())[0]
    scene = upscale_scene(request, folder)
    # a scene that cannot render is not written: checked where it will be, its paths relative to its folder
    # (which need not exist yet)
    scene_from_dict(scene, target, base_dir=folder.resolve())
    text = (f"# an upscale of {request.image.name}, x{request.scale:g}: written by multidiff upscale; edit it and run\n"
            f"# multidiff render {target.name}\n")
    for key, value in scene.items():  # block style, with flow-style boxes
        flow = None if isinstance(value, (list, dict)) else False
        text += yaml.safe_dump({key: value}, allow_unicode=True, default_flow_style=flow, sort_keys=False)
    return write_atomic(target, lambda handle: handle.write(text.encode("utf-8")))


def run_upscale(request: UpscaleRequest, settings, on_event=None):
    """Write the upscale's scene, then render it as `render` would (settings: run.batch.RunSettings);
    returns (the scene's path, the batch's report). Where the render refuses its input (exit 2: the
    memory check, say), the scene is removed again: bad input writes nothing."""
    from .batch import BatchRequest, run_batch

    scene_path = write_upscale_scene(request)
    try:
        report = run_batch(BatchRequest([scene_path], output=request.output, output_dir=request.output_dir), settings,
                           on_event)
    except BaseException:
        scene_path.unlink(missing_ok=True)
        raise
    if report.exit_code == 2 and not report.written:
        scene_path.unlink(missing_ok=True)
    return scene_path, report
