"""Boxes and mask images -> latent cells (scene.grid, numpy) -> fusion weights (method.weights, torch)
(METHOD.md: W_i thresholded at 0.5, resized nearest; W_0 = clamp(1 - sum W_i, 0)).

The canvas is non-square (384 x 256 px -> 32 x 48 latent cells), so x and y cannot be swapped unnoticed.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from multidiff_cli.method.weights import region_weights
from multidiff_cli.scene.grid import box_cells, image_to_grey, pixel_mask, read_mask_image, resize_nearest

WIDTH_PX, HEIGHT_PX = 384, 256
LATENT_HW = (HEIGHT_PX // 8, WIDTH_PX // 8)  # (h, w) = (32, 48)
BOX_PX = (64, 32, 192, 128)  # x0, y0, x1, y1; aligned to the 8-px grid: rows 4..15, columns 8..23


def expected_cells(box_px, latent_hw=LATENT_HW, scale=8):
    """Oracle, cell by cell: a latent cell is in the box iff its centre (8j+4, 8i+4) lies in [x0, x1) x [y0, y1)."""
    x0, y0, x1, y1 = box_px
    h, w = latent_hw
    out = np.zeros((h, w), dtype=bool)
    for i in range(h):
        for j in range(w):
            cy, cx = scale * i + scale / 2, scale * j + scale / 2
            if y0 <= cy < y1 and x0 <= cx < x1:
                out[i, j] = True
    return out


def same(actual: np.ndarray, expected: np.ndarray) -> bool:
    """Equal boolean masks, shape and dtype included."""
    return actual.dtype == expected.dtype == bool and np.array_equal(actual, expected)


def read_mask(path, latent_hw) -> np.ndarray:
    """A mask file at latent resolution, as the scene loader reads it (region_cells)."""
    return resize_nearest(read_mask_image(path), latent_hw)


def rectangle_png(box_px, size=(WIDTH_PX, HEIGHT_PX), mode="L", inside=255, outside=0):
    """A mask image with the half-open pixel rectangle [x0, x1) x [y0, y1) filled (clipped to the image)."""
    image = Image.new(mode, size, outside)
    x0, y0, x1, y1 = box_px
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, size[0]), min(y1, size[1])
    if x1 > x0 and y1 > y0:
        ImageDraw.Draw(image).rectangle((x0, y0, x1 - 1, y1 - 1), fill=inside)  # PIL's rectangle is inclusive
    return image


# --- box_cells ----------------------------------------------------------------------------------


def test_box_on_non_square_canvas_fills_the_right_rows_and_columns():
    # Right-hand third of the canvas, top quarter: columns 32..47, rows 0..7.
    latent = box_cells((256, 0, 384, 64), LATENT_HW)
    assert latent.shape == LATENT_HW
    assert latent.dtype == bool
    assert latent[0, 32] == 1 and latent[7, 47] == 1 and latent[0, 47] == 1 and latent[7, 32] == 1
    assert latent[8, 32] == 0  # just below
    assert latent[0, 31] == 0  # just left
    # With x and y swapped, the box would cover rows 32..47 (none exist) and columns 0..7.
    assert latent[:, :32].sum() == 0
    assert latent[0:8, 0:8].sum() == 0
    assert latent.sum() == 8 * 16


def test_box_rows_are_y_and_columns_are_x():
    latent = box_cells(BOX_PX, LATENT_HW)
    rows = np.flatnonzero(latent.any(axis=1)).tolist()
    cols = np.flatnonzero(latent.any(axis=0)).tolist()
    assert rows == list(range(4, 16))  # y0/8 .. y1/8 - 1
    assert cols == list(range(8, 24))  # x0/8 .. x1/8 - 1


@pytest.mark.parametrize(
    "box_px",
    [
        (0, 0, 8, 8),
        (64, 32, 192, 128),
        (0, 0, WIDTH_PX, HEIGHT_PX),
        (376, 248, 384, 256),
        (8, 200, 368, 256),
        (128, 0, 136, 256),  # one column, full height
    ],
)
def test_grid_aligned_box_maps_exactly_to_eighths(box_px):
    x0, y0, x1, y1 = box_px
    expected = np.zeros(LATENT_HW, dtype=bool)
    expected[y0 // 8 : y1 // 8, x0 // 8 : x1 // 8] = True
    latent = box_cells(box_px, LATENT_HW)
    assert same(latent, expected)
    assert same(latent, expected_cells(box_px))


@pytest.mark.parametrize(
    "box_px, rows, cols",
    [
        # x centres 4, 12 in [3, 13); 20 is not.  y centres 12, 20 in [5, 21); 4 is not.
        ((3, 5, 13, 21), [1, 2], [0, 1]),
        # Half-open: a centre on x1 / y1 is out, a centre on x0 / y0 is in.
        ((12, 12, 28, 20), [1], [1, 2]),
        ((13, 13, 29, 21), [2], [2, 3]),
        # A 1-px box around a cell centre picks exactly that cell.
        ((100, 60, 101, 61), [7], [12]),
    ],
)
def test_unaligned_box_includes_cells_whose_centre_is_inside(box_px, rows, cols):
    expected = np.zeros(LATENT_HW, dtype=bool)
    for i in rows:
        for j in cols:
            expected[i, j] = True
    assert same(box_cells(box_px, LATENT_HW), expected)


@settings(max_examples=150, deadline=None)
@given(
    x=st.tuples(st.integers(-40, WIDTH_PX + 40), st.integers(-40, WIDTH_PX + 40)),
    y=st.tuples(st.integers(-40, HEIGHT_PX + 40), st.integers(-40, HEIGHT_PX + 40)),
)
def test_box_matches_the_cell_centre_rule(x, y):
    box_px = (min(x), min(y), max(x), max(y))
    assert same(box_cells(box_px, LATENT_HW), expected_cells(box_px))


@pytest.mark.parametrize(
    "box_px, expected_slice",
    [
        ((-50, -30, 1000, 20), (slice(0, 2), slice(0, 48))),  # y centres 4, 12 < 20
        ((-100, -100, 10_000, 10_000), (slice(0, 32), slice(0, 48))),
        ((300, 200, 900, 900), (slice(25, 32), slice(37, 48))),  # first centres >= 300: 300 -> col 37; 200 -> row 25 (centre 204)
        ((400, 0, 500, 256), None),  # right of the canvas
        ((0, -90, 384, -10), None),  # above the canvas
    ],
)
def test_box_past_the_canvas_is_clipped(box_px, expected_slice):
    expected = np.zeros(LATENT_HW, dtype=bool)
    if expected_slice is not None:
        expected[expected_slice] = True
    latent = box_cells(box_px, LATENT_HW)
    assert latent.shape == LATENT_HW
    assert same(latent, expected)


@pytest.mark.parametrize("box_px", [(9, 9, 11, 11), (5, 5, 12, 12), (13, 13, 20, 20), (0, 0, 4, 4), (50, 50, 50, 60)])
def test_tiny_box_without_a_cell_centre_is_empty(box_px):
    latent = box_cells(box_px, LATENT_HW)
    assert latent.shape == LATENT_HW
    assert not latent.any()


# --- a box and the PNG of that box agree -------------------------------------------------------


@pytest.mark.parametrize(
    "box_px",
    [BOX_PX, (3, 5, 13, 21), (12, 12, 28, 20), (101, 7, 333, 250), (-20, 100, 50, 400), (9, 9, 11, 11)],
)
def test_box_and_png_of_the_same_rectangle_give_identical_weights(box_px, tmp_path):
    image = rectangle_png(box_px)
    from_image = resize_nearest(pixel_mask(image), LATENT_HW)
    assert same(from_image, box_cells(box_px, LATENT_HW))

    path = tmp_path / "mask.png"
    image.save(path)
    assert same(read_mask(path, LATENT_HW), box_cells(box_px, LATENT_HW))


@settings(max_examples=60, deadline=None)
@given(
    x=st.tuples(st.integers(0, WIDTH_PX), st.integers(0, WIDTH_PX)),
    y=st.tuples(st.integers(0, HEIGHT_PX), st.integers(0, HEIGHT_PX)),
)
def test_any_box_and_its_png_agree(x, y):
    box_px = (min(x), min(y), max(x), max(y))
    from_image = resize_nearest(pixel_mask(rectangle_png(box_px)), LATENT_HW)
    assert same(from_image, box_cells(box_px, LATENT_HW))


# --- every image mode --------------------------------------------------------------------------


def _palette(*colours):
    flat = [c for rgb in colours for c in rgb]
    return flat + [0] * (768 - len(flat))


def _p_image(transparent_background: bool):
    # Index 0 is white in both cases: only the transparency index makes it "not region".
    if transparent_background:
        image = rectangle_png(BOX_PX, mode="P", inside=1, outside=0)
        image.putpalette(_palette((255, 255, 255), (255, 255, 255)))
        image.info["transparency"] = 0
    else:
        image = rectangle_png(BOX_PX, mode="P", inside=1, outside=0)
        image.putpalette(_palette((0, 0, 0), (255, 255, 255)))
    return image


# mode -> (builder, PNG can store it with Pillow). Outside the box every image holds a value that is
# "not region" but easy to get wrong: transparent white, 16-bit values that clip to 255, and so on.
MODE_CASES = {
    "L": (lambda: rectangle_png(BOX_PX, mode="L", inside=255, outside=0), True),
    "RGB": (lambda: rectangle_png(BOX_PX, mode="RGB", inside=(255, 255, 255), outside=(0, 0, 0)), True),
    "RGB-colour": (lambda: rectangle_png(BOX_PX, mode="RGB", inside=(250, 240, 200), outside=(90, 20, 10)), True),
    "RGBA-transparent-white": (
        lambda: rectangle_png(BOX_PX, mode="RGBA", inside=(255, 255, 255, 255), outside=(255, 255, 255, 0)),
        True,
    ),
    "LA-transparent-white": (lambda: rectangle_png(BOX_PX, mode="LA", inside=(255, 255), outside=(255, 0)), True),
    "P": (lambda: _p_image(transparent_background=False), True),
    "P-transparency-index": (lambda: _p_image(transparent_background=True), True),
    "1": (lambda: rectangle_png(BOX_PX, mode="1", inside=1, outside=0), True),
    "I;16": (lambda: rectangle_png(BOX_PX, mode="I;16", inside=40000, outside=20000), True),
    "I": (lambda: rectangle_png(BOX_PX, mode="I", inside=40000, outside=20000), False),  # Pillow cannot write I as PNG
    "F": (lambda: rectangle_png(BOX_PX, mode="F", inside=0.7, outside=0.3), False),  # nor F
}


def expected_pixel_mask(box_px=BOX_PX):
    x0, y0, x1, y1 = box_px
    mask = np.zeros((HEIGHT_PX, WIDTH_PX), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_pixel_mask_for_every_mode(case):
    build, _ = MODE_CASES[case]
    image = build()
    grey = image_to_grey(image)
    assert grey.shape == (HEIGHT_PX, WIDTH_PX)
    assert grey.min() >= 0.0 and grey.max() <= 1.0
    mask = pixel_mask(image)
    assert mask.shape == (HEIGHT_PX, WIDTH_PX)
    assert same(mask, expected_pixel_mask())
    assert same(resize_nearest(mask, LATENT_HW), box_cells(BOX_PX, LATENT_HW))


@pytest.mark.parametrize("case", [c for c, (_, png) in MODE_CASES.items() if png])
def test_read_mask_after_png_round_trip(case, tmp_path):
    build, _ = MODE_CASES[case]
    path = tmp_path / f"{case}.png"
    build().save(path)
    with Image.open(path) as reopened:
        mode = reopened.mode
    if case == "I;16":
        assert mode in ("I;16", "I;16B", "I"), "a 16-bit PNG must not come back as 8-bit"
    assert same(read_mask_image(path), expected_pixel_mask())  # at the file's own size
    latent = read_mask(path, LATENT_HW)
    assert latent.shape == LATENT_HW
    assert same(latent, box_cells(BOX_PX, LATENT_HW))


def test_rgba_transparent_white_is_black():
    image = Image.new("RGBA", (4, 2), (255, 255, 255, 0))
    image.putpixel((1, 0), (255, 255, 255, 255))
    grey = image_to_grey(image)
    assert grey[0, 1] == pytest.approx(1.0)
    assert grey[0, 0] == 0.0 and grey[1, 3] == 0.0


def test_p_image_transparency_index_is_black_even_if_its_colour_is_white():
    image = Image.new("P", (3, 1), 0)
    image.putpalette(_palette((255, 255, 255), (255, 255, 255)))
    image.putpixel((2, 0), 1)
    image.info["transparency"] = 0
    assert pixel_mask(image).tolist() == [[False, False, True]]


def test_p_image_with_rgba_palette_transparent_white_is_black():
    # RGBA.quantize() gives a P image whose palette carries alpha and info has no "transparency": a check
    # on mode names or info alone misses it (the original image_to_grey did: transparent white read as white).
    rgba = Image.new("RGBA", (4, 2), (255, 255, 255, 0))
    rgba.putpixel((0, 0), (255, 255, 255, 255))
    image = rgba.quantize()
    assert image.mode == "P" and image.palette.mode == "RGBA"
    assert pixel_mask(image).tolist() == [[True, False, False, False], [False, False, False, False]]


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_values_are_scaled_not_clipped(mode):
    image = Image.new(mode, (2, 1), 0)
    image.putpixel((0, 0), 40000)
    image.putpixel((1, 0), 20000)
    grey = image_to_grey(image)
    assert grey[0, 0] == pytest.approx(40000 / 65535)
    assert grey[0, 1] == pytest.approx(20000 / 65535)
    assert pixel_mask(image).tolist() == [[True, False]]
    # The trap this guards against: Pillow's convert("L") clips both to 255, so both would be "region".
    if mode == "I;16":
        assert np.asarray(image.convert("L")).tolist() == [[255, 255]]


def test_16_bit_png_round_trip_keeps_the_values(tmp_path):
    # Drawn, not pasted: Image.paste(40000, box) on I;16 repeats the low byte (gives 16448), a Pillow quirk.
    image = rectangle_png((0, 0, 8, 8), size=(16, 8), mode="I;16", inside=40000, outside=20000)
    path = tmp_path / "sixteen.png"
    image.save(path)
    assert read_mask(path, (1, 2)).tolist() == [[True, False]]


def test_float_mode_clips_to_unit_range():
    image = Image.new("F", (4, 1), 0.0)
    for x, value in enumerate([-3.0, 0.49, 0.51, 7.5]):
        image.putpixel((x, 0), value)
    grey = image_to_grey(image)
    assert grey.tolist()[0] == pytest.approx([0.0, 0.49, 0.51, 1.0])
    assert pixel_mask(image).tolist() == [[False, False, True, True]]


# --- threshold at half -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, inside, outside",
    [
        ("L", 128, 127),
        ("RGB", (128, 128, 128), (127, 127, 127)),
        ("LA", (128, 255), (127, 255)),
        ("RGBA", (255, 255, 255, 128), (255, 255, 255, 127)),  # white, half transparent
    ],
)
def test_threshold_at_half(mode, inside, outside):
    image = Image.new(mode, (2, 1), outside)
    image.putpixel((0, 0), inside)
    assert pixel_mask(image).tolist() == [[True, False]]


# --- resize_nearest ---------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.5, 1, 2])
def test_mask_of_another_size_gives_the_same_latent_mask(scale):
    canvas = (512, 256)  # width, height -> latent (32, 64)
    latent_hw = (canvas[1] // 8, canvas[0] // 8)
    box_px = (128, 64, 320, 192)  # multiple of 16, so it stays on the grid at half size
    size = (int(canvas[0] * scale), int(canvas[1] * scale))
    scaled_box = tuple(int(v * scale) for v in box_px)
    mask = pixel_mask(rectangle_png(scaled_box, size=size))
    latent = resize_nearest(mask, latent_hw)
    assert latent.shape == latent_hw
    assert same(latent, box_cells(box_px, latent_hw))
    canvas_size = resize_nearest(pixel_mask(rectangle_png(box_px, size=canvas)), latent_hw)
    assert same(latent, canvas_size)


@pytest.mark.parametrize("mask_hw", [(256, 384), (37, 100), (1, 1), (1000, 3)])
def test_resize_nearest_output_shape_is_latent_hw(mask_hw):
    latent = resize_nearest(np.ones(mask_hw, dtype=bool), LATENT_HW)
    assert latent.shape == LATENT_HW
    assert same(latent, np.ones(LATENT_HW, dtype=bool))


def test_resize_nearest_samples_each_cell_centre():
    mask = pixel_mask(rectangle_png((3, 5, 13, 21)))
    latent = resize_nearest(mask, LATENT_HW)
    assert same(latent, box_cells((3, 5, 13, 21), LATENT_HW))  # nearest: the pixel under each cell's centre


def test_read_mask_resizes_a_half_size_png(tmp_path):
    path = tmp_path / "half.png"
    rectangle_png(tuple(v // 2 for v in BOX_PX), size=(WIDTH_PX // 2, HEIGHT_PX // 2)).save(path)
    assert same(read_mask(path, LATENT_HW), box_cells(BOX_PX, LATENT_HW))


# --- region_weights ----------------------------------------------------------------------------


def test_region_weights_shape_and_background(box_mask):
    a = box_mask((0, 0, 128, 128), LATENT_HW)
    b = box_mask((256, 128, 384, 256), LATENT_HW)
    weights = region_weights([a, b], LATENT_HW)
    assert weights.shape == (3, 1, *LATENT_HW)
    background = weights[0, 0]
    assert torch.equal(weights[1, 0], a)
    assert torch.equal(weights[2, 0], b)
    assert torch.equal(background, 1 - a - b)
    assert background[0, 0] == 0 and background[31, 47] == 0  # under a region
    assert background[0, 47] == 1 and background[31, 0] == 1  # no region
    assert torch.equal(weights.sum(0), torch.ones(1, *LATENT_HW))  # disjoint binary regions: a partition


def test_overlapping_regions_each_keep_weight_one_and_background_is_zero_not_negative(box_mask):
    a = box_mask((0, 0, 256, 256), LATENT_HW)
    b = box_mask((128, 0, 384, 128), LATENT_HW)
    weights = region_weights([a, b], LATENT_HW)
    overlap = (a * b).bool()
    assert overlap.any()
    assert (weights[1, 0][overlap] == 1).all()
    assert (weights[2, 0][overlap] == 1).all()
    assert (weights[0, 0][overlap] == 0).all()
    assert weights.min() >= 0
    # Where both cover, the fusion's divide by sum W averages the two: sum W = 2 there.
    assert (weights.sum(0)[0][overlap] == 2).all()


def test_three_overlapping_regions_clamp_background():
    masks = [torch.ones(LATENT_HW)] * 3
    weights = region_weights(masks, LATENT_HW)
    assert torch.equal(weights[0, 0], torch.zeros(LATENT_HW))


@pytest.mark.parametrize("latent_hw", [LATENT_HW, (5, 7)])
def test_no_regions_gives_one_all_ones_background(latent_hw):
    weights = region_weights([], latent_hw)
    assert weights.shape == (1, 1, *latent_hw)
    assert torch.equal(weights, torch.ones(1, 1, *latent_hw))


def test_soft_masks_background_is_one_minus_sum_clamped():
    a = torch.tensor([[0.3, 0.7, 0.0, 1.0]])
    b = torch.tensor([[0.5, 0.6, 0.0, 0.25]])
    weights = region_weights([a, b], (1, 4))
    assert weights.shape == (3, 1, 1, 4)
    assert weights[0, 0, 0].tolist() == pytest.approx([0.2, 0.0, 1.0, 0.0])
    assert torch.equal(weights[1, 0], a) and torch.equal(weights[2, 0], b)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_bool_masks_are_accepted_as_float_weights(kind):
    a = np.zeros(LATENT_HW, dtype=bool)
    a[:4, :4] = True
    weights = region_weights([torch.from_numpy(a) if kind == "torch" else a], LATENT_HW)
    assert weights.dtype == torch.float32
    assert torch.equal(weights[1, 0], torch.from_numpy(a).float())
    assert torch.equal(weights[0, 0], 1 - torch.from_numpy(a).float())
