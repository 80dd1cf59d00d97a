"""A scene's controls and references (`control:` and `reference:` on the scene and its regions): where each
control image goes on the canvas, its pixels there, where each IP-Adapter's files are, and the problems a
scene can be told of before any model loads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..catalog import PICKLE_SUFFIXES, RANDOM_CONTROLNET, looks_like_hub_id
from ..errors import PictureError
from . import picture
from .geometry import region_cells
from .paths import local_model, scene_path
from .schema import Control, Reference, Scene

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


def control_box(scene: Scene, region: int | None, control: Control, image_wh: tuple[int, int]) -> Box:
    """Where a control image goes on the canvas: a scene-wide one, and a region's with `fit: canvas` (or, fit
    absent, of exactly the canvas' size), on the whole canvas; any other region's fitted to the region's
    bounding box (its cells'), black around it (a ControlNet reads black as no edges, no pose, far depth)."""
    canvas = (0, 0, scene.width, scene.height)
    if region is None or control.fit == "canvas" or (control.fit is None and tuple(image_wh) == canvas[2:]):
        return canvas
    cells = region_cells(scene, region)
    rows, cols = cells.any(axis=1).nonzero()[0], cells.any(axis=0).nonzero()[0]
    cell = scene.cell_px
    return int(cols[0]) * cell, int(rows[0]) * cell, (int(cols[-1]) + 1) * cell, (int(rows[-1]) + 1) * cell


def control_image_path(scene: Scene, control: Control) -> Path:
    return scene.path_of(control.image)


def control_model_name(scene: Scene, control: Control) -> str:
    """A control's ControlNet resolved: a local folder or file as an absolute path (relative to the scene
    file, the one rule for paths); a hub id or the built-in random one as written."""
    return local_model(control.model, scene.base_dir)[0]


def control_pixels(scene: Scene, region: int | None, control: Control) -> np.ndarray:
    """A control image on the canvas: float32 (H, W, 3) in [0, 1], as diffusers' control_image_processor
    makes it (RGB, Lanczos-resized, not normalised), placed by `control_box`."""
    return placed_control(scene, region, control)[0]


def placed_control(scene: Scene, region: int | None, control: Control) -> tuple[np.ndarray, Box]:
    """`control_pixels`, and the box it placed the image in."""
    with picture.open_image(control_image_path(scene, control), "a control image") as image:
        image = image.convert("RGB")
        box = x0, y0, x1, y1 = control_box(scene, region, control, image.size)
        if image.size != (x1 - x0, y1 - y0):
            image = image.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS)
        canvas = np.zeros((scene.height, scene.width, 3), dtype=np.float32)
        canvas[y0:y1, x0:x1] = np.asarray(image, dtype=np.float32) / 255.0
    return canvas, box


def with_fits(scene: Scene, authored_wh: tuple[int, int] | None) -> Scene:
    """The scene with every region control's `fit` decided where it is absent: canvas for an image of the canvas'
    size as the scene file has it (authored_wh; --size may have scaled the canvas and boxes since) or as it is
    now, else box. Recorded so, a re-render places each image as this render does. Images that cannot be read
    are left as they are (their problem is reported)."""
    sizes = {(scene.width, scene.height), *([tuple(authored_wh)] if authored_wh else [])}
    regions = []
    for region in scene.regions:
        controls = []
        for control in region.control:
            if control.fit is None:
                try:
                    with picture.open_image(scene.path_of(control.image), "a control image") as image:
                        control = control.model_copy(update={"fit": "canvas" if image.size in sizes else "box"})
                except PictureError:
                    pass
            controls.append(control)
        regions.append(region.model_copy(update={"control": controls}) if region.control else region)
    return scene.model_copy(update={"regions": regions}) if any(r.control for r in scene.regions) else scene


def located(scene: Scene, key: str) -> list[tuple[tuple, int | None, Control | Reference]]:
    """Every control (key "control") or reference ("reference") of the scene, in the order renders number them
    (Scene.controls, Scene.references), with where the scene writes it: ("control", 0), ("regions", 1,
    "control", 0); and its region (None: scene-wide)."""
    counts: dict[int | None, int] = {}
    out = []
    for region, item in scene.controls() if key == "control" else scene.references():
        k = counts[region] = counts.get(region, -1) + 1
        out.append(((key, k) if region is None else ("regions", region, key, k), region, item))
    return out


def control_problems(scene: Scene, allow_pickle: bool = False) -> list[tuple[tuple, str]]:
    """Each control's problems at its field: its image missing or unreadable, or of another shape than where it
    goes (over 3% apart in aspect); its ControlNet a local path that does not exist, or a pickle without
    allow_pickle; a family that takes no ControlNet."""
    problems = []
    family = scene.family
    for loc, region, control in located(scene, "control"):
        if family is not None and not family.controlnets:
            problems.append((loc, f"{family.label} models take no ControlNet in multidiff yet (SD 1.x/2.x, SDXL and "
                                  "FLUX.1 do)"))
            continue
        problem = _image_problem(scene, region, control)
        if problem:
            problems.append(((*loc, "image"), problem))
        problem = controlnet_problem(scene.base_dir, control.model, allow_pickle)
        if problem:
            problems.append(((*loc, "model"), problem))
    return problems


def _image_problem(scene: Scene, region: int | None, control: Control) -> str | None:
    path = control_image_path(scene, control)
    try:
        with picture.open_image(path, "a control image") as image:
            size = image.size
    except PictureError as exc:
        return str(exc)
    x0, y0, x1, y1 = control_box(scene, region, control, size)
    target = (x1 - x0, y1 - y0)
    if not picture.aspects_differ(size, target):
        return None
    where = "the canvas" if target == (scene.width, scene.height) else f"the region's box {[x0, y0, x1, y1]}"
    return (f"{path} is {size[0]}x{size[1]} (aspect {size[0] / size[1]:.2f}) but {where} is {target[0]}x{target[1]} "
            f"(aspect {target[0] / target[1]:.2f}): give a control image of that shape"
            + ("" if region is None else f", or of the canvas' size ({scene.width}x{scene.height})"))


def controlnet_problem(base_dir: Path, model: str, allow_pickle: bool) -> str | None:
    """A ControlNet name's problem: a local path that does not exist (nor a hub id), a folder without config.json,
    a pickle without allow_pickle."""
    if model == RANDOM_CONTROLNET:
        return None
    path = Path(local_model(model, base_dir)[0])
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"{path}: not a diffusers ControlNet folder (it holds no config.json)"
        return None
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
            return (f"{model} is a pickle ({path.suffix}), which can run code when loaded: use a .safetensors "
                    "file, or, for a file you trust, pass --allow-pickle")
        return None
    if looks_like_hub_id(model) and not _meant_local(base_dir, model):
        return None
    return f"no such folder or file: {scene_path(base_dir, model)} (nor a hub id, owner/name, nor {RANDOM_CONTROLNET})"


def _meant_local(base_dir: Path, name: str) -> bool:
    """Whether an owner/name that is no local path still means one: its first folder is there beside the scene
    (controlnets/depth with controlnets/ present is a folder not made yet, not a hub repo)."""
    return scene_path(base_dir, name.split("/", 1)[0]).is_dir()


def picture_problem(base_dir: Path, name: str, what: str) -> str | None:
    try:
        picture.open_image(scene_path(base_dir, name), what).close()
    except PictureError as exc:
        return str(exc)
    return None


def adapter_root_problem(base_dir: Path, reference: Reference, family: str | None) -> tuple[str, str] | None:
    """(field, problem) of an IP-Adapter's repo: a local folder without the weight file, or no such folder (nor a
    hub id). family None: the weight may be in any of h94's folders."""
    root = Path(local_model(reference.model, base_dir)[0])
    if root.is_dir():
        if "/" in reference.weight:
            candidates = [reference.weight]
        elif family in H94_FOLDERS:
            candidates = [reference.weight, f"{H94_FOLDERS[family]}/{reference.weight}"]
        else:
            candidates = [reference.weight, *(f"{f}/{reference.weight}" for f in H94_FOLDERS.values())]
        if not any((root / name).is_file() for name in candidates):
            return "weight", f"no such file in {root}: {' or '.join(candidates)}"
    elif not looks_like_hub_id(reference.model) or _meant_local(base_dir, reference.model):
        return "model", f"no such folder: {scene_path(base_dir, reference.model)} (nor a hub id, owner/name)"
    return None


# --- references (IP-Adapters) -----------------------------------------------------------------------------

H94_FOLDERS = {"sd": "models", "sdxl": "sdxl_models"}  # where h94/IP-Adapter keeps each family's weights


def reference_root(scene: Scene, reference: Reference) -> str:
    """An IP-Adapter's repo resolved: a local folder as an absolute path (relative to the scene file), else the
    hub id as written."""
    return local_model(reference.model, scene.base_dir)[0]


def reference_weight(scene: Scene, reference: Reference, family: str | None) -> str:
    """The weight file's path inside the repo: as written where it names a folder (or is there at the top of a
    local folder), else in h94's folder for the family (models/, sdxl_models/)."""
    if "/" in reference.weight or family not in H94_FOLDERS:
        return reference.weight
    root = Path(reference_root(scene, reference))
    if root.is_dir() and (root / reference.weight).is_file():
        return reference.weight
    return f"{H94_FOLDERS[family]}/{reference.weight}"


def reference_encoder(reference: Reference, weight: str) -> str:
    """The image encoder's folder inside the repo: as written, else image_encoder/ beside the weight file
    (diffusers' load_ip_adapter rule)."""
    if reference.image_encoder is not None:
        return reference.image_encoder
    folder = Path(weight).parent
    return "image_encoder" if str(folder) == "." else f"{folder.as_posix()}/image_encoder"


def reference_problems(scene: Scene) -> list[tuple[tuple, str]]:
    """Each reference's problems at its field: its picture missing or unreadable; its repo a local path that
    does not exist (nor a hub id), or a local folder without the weight file; a family that takes none."""
    problems = []
    family = scene.family
    for loc, _, reference in located(scene, "reference"):
        if family is not None and not family.ip_adapters:
            problems.append((loc, f"{family.label} models take no IP-Adapter in multidiff yet (SD 1.x/2.x and SDXL do)"))
            continue
        problem = picture_problem(scene.base_dir, reference.image, "a reference picture")
        if problem:
            problems.append(((*loc, "image"), problem))
        root = adapter_root_problem(scene.base_dir, reference, family.name if family is not None else None)
        if root:
            problems.append(((*loc, root[0]), root[1]))
    return problems
