"""A VAE as the latent codec of a family: pixels <-> latents with its config's scaling and shift factors."""
from __future__ import annotations

import torch
from PIL import Image

BACKGROUND_PX = 64  # flat-colour images for bootstrapping are encoded this small, then broadcast
WRAP_PAD_CELLS = 8  # latent cells of circular padding around a 360-degree panorama when decoding


class VAECodec:
    """diffusers' AutoencoderKL: latents = (mean - shift_factor) * scaling_factor, as diffusers' pipelines
    scale them (SD's VAEs have no shift factor; FLUX's and SD3's have one)."""

    def __init__(self, vae, cell_px: int):
        self.vae, self.cell_px = vae, cell_px

    @property
    def scaling(self) -> float:
        return self.vae.config.scaling_factor

    @property
    def shift(self) -> float | None:
        return getattr(self.vae.config, "shift_factor", None)

    def to_latents(self, mean: torch.Tensor) -> torch.Tensor:
        mean = mean.float()
        return (mean if self.shift is None else mean - self.shift) * self.scaling

    def from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        scaled = latents / self.scaling
        return scaled if self.shift is None else scaled + self.shift

    def background_latents(self, generator: torch.Generator, steps: int, regions: int) -> torch.Tensor:
        """(steps, regions, C, 1, 1) latents of flat random colours, one per bootstrap step and region.

        As in the authors' code, each step and region gets its own colour; a flat image encodes to a
        flat latent, so each is encoded small and broadcast over the canvas."""
        colours = torch.rand((steps * regions, 3, 1, 1), generator=generator) * 2 - 1
        images = colours.expand(-1, -1, BACKGROUND_PX, BACKGROUND_PX).to(self.vae.device, self.vae.dtype)
        with torch.inference_mode():
            latents = self.to_latents(self.vae.encode(images).latent_dist.mean)
        return latents.mean(dim=(2, 3), keepdim=True).reshape(steps, regions, -1, 1, 1)

    def encode(self, pixels: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """(1, 3, H, W) pixels in [-1, 1] -> (1, C, H/8, W/8) latents: the latent distribution's mean,
        scaled. tiled: in overlapping tiles (bounded memory), as `decode` tiles."""
        vae = self.vae
        vae.enable_tiling() if tiled else vae.disable_tiling()
        try:
            with torch.inference_mode():
                mean = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
        finally:
            vae.disable_tiling()
        return self.to_latents(mean)

    def decode(self, latents: torch.Tensor, wrap: bool = False, tiled: bool = False) -> Image.Image:
        """Latents -> RGB picture.

        wrap: pad the latents circularly left and right before decoding, and crop the padding off,
            so the decoder sees across the seam of a 360-degree panorama.
        tiled: decode in overlapping tiles (diffusers' tiled VAE decoding): bounded memory for wide canvases.
        """
        vae = self.vae
        pad = min(WRAP_PAD_CELLS, latents.shape[-1]) if wrap else 0
        if pad:
            latents = torch.cat([latents[..., -pad:], latents, latents[..., :pad]], dim=-1)
        vae.enable_tiling() if tiled else vae.disable_tiling()
        try:
            with torch.inference_mode():
                pixels = vae.decode(self.from_latents(latents.to(vae.dtype))).sample
        finally:
            vae.disable_tiling()
        if pad:
            margin = pad * self.cell_px
            pixels = pixels[..., margin:-margin]
        pixels = ((pixels[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())

    def activation_bytes(self, pixels: int) -> int:
        """The decoder's activation memory over `pixels` (an estimate): VAE_MULTIPLICITY live float32
        tensors per level, each level a quarter of the one above."""
        per_pixel = sum(c / 4**level for level, c in enumerate(self.vae.config.block_out_channels))
        return int(pixels * per_pixel * 4 * VAE_MULTIPLICITY)


VAE_MULTIPLICITY = 3  # live tensors per decoder level
