"""Panorama views: coverage, fusion against a per-view reference loop, placement, wrap-around."""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from multidiff_cli.method.schedule import DiffusionSchedule
from multidiff_cli.method.sampler import multidiffusion
from multidiff_cli.models.schedulers import make_scheduler
from multidiff_cli.method.views import axis_starts, make_views
from multidiff_cli.method.weights import region_weights
from multidiff_cli.models.random_weights import sd2_scheduler_config
from multidiff_cli.scene.grid import box_cells
from reference import reference_multidiffusion


@settings(max_examples=150, deadline=None)
@given(
    h=st.integers(1, 300), w=st.integers(1, 300), window=st.integers(1, 96), stride_fraction=st.floats(0.01, 1.0),
    wrap=st.booleans(),
)
@pytest.mark.slow
def test_views_cover_every_latent_cell(h, w, window, stride_fraction, wrap):
    stride = max(1, int(window * stride_fraction))
    # coverage, not volume: the edges are found as well among fewer views (counted before they are made)
    count = len(axis_starts(h, window, stride)) * len(axis_starts(w, window, stride, wrap and w > window))
    assume(count <= 400)
    views = make_views((h, w), window, stride, wrap)
    assert len(views) == count
    covered = torch.zeros(h, w)
    for view in views:
        assert (view.height, view.width) == (min(window, h), min(window, w))  # one batchable shape
        assert 0 <= view.top and view.top + view.height <= h
        if not view.wrap:
            assert 0 <= view.left and view.left + view.width <= w
        view.add_to(covered[None], torch.ones(1, view.height, view.width))
    assert covered.min() >= 1


@pytest.mark.parametrize(
    ("length", "window", "stride", "starts"),
    [
        (256, 64, 8, list(range(0, 193, 8))),  # 512x2048: 25 views along the width
        (100, 64, 8, [0, 8, 16, 24, 32, 36]),  # off the stride grid: the last view snaps to the edge
        (64, 64, 8, [0]),
        (40, 64, 8, [0]),  # smaller than the window: one view of the canvas
    ],
)
def test_axis_starts(length, window, stride, starts):
    assert axis_starts(length, window, stride) == starts


def test_a_canvas_smaller_than_the_window_is_one_view():
    views = make_views((32, 40), 64, 8)
    assert len(views) == 1 and (views[0].height, views[0].width) == (32, 40)


def test_wrap_views_run_across_the_edge_so_the_seam_columns_are_neighbours():
    views = make_views((64, 256), 64, 8, wrap=True)
    assert len(views) == 32  # a start every 8 cells all the way round
    seam = [v for v in views if v.left + v.width > 256]
    assert seam
    cols = seam[0].columns().tolist()
    i = cols.index(255)
    assert cols[i + 1] == 0  # the last and first columns sit side by side in this view
    x = torch.arange(256.0).expand(1, 64, 256)
    assert seam[0].crop(x)[0, 0].tolist() == [float(c) for c in cols]


H, W = 16, 48  # latent cells; windows of 16 at stride 8 -> 5 views
BOXES = [(0, 0, 96, 128), (160, 32, 320, 96), (288, 0, 384, 128)]


@pytest.mark.parametrize("bootstrap_steps", [0, 2])
@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_fused_views_equal_a_per_view_per_prompt_reference_loop(bootstrap_steps, wrap, name, prompt_eps,
                                                               per_request_denoiser, assert_close_batched):
    """Every (view, prompt) its own schedule copy in the reference: a multistep solver's one state over the
    fused canvas holds too (diffusers' panorama pipeline keeps a copy per view instead)."""
    weights = region_weights([box_cells(b, (H, W)) for b in BOXES], (H, W))
    views = make_views((H, W), 16, 8, wrap)
    noise = torch.randn((1, 4, H, W), generator=torch.Generator().manual_seed(0))
    backgrounds = torch.randn((2, 3, 4, 1, 1), generator=torch.Generator().manual_seed(1))

    def scheduler():
        s = make_scheduler(name, sd2_scheduler_config())
        s.set_timesteps(6)
        return s

    fused = multidiffusion(noise, DiffusionSchedule(scheduler()), per_request_denoiser, weights, views=views,
                           bootstrap_steps=bootstrap_steps, backgrounds=backgrounds)
    reference = reference_multidiffusion(lambda p, x, t: prompt_eps(p, x), noise, DiffusionSchedule(scheduler()), weights,
                                         views=views, bootstrap_steps=bootstrap_steps, backgrounds=backgrounds)
    assert_close_batched(fused, reference, steps=6)  # fusing before or after the affine step: another order


def test_regions_land_in_place_on_a_1536x512_canvas():
    """A stand-in denoiser pulls each prompt to its own value: every region ends with its value."""
    h, w = 64, 192
    boxes = [(64, 128, 448, 448), (1024, 64, 1472, 384)]  # left and right, in pixels
    values = [0.0, 1.5, -2.0]
    weights = region_weights([box_cells(b, (h, w)) for b in boxes], (h, w))
    scheduler = make_scheduler("ddim", sd2_scheduler_config())
    scheduler.set_timesteps(20)
    alphas = scheduler.alphas_cumprod
    requests_seen = []

    def pull(inputs, t, requests):
        requests_seen.append(len(requests))
        a = alphas[int(t)]
        return torch.stack([(inputs[i] - a.sqrt() * values[p]) / (1 - a).sqrt() for i, p in requests])

    latents = multidiffusion(
        torch.randn((1, 4, h, w), generator=torch.Generator().manual_seed(2)), DiffusionSchedule(scheduler), pull, weights,
        views=make_views((h, w), 64, 8),
    )
    for p, value in enumerate(values):
        owned = weights[p, 0].bool()
        assert torch.allclose(latents[0][:, owned], torch.tensor(value), atol=0.15), p
    assert torch.allclose(latents[0, :, 20:52, 12:52], torch.tensor(1.5), atol=0.15)  # x and y not swapped
    assert torch.allclose(latents[0, :, 12:44, 132:180], torch.tensor(-2.0), atol=0.15)
    # 17 views; each region's prompt only where it has weight: far fewer than 17 x 3 requests
    assert len(make_views((h, w), 64, 8)) == 17 and requests_seen[0] < 17 * 3
