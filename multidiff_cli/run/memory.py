"""A rough memory estimate of a render, so a canvas that cannot fit is refused before the work starts."""
from __future__ import annotations

from ..errors import TooLarge
from ..models import Model
from ..output.report import size_text
from ..scene import Scene
from .render import RenderPlan, plan_render

TILE_PX = 512  # diffusers' tiled decoding works on tiles of the VAE's sample size
# Tiled encoding held more than one tile's worth (measured on the CPU, sd2-random's VAE: one 512x512 encode
# grew the RSS by 0.64 GiB, a tiled 1024x1024 encode by 0.76 GiB; the estimate of one tile is 0.68 GiB).
TILED_ENCODE_OVERHEAD = 1.2
PICTURE_BYTES_PER_PX = 3 + 3 * 4  # the init image as 8-bit RGB and as float32 at the canvas's size


def estimate_bytes(scene: Scene, model: Model, samples_per_call: int, tiled: bool,
                   view_cells: int | None = None) -> dict[str, int]:
    """Activation memory, beyond the loaded weights: the denoiser's largest call (as the family estimates
    it), the decode, and the init image's encode (the encoder's levels are the decoder's; it tiles when
    decoding does). view_cells: the largest view's latent cells (RenderPlan.view_cells); by default,
    planned here."""
    view_cells = view_cells or plan_render(scene, model).view_cells
    denoiser = samples_per_call * model.bytes_per_sample(view_cells)
    pixels = TILE_PX * TILE_PX if tiled else scene.width * scene.height
    decode = model.codec.activation_bytes(pixels)  # the VAE decodes in float32
    parts = {model.denoiser_part: int(denoiser), "decode": decode}
    if scene.init_image is not None:
        picture = scene.width * scene.height * PICTURE_BYTES_PER_PX
        parts["encode"] = int(decode * (TILED_ENCODE_OVERHEAD if tiled else 1)) + picture
    return parts


def check_memory(scene: Scene, model: Model, plan: RenderPlan) -> None:
    """Refuse (TooLarge, exit 2) a render whose estimate exceeds the free memory."""
    free = model.free_bytes()
    if free is None:
        return
    # the most samples a step can have: every prompt in every view, twice (guidance), each its own
    # input (bootstrapping)
    samples = min(plan.samples_per_call, 2 * (len(scene.regions) + 1) * len(plan.views))
    parts = estimate_bytes(scene, model, samples, plan.tiled_decode, plan.view_cells)
    need = max(parts.values())  # the denoiser's memory is released before decoding
    if need > 0.9 * free:
        largest = max(parts, key=parts.get)
        advice = {
            "decode": "set `tiled_decode: true` (or leave it on auto)",
            "encode": "set `tiled_decode: true` (it tiles the encode too; or leave it on auto)",
        }.get(largest, "lower max_batch (--max-batch 1)")
        raise TooLarge(
            f"a {scene.width}x{scene.height} render needs about {size_text(need)} for its {largest} "
            f"(estimate), but {model.device} has {size_text(free)} free: {advice}, or make the canvas "
            "smaller; --no-memory-check renders anyway"
        )
