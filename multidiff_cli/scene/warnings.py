"""What a scene allows but probably does not mean: boxes past the edge, masks stretched to another shape,
overlaps, tiny regions, no background left for the global prompt. Each at its field, so a warning
points at its line as a problem does (scene.load formats them once; every command prints those)."""
from __future__ import annotations

import numpy as np

from . import grid
from .geometry import region_cells
from .schema import Region, Scene
from .validation import Problem


def scene_warnings(scene: Scene) -> list[Problem]:
    """(location, message) of everything allowed but probably not meant."""
    warnings: list[Problem] = []
    for i, region in enumerate(scene.regions):
        if region.box is not None:
            x0, y0, x1, y1 = region.box
            if x0 < 0 or y0 < 0 or x1 > scene.width or y1 > scene.height:
                warnings.append((("regions", i, "box"), f"{region.box} extends past the {scene.width}x{scene.height} "
                                                        "canvas: clipped"))
        else:
            warnings += _stretch_warning(scene, i, region)
    cells = [region_cells(scene, i) for i in range(len(scene.regions))]
    total = scene.latent_hw[0] * scene.latent_hw[1]
    for i, area in enumerate(cells):
        if area.sum() < 0.01 * total:
            warnings.append((("regions", i), f"covers {share_text(area.sum() / total)} of the canvas (under 1%): "
                                             "it may be ignored"))
        for j in range(i + 1, len(cells)):
            shared = (area & cells[j]).sum()
            if shared:
                warnings.append((("regions", j), f"overlaps regions[{i}] on {share_text(shared / total)} of the "
                                                 "canvas: there they are averaged"))
    if cells and np.logical_or.reduce(cells).all():
        warnings.append((("regions",), "they cover the whole canvas: the global prompt has no background of its own left"))
    return warnings


def share_text(share: float) -> str:
    """A share of the canvas as people read it: 12.5%, 0.6%, and a tiny one to two figures (0.024%), never 0.0%."""
    return f"{share:.1%}" if share >= 0.001 or share == 0 else f"{100 * share:.2g}%"


def _stretch_warning(scene: Scene, i: int, region: Region) -> list[Problem]:
    """A mask image of another aspect ratio than the canvas (over 1% off) is stretched to fit it."""
    mask_w, mask_h = grid.image_size_px(scene.path_of(region.mask))
    mask_aspect, canvas_aspect = mask_w / mask_h, scene.width / scene.height
    if abs(mask_aspect / canvas_aspect - 1) <= 0.01:
        return []
    return [(("regions", i, "mask"), f"{region.mask} is {mask_w}x{mask_h} (aspect {mask_aspect:.2f}) but the canvas is "
                                     f"{scene.width}x{scene.height} (aspect {canvas_aspect:.2f}): stretched to fit")]
