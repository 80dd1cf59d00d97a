"""One render: a validated scene and loaded model components -> MultiDiffusion latents -> a picture."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

from . import masks
from .errors import MultidiffError
from .models import Components
from .sampler import Denoiser, Job, StepCallback, multidiffusion
from .scene import Scene
from .schedulers import make_scheduler
from .views import View, make_views

BACKGROUND_PX = 64  # flat-colour images for bootstrapping are encoded this small, then broadcast
WRAP_PAD_CELLS = 8  # latent cells of circular padding around a 360-degree panorama when decoding
DEFAULT_MAX_BATCH = 16  # UNet samples per call unless the scene says: past this, GPUs gain little speed
TILED_DECODE_PX = 1024 * 1024  # `tiled_decode: auto` tiles canvases larger than this


class RenderError(MultidiffError):
    """The render itself failed (NaN latents, ...)."""


@dataclass
class Prompts:
    """The distinct texts to encode, and for each prompt (0 = global) its cond/negative text and guidance."""

    texts: list[str]
    cond: list[int]
    negative: list[int]
    guidance: list[float]
    labels: list[str] = field(default_factory=list)


@dataclass
class RenderResult:
    image: Image.Image
    latents: torch.Tensor
    seed: int
    seconds: float
    warnings: list[str]


def scene_prompts(scene: Scene) -> Prompts:
    """Global prompt plus one per region, each text listed once (encoded once)."""
    texts: list[str] = []

    def index(text: str) -> int:
        if text not in texts:
            texts.append(text)
        return texts.index(text)

    prompts = Prompts(texts, [], [], [])
    entries = [("prompt", scene.prompt, None, None)] + [
        (f"regions[{i}].prompt", r.prompt, r.negative_prompt, r.guidance_scale) for i, r in enumerate(scene.regions)
    ]
    for label, text, negative, guidance in entries:
        prompts.labels.append(label)
        prompts.cond.append(index(scene.full_prompt(text)))
        prompts.negative.append(index(scene.negative_prompt if negative is None else negative))
        prompts.guidance.append(scene.guidance_scale if guidance is None else guidance)
    return prompts


def scene_masks(scene: Scene) -> list[torch.Tensor]:
    """Every region's binary (h, w) mask at latent resolution."""
    return [
        masks.box_to_latent(r.box, scene.latent_hw) if r.box is not None else masks.read_mask(scene.mask_path(r), scene.latent_hw)
        for r in scene.regions
    ]


def scene_weights(scene: Scene, scheduler=None) -> torch.Tensor:
    """Fusion weights of the global prompt and every region: (N+1, 1, h, w), or with the few-step
    stabilisation on, quantized masks, one set per step (steps, N+1, 1, h, w)."""
    region_masks = scene_masks(scene)
    if not (scene.few_step_on and region_masks and scheduler is not None):
        return masks.region_weights(region_masks, scene.latent_hw)
    return masks.quantized_weights(region_masks, noise_levels(scheduler))


def noise_levels(scheduler) -> torch.Tensor:
    """sqrt(1 - alphas_cumprod[t]) at each step's timestep: 1 is pure noise, 0 clean."""
    alphas = scheduler.alphas_cumprod.cpu()
    timesteps = scheduler.timesteps[:: getattr(scheduler, "order", 1)].cpu()
    return (1 - alphas[timesteps.round().long().clamp(0, len(alphas) - 1)]).sqrt()


def encode_texts(components: Components, texts: list[str]) -> torch.Tensor:
    """(E, 77, D) text-encoder hidden states, as diffusers' SD pipelines compute them."""
    tokenizer, encoder = components.tokenizer, components.text_encoder
    tokens = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    mask = tokens.attention_mask.to(components.device) if getattr(encoder.config, "use_attention_mask", False) else None
    with torch.inference_mode():
        return encoder(tokens.input_ids.to(components.device), attention_mask=mask)[0]


def truncation_warnings(components: Components, prompts: Prompts) -> list[str]:
    """Name every prompt longer than the text encoder's window, and where it is cut."""
    tokenizer, notes = components.tokenizer, []
    limit = tokenizer.model_max_length
    for label, text_index in zip(prompts.labels, prompts.cond):
        ids = tokenizer(prompts.texts[text_index], truncation=False).input_ids
        if len(ids) > limit:
            kept = tokenizer.decode(ids[1 : limit - 1])
            notes.append(f"{label} is {len(ids) - 2} tokens, over the text encoder's {limit - 2}: cut after "
                         f"'...{kept[-40:]}'")
    return notes


UNetRun = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""run(inputs (B, C, h, w), t, texts (B, L, D)) -> float model outputs (B, C, h, w)."""


class BatchedUNet:
    """Runs UNet samples in calls of at most `max_batch`; on CUDA out-of-memory, halves it once and retries."""

    def __init__(self, unet, max_batch: int | None = None, warn: Callable[[str], None] | None = None):
        self.unet, self.max_batch, self.warn = unet, max_batch, warn or (lambda _message: None)
        self.halved = False

    def __call__(self, inputs: torch.Tensor, t: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        while True:
            size = self.max_batch or inputs.shape[0]
            try:
                return torch.cat([
                    self._forward(inputs[i : i + size], t, texts[i : i + size]) for i in range(0, inputs.shape[0], size)
                ])
            except torch.cuda.OutOfMemoryError:
                if self.halved or size == 1:
                    raise
                self.halved, self.max_batch = True, max(1, size // 2)
                torch.cuda.empty_cache()
                self.warn(f"out of GPU memory at {size} UNet samples per call: retrying with --max-batch {self.max_batch}")

    def _forward(self, inputs, t, texts):
        return self.unet(inputs.to(self.unet.dtype), t, encoder_hidden_states=texts).sample.float()


def guided_denoiser(run: UNetRun, embeddings: torch.Tensor, prompts: Prompts) -> Denoiser:
    """Classifier-free guidance for every job of a step, all UNet samples batched together.

    A sample is (input latent, text); each distinct one runs once, so jobs on the same input
    whose prompts share a negative prompt share its unconditional pass (N regions: N+2 samples a
    step instead of 2(N+1)). Guidance <= 1 runs no unconditional pass (diffusers' convention).
    `run` is a BatchedUNet (or any run(inputs, t, texts) -> float outputs).
    """

    def denoise(inputs: torch.Tensor, t: torch.Tensor, jobs: list[Job]) -> torch.Tensor:
        samples: dict[tuple[int, int], int] = {}

        def sample(latent: int, text: int) -> int:
            return samples.setdefault((latent, text), len(samples))

        cond = [sample(latent, prompts.cond[p]) for latent, p in jobs]
        uncond = [sample(latent, prompts.negative[p]) if prompts.guidance[p] > 1 else None for latent, p in jobs]
        out = run(inputs[[latent for latent, _ in samples]], t, embeddings[[text for _, text in samples]])
        guided = []
        for c, u, (_, p) in zip(cond, uncond, jobs):
            guided.append(out[c] if u is None else out[u] + prompts.guidance[p] * (out[c] - out[u]))
        return torch.stack(guided)

    return denoise


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


def decode_scene(components: Components, latents: torch.Tensor, scene: Scene) -> Image.Image:
    """`decode` with the scene's wrap-around and tiling settings."""
    return decode(components, latents, wrap=scene.wrap == "horizontal", tiled=tiled_decode_on(scene))


def canvas_views(scene: Scene, components: Components) -> list[View]:
    """Model-sized windows over the canvas at the scene's stride (one view if the canvas fits)."""
    window = components.unet.config.sample_size
    window = window if isinstance(window, int) else min(window)
    stride = max(1, scene.view_stride // components.vae_scale_factor)
    return make_views(scene.latent_hw, window, stride, wrap=scene.wrap == "horizontal")


def tiled_decode_on(scene: Scene) -> bool:
    return scene.width * scene.height > TILED_DECODE_PX if scene.tiled_decode == "auto" else scene.tiled_decode


def finite_checked(callback: StepCallback | None, components: Components) -> StepCallback:
    """Stop at the step where the latents first hold NaN or inf, rather than decode a black picture."""

    def check(i: int, n: int, latents: torch.Tensor, denoised: torch.Tensor | None) -> None:
        if not torch.isfinite(latents).all():
            cause = ("float16 overflowed: try --dtype bfloat16 or float32" if components.dtype == torch.float16
                     else "the model's weights may be broken")
            raise RenderError(
                f"the latents hold NaN or inf values from step {i + 1} of {n} ({components.dtype_name} on "
                f"{components.device}): {cause}. Nothing was written."
            )
        if callback is not None:
            callback(i, n, latents, denoised)

    return check


@torch.inference_mode()
def render(
    scene: Scene,
    components: Components,
    seed: int,
    callback: StepCallback | None = None,
    warn: Callable[[str], None] | None = None,
) -> RenderResult:
    """Render `scene` with `seed`: MultiDiffusion sampling, then VAE decoding. `warn` hears recoveries."""
    started = time.perf_counter()
    device = components.device
    generator = torch.Generator("cpu").manual_seed(seed)
    h, w = scene.latent_hw
    # Drawn on the CPU so every device starts from the same numbers.
    noise = torch.randn((1, components.unet.config.in_channels, h, w), generator=generator).to(device)

    prompts = scene_prompts(scene)
    embeddings = encode_texts(components, prompts.texts)
    backgrounds = None
    if scene.bootstrap_steps and scene.regions:
        backgrounds = background_latents(components, generator, scene.bootstrap_steps, len(scene.regions))

    scheduler = make_scheduler(scene.scheduler, components.scheduler_config)
    scheduler.set_timesteps(scene.steps, device=device)
    weights = scene_weights(scene, scheduler).to(device)
    unet = BatchedUNet(components.unet, scene.max_batch or DEFAULT_MAX_BATCH, warn)
    try:
        latents = multidiffusion(
            noise,
            scheduler,
            guided_denoiser(unet, embeddings, prompts),
            weights,
            views=canvas_views(scene, components),
            bootstrap_steps=scene.bootstrap_steps,
            backgrounds=backgrounds,
            center_regions=scene.few_step_on,
            generator=generator,
            callback=finite_checked(callback, components),
        )
    except torch.cuda.OutOfMemoryError:
        raise RenderError(
            f"out of GPU memory with {unet.max_batch} UNet samples per call on a {scene.width}x{scene.height} "
            f"canvas ({components.dtype_name} on {device}): try --max-batch 1, a smaller canvas, or --dtype float16"
        ) from None
    image = decode_scene(components, latents, scene)
    return RenderResult(image, latents, seed, time.perf_counter() - started, truncation_warnings(components, prompts))
