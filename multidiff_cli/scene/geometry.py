"""A scene's geometry: the canvas an init image implies, boxes that follow a new canvas, and the latent
cells each region and `keep` cover (numpy and Pillow only)."""
from __future__ import annotations

import math
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


# --- region windows ---------------------------------------------------------------------------------------

MIN_CONTEXT_PX = 32  # a window's margin around its region is at least this, whatever window_context says
# region_windows: auto windows a region whose window costs at most this share of its canvas views' cells (a window
# runs 2 samples where a view runs 1). Measured (README, Region windows): whole steps with windows of 0.47 of a view
# run 0.93x the full-canvas step; one unbatched sample takes half a view's at 0.46 of its cells
AUTO_SHARE = 0.5
# with window_unconditional: canvas a window runs 1 sample where a view runs 1: the same table's line (a sample's
# time about 0.07 + 0.93 x its share of a view's cells) breaks even near the whole view; 0.9 keeps a margin for
# the window's call of its own
AUTO_SHARE_CANVAS_UNCONDITIONAL = 0.9
Window = tuple[int, int, int, int]  # (top, left, height, width) in latent cells


def window_span(lo: int, hi: int, length: int, context: float, min_context: int, least: int, align: int) -> tuple[int, int]:
    """One axis of a region window: the region's cells [lo, hi) grown by `context` of their extent on each side
    (at least `min_context` cells), at least `least` cells long, rounded up to whole `align` cells, clipped to
    the canvas' `length`, and centred on the region as far as the canvas allows. Returns (start, size)."""
    pad = max(math.ceil(context * (hi - lo)), min_context)
    size = max(hi - lo + 2 * pad, least)
    size = min(math.ceil(size / align) * align, length)
    start = round((lo + hi) / 2 - size / 2)
    return max(0, min(start, length - size)), size


def cells_window(cells: np.ndarray, context: float, min_context: int, least: int, align: int) -> Window:
    """The window around a region's (h, w) boolean cells: its bounding box grown by `window_span` on both axes."""
    rows, cols = np.nonzero(cells.any(axis=1))[0], np.nonzero(cells.any(axis=0))[0]
    top, height = window_span(int(rows[0]), int(rows[-1]) + 1, cells.shape[0], context, min_context, least, align)
    left, width = window_span(int(cols[0]), int(cols[-1]) + 1, cells.shape[1], context, min_context, least, align)
    return top, left, height, width


def box_window(scene: Scene, box: list[int]) -> Window:
    """A `window: [x0, y0, x1, y1]` in pixels as cells (the cells whose centre it holds, as boxes are read)."""
    cells = grid.box_cells(box, scene.latent_hw, scene.cell_px)
    rows, cols = np.nonzero(cells.any(axis=1))[0], np.nonzero(cells.any(axis=0))[0]
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1 - int(rows[0]), int(cols[-1]) + 1 - int(cols[0])


def region_windows(scene: Scene, native_cells: int, align_px: int, views: list[Window]) -> dict[int, Window]:
    """The windows the scene's regions run in, by prompt index (1 = regions[0]); a region not in it runs on the
    canvas' `views` as the global prompt does.

    A region's `window` decides (absent: the scene's region_windows): canvas, never; a box, that box; true, its
    cells' bounding box grown by window_context (at least MIN_CONTEXT_PX), at least half the native window,
    sides whole multiples of align_px, within the canvas; auto, that window where it costs at most AUTO_SHARE
    of the canvas views the region has weight in (AUTO_SHARE_CANVAS_UNCONDITIONAL where its window takes the
    canvas's unconditional, `takes_canvas_unconditional`: one sample a window, not two). A computed window
    wider or taller than the native window is no window: the region runs on the canvas' views (a panorama
    region already runs only where it is)."""
    cell = scene.cell_px
    align = max(1, align_px // cell)
    windows: dict[int, Window] = {}
    for i, region in enumerate(scene.regions):
        choice = scene.window_choice(region)
        if choice is False or choice == "canvas":
            continue
        cells = region_cells(scene, i)
        if not cells.any():
            continue
        if isinstance(choice, list):
            windows[i + 1] = box_window(scene, choice)
            continue
        pins = scene.window_pins
        if choice == "auto" and i + 1 in pins and pin_holds(scene, pins[i + 1], cells):
            if pins[i + 1] is not None:  # what the picture's render ran, whatever AUTO_SHARE says now
                windows[i + 1] = box_window(scene, pins[i + 1])
            continue
        window = cells_window(cells, scene.window_context, math.ceil(MIN_CONTEXT_PX / cell), native_cells // 2, align)
        if window[2] > native_cells or window[3] > native_cells:
            continue
        share = AUTO_SHARE_CANVAS_UNCONDITIONAL if takes_canvas_unconditional(scene, region) else AUTO_SHARE
        if choice == "auto" and window[2] * window[3] > share * views_cost(cells, views):
            continue
        windows[i + 1] = window
    return windows


def takes_canvas_unconditional(scene: Scene, region) -> bool:
    """Whether a region's window would guide with the canvas's unconditional (window_unconditional: canvas): its
    negative condition is the global prompt's, so no negative prompt, guidance, LoRA, ControlNet or IP-Adapter
    of its own (each makes its negative a condition of its own: run.render.scene_prompts)."""
    return (scene.window_unconditional == "canvas" and region.negative_prompt in (None, scene.negative_prompt)
            and region.guidance_scale in (None, scene.guidance_scale)
            and not (region.loras or region.control or region.reference))


def pin_holds(scene: Scene, box: list[int] | None, cells: np.ndarray) -> bool:
    """Whether a pinned window (None: the canvas) still fits its region: on whole cells, within the canvas, and
    holding every cell of the region (its mask may have changed since the picture was rendered)."""
    if box is None:
        return True
    x0, y0, x1, y1 = box
    cell = scene.cell_px
    if any(v % cell for v in box) or not (0 <= x0 < x1 <= scene.width and 0 <= y0 < y1 <= scene.height):
        return False
    top, left, bottom, right = y0 // cell, x0 // cell, y1 // cell, x1 // cell
    return int(cells[top:bottom, left:right].sum()) == int(cells.sum())


def views_cost(cells: np.ndarray, views: list[Window]) -> int:
    """The latent cells a prompt with weight in `cells` runs on per step over the canvas' views (those it touches)."""
    width = cells.shape[1]
    cost = 0
    for top, left, height, view_width in views:
        columns = np.arange(left, left + view_width) % width
        if cells[top:top + height][:, columns].any():
            cost += height * view_width
    return cost
