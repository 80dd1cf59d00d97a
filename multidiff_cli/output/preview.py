"""Pictures without a model: the layout of a scene, and contact sheets of a batch (Pillow and numpy only)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..scene import grid
from ..scene import Scene

CANVAS_RGB = (46, 46, 52)
CAPTION_RGB = (18, 18, 22)
TEXT_RGB = (240, 240, 240)
REGION_ALPHA = 0.45  # how much of a region's colour covers the canvas
# Distinct, readable colours (Tableau 10), one per region in order.
PALETTE = [
    (78, 121, 167), (242, 142, 43), (225, 87, 89), (118, 183, 178), (89, 161, 79),
    (237, 201, 72), (176, 122, 161), (255, 157, 167), (156, 117, 95), (186, 176, 172),
]
MAX_SIDE_PX = 2048  # larger canvases are drawn scaled down


def region_colour(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def region_pixels(scene: Scene, index: int, size_wh: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) at the drawing's size: the region's box, or its mask image resized (nearest)."""
    region = scene.regions[index]
    width, height = size_wh
    if region.box is not None:
        sx, sy = width / scene.width, height / scene.height
        x0, y0, x1, y1 = region.box
        ys, xs = np.arange(height)[:, None] + 0.5, np.arange(width)[None, :] + 0.5
        return (xs >= x0 * sx) & (xs < x1 * sx) & (ys >= y0 * sy) & (ys < y1 * sy)
    return grid.resize_nearest(grid.read_mask_image(scene.mask_path(region)), (height, width))


def draw_layout(scene: Scene) -> Image.Image:
    """The canvas with every region filled in its own translucent colour and labelled with its prompt,
    and the global prompt in a caption strip below."""
    scale = min(1.0, MAX_SIDE_PX / max(scene.width, scene.height))
    width, height = max(1, round(scene.width * scale)), max(1, round(scene.height * scale))
    canvas = np.empty((height, width, 3), dtype=np.float64)
    canvas[:] = CANVAS_RGB
    shapes = [region_pixels(scene, i, (width, height)) for i in range(len(scene.regions))]
    for i, inside in enumerate(shapes):
        canvas[inside] = (1 - REGION_ALPHA) * canvas[inside] + REGION_ALPHA * np.array(region_colour(i))
    caption_h = max(24, height // 16)
    picture = Image.new("RGB", (width, height + caption_h), CAPTION_RGB)
    picture.paste(Image.fromarray(canvas.round().astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(picture)
    label_font = font(max(11, min(18, width // 40)))
    for i, inside in enumerate(shapes):
        rows, cols = np.nonzero(inside)
        if rows.size == 0:
            continue
        box = (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))
        draw.rectangle(box, outline=region_colour(i), width=2)
        label = _fit(draw, f"{i + 1}. {scene.regions[i].prompt}", label_font, max(40, box[2] - box[0] - 8))
        draw.text((box[0] + 5, box[1] + 4), label, fill=TEXT_RGB, font=label_font)
    caption_font = font(max(11, min(18, caption_h - 8)))
    caption = _fit(draw, f"{scene.prompt}  ·  {scene.width}x{scene.height}", caption_font, width - 12)
    draw.text((6, height + 4), caption, fill=TEXT_RGB, font=caption_font)
    return picture


def _fit(draw: ImageDraw.ImageDraw, text: str, text_font, max_width: int) -> str:
    """`text`, shortened with an ellipsis to fit `max_width` pixels."""
    if draw.textlength(text, font=text_font) <= max_width:
        return text
    while text and draw.textlength(text + "…", font=text_font) > max_width:
        text = text[:-1]
    return text + "…"


def contact_sheet(pictures: list[tuple[Image.Image, str]], columns: int | None = None, thumb_px: int = 256) -> Image.Image:
    """A grid of thumbnails, each labelled (e.g. with its scene and seed)."""
    columns = columns or min(4, max(1, len(pictures)))
    rows = -(-len(pictures) // columns)
    label_h = 22
    thumbs = []
    for picture, label in pictures:
        thumb = picture.copy()
        thumb.thumbnail((thumb_px, thumb_px))
        thumbs.append((thumb, label))
    cell_w = max(t.width for t, _ in thumbs)
    cell_h = max(t.height for t, _ in thumbs) + label_h
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), CAPTION_RGB)
    draw = ImageDraw.Draw(sheet)
    label_font = font(13)
    for k, (thumb, label) in enumerate(thumbs):
        x, y = (k % columns) * cell_w, (k // columns) * cell_h
        sheet.paste(thumb, (x + (cell_w - thumb.width) // 2, y))
        draw.text((x + 4, y + cell_h - label_h + 4), _fit(draw, label, label_font, cell_w - 8), fill=TEXT_RGB,
                  font=label_font)
    return sheet
