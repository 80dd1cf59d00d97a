"""CUDA checks (skipped without a CUDA device): same start as the CPU, float16 and bfloat16 renders."""
from __future__ import annotations

import pytest
import torch

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
    return build_tiny_random().to(torch.device(device), dtype).speed_up()


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


def test_compiled_unet_with_a_region_lora_renders_as_the_eager_one(write_scene, tmp_path):
    """--compile with LoRAs: switching adapter sets makes torch.compile guard on peft's per-layer state and
    compile once per set (on the CPU this measured equal to eager up to 4e-5 at a latent scale of 10)."""
    from safetensors.torch import save_file

    eager_model = on("cuda", torch.float32)
    generator = torch.Generator().manual_seed(2)
    save_file({f"unet.{name}.lora_{part}.weight": torch.randn(shape, generator=generator) * 0.3
               for name, linear in eager_model.unet.named_modules()
               if isinstance(linear, torch.nn.Linear) and name.endswith((".to_q", ".to_k", ".to_v"))
               for part, shape in (("A", (2, linear.in_features)), ("B", (linear.out_features, 2)))},
              str(tmp_path / "alice.safetensors"))
    scene = load_scene(write_scene(SCENE + "    loras: [{path: " + str(tmp_path / "alice.safetensors") + "}]\n"))
    eager = render(scene, eager_model, seed=3).latents
    compiled = render(scene, build_tiny_random().to(torch.device("cuda"), torch.float32).speed_up(compile=True), seed=3).latents
    assert (compiled - eager).abs().max() < 1e-3 * eager.abs().max()
