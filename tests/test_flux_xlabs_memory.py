"""FLUX.1's XLabs LoRAs and its memory check (issue 21): an XLabs-layout LoRA renders as FluxPipeline with
load_lora_weights; a full-size FLUX.1-dev in float32 on a 24 GiB machine is one line before anything loads.
(peft and kohya LoRAs, regions: test_flux_lora.py; single files and refusals: test_flux.py.)"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from multidiff_cli.models.random_flux import build_tiny_flux_random
from multidiff_cli.run.render import render
from reference import flux_pipeline, scene_of

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dev():
    return build_tiny_flux_random()


PLAIN = "prompt: a red sofa in a room\nwidth: 96\nheight: 64\nsteps: 2\nseed: 9\nguidance_scale: 4.0\n"


def xlabs_lora(path, model, seed: int, rank: int = 2, strength: float = 0.3):
    """XLabs' layout (double_blocks.<i>.processor.qkv_lora1/2 and proj_lora1/2, down/up): one down matrix for q,
    k and v together, their up matrices stacked."""
    generator = torch.Generator().manual_seed(seed)
    inner = model.transformer.config.num_attention_heads * model.transformer.config.attention_head_dim
    tensors = {}
    for i in range(model.transformer.config.num_layers):
        for name, out in (("qkv_lora1", 3 * inner), ("qkv_lora2", 3 * inner), ("proj_lora1", inner),
                          ("proj_lora2", inner)):
            tensors[f"double_blocks.{i}.processor.{name}.down.weight"] = torch.randn((rank, inner), generator=generator) * strength
            tensors[f"double_blocks.{i}.processor.{name}.up.weight"] = torch.randn((out, rank), generator=generator) * strength
    save_file(tensors, str(path))
    return path


def test_an_xlabs_lora_renders_as_flux_pipeline_with_load_lora_weights(dev, write_scene, tmp_path,
                                                                     assert_close_batched):
    """XLabs' layout through diffusers' conversion (peft and kohya layouts, and region LoRAs: test_flux_lora.py)."""
    (tmp_path / "loras").mkdir()
    style = xlabs_lora(tmp_path / "loras" / "style.safetensors", dev, seed=1)
    scene = scene_of(write_scene, dev, PLAIN + "loras:\n  - path: loras/style.safetensors\n    scale: 0.8\n")
    ours = render(scene, copy.deepcopy(dev), seed=9).latents
    pipe = flux_pipeline(copy.deepcopy(dev))
    pipe.load_lora_weights(str(style), adapter_name="style")
    pipe.set_adapters(["style"], [0.8])
    with torch.inference_mode():
        packed = pipe("a red sofa in a room", height=64, width=96, num_inference_steps=2, guidance_scale=4.0,
                      generator=torch.Generator("cpu").manual_seed(9), output_type="latent").images
    theirs = pipe._unpack_latents(packed, 64, 96, pipe.vae_scale_factor)
    bare = render(scene.model_copy(update={"loras": []}), dev, seed=9).latents
    assert (bare - theirs).abs().max() > 100 * (ours - theirs).abs().max()  # the LoRA matters
    assert_close_batched(ours, theirs, steps=2)


# --- memory: a full-size FLUX in float32 on a 24 GiB machine -----------------------------------------------------


def header_only(path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A .safetensors file's header alone (no data): what the memory check reads, the size of FLUX.1's weights
    without writing 32 GiB."""
    import struct

    offset, header = 0, {}
    for name, (dtype, shape) in tensors.items():
        count = 1
        for dim in shape:
            count *= dim
        size = count * 2
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(text)) + text)


def test_a_full_flux_in_float32_on_a_24_gib_machine_is_one_line_before_anything_loads(cli, write_scene, tmp_path,
                                                                                      monkeypatch, no_model_load):
    """11.9 B transformer parameters and T5-XXL's 4.8 B, in bfloat16 files: 63 GiB in float32 against 24 GiB."""
    folder = tmp_path / "FLUX.1-dev"
    header_only(folder / "transformer" / "diffusion_pytorch_model.safetensors",
                {"weight": ("BF16", [11_900_000_000])})
    header_only(folder / "text_encoder_2" / "model.safetensors", {"weight": ("BF16", [4_760_000_000])})
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    monkeypatch.setattr("multidiff_cli.models.available_bytes", lambda device: 24 * 2**30)
    scene = write_scene("prompt: p\nwidth: 64\nheight: 64\n")
    result = cli("render", scene, "--model", str(folder), "--device", "cpu", "--dtype", "float32", "-q",
                 "-o", tmp_path / "out.png")
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line == (f"error: {folder}'s weights take about 62.06 GiB in float32, but cpu has 24.00 GiB free: use "
                    "--dtype bfloat16 (half of float32); --no-memory-check loads anyway")
    assert no_model_load == [] and not (tmp_path / "out.png").exists()
