"""What a scene allows but probably does not mean: boxes past the edge, masks stretched to another shape,
overlaps, tiny regions, no background left for the global prompt."""
from __future__ import annotations

import numpy as np

from . import grid
from .geometry import region_cells
from .schema import Region, Scene


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


def _stretch_warning(scene: Scene, i: int, region: Region) -> list[str]:
    """A mask image of another aspect ratio than the canvas (over 1% off) is stretched to fit it."""
    mask_w, mask_h = grid.image_size_px(scene.path_of(region.mask))
    mask_aspect, canvas_aspect = mask_w / mask_h, scene.width / scene.height
    if abs(mask_aspect / canvas_aspect - 1) <= 0.01:
        return []
    return [f"regions[{i}].mask {region.mask} is {mask_w}x{mask_h} (aspect {mask_aspect:.2f}) but the canvas is "
            f"{scene.width}x{scene.height} (aspect {canvas_aspect:.2f}): stretched to fit"]
