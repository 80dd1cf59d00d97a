"""The Stable Diffusion 1.x/2.x denoiser and codec: text encoding, the UNet in chunks, the VAE."""
from __future__ import annotations

from typing import Callable

import torch
from PIL import Image

from .components import Components

# Live activation tensors per element of the UNet's first level, per sample (measured on the CPU:
# SD2-base at 512x512 in float32 holds about 0.2 GiB per sample; attention runs through SDPA,
# which keeps no quadratic matrix). It bounds SDXL's too: measured the same way (peak RSS of one
# call of 1, 2 and 4 samples of 64x64 latents, bfloat16, README *SDXL*), SDXL base's UNet held
# 45-75 MiB per extra sample where SD2's held 93-105: its first level has no attention, and its
# transformer blocks work on 4x and 16x fewer cells.
UNET_MULTIPLICITY = 40
# `max_batch: auto` on the CPU: the UNet activations one call may hold. Measured on a quiet 2-core x86
# CPU with SD2's UNet in float32, freed memory kept for reuse (README, Benchmark): seconds per sample
# at 64x64 latents were within 1% from 4 to 6 samples a call (+2% at 2 and at 8, +7% at 1); at 32x32
# they fell all the way to 24 (+11% at 5, +2% at 16). A call's weights are read once for all its
# samples, so small calls cost more per sample. 6 samples of 64x64, 24 of 32x32 (1.2 GiB by the
# estimate) is at the fastest for both.
CPU_CALL_BYTES = 6 * 4096 * 320 * 4 * UNET_MULTIPLICITY
FREE_MEMORY_SHARE = 0.8  # `max_batch: auto` fills at most this share of the free memory (the memory check refuses at 0.9)
FALLBACK_SAMPLES_PER_CALL = 16  # auto where free memory cannot be told (MPS): past this, GPUs gain little
MAX_SAMPLES_PER_CALL = 4096  # the scene's max_batch bound
BACKGROUND_PX = 64  # flat-colour images for bootstrapping are encoded this small, then broadcast
WRAP_PAD_CELLS = 8  # latent cells of circular padding around a 360-degree panorama when decoding


def encode_texts(components: Components, texts: list[str]) -> torch.Tensor:
    """(E, 77, D) text-encoder hidden states, as diffusers' SD pipelines compute them."""
    tokenizer, encoder = components.tokenizer, components.text_encoder
    tokens = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    mask = tokens.attention_mask.to(components.device) if getattr(encoder.config, "use_attention_mask", False) else None
    with torch.inference_mode():
        return encoder(tokens.input_ids.to(components.device), attention_mask=mask)[0]


def truncation_warnings(components: Components, labelled_texts: list[tuple[str, str]]) -> list[str]:
    """Name every (label, text) longer than the text encoder's window, and where it is cut."""
    tokenizer, notes = components.tokenizer, []
    limit = tokenizer.model_max_length  # 77 for CLIP: 75 prompt tokens between the start and end tokens
    for label, text in labelled_texts:
        ids = tokenizer(text, truncation=False, verbose=False).input_ids
        if len(ids) > limit:
            kept = tokenizer.decode(ids[1 : limit - 1])
            notes.append(f"{label} is {len(ids) - 2} tokens, over the text encoder's {limit - 2} ({limit} with the "
                         f"start and end tokens): cut after '...{kept[-40:]}'")
    return notes


def unet_bytes_per_sample(unet_config, view_cells: int, dtype: torch.dtype) -> int:
    """Activation memory of one UNet sample over `view_cells` latent cells (an estimate, see UNET_MULTIPLICITY)."""
    element = torch.finfo(dtype).bits // 8
    return view_cells * unet_config.block_out_channels[0] * element * UNET_MULTIPLICITY


def auto_samples_per_call(device_type: str, bytes_per_sample: int, free_bytes: int | None) -> int:
    """`max_batch: auto`: the UNet samples per call each device runs fastest.

    CPU: as many as fit CPU_CALL_BYTES of activations (the fastest size per sample, measured);
    CUDA: as many as FREE_MEMORY_SHARE of the free memory holds (GPUs gain from full batches; the
    chunked UNet still halves once on out-of-memory); elsewhere (MPS: free memory unknown) 16."""
    if device_type == "cpu":
        budget = CPU_CALL_BYTES if free_bytes is None else min(CPU_CALL_BYTES, FREE_MEMORY_SHARE * free_bytes)
    elif free_bytes is not None:
        budget = FREE_MEMORY_SHARE * free_bytes
    else:
        return FALLBACK_SAMPLES_PER_CALL
    return int(min(MAX_SAMPLES_PER_CALL, max(1, budget // bytes_per_sample)))


def call_bounds(samples: int, samples_per_call: int) -> list[tuple[int, int]]:
    """(start, end) of each UNet call: the fewest calls of at most `samples_per_call`, their sizes as
    even as can be (7 in calls of at most 3: 3, 2, 2, not 3, 3, 1), so no call is left running a
    sample or two at a small call's higher cost per sample."""
    calls = -(-samples // samples_per_call)
    size, larger = divmod(samples, calls)
    ends = [0]
    for call in range(calls):
        ends.append(ends[-1] + size + (call < larger))
    return list(zip(ends, ends[1:]))


class ChunkedUNet:
    """Runs UNet samples in the fewest calls of at most `samples_per_call`, as even as can be
    (`call_bounds`); on CUDA out-of-memory, halves the largest call once and retries."""

    def __init__(self, unet, samples_per_call: int = FALLBACK_SAMPLES_PER_CALL, warn: Callable[[str], None] | None = None):
        self.unet, self.samples_per_call, self.warn = unet, samples_per_call, warn or (lambda _message: None)
        self.halved = False

    def __call__(self, inputs: torch.Tensor, t: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        while True:
            bounds = call_bounds(inputs.shape[0], self.samples_per_call)
            size = bounds[0][1] - bounds[0][0]  # the largest call
            try:
                return torch.cat([self._forward(inputs[start:end], t, texts[start:end]) for start, end in bounds])
            except torch.cuda.OutOfMemoryError:
                if self.halved or size == 1:
                    raise
                self.halved, self.samples_per_call = True, max(1, size // 2)
                torch.cuda.empty_cache()
                self.warn(f"out of GPU memory at {size} UNet samples per call: retrying with --max-batch {self.samples_per_call}")

    def _forward(self, inputs, t, conds):
        """One UNet call. conds: the samples' text conditioning, a (B, L, D) tensor, or an object that
        slices like one and gives the UNet's keyword arguments with `unet_kwargs()` (a model family
        with more conditioning than hidden states adds it there)."""
        kwargs = conds.unet_kwargs() if hasattr(conds, "unet_kwargs") else {"encoder_hidden_states": conds}
        return self.unet(inputs.to(self.unet.dtype), t, **kwargs).sample.float()


def background_latents(components: Components, generator: torch.Generator, steps: int, regions: int) -> torch.Tensor:
    """(steps, regions, C, 1, 1) latents of flat random colours, one per bootstrap step and region.

    As in the authors' code, each step and region gets its own colour; a flat image encodes to a
    flat latent, so each is encoded small and broadcast over the canvas.
    """
    colours = torch.rand((steps * regions, 3, 1, 1), generator=generator) * 2 - 1
    images = colours.expand(-1, -1, BACKGROUND_PX, BACKGROUND_PX).to(components.device, components.vae.dtype)
    with torch.inference_mode():
        latents = components.vae.encode(images).latent_dist.mean * components.vae.config.scaling_factor
    return latents.mean(dim=(2, 3), keepdim=True).float().reshape(steps, regions, -1, 1, 1)


def encode_image(components: Components, pixels: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """(1, 3, H, W) pixels in [-1, 1] -> (1, C, H/8, W/8) latents: the latent distribution's mean times
    the VAE's scaling factor. tiled: in overlapping tiles (bounded memory), as `decode` tiles."""
    vae = components.vae
    vae.enable_tiling() if tiled else vae.disable_tiling()
    try:
        with torch.inference_mode():
            latents = vae.encode(pixels.to(components.device, vae.dtype)).latent_dist.mean
    finally:
        vae.disable_tiling()
    return latents.float() * vae.config.scaling_factor


def decode(components: Components, latents: torch.Tensor, wrap: bool = False, tiled: bool = False) -> Image.Image:
    """Latents -> RGB picture, with the VAE's own scaling factor.

    wrap: pad the latents circularly left and right before decoding, and crop the padding off,
        so the decoder sees across the seam of a 360-degree panorama.
    tiled: decode in overlapping tiles (diffusers' tiled VAE decoding): bounded memory for wide canvases.
    """
    vae = components.vae
    pad = min(WRAP_PAD_CELLS, latents.shape[-1]) if wrap else 0
    if pad:
        latents = torch.cat([latents[..., -pad:], latents, latents[..., :pad]], dim=-1)
    vae.enable_tiling() if tiled else vae.disable_tiling()
    try:
        with torch.inference_mode():
            pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    finally:
        vae.disable_tiling()
    if pad:
        margin = pad * components.vae_scale_factor
        pixels = pixels[..., margin:-margin]
    pixels = ((pixels[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())


