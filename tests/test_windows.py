"""Region windows (issue 25): a region's prompt runs only on a window around its region, one more view fused by
the same equation (the paper's Eq. 7). The sampler against the shared reference loop given the same windows;
a window that is the whole canvas changes nothing; the cells computed per step are the windows' sums; the
window's geometry (context, least size, alignment, the canvas, auto); records, inspect, preview; bad windows."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from multidiff_cli.method.sampler import multidiffusion
from multidiff_cli.method.schedule import DiffusionSchedule, FlowSchedule
from multidiff_cli.method.views import View, full_view, make_views
from multidiff_cli.method.weights import region_weights
from multidiff_cli.models.random_weights import sd2_scheduler_config
from multidiff_cli.models.schedulers import make_scheduler
from multidiff_cli.output.png import read_metadata
from multidiff_cli.output.report import bench_summary
from multidiff_cli.output.preview import REGION_ALPHA, region_colour
from multidiff_cli.run.render import plan_render, render
from multidiff_cli.scene import load_scene
from multidiff_cli.scene.geometry import region_windows, window_span
from multidiff_cli.scene.grid import box_cells
from reference import reference_multidiffusion

H, W = 16, 40  # latent cells
BOXES = [(16, 16, 80, 96), (200, 32, 272, 112)]  # pixels: two small regions apart


def weights_for(boxes=BOXES):
    return region_weights([box_cells(b, (H, W)) for b in boxes], (H, W))


def ddim(steps: int = 6) -> DiffusionSchedule:
    scheduler = make_scheduler("ddim", sd2_scheduler_config())
    scheduler.set_timesteps(steps)
    return DiffusionSchedule(scheduler)


def flow(steps: int = 4) -> FlowSchedule:
    from multidiff_cli.catalog import FLOW_SCHEDULERS

    scheduler = make_scheduler("euler", {"num_train_timesteps": 1000, "shift": 3.0}, FLOW_SCHEDULERS)
    scheduler.set_timesteps(steps)
    return FlowSchedule(scheduler)


WINDOWS = {1: [View(0, 0, 16, 16, W)], 2: [View(2, 20, 12, 16, W)]}


@pytest.mark.parametrize("schedule", [ddim, flow], ids=["ddim", "flow"])
@pytest.mark.parametrize("bootstrap_steps", [0, 2])
def test_windows_equal_the_reference_loop_given_the_same_windows(schedule, bootstrap_steps, prompt_eps,
                                                                 per_request_denoiser, assert_close_batched):
    """Each region's prediction computed on its window's crop (bootstrapping cropped to it too), fused by its
    weights inside the window; the global prompt on the canvas' views, as before."""
    weights = weights_for()
    noise = torch.randn((1, 4, H, W), generator=torch.Generator().manual_seed(0))
    backgrounds = torch.randn((2, 2, 4, 1, 1), generator=torch.Generator().manual_seed(1))
    views = make_views((H, W), 16, 8)
    ours = multidiffusion(noise, schedule(), per_request_denoiser, weights, views=views, windows=WINDOWS,
                          bootstrap_steps=bootstrap_steps, backgrounds=backgrounds)
    expected = reference_multidiffusion(lambda p, x, t: prompt_eps(p, x), noise, schedule(), weights, views=views,
                                        windows=WINDOWS, bootstrap_steps=bootstrap_steps, backgrounds=backgrounds)
    assert_close_batched(ours, expected, steps=6)
    without = multidiffusion(noise, schedule(), per_request_denoiser, weights, views=views,
                             bootstrap_steps=bootstrap_steps, backgrounds=backgrounds)
    assert (without - ours).abs().max() > 1e-3  # the stand-in mixes neighbours: a window sees less, and it shows


def test_a_window_that_is_the_whole_canvas_changes_nothing(prompt_eps, per_request_denoiser):
    weights = weights_for()
    noise = torch.randn((1, 4, H, W), generator=torch.Generator().manual_seed(2))
    whole = {1: [full_view((H, W))], 2: [full_view((H, W))]}
    windowed = multidiffusion(noise, ddim(), per_request_denoiser, weights, windows=whole)
    plain = multidiffusion(noise, ddim(), per_request_denoiser, weights)
    torch.testing.assert_close(windowed, plain, rtol=0, atol=1e-6)


def test_the_cells_computed_per_step_are_the_canvas_views_and_the_windows(prompt_eps):
    """A counting stand-in: every request's input area, per call. The global prompt on the three canvas views,
    each region on its window alone; the windows' samples in a call of their own size."""
    seen: dict[float, int] = {}

    def counting(inputs, t, requests):
        seen[float(t)] = seen.get(float(t), 0) + sum(inputs[i].shape[-2] * inputs[i].shape[-1] for i, _ in requests)
        return torch.stack([prompt_eps(p, inputs[i]) for i, p in requests])

    views = make_views((H, W), 16, 12)
    assert len(views) == 3
    multidiffusion(torch.zeros((1, 4, H, W)), ddim(2), counting, weights_for(), views=views, windows=WINDOWS)
    per_step = list(seen.values())
    global_cells = sum(v.height * v.width for v in views)
    windows = 16 * 16 + 12 * 16
    assert per_step == [global_cells + windows] * 2
    canvas_regions = 2 * 16 * 16 + 16 * 16  # without windows: region 1 in one view, region 2 in two
    assert global_cells + windows < global_cells + canvas_regions


# --- windows that take the canvas's unconditional (window_unconditional: canvas) -------------------------------

GUIDANCE = 5.0
NEGATIVE = 9  # the stand-in network's "prompt" for the negative text


def guided_stand_in(seen: list | None = None, negatives=(0, 0, 0)):
    """guided_denoiser over _prompt_eps: text 0 is the negative (NEGATIVE), text p + 1 prompt p's; regions may
    have a negative of their own (negatives[p] != 0: text 4 + p, a network of its own). `seen` gathers each
    call's (samples, latent cells)."""
    from multidiff_cli.method.guidance import Prompts, guided_denoiser
    from conftest import _prompt_eps

    kinds = torch.tensor([NEGATIVE, 0, 1, 2, NEGATIVE + 1, NEGATIVE + 2], dtype=torch.float32)[:, None, None]

    def run(inputs, t, rows):
        if seen is not None:
            seen.append((inputs.shape[0], inputs.shape[0] * inputs.shape[-2] * inputs.shape[-1]))
        return torch.stack([_prompt_eps(int(kind), x) for kind, x in zip(rows[:, 0, 0].tolist(), inputs)])

    negative = [0] + [0 if own == 0 else 3 + p for p, own in enumerate(negatives[1:], start=1)]
    prompts = Prompts(["neg", "global", "r1", "r2", "neg1", "neg2"], [1, 2, 3], negative, [GUIDANCE] * 3)
    return guided_denoiser(run, kinds, prompts)


def guided_reference(negatives=(0, 0, 0)):
    """The reference loop's functions for guided_stand_in(negatives=...): a region with a negative of its own
    guides with its own unconditional on its window, the others with the canvas's."""
    from conftest import _prompt_eps

    def model_output(p, crop, t):
        u = _prompt_eps(NEGATIVE + (p if negatives[p] else 0), crop)
        return u + GUIDANCE * (_prompt_eps(p, crop) - u)

    def guided_with(p, crop, t, u):
        return model_output(p, crop, t) if negatives[p] else u + GUIDANCE * (_prompt_eps(p, crop) - u)

    return {"model_output": model_output, "unconditional_output": lambda crop, t: _prompt_eps(NEGATIVE, crop),
            "guided_with": guided_with}


@pytest.mark.parametrize("schedule", [ddim, flow], ids=["ddim", "flow"])
@pytest.mark.parametrize("bootstrap_steps", [0, 2])
def test_windows_that_take_the_canvas_s_unconditional_equal_the_reference_loop(schedule, bootstrap_steps,
                                                                               assert_close_batched):
    """After bootstrapping, a window's region guides with the canvas's unconditional prediction on the window's
    cells (the canvas views' negative sample, averaged where they overlap) instead of its own; while
    bootstrapping, with its own, as its input is its own."""
    weights = weights_for()
    noise = torch.randn((1, 4, H, W), generator=torch.Generator().manual_seed(0))
    backgrounds = torch.randn((2, 2, 4, 1, 1), generator=torch.Generator().manual_seed(1))
    views = make_views((H, W), 16, 8)
    common = dict(views=views, windows=WINDOWS, bootstrap_steps=bootstrap_steps, backgrounds=backgrounds)
    ours = multidiffusion(noise, schedule(), guided_stand_in(), weights, shared_unconditional=True, **common)
    functions = guided_reference()
    expected = reference_multidiffusion(functions.pop("model_output"), noise, schedule(), weights, **functions,
                                        **common)
    assert_close_batched(ours, expected, guidance=GUIDANCE, steps=6)
    own = multidiffusion(noise, schedule(), guided_stand_in(), weights, **common)
    assert (own - ours).abs().max() > 1e-3  # the stand-in mixes neighbours: the window's own unconditional differs


@pytest.mark.parametrize("schedule", [ddim, flow], ids=["ddim", "flow"])
def test_on_a_360_canvas_two_windows_of_one_size_one_with_a_negative_of_its_own_equal_the_reference_loop(
        schedule, assert_close_batched):
    """Wrapping views, and two windows of the same size in one call: region 1's takes the canvas's unconditional,
    region 2's (a negative prompt of its own) samples its own; region 2's window runs across the seam."""
    weights = region_weights([box_cells((16, 16, 80, 96), (H, W)), box_cells((288, 16, 320, 96), (H, W))], (H, W))
    views = make_views((H, W), 16, 8, wrap=True)
    windows = {1: [View(0, 0, 16, 16, W, True)], 2: [View(0, 30, 16, 16, W, True)]}
    noise = torch.randn((1, 4, H, W), generator=torch.Generator().manual_seed(4))
    ours = multidiffusion(noise, schedule(), guided_stand_in(negatives=(0, 0, 1)), weights, views=views,
                          windows=windows, shared_unconditional=True)
    functions = guided_reference(negatives=(0, 0, 1))
    expected = reference_multidiffusion(functions.pop("model_output"), noise, schedule(), weights, views=views,
                                        windows=windows, **functions)
    assert_close_batched(ours, expected, guidance=GUIDANCE, steps=6)


def test_a_whole_canvas_window_that_takes_the_canvas_s_unconditional_is_a_region_on_the_canvas():
    weights = weights_for()
    noise = torch.randn((1, 4, H, W), generator=torch.Generator().manual_seed(2))
    whole = {1: [full_view((H, W))], 2: [full_view((H, W))]}
    windowed = multidiffusion(noise, ddim(), guided_stand_in(), weights, windows=whole, shared_unconditional=True)
    plain = multidiffusion(noise, ddim(), guided_stand_in(), weights)
    torch.testing.assert_close(windowed, plain, rtol=0, atol=1e-6)


def test_a_window_that_takes_the_canvas_s_unconditional_runs_one_sample_not_two():
    """Per step: the canvas views' two samples each (global conditional, negative), then one conditional per
    window; with its own unconditional, two per window. A region with a negative prompt of its own keeps its own."""
    views = make_views((H, W), 16, 12)
    canvas_cells = sum(v.height * v.width for v in views)
    window_cells = 16 * 16 + 12 * 16
    for shared, negatives, windows_samples in ((True, (0, 0, 0), 1), (False, (0, 0, 0), 2), (True, (0, 0, 1), None)):
        seen = []
        multidiffusion(torch.zeros((1, 4, H, W)), ddim(1), guided_stand_in(seen, negatives), weights_for(),
                       views=views, windows=WINDOWS, shared_unconditional=shared)
        cells = sum(c for _, c in seen)
        if windows_samples is None:  # region 2's negative is its own: two samples on its window, one on region 1's
            assert cells == 2 * canvas_cells + 16 * 16 + 2 * 12 * 16, (shared, negatives)
        else:
            assert cells == 2 * canvas_cells + windows_samples * window_cells, (shared, negatives)


def test_a_window_over_cells_no_canvas_view_ran_keeps_its_own_unconditional():
    """Region 1 fills the first view, which then runs no canvas prompt: its window's first cells have no canvas
    unconditional, so the window samples its own, and the render is the one with its own."""
    weights = region_weights([box_cells((0, 0, 128, 128), (H, W)), box_cells(BOXES[1], (H, W))], (H, W))
    views = make_views((H, W), 16, 12)
    windows = {1: [View(0, 0, 16, 16, W)], 2: WINDOWS[2]}
    noise = torch.randn((1, 4, H, W), generator=torch.Generator().manual_seed(3))
    seen = []
    shared = multidiffusion(noise, ddim(2), guided_stand_in(seen), weights, views=views, windows=windows,
                            shared_unconditional=True)
    own = multidiffusion(noise, ddim(2), guided_stand_in(), weights, views=views, windows=windows)
    ran = [v for v in views if v.crop(weights[0]).any()]
    assert len(ran) == 2
    per_step = 2 * sum(v.height * v.width for v in ran) + 2 * 16 * 16 + 12 * 16
    assert sum(c for _, c in seen) == 2 * per_step
    assert (shared - own).abs().max() > 1e-3  # region 2 shares, so only region 1's window is as with its own
    functions = guided_reference()
    expected = reference_multidiffusion(functions.pop("model_output"), noise, ddim(2), weights, views=views,
                                        windows=windows, **functions)
    torch.testing.assert_close(shared, expected, rtol=0, atol=1e-5)


# --- the window's geometry ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("lo, hi, length, context, least, align, expected", [
    (10, 18, 64, 0.25, 0, 1, (6, 16)),  # 8 cells grown by 4 (the 4-cell minimum) each side
    (10, 18, 64, 1.0, 0, 1, (2, 24)),  # grown by its own length each side
    (10, 18, 64, 0.25, 32, 1, (0, 32)),  # at least 32 long, clipped at the canvas' start
    (10, 18, 64, 0.25, 0, 8, (6, 16)),  # already whole multiples of 8
    (10, 19, 64, 0.25, 0, 8, (2, 24)),  # 17 -> 24: rounded up to whole 8s, centred (start 2.5, rounded)
    (58, 64, 64, 0.25, 0, 8, (48, 16)),  # at the far edge: shifted inside
    (0, 60, 64, 0.25, 0, 8, (0, 64)),  # larger than the canvas: the canvas
])
def test_window_span(lo, hi, length, context, least, align, expected):
    assert window_span(lo, hi, length, context, 4, least, align) == expected


SCENE = """
prompt: a wide landscape
width: 1024
height: 512
steps: 2
{keys}regions:
  - prompt: a small house
    box: [64, 256, 192, 384]
{house}  - prompt: a big sky
    box: [0, 0, 1024, 200]
"""


def windows_of(write_scene, keys="", house="", native_cells=64):
    scene = load_scene(write_scene(SCENE.format(keys=keys, house=house)), default_model="tiny-random")
    views = [(v.top, v.left, v.height, v.width) for v in make_views(scene.latent_hw, native_cells, 8)]
    return region_windows(scene, native_cells, 64, views)


def test_which_regions_get_windows(write_scene):
    """true: the house's box grown (to half the 512 px native window, 256 px, whole 64 px); the sky, wider than
    the native window, stays on the canvas' views. auto: the house's window costs a share of the views it
    touches. false, or `window: canvas`: none. A window box: that box."""
    assert windows_of(write_scene) == {}
    assert windows_of(write_scene, "region_windows: true\n") == {1: (24, 0, 32, 32)}
    assert windows_of(write_scene, "region_windows: auto\n") == {1: (24, 0, 32, 32)}
    assert windows_of(write_scene, "region_windows: true\n", "    window: canvas\n") == {}
    assert windows_of(write_scene, "", "    window: [0, 192, 320, 512]\n") == {1: (24, 0, 40, 40)}
    # grown by twice its side the house's window would be wider than the native window: the canvas' views
    assert windows_of(write_scene, "region_windows: true\nwindow_context: 2\n") == {}
    assert windows_of(write_scene, "region_windows: true\nwindow_context: 1\n") == {1: (16, 0, 48, 48)}


def test_auto_leaves_a_region_on_the_canvas_where_its_window_would_save_nothing(write_scene):
    """On a canvas that is one view, a window of half the native window's side is a quarter of that view: auto
    takes it; a region near the canvas' size gains nothing and keeps the canvas."""
    scene = load_scene(write_scene("prompt: p\nwidth: 512\nheight: 512\nregion_windows: auto\nregions:\n"
                                   "  - prompt: a\n    box: [0, 0, 96, 96]\n  - prompt: b\n    box: [32, 32, 480, 480]\n"),
                       default_model="tiny-random")
    assert region_windows(scene, 64, 64, [(0, 0, 64, 64)]) == {1: (0, 0, 32, 32)}


def test_auto_windows_more_regions_where_a_window_takes_the_canvas_s_unconditional(write_scene):
    """A window of 0.56 of its region's canvas view (48x48 cells of 64x64): two samples there cost more than the
    view's one, so auto keeps the region on the canvas; one (window_unconditional: canvas) costs less: a window."""
    text = ("prompt: p\nwidth: 512\nheight: 512\nregion_windows: auto\n{keys}regions:\n"
            "  - prompt: a\n    box: [128, 128, 384, 384]\n")
    own_negative = "    negative_prompt: blurry\n"  # its negative is a condition of its own: two samples on a window
    for keys, region, expected in (("", "", {}), ("window_unconditional: canvas\n", "", {1: (8, 8, 48, 48)}),
                                   ("window_unconditional: canvas\n", own_negative, {})):
        scene = load_scene(write_scene(text.format(keys=keys) + region), default_model="tiny-random")
        assert region_windows(scene, 64, 64, [(0, 0, 64, 64)]) == expected, keys


# --- renders: the same picture without a window, the record, inspect, preview ------------------------------------

SMALL = """
prompt: a room
width: 128
height: 96
steps: 2
seed: 5
{keys}regions:
  - prompt: a lamp
    box: [0, 0, 48, 48]
"""


def test_on_a_small_canvas_the_window_is_the_canvas_and_the_picture_is_the_same(tiny, write_scene,
                                                                                assert_close_batched):
    """Half of tiny-random's 512 px native window is more than this 128x96 canvas: the window is the canvas,
    and the render equals the one without windows (its own unconditional sample, so batched rounding)."""
    windowed = load_scene(write_scene(SMALL.format(keys="region_windows: true\n"), "w.yaml"), default_model=tiny.model_id)
    plain = load_scene(write_scene(SMALL.format(keys=""), "p.yaml"), default_model=tiny.model_id)
    plan = plan_render(windowed, tiny)
    assert {p: (v.top, v.left, v.height, v.width) for p, v in plan.windows.items()} == {1: (0, 0, 12, 16)}
    assert_close_batched(render(windowed, tiny, seed=5).latents, render(plain, tiny, seed=5).latents,
                         guidance=7.5, steps=2)


def test_window_unconditional_canvas_reaches_the_sampler_is_recorded_and_renders_again_exactly(
        cli, tiny, write_scene, tmp_path, assert_close_batched):
    """On a canvas wider than a window the key changes the picture (the window guides with the canvas's negative
    sample); the PNG records it and renders again to the same pixels. On a canvas that is its own window, it is
    the region on the canvas (the same unconditional sample)."""
    text = ("prompt: a field\nwidth: 512\nheight: 256\nsteps: 2\nbootstrap_steps: 0\nseed: 6\nregion_windows: true\n"
            "{keys}regions:\n  - prompt: a hut\n    box: [0, 0, 96, 96]\n")
    canvas, own = tmp_path / "canvas.png", tmp_path / "own.png"
    assert cli.render(write_scene(text.format(keys="window_unconditional: canvas\n"), "c.yaml"), "-o", canvas).exit_code == 0
    assert cli.render(write_scene(text.format(keys=""), "o.yaml"), "-o", own).exit_code == 0
    assert read_metadata(canvas)["scene"]["window_unconditional"] == "canvas"
    assert "window_unconditional" not in read_metadata(own)["scene"]  # the default is not written
    with Image.open(canvas) as a, Image.open(own) as b:
        assert a.tobytes() != b.tobytes()
    assert cli.render(canvas, "-o", tmp_path / "again.png").exit_code == 0
    with Image.open(canvas) as a, Image.open(tmp_path / "again.png") as b:
        assert a.tobytes() == b.tobytes()
    shared = load_scene(write_scene(SMALL.format(keys="region_windows: true\nwindow_unconditional: canvas\n"), "s.yaml"),
                        default_model=tiny.model_id)
    plain = load_scene(write_scene(SMALL.format(keys=""), "p.yaml"), default_model=tiny.model_id)
    latents = render(shared, tiny, seed=5).latents
    assert torch.is_inference(latents)  # render runs under torch.inference_mode: no autograd state is kept
    assert_close_batched(latents, render(plain, tiny, seed=5).latents, guidance=7.5, steps=2)
    refused = cli("validate", write_scene(text.format(keys="window_unconditional: shared\n"), "bad.yaml"))
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "window_unconditional" in refused.stderr


WIDE = """
prompt: a wide landscape
width: 1024
height: 256
steps: 1
seed: 3
region_windows: true
regions:
  - prompt: a small house
    box: [64, 128, 192, 256]
"""


@pytest.mark.slow
def test_the_record_inspect_and_preview_show_the_windows_and_a_re_render_is_exact(cli, write_scene, tmp_path):
    scene = write_scene(WIDE)
    out = tmp_path / "wide.png"
    assert cli.render(scene, "-o", out).exit_code == 0
    windows = read_metadata(out)["windows"]
    assert windows["boxes"] == {"regions[0]": [0, 0, 256, 256]}
    assert windows["region_cells_per_step"] == 32 * 32 < windows["without_windows"]
    shown = cli("inspect", out)
    assert "regions[0]: '[0, 0, 256, 256] px'" in shown.stdout and "latent cells" in shown.stdout
    again = cli.render(out, "-o", tmp_path / "again.png")
    assert again.exit_code == 0, again.output
    with Image.open(out) as a, Image.open(tmp_path / "again.png") as b:
        assert a.tobytes() == b.tobytes()
    drawn = cli("preview", scene, "-o", tmp_path / "layout.png")
    assert drawn.exit_code == 0
    with Image.open(tmp_path / "layout.png") as layout:
        pixels = np.asarray(layout.convert("RGB")).astype(int)
    scale = 768 / 1024 if pixels.shape[1] < 1024 + 300 else 1.0  # the layout shrinks wide canvases
    edge_x = round(256 * scale) - 1
    column = pixels[: round(256 * scale), edge_x]
    assert (np.abs(column - np.array(region_colour(0))).sum(axis=1) < 30).sum() > 10  # a dashed line in its colour
    assert REGION_ALPHA < 1


def test_a_picture_rendered_with_auto_renders_again_with_its_own_windows_whatever_auto_now_decides(
        cli, write_scene, tmp_path, monkeypatch):
    """auto's share may move between releases: a PNG's re-render pins each auto region to what ran (its recorded
    window, or the canvas), so the pixels stay; another --size lets auto decide again."""
    import multidiff_cli.scene.geometry as geometry

    scene = write_scene("prompt: a field\nwidth: 512\nheight: 512\nsteps: 1\nseed: 4\nregion_windows: auto\n"
                        "regions:\n  - prompt: a hut\n    box: [0, 0, 96, 96]\n  - prompt: a pond\n"
                        "    box: [160, 160, 480, 480]\n")
    out = tmp_path / "field.png"
    assert cli.render(scene, "-o", out).exit_code == 0
    assert read_metadata(out)["windows"]["boxes"] == {"regions[0]": [0, 0, 256, 256]}  # the pond: its whole view
    for share in (0.0, 1.0):  # now auto would window neither region, or both
        monkeypatch.setattr(geometry, "AUTO_SHARE", share)
        again = tmp_path / f"again-{share}.png"
        assert cli.render(out, "-o", again).exit_code == 0
        with Image.open(out) as a, Image.open(again) as b:
            assert a.tobytes() == b.tobytes()
        assert read_metadata(again)["windows"] == read_metadata(out)["windows"]
        assert read_metadata(again)["scene"]["region_windows"] == "auto"  # the pins are not the scene's
        assert all("window" not in region for region in read_metadata(again)["scene"]["regions"])
    resized = tmp_path / "resized.png"  # from the re-render, at share 1.0: auto decides again, both windowed
    assert cli.render(again, "--size", "256x256", "-o", resized).exit_code == 0
    assert set(read_metadata(resized)["windows"]["boxes"]) == {"regions[0]", "regions[1]"}


def test_a_pinned_window_that_no_longer_holds_its_region_lets_auto_decide(write_scene):
    """A pin from a picture's record: kept where it holds its region on whole cells inside the canvas;
    otherwise (the mask grew, the record is odd) auto decides as for a scene file."""
    from multidiff_cli.scene.geometry import pin_holds

    scene = load_scene(write_scene("prompt: p\nwidth: 512\nheight: 512\nregion_windows: auto\nregions:\n"
                                   "  - prompt: a\n    box: [0, 0, 96, 96]\n"), default_model="tiny-random")
    cells = box_cells([0, 0, 96, 96], scene.latent_hw)
    assert pin_holds(scene, None, cells) and pin_holds(scene, [0, 0, 256, 256], cells)
    assert not pin_holds(scene, [0, 0, 64, 256], cells)  # misses part of the region
    assert not pin_holds(scene, [0, 0, 260, 256], cells) and not pin_holds(scene, [0, 0, 576, 256], cells)
    views = [(0, 0, 64, 64)]
    assert region_windows(scene.with_window_pins({1: None}), 64, 64, views) == {}  # pinned to the canvas
    assert region_windows(scene.with_window_pins({1: [0, 0, 128, 128]}), 64, 64, views) == {1: (0, 0, 16, 16)}
    assert region_windows(scene.with_window_pins({1: [0, 0, 64, 64]}), 64, 64, views) == {1: (0, 0, 32, 32)}


def test_a_window_that_misses_part_of_its_region_is_one_line_and_nothing_written(cli, write_scene, tmp_path):
    scene = write_scene("prompt: p\nwidth: 256\nheight: 256\nregions:\n  - prompt: a\n    box: [64, 64, 192, 192]\n"
                        "    window: [0, 0, 128, 256]\n")
    for command in (("validate", scene), ("render", scene, "--model", "tiny-random", "-o", tmp_path / "x.png")):
        result = cli(*command)
        assert result.exit_code == 2, result.output
        (line,) = result.stderr.strip().splitlines()
        assert line == (f"{scene}:7: regions[0].window: window [0, 0, 128, 256] does not contain its region (it "
                        "reaches [128, 64, 192, 192]): the region's prompt runs only inside its window")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("window, said", [
    ("[0, 0, 512, 256]", "reaches past the 256x256 canvas"),
    ("[0, 0, 200, 200]", "must be a multiple of"),
    ("[0, 0, 256]", "a window box is [x0, y0, x1, y1]"),
    ("somewhere", "window"),
])
def test_bad_windows(cli, write_scene, window, said):
    scene = write_scene(f"prompt: p\nwidth: 256\nheight: 256\nmodel: black-forest-labs/FLUX.1-dev\nregions:\n"
                        f"  - prompt: a\n    box: [64, 64, 192, 192]\n    window: {window}\n")
    result = cli("validate", scene)
    assert result.exit_code == 2 and said in result.stderr, result.output


@pytest.mark.slow
def test_the_bench_times_windows_against_full_canvas_regions_and_counts_their_cells():
    """`multidiff bench --windows` adds a path with region windows; what is checked here is its arithmetic (cells
    and samples), never its seconds. A 1024x128 canvas (16x128 cells, nine 16x64 views at stride 8) of 4 regions
    256 px (32 cells) wide: each region's window is 384x128 px (16x48 cells), where on the canvas each region runs
    in every view it touches (4, 8, 8 and 4 of them)."""
    from multidiff_cli.bench.sampler import BenchConfig, run_bench

    report = run_bench(BenchConfig(model="tiny-random", size_px=128, width_px=1024, regions=4, steps=2,
                                   windows=True), in_process=True)
    paths = report["paths"]
    assert list(paths) == ["reference", "multidiff", "multidiff+windows", "multidiff+windows+canvas-unconditional"]
    canvas = 2 * 9 * 16 * 64  # the global prompt and the unconditional sample, in every view
    assert paths["multidiff"]["cells_per_step"] == canvas + (4 + 8 + 8 + 4) * 16 * 64
    assert paths["multidiff+windows"]["cells_per_step"] == canvas + 4 * 2 * 16 * 48  # a window and its own uncond
    # window_unconditional: canvas: the canvas's unconditional on the window, so one sample a window
    assert paths["multidiff+windows+canvas-unconditional"]["cells_per_step"] == canvas + 4 * 16 * 48
    for key, path in (("windows", "multidiff+windows"),
                      ("windows_canvas_unconditional", "multidiff+windows+canvas-unconditional")):
        assert report[key]["cells_ratio"] == pytest.approx(paths[path]["cells_per_step"] / paths["multidiff"]["cells_per_step"])
    summary = bench_summary(report)
    assert "region windows / full-canvas regions" in summary
    assert "region windows, the canvas's unconditional / full-canvas regions" in summary
