"""Panoramas end to end on the tiny model: views over wide canvases, 360-degree wrap, tiled decoding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from multidiff_cli.run import render as render_module
from multidiff_cli.models.codec import VAECodec
from multidiff_cli.run.render import plan_render
from multidiff_cli.scene import load_scene


def test_views_follow_the_model_window_and_the_scene_stride(tiny, write_scene):
    scene = load_scene(write_scene("prompt: p\nwidth: 2048\nheight: 512\nview_stride: 128\n"))
    views = plan_render(scene, tiny).views  # tiny-random's native size is SD2-base's: 64 latent cells
    assert [v.left for v in views] == list(range(0, 193, 16))
    assert {(v.top, v.height, v.width) for v in views} == {(0, 64, 64)}
    small = load_scene(write_scene("prompt: p\nwidth: 256\nheight: 192\n"))
    assert [(v.height, v.width) for v in plan_render(small, tiny).views] == [(24, 32)]  # smaller than a view


def seam_error(picture: np.ndarray, reference: np.ndarray, seam_px: int, margin: int = 16) -> float:
    """Mean difference between the picture's two edges and the reference's pixels around `seam_px`."""
    right = np.abs(picture[:, :margin] - reference[:, seam_px : seam_px + margin]).mean()
    left = np.abs(picture[:, -margin:] - reference[:, seam_px - margin : seam_px]).mean()
    return float(right + left) / 2


def test_wrap_padding_decodes_across_the_seam(tiny):
    """Decode a latent rolled by half its width: its middle is what the seam should look like."""
    z = torch.randn((1, 4, 8, 32), generator=torch.Generator().manual_seed(0))
    reference = np.asarray(tiny.codec.decode(torch.roll(z, 16, dims=-1))).astype(float)
    plain = np.asarray(tiny.codec.decode(z)).astype(float)
    wrapped = np.asarray(tiny.codec.decode(z, wrap=True)).astype(float)
    assert wrapped.shape == plain.shape == (64, 256, 3)
    interior = np.abs(plain[:, 64:80] - reference[:, 192:208]).mean()  # the VAE's global attention differs a little
    assert seam_error(wrapped, reference, 128) < 0.25 * seam_error(plain, reference, 128)
    assert seam_error(wrapped, reference, 128) < 2 * interior + 1


def test_a_360_panorama_renders_with_wrapping_views(tiny, write_scene, monkeypatch):
    scene = load_scene(write_scene("prompt: city\nwidth: 1024\nheight: 512\nsteps: 1\nwrap: horizontal\n"))
    plan = plan_render(scene, tiny)
    assert plan.wrap and any(v.left + v.width > 128 for v in plan.views)  # some views run across the edge
    calls = []
    real = VAECodec.decode
    monkeypatch.setattr(VAECodec, "decode", lambda codec, z, wrap, tiled: calls.append((wrap, tiled)) or real(codec, z, wrap, tiled))
    result = render_module.render(scene, tiny, seed=0)
    assert result.image.size == (1024, 512) and calls == [(True, False)]


@pytest.mark.parametrize(("size", "setting", "on"), [((512, 4096), "auto", True), ((512, 2048), "auto", False),
                                                     ((512, 512), "true", True), ((4096, 512), "false", False)])
def test_tiled_decoding_turns_on_for_large_canvases(tiny, write_scene, size, setting, on):
    height, width = size
    scene = load_scene(write_scene(f"prompt: p\nwidth: {width}\nheight: {height}\ntiled_decode: {setting}\n"))
    assert plan_render(scene, tiny).tiled_decode is on


def test_tiled_decoding_gives_the_whole_picture(tiny):
    z = torch.randn((1, 4, 64, 160), generator=torch.Generator().manual_seed(1))
    tiled = np.asarray(tiny.codec.decode(z, tiled=True)).astype(float)
    whole = np.asarray(tiny.codec.decode(z)).astype(float)
    assert tiled.shape == whole.shape == (512, 1280, 3)
    assert not tiny.vae.use_tiling  # switched off again for the next render
    assert np.abs(tiled - whole).mean() < 0.1 * np.abs(whole - whole.mean()).mean() + 5
