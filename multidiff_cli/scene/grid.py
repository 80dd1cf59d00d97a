"""Region shapes on the latent grid with numpy and Pillow only: what validation and previews need
without loading torch (method/weights.py turns them into fusion weights)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..catalog import CELL_PX

def box_cells(box_px, latent_hw: tuple[int, int], scale: int = CELL_PX) -> np.ndarray:
    """Boolean (h, w): the latent cells whose centre lies in the box [x0, y0, x1, y1) (pixels).

    The same rule as resizing a pixel mask by cell-centre (nearest) sampling, so a box and the
    PNG of that box give identical weights.
    """
    h, w = latent_hw
    x0, y0, x1, y1 = box_px
    centres_y = np.arange(h) * scale + scale / 2
    centres_x = np.arange(w) * scale + scale / 2
    inside_y = (centres_y >= y0) & (centres_y < y1)
    inside_x = (centres_x >= x0) & (centres_x < x1)
    return inside_y[:, None] & inside_x[None, :]


def image_to_grey(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> float grey in [0, 1]. Transparent pixels count as black (not in the region)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit PNGs open as I;16 or I depending on Pillow; convert("L") would clip, not scale.
        return np.clip(np.asarray(image, dtype=np.float64) / 65535.0, 0.0, 1.0)
    if image.mode == "F":
        return np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    if image.has_transparency_data:  # alpha band, transparency index, or an RGBA palette
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float64) / 255.0
        return np.asarray(rgba.convert("L"), dtype=np.float64) / 255.0 * alpha
    return np.asarray(image.convert("L"), dtype=np.float64) / 255.0


def pixel_mask(image: Image.Image) -> np.ndarray:
    """Boolean (H, W) pixel mask: grey thresholded at half (white = region)."""
    return image_to_grey(image) >= 0.5


def resize_nearest(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D mask by sampling at each output cell's centre (torch's 'nearest-exact')."""
    rows = np.minimum(((np.arange(size_hw[0]) + 0.5) * mask.shape[0] / size_hw[0]).astype(int), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(size_hw[1]) + 0.5) * mask.shape[1] / size_hw[1]).astype(int), mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


def read_mask_image(path: Path) -> np.ndarray:
    """A mask image file -> boolean pixel mask at the file's own size."""
    with Image.open(path) as image:
        image.load()
        return pixel_mask(image)


def image_size_px(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, from its header (no pixels decoded)."""
    with Image.open(path) as image:
        return image.size
