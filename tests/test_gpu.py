"""CUDA checks (skipped without a CUDA device): same start as the CPU, float16 and bfloat16 renders."""
from __future__ import annotations

import pytest
import torch

from multidiff_cli.models.components import speed_up, to_device
from multidiff_cli.models.random_weights import build_tiny_random
from multidiff_cli.run.render import render
from multidiff_cli.scene import load_scene

pytestmark = pytest.mark.gpu

SCENE = """\
prompt: a room
width: 192
height: 128
steps: 4
regions:
  - prompt: a sofa
    box: [32, 32, 128, 128]
"""


def on(device: str, dtype: torch.dtype):
    return speed_up(to_device(build_tiny_random(), torch.device(device), dtype))


def test_cuda_float32_render_matches_the_cpu_render(write_scene, monkeypatch, assert_close_batched):
    """Noise is drawn on the CPU, so both devices start from the same numbers and end close: as close as
    float32 arithmetic in another order allows (TF32 convolutions off, so CUDA computes in float32 too)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    scene = load_scene(write_scene(SCENE))
    cpu = render(scene, on("cpu", torch.float32), seed=5).latents
    cuda = render(scene, on("cuda", torch.float32), seed=5).latents.cpu()
    assert_close_batched(cuda, cpu, guidance=scene.guidance_scale, steps=scene.steps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_renders_are_finite_and_channels_last(write_scene, dtype):
    components = on("cuda", dtype)
    assert components.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert components.vae.dtype == torch.float32  # decoding never overflows
    result = render(load_scene(write_scene(SCENE)), components, seed=5)
    assert torch.isfinite(result.latents).all()
    assert result.image.size == (192, 128)


def test_same_seed_same_pixels_on_cuda(write_scene):
    scene = load_scene(write_scene(SCENE))
    components = on("cuda", torch.float16)
    assert render(scene, components, seed=1).image.tobytes() == render(scene, components, seed=1).image.tobytes()
