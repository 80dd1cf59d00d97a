"""A scene's geometry: the canvas an init image implies, boxes that follow a new canvas, and the latent
cells each region and `keep` cover (numpy and Pillow only)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError

from . import grid, picture
from .paths import scene_path
from .schema import Scene, SizePx


def canvas_of_picture(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """A scene with an init image and no width/height takes the picture's canvas (picture.PictureError
    when the picture cannot be used; {} when there is no init image or validation will say why)."""
    name = data.get("init_image") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name.strip():
        return {}
    return picture.canvas_from_picture(data, scene_path(base_dir, name))


def boxes_following_canvas(data, overrides, notes, hints) -> dict[str, Any]:
    """A new canvas (--size) keeps the layout: boxes scale with it, as mask images already do."""
    old, new = canvas_of(data), canvas_of({**data, **overrides})
    regions = data.get("regions")
    if not {"width", "height"} & overrides.keys() or None in (old, new) or old == new or not isinstance(regions, list):
        return {}
    scaled_regions, any_scaled = [], False
    for i, region in enumerate(regions):
        box = region.get("box") if isinstance(region, dict) else None
        if isinstance(box, list) and len(box) == 4 and all(is_int(v) for v in box):  # else validation says why
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


def is_int(value: Any, least: int | None = None) -> bool:
    """An int as YAML wrote it (not a bool), at least `least` when given."""
    return isinstance(value, int) and not isinstance(value, bool) and (least is None or value >= least)


_SIZE_PX = TypeAdapter(SizePx)


def canvas_of(data: dict[str, Any]) -> tuple[int, int] | None:
    """(width, height) the data asks for, the schema's defaults where absent; None if either is invalid."""
    try:
        return tuple(_SIZE_PX.validate_python(data.get(key, Scene.model_fields[key].default), strict=True)
                     for key in ("width", "height"))
    except ValidationError:
        return None


def changeable_cells(scene: Scene) -> np.ndarray | None:
    """Boolean (h, w): the latent cells `keep` lets change, or None where everything may."""
    if scene.keep == "outside_regions":
        return np.logical_or.reduce([region_cells(scene, i) for i in range(len(scene.regions))])
    if scene.keep_mask is not None:
        return picture.keep_cells(scene.keep_mask_path, scene.latent_hw)
    return None


def region_cells(scene: Scene, index: int) -> np.ndarray:
    """Boolean (h, w): the latent cells region `index` covers."""
    region = scene.regions[index]
    if region.box is not None:
        return grid.box_cells(region.box, scene.latent_hw, scene.cell_px)
    return grid.resize_nearest(grid.read_mask_image(scene.path_of(region.mask)), scene.latent_hw)
