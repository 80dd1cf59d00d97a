"""Models with random weights, built in code (no download): `tiny-random` (tests, smoke renders) and
`sd2-random` (full-size SD2-base shapes: the real model's compute, for `bench` and `gpu-check`); their
SDXL counterparts `tiny-sdxl-random` and `sdxl-random`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..catalog import (FLUX_RANDOM, SD2_RANDOM, SD3_RANDOM, SDXL_RANDOM, TINY_FLUX_RANDOM, TINY_FLUX_SCHNELL_RANDOM,
                       TINY_RANDOM, TINY_SD3_RANDOM, TINY_SDXL_RANDOM, TINY_ZIMAGE_RANDOM, TINY_ZIMAGE_TURBO_RANDOM,
                       ZIMAGE_RANDOM, KLEIN_RANDOM, TINY_KLEIN_BASE_RANDOM, TINY_KLEIN_RANDOM)
from .family import LoadedState, Model
from .random_text import FULL_VOCAB, TINY_TEXT, clip_config, tiny_tokenizer
from .sd import SD
from .sdxl import SDXL


# The tiny UNets' shared shape (SD2- and SDXL-shaped alike): two levels, cross attention at half
# resolution only, so a 512px smoke render takes seconds.
_TINY_UNET = dict(in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32)


def build_random(name: str) -> Model:
    """A built-in random model by name (catalog.BUILT_IN); text encoders included, so it renders scenes."""
    from .random_flux import (build_flux_random, build_sd3_random, build_tiny_flux_random, build_tiny_sd3_random,
                              build_klein_random, build_tiny_klein_random, build_tiny_zimage_random,
                              build_zimage_random)

    builders = {TINY_RANDOM: build_tiny_random, SD2_RANDOM: lambda: build_sd2_random(text_encoder=True),
                TINY_KLEIN_RANDOM: build_tiny_klein_random, KLEIN_RANDOM: lambda: build_klein_random(text_encoder=True),
                TINY_KLEIN_BASE_RANDOM: lambda: build_tiny_klein_random(distilled=False),
                TINY_ZIMAGE_RANDOM: build_tiny_zimage_random, ZIMAGE_RANDOM: lambda: build_zimage_random(text_encoder=True),
                TINY_ZIMAGE_TURBO_RANDOM: lambda: build_tiny_zimage_random(turbo=True),
                TINY_SD3_RANDOM: build_tiny_sd3_random, SD3_RANDOM: lambda: build_sd3_random(text_encoder=True),
                TINY_SDXL_RANDOM: build_tiny_sdxl_random, SDXL_RANDOM: lambda: build_sdxl_random(text_encoder=True),
                TINY_FLUX_RANDOM: build_tiny_flux_random, TINY_FLUX_SCHNELL_RANDOM: lambda: build_tiny_flux_random(schnell=True),
                FLUX_RANDOM: lambda: build_flux_random(text_encoder=True)}
    return builders[name]()


def bench_model(name: str) -> Model:
    """A built-in random model as the bench builds it: without text encoders where it can (full size)."""
    from .random_flux import (build_flux_random, build_sd3_random, build_tiny_flux_random, build_tiny_sd3_random,
                              build_klein_random, build_tiny_klein_random, build_tiny_zimage_random,
                              build_zimage_random)

    builders = {TINY_RANDOM: build_tiny_random, SD2_RANDOM: build_sd2_random,
                TINY_KLEIN_RANDOM: build_tiny_klein_random, KLEIN_RANDOM: build_klein_random,
                TINY_KLEIN_BASE_RANDOM: lambda: build_tiny_klein_random(distilled=False),
                TINY_ZIMAGE_RANDOM: build_tiny_zimage_random, ZIMAGE_RANDOM: build_zimage_random,
                TINY_ZIMAGE_TURBO_RANDOM: lambda: build_tiny_zimage_random(turbo=True),
                TINY_SD3_RANDOM: build_tiny_sd3_random, SD3_RANDOM: build_sd3_random,
                TINY_SDXL_RANDOM: build_tiny_sdxl_random, SDXL_RANDOM: build_sdxl_random,
                TINY_FLUX_RANDOM: build_tiny_flux_random, TINY_FLUX_SCHNELL_RANDOM: lambda: build_tiny_flux_random(schnell=True),
                FLUX_RANDOM: build_flux_random}
    return builders[name]()


def build_tiny_random(seed: int = 0) -> SD:
    """SD2-shaped components with small random weights, built in code: no download, same every time.

    Same structure as SD2-base (OpenCLIP-style text encoder, linear-projection cross attention,
    8x VAE, 64-latent native size, SD2's DDIM config), so every code path runs; the pictures are
    noise-like.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer()
        text_encoder = CLIPTextModel(clip_config(tokenizer, len(tokenizer), **TINY_TEXT))
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=32, **_TINY_UNET)
        vae = random_vae(tiny=True, sample_size=512)
    return SD(tokenizer=tokenizer, text_encoder=text_encoder.eval(), unet=unet.eval(), vae=vae.eval(),
              state=LoadedState(model_id=TINY_RANDOM, scheduler_config=sd2_scheduler_config()))


def build_sd2_random(seed: int = 0, text_encoder: bool = False) -> SD:
    """Full-size SD2-base-shaped UNet and VAE with random weights (the real model's compute, no download).

    text_encoder: also an OpenCLIP ViT-H-shaped text encoder (SD2's: 1024 wide, 23 layers) over
    tiny-random's tokenizer, so `--model sd2-random` renders scenes; the bench needs none."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer() if text_encoder else None
        encoder = CLIPTextModel(clip_config(tokenizer, FULL_VOCAB, 1024, 4096, 23, 16)).eval() if text_encoder else None
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
        )
        vae = random_vae(tiny=False, sample_size=512)
    return SD(tokenizer, encoder, unet.eval(), vae.eval(), LoadedState(model_id=SD2_RANDOM, scheduler_config=sd2_scheduler_config()))


def random_vae(tiny: bool, sample_size: int, scaling_factor: float = 0.18215):
    """An 8x VAE with random weights: SD's full-size shapes, or tiny ones (8 channels a level); SD's
    and SDXL's differ only in sample size and scaling factor (0.18215 is diffusers' default)."""
    from diffusers import AutoencoderKL

    shape = {"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4} if tiny else {
        "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2}
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
        sample_size=sample_size, scaling_factor=scaling_factor, **shape,
    )


def sd2_scheduler_config(prediction_type: str = "epsilon") -> dict[str, Any]:
    """The scheduler config SD2-base ships (SD2-768 differs only in v_prediction)."""
    return {
        "_class_name": "DDIMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": prediction_type,
        "timestep_spacing": "leading",
    }


def save_model(model: Model, folder: Path) -> None:
    """Write a model as a diffusers folder (safetensors) with its model_index.json, loadable with
    `--model FOLDER`."""
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": model.facts.pipelines[0]}
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if getattr(model, name, None) is not None:
            getattr(model, name).save_pretrained(folder / name)
    for name, module in model.networks().items():
        module.save_pretrained(folder / name, safe_serialization=True)
    if isinstance(model, SDXL):
        index["force_zeros_for_empty_prompt"] = model.force_zeros_for_empty_prompt
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2))


def build_tiny_sdxl_random(seed: int = 0, sample_size: int = 64) -> SDXL:
    """SDXL-shaped components with small random weights, built in code (tests, `--model tiny-sdxl-random`).

    SDXL's structure: two CLIP text encoders (the second with a projection, whose pooled embedding
    conditions the UNet), cross attention over both encoders' hidden states concatenated, a
    `text_time` added embedding of the pooled text and six time ids, SDXL's Euler scheduler config
    and VAE scaling factor. sample_size: latent cells of the native size (64: 512 px, as SDXL-Turbo)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer()
        text_encoder = CLIPTextModel(clip_config(tokenizer, len(tokenizer), **TINY_TEXT))
        text_encoder_2 = CLIPTextModelWithProjection(clip_config(tokenizer, len(tokenizer), **TINY_TEXT))
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=32 + 32,  # both encoders' hidden states
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids, then the pooled text
            **_TINY_UNET,
        )
        vae = random_vae(tiny=True, sample_size=8 * sample_size, scaling_factor=0.13025)
    return SDXL(
        tokenizer=tokenizer, text_encoder=text_encoder.eval(), tokenizer_2=tokenizer_2,
        text_encoder_2=text_encoder_2.eval(), unet=unet.eval(), vae=vae.eval(),
        state=LoadedState(model_id=TINY_SDXL_RANDOM, scheduler_config=sdxl_scheduler_config()),
        force_zeros_for_empty_prompt=True,
    )


def build_sdxl_random(seed: int = 0, text_encoder: bool = False) -> SDXL:
    """Full-size SDXL-base-shaped UNet (2.6 B parameters) and VAE with random weights: the real model's
    compute, no download. text_encoder: also CLIP ViT-L- and OpenCLIP bigG-shaped text encoders over
    tiny-random's tokenizer, so `--model sdxl-random` renders scenes; the bench needs none."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer() if text_encoder else None
        tokenizer_2 = tiny_tokenizer() if text_encoder else None
        encoders = (None, None)
        if text_encoder:
            encoders = (CLIPTextModel(clip_config(tokenizer, FULL_VOCAB, 768, 4 * 768, 12, 12)).eval(),
                        CLIPTextModelWithProjection(clip_config(tokenizer, FULL_VOCAB, 1280, 4 * 1280, 32, 20)).eval())
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,  # six time ids x 256, then bigG's pooled 1280
        )
        vae = random_vae(tiny=False, sample_size=1024, scaling_factor=0.13025)
    return SDXL(tokenizer, encoders[0], tokenizer_2, encoders[1], unet.eval(), vae.eval(),
                LoadedState(model_id=SDXL_RANDOM, scheduler_config=sdxl_scheduler_config()),
                force_zeros_for_empty_prompt=True)


def sdxl_scheduler_config() -> dict[str, Any]:
    """The scheduler config SDXL base ships (Euler, SD2-base's betas; SDXL-Turbo's differs in trailing spacing)."""
    return {**sd2_scheduler_config(), "_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
            "use_karras_sigmas": False}


LORA_RANK = 16  # a common rank for character and style LoRAs (civitai's are mostly 8 to 128)


def random_lora(model: Model, generator: torch.Generator, rank: int = LORA_RANK, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """A LoRA with random weights for `model` in the diffusers/peft layout: every attention projection
    (to_q, to_k, to_v, to_out.0) of its denoiser, rank `rank` (the bench's region LoRAs; the README's
    offline LoRA recipe, scripts/random_loras.py)."""
    projections = [(name, module) for name, module in model.denoiser.named_modules()
                   if isinstance(module, torch.nn.Linear) and name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    return {f"{model.denoiser_part}.{name}.lora_{part}.weight": torch.randn(shape, generator=generator) * scale
            for name, linear in projections
            for part, shape in (("A", (rank, linear.in_features)), ("B", (linear.out_features, rank)))}
