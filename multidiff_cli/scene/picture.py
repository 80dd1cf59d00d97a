"""The picture a scene starts from (`init_image`) and its keep mask, with Pillow and numpy only: the
canvas it implies, the checks that refuse bad files, and its pixels at the canvas size."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..catalog import CELL_PX
from ..errors import PictureError
from . import grid

MIN_IMAGE_PX = 64  # the smallest side the VAE encodes (the smallest canvas)
ASPECT_TOLERANCE = 0.03  # an init image may differ this much from the canvas's aspect ratio (resized to fit)
BACKGROUND_RGB = (255, 255, 255)  # transparent pixels are composited on white
_SWAPPED = {5, 6, 7, 8}  # EXIF orientations that turn the picture a quarter


def open_image(path: Path, what: str) -> Image.Image:
    """Open an image file, refusing what Pillow calls a decompression bomb (its warning, too)."""
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte in it
        raise PictureError(f"cannot open {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not exists:
        raise PictureError(f"no such file: {path}")
    if is_dir:
        raise PictureError(f"{path} is a directory, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            try:
                image.load()
            except BaseException:
                image.close()
                raise
            return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PictureError(f"{path}: refused, too many pixels for {what} ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise PictureError(f"{path} is not an image Pillow can read ({exc})") from None


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as it is shown: EXIF orientation applied. Checks the file (PictureError)."""
    image = open_image(path, "an init image")
    with image:
        width, height = image.size
        if image.getexif().get(0x0112) in _SWAPPED:
            width, height = height, width
    if min(width, height) < MIN_IMAGE_PX:
        raise PictureError(f"{path} is {width}x{height}: too small to encode (under {MIN_IMAGE_PX} px a side)")
    return width, height


def load_picture(path: Path, size_wh: tuple[int, int]) -> np.ndarray:
    """The init image upright, transparency composited on white, resized (Lanczos) to size_wh:
    float32 (H, W, 3) in [-1, 1], as the VAE takes it."""
    with open_image(path, "an init image") as image:
        image = ImageOps.exif_transpose(image)
        if image.has_transparency_data:
            rgba = image.convert("RGBA")
            image = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
            image.alpha_composite(rgba)
        image = image.convert("RGB")
        if image.size != tuple(size_wh):
            image = image.resize(tuple(size_wh), Image.Resampling.LANCZOS)
        return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


def canvas_from_picture(data: dict[str, Any], path: Path) -> dict[str, int]:
    """width and height for a scene with an init image that leaves them out: the image's size rounded
    down to a multiple of the latent cell; with one of them given, the other follows the image's aspect ratio."""
    width, height = upright_size(path)
    has_w, has_h = "width" in data, "height" in data
    if has_w and has_h:
        return {}
    if not has_w and not has_h:
        return {"width": multiple_of_cell(width, down=True), "height": multiple_of_cell(height, down=True)}
    given = data["width"] if has_w else data["height"]
    if not isinstance(given, int) or isinstance(given, bool):
        return {}  # validation says why
    if has_w:
        return {"height": multiple_of_cell(given * height / width)}
    return {"width": multiple_of_cell(given * width / height)}


def multiple_of_cell(value: float, down: bool = False, cell: int = CELL_PX) -> int:
    """value rounded to a multiple of the latent cell (down: floored), at least one cell; cell: a family's
    alignment where it needs more (FLUX's 16 px)."""
    cells = int(value // cell) if down else round(value / cell)
    return max(1, cells) * cell


def aspects_differ(size_wh: tuple[int, int], target_wh: tuple[int, int]) -> bool:
    """Whether a picture of size_wh is of another shape than target_wh: aspect ratios over ASPECT_TOLERANCE apart."""
    return abs((size_wh[0] / size_wh[1]) / (target_wh[0] / target_wh[1]) - 1) > ASPECT_TOLERANCE


def aspect_problem(path: Path, canvas_wh: tuple[int, int]) -> str | None:
    """Why an init image does not fit the canvas (aspect ratios over ASPECT_TOLERANCE apart), or None."""
    width, height = upright_size(path)
    image_aspect, canvas_aspect = width / height, canvas_wh[0] / canvas_wh[1]
    if not aspects_differ((width, height), canvas_wh):
        return None
    return (f"{path} is {width}x{height} (aspect {image_aspect:.2f}) but the canvas is {canvas_wh[0]}x{canvas_wh[1]} "
            f"(aspect {canvas_aspect:.2f}): give a canvas of the picture's shape (--size, or width/height), "
            "or crop the picture")


def keep_cells(path: Path, latent_hw: tuple[int, int]) -> np.ndarray:
    """Boolean (h, w): the latent cells a keep mask lets change (white = may change, black = kept), by the
    region masks' cell-centre rule. PictureError when it lets nothing change, or everything."""
    with open_image(path, "a keep mask") as image:
        pixels = grid.pixel_mask(image)
    cells = grid.resize_nearest(pixels, latent_hw)
    if not cells.any():
        raise PictureError(f"{path}: the keep mask is empty: nothing may change (white = may change, black = kept)")
    if cells.all():
        raise PictureError(f"{path}: the keep mask is all white: nothing is kept (for that, leave `keep` out)")
    return cells
