"""Pictures without a model: the layout of a scene, and contact sheets of a batch (Pillow and numpy only)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..scene import grid
from ..scene import Scene
from ..scene.controls import placed_control
from ..scene.picture import load_picture

CANVAS_RGB = (46, 46, 52)
CAPTION_RGB = (18, 18, 22)
TEXT_RGB = (240, 240, 240)
REGION_ALPHA = 0.45  # how much of a region's colour covers the canvas
CONTROL_ALPHA = 0.6  # how much of a control image shows, faded, under the regions' colours
# Distinct, readable colours (Tableau 10), one per region in order.
PALETTE = [
    (78, 121, 167), (242, 142, 43), (225, 87, 89), (118, 183, 178), (89, 161, 79),
    (237, 201, 72), (176, 122, 161), (255, 157, 167), (156, 117, 95), (186, 176, 172),
]
MAX_SIDE_PX = 2048  # larger canvases are drawn scaled down
LEGEND_PX = 320  # the legend beside the canvas
LEGEND_PAD_PX = 10
LEGEND_FONT_PX = 14
SWATCH_PX = 12


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
    return grid.resize_nearest(grid.read_mask_image(scene.path_of(region.mask)), (height, width))


def draw_layout(scene: Scene, windows: dict[int, tuple[int, int, int, int]] | None = None) -> Image.Image:
    """The canvas with every region filled in its own translucent colour and numbered, and beside it
    a legend: the canvas size, the global prompt, and each number's prompt in full (wrapped, never cut).
    windows: region index -> its window [x0, y0, x1, y1] in pixels, drawn as a dashed outline in its colour."""
    scale = min(1.0, MAX_SIDE_PX / max(scene.width, scene.height))
    width, height = max(1, round(scene.width * scale)), max(1, round(scene.height * scale))
    canvas = np.empty((height, width, 3), dtype=np.float64)
    canvas[:] = CANVAS_RGB
    if scene.init_image is not None:  # the picture it starts from, under the boxes
        canvas[:] = (load_picture(scene.init_image_path, (width, height)) + 1) * 127.5
    for region, control in scene.controls():  # each control image faded where it goes (a region's: its box)
        placed, box = placed_control(scene, region, control)
        x0, y0, x1, y1 = (round(v * scale) for v in box)
        pixels = Image.fromarray((placed * 255).round().astype(np.uint8))
        shown = np.asarray(pixels.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float64)
        canvas[y0:y1, x0:x1] = (1 - CONTROL_ALPHA) * canvas[y0:y1, x0:x1] + CONTROL_ALPHA * shown[y0:y1, x0:x1]
    shapes = [region_pixels(scene, i, (width, height)) for i in range(len(scene.regions))]
    for i, inside in enumerate(shapes):
        canvas[inside] = (1 - REGION_ALPHA) * canvas[inside] + REGION_ALPHA * np.array(region_colour(i))

    text_font = font(LEGEND_FONT_PX)
    line_h = LEGEND_FONT_PX + 6
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = LEGEND_PX - 2 * LEGEND_PAD_PX - SWATCH_PX - 8
    global_text = (f"global: {scene.prompt}{lora_text(scene.loras, 'every prompt: ')}"
                   f"{control_text(scene.control, 'every prompt: ')}{reference_text(scene.reference, 'every prompt: ')}")
    entries = [(None, [f"canvas {scene.width}x{scene.height}"]), (None, _wrap(measure, global_text, text_font, text_w))]
    if scene.init_image is not None:
        about = f"init image: {scene.init_image} (strength {scene.strength}, keep {scene.keep})"
        entries.insert(1, (None, _wrap(measure, about, text_font, text_w)))
    for i, region in enumerate(scene.regions):
        where = f"box {region.box}" if region.box is not None else f"mask {region.mask}"
        text = (f"{i + 1}. {region.prompt} ({where}){lora_text(region.loras)}{control_text(region.control)}"
                f"{reference_text(region.reference)}")
        entries.append((i, _wrap(measure, text, text_font, text_w)))
    legend_h = LEGEND_PAD_PX * 2 + sum(len(lines) * line_h + 6 for _, lines in entries)
    picture = Image.new("RGB", (width + LEGEND_PX, max(height, legend_h)), CAPTION_RGB)
    picture.paste(Image.fromarray(canvas.round().astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(picture)
    number_font = font(max(11, min(18, width // 30)))
    for i, inside in enumerate(shapes):
        rows, cols = np.nonzero(inside)
        if rows.size == 0:
            continue
        box = (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))
        draw.rectangle(box, outline=region_colour(i), width=2)
        draw.text((box[0] + 5, box[1] + 4), str(i + 1), fill=TEXT_RGB, font=number_font)
    for i, (x0, y0, x1, y1) in sorted((windows or {}).items()):
        dashed_rectangle(draw, (round(x0 * scale), round(y0 * scale), round(x1 * scale) - 1, round(y1 * scale) - 1),
                         region_colour(i))
    y = LEGEND_PAD_PX
    for index, lines in entries:
        x = width + LEGEND_PAD_PX
        if index is not None:
            draw.rectangle((x, y + 2, x + SWATCH_PX, y + 2 + SWATCH_PX), fill=region_colour(index))
        for line in lines:
            draw.text((x + SWATCH_PX + 8, y), line, fill=TEXT_RGB, font=text_font)
            y += line_h
        y += 6
    return picture


DASH_PX = 8


def dashed_rectangle(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], colour, width: int = 2) -> None:
    """A rectangle outline of DASH_PX dashes and gaps (a region's window, around its filled shape)."""
    x0, y0, x1, y1 = box
    for start in range(x0, x1 + 1, 2 * DASH_PX):
        end = min(start + DASH_PX, x1)
        draw.line((start, y0, end, y0), fill=colour, width=width)
        draw.line((start, y1, end, y1), fill=colour, width=width)
    for start in range(y0, y1 + 1, 2 * DASH_PX):
        end = min(start + DASH_PX, y1)
        draw.line((x0, start, x0, end), fill=colour, width=width)
        draw.line((x1, start, x1, end), fill=colour, width=width)


def control_text(controls, lead: str = "") -> str:
    """A legend's note of controls: ' [control: depth.png x0.8 (random-controlnet)]', or ''."""
    if not controls:
        return ""
    return f" [control: {lead}" + ", ".join(f"{c.image} x{c.scale:g} ({c.model})" for c in controls) + "]"


def reference_text(references, lead: str = "") -> str:
    """A legend's note of IP-Adapter references: ' [reference: knight.jpg x0.6]', or ''."""
    if not references:
        return ""
    return f" [reference: {lead}" + ", ".join(f"{r.image} x{r.scale:g}" for r in references) + "]"


def lora_text(loras, lead: str = "") -> str:
    """' [LoRA: <lead>alice.safetensors x0.9, ...]' for a legend entry; '' without LoRAs."""
    if not loras:
        return ""
    return f" [LoRA: {lead}" + ", ".join(f"{lora.path} x{lora.scale:g}" for lora in loras) + "]"


def _wrap(draw: ImageDraw.ImageDraw, text: str, text_font, max_width: int) -> list[str]:
    """`text` in lines of at most `max_width` pixels, broken at spaces (a long word on its own line)."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=text_font) > max_width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines or [""]


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
