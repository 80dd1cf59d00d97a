"""Single-file checkpoints in the original (A1111/ComfyUI, LDM) layout: written here from tiny-random's
weights, loaded through diffusers' single-file support with the configs of a diffusers folder."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from multidiff_cli.models.random_weights import build_tiny_random, save_model

VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(key: str, blocks: int) -> str:
    """A diffusers VAE key -> the original one: encoder.down.i.block.j, decoder.up.(n-1-i), mid.block_1/attn_1."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv


def original_layout(components, ldm_unet_key) -> dict[str, torch.Tensor]:
    """One state dict as A1111 and ComfyUI save SD checkpoints: model.diffusion_model.*, first_stage_model.*
    (attention as 1x1 convolutions), cond_stage_model.transformer.text_model.* (a CLIP text model)."""
    tensors = {}
    for key, value in components.unet.state_dict().items():
        tensors["model.diffusion_model." + ldm_unet_key(key, components.unet.config)] = value
    blocks = len(components.vae.config.block_out_channels)
    for key, value in components.vae.state_dict().items():
        new = vae_key(key, blocks)
        tensors["first_stage_model." + new] = value[..., None, None] if ".attn_1." in new and value.ndim == 2 else value
    for key, value in components.text_encoder.state_dict().items():
        tensors["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    return {key: value.contiguous() for key, value in tensors.items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, ldm_unet_key):
    """(diffusers folder, the same weights as one original-layout .safetensors file)."""
    folder = tmp_path_factory.mktemp("single")
    components = build_tiny_random()
    save_model(components, folder / "tiny")
    (folder / "tiny" / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"], '
        '"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"], '
        '"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"], '
        '"safety_checker": [null, null], "feature_extractor": [null, null]}'
    )
    save_file(original_layout(components, ldm_unet_key), str(folder / "tiny.safetensors"))
    return folder / "tiny", folder / "tiny.safetensors"


SCENE = "prompt: a red sofa\nwidth: 64\nheight: 64\nsteps: 2\nseed: 3\nregions:\n  - prompt: a lamp\n    box: [0, 0, 32, 64]\n"


@pytest.mark.slow
def test_a_single_file_checkpoint_renders_as_its_diffusers_folder(cli, checkpoint, write_scene, tmp_path):
    folder, single = checkpoint
    scene = write_scene(SCENE + f"model_config: {folder}\n")
    from_folder = cli("render", "-q", str(scene), "--model", str(folder), "-o", str(tmp_path / "folder.png"))
    from_file = cli("render", "-q", str(scene), "--model", str(single), "-o", str(tmp_path / "file.png"))
    assert from_folder.exit_code == 0, from_folder.output
    assert from_file.exit_code == 0, from_file.output
    ignored = f"model_config {folder} is ignored: it gives the configs of a single-file checkpoint, and {folder}"
    assert ignored in from_folder.stderr and "model_config" not in from_file.stderr
    from PIL import Image

    with Image.open(tmp_path / "folder.png") as a, Image.open(tmp_path / "file.png") as b:
        assert a.tobytes() == b.tobytes()


def test_a_single_file_without_configs_offline_says_how_to_get_them(cli, checkpoint, write_scene, tmp_path, monkeypatch):
    _, single = checkpoint
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = cli("render", "-q", str(write_scene(SCENE)), "--model", str(single), "--output-dir", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert "model_config:" in result.stderr and "hf download" in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_ckpt_checkpoint_is_refused_without_allow_pickle(cli, checkpoint, write_scene, tmp_path):
    folder, single = checkpoint
    pickled = tmp_path / "tiny.ckpt"
    from safetensors.torch import load_file

    torch.save({"state_dict": load_file(str(single))}, pickled)
    result = cli("render", "-q", str(write_scene(SCENE + f"model_config: {folder}\n")), "--model", str(pickled),
                    "--output-dir", str(tmp_path / "out"))
    assert result.exit_code == 1 and "--allow-pickle" in result.stderr
