"""One render: a validated scene and loaded components -> a plan -> MultiDiffusion latents -> a picture."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ..errors import RenderError
from ..method.guidance import Prompts, guided_denoiser
from ..method.sampler import StepCallback, first_step, multidiffusion
from ..method.schedulers import make_scheduler
from ..method.views import View, make_views
from ..method.weights import noise_levels, quantized_weights, region_weights
from ..models import sdxl
from ..models.components import Components, available_bytes
from ..models.lora import AdapterSet, AdapterUNet, adapter_set, encode_conditions, load_loras
from ..models.sd import (ChunkedUNet, auto_samples_per_call, background_latents, decode, encode_image, encode_texts,
                         truncation_warnings, unet_bytes_per_sample)
from ..scene import Scene, changeable_cells, region_cells
from ..scene.picture import load_picture

TILED_DECODE_PX = 1024 * 1024  # `tiled_decode: auto` tiles canvases larger than this


@dataclass(frozen=True)
class RenderPlan:
    """What a render of this scene on these components will do, decided once: the memory check and
    the sampler read the same numbers."""

    views: list[View]
    samples_per_call: int
    tiled_decode: bool
    wrap: bool
    few_step: bool  # StreamMultiDiffusion's quantized masks and mask-centering bootstrapping
    auto_batch: bool = False  # samples_per_call chosen by `max_batch: auto` for this device and view size

    @property
    def view_cells(self) -> int:
        """Latent cells of the largest view: what one UNet sample works on."""
        return largest_view_cells(self.views)


def largest_view_cells(views: list[View]) -> int:
    return max(v.height * v.width for v in views)


@dataclass
class RenderResult:
    image: Image.Image
    latents: torch.Tensor
    seed: int
    seconds: float
    warnings: list[str]


def plan_render(scene: Scene, components: Components) -> RenderPlan:
    """Views of the model's native size over the canvas, UNet samples per call, and tiled decoding."""
    window = components.unet.config.sample_size
    window = window if isinstance(window, int) else min(window)
    stride = max(1, scene.view_stride // components.vae_scale_factor)
    wrap = scene.wrap == "horizontal"
    tiled = scene.width * scene.height > TILED_DECODE_PX if scene.tiled_decode == "auto" else scene.tiled_decode
    views = make_views(scene.latent_hw, window, stride, wrap=wrap)
    auto = scene.max_batch in (None, "auto")
    return RenderPlan(
        views=views,
        samples_per_call=auto_batch_size(components, largest_view_cells(views)) if auto else scene.max_batch,
        tiled_decode=tiled,
        wrap=wrap,
        few_step=components.few_step_model if scene.few_step == "auto" else scene.few_step,
        auto_batch=auto,
    )


def auto_batch_size(components: Components, view_cells: int) -> int:
    """`max_batch: auto` for these components: `auto_samples_per_call` with this device's free memory."""
    per_sample = unet_bytes_per_sample(components.unet.config, view_cells, components.dtype)
    return auto_samples_per_call(components.device.type, per_sample, available_bytes(components.device))


@dataclass
class ScenePrompts(Prompts):
    """Prompts whose conditions are (text, adapter set) pairs: texts[i] runs with the LoRAs adapters[i]
    (the sampler sees condition indices only, so LoRA sets never share a UNet sample)."""

    adapters: list[AdapterSet] = field(default_factory=list)


def scene_prompts(scene: Scene) -> ScenePrompts:
    """Global prompt plus one per region; each distinct (text, LoRA set) is one condition, encoded once.
    A prompt's conditional and negative text both run with its LoRAs: the scene's, plus its region's."""
    conditions: list[tuple[str, AdapterSet]] = []

    def index(text: str, adapters: AdapterSet) -> int:
        if (text, adapters) not in conditions:
            conditions.append((text, adapters))
        return conditions.index((text, adapters))

    prompts = ScenePrompts([], [], [], [])
    entries = [("prompt", scene.prompt, None, None, [])] + [
        (f"regions[{i}].prompt", r.prompt, r.negative_prompt, r.guidance_scale, r.loras)
        for i, r in enumerate(scene.regions)
    ]
    for label, text, negative, guidance, loras in entries:
        adapters = adapter_set([(str(scene.lora_path(lora).resolve()), lora.scale) for lora in scene.loras + loras])
        prompts.labels.append(label)
        prompts.cond.append(index(scene.full_prompt(text), adapters))
        prompts.negative.append(index(scene.negative_prompt if negative is None else negative, adapters))
        prompts.guidance.append(scene.guidance_scale if guidance is None else guidance)
    prompts.texts[:] = [text for text, _ in conditions]
    prompts.adapters[:] = [adapters for _, adapters in conditions]
    return prompts


def scene_weights(scene: Scene, scheduler=None, few_step: bool = False) -> torch.Tensor:
    """Fusion weights of the global prompt and every region: (N+1, 1, h, w), or with the few-step
    stabilisation on (and a scheduler), quantized masks, one set per step (steps, N+1, 1, h, w)."""
    region_masks = [torch.from_numpy(region_cells(scene, i)).float() for i in range(len(scene.regions))]
    if not (few_step and region_masks and scheduler is not None):
        return region_weights(region_masks, scene.latent_hw)
    return quantized_weights(region_masks, noise_levels(scheduler))


def picture_latents(scene: Scene, components: Components, plan: RenderPlan) -> torch.Tensor:
    """The init image at the canvas's size, encoded (in tiles where the plan decodes in tiles)."""
    pixels = torch.from_numpy(load_picture(scene.init_image_path, (scene.width, scene.height)))
    return encode_image(components, pixels.permute(2, 0, 1)[None], tiled=plan.tiled_decode)


def encode_conditioning(components: Components, prompts: ScenePrompts, views: list[View]):
    """The UNet's conditioning of each distinct condition, as the model's family encodes it: SD's hidden
    states (E, 77, D), or SDXL's hidden states, pooled embeddings and time ids (models/sdxl.py), the
    time ids those of a whole picture of the views' size. Conditions with LoRAs (prompts.adapters) are
    encoded with their text-encoder LoRAs on, and carry their sets to the UNet (models/lora.py)."""
    encode, zeroed = encode_texts, frozenset()
    if components.family == "sdxl":
        view_px = (views[0].height * components.vae_scale_factor, views[0].width * components.vae_scale_factor)
        encode = functools.partial(sdxl.encode_prompts, size_px=view_px)
        if components.force_zeros_for_empty_prompt:
            zeroed = sdxl.empty_negatives(prompts.texts, prompts.cond, prompts.negative)
    if any(prompts.adapters):
        conditioning = encode_conditions(components, prompts.texts, prompts.adapters, encode)
    else:
        conditioning = encode(components, prompts.texts)
    return conditioning.zeroed(zeroed) if zeroed else conditioning  # zeroed: SDXL's only


def decode_scene(components: Components, latents: torch.Tensor, plan: RenderPlan) -> Image.Image:
    """`decode` with the plan's wrap-around and tiling."""
    return decode(components, latents, wrap=plan.wrap, tiled=plan.tiled_decode)


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
    plan: RenderPlan | None = None,
    callback: StepCallback | None = None,
    warn: Callable[[str], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    allow_pickle: bool = False,
) -> RenderResult:
    """Render `scene` with `seed`: MultiDiffusion sampling, then VAE decoding.

    `warn` hears recoveries (a halved batch); `on_stage` hears what is happening ("encoding
    prompts", "decoding") between the steps that `callback` reports."""
    started = time.perf_counter()
    plan = plan or plan_render(scene, components)
    stage = on_stage or (lambda _what: None)
    device = components.device
    generator = torch.Generator("cpu").manual_seed(seed)
    h, w = scene.latent_hw
    # Drawn on the CPU so every device starts from the same numbers.
    noise = torch.randn((1, components.unet.config.in_channels, h, w), generator=generator).to(device)

    stage("encoding prompts")
    prompts = scene_prompts(scene)
    lora_files = sorted({Path(path) for adapters in prompts.adapters for path, _ in adapters})
    if lora_files:  # before any sampling: a LoRA that does not fit this model stops the render here
        load_loras(components, lora_files, allow_pickle)
    embeddings = encode_conditioning(components, prompts, plan.views)
    image_latents = changeable = None
    start = first_step(scene.steps, scene.strength) if scene.init_image is not None else 0
    if scene.init_image is not None:
        stage("encoding the init image")
        image_latents = picture_latents(scene, components, plan)
        cells = changeable_cells(scene)
        changeable = None if cells is None else torch.from_numpy(cells).float()[None, None].to(device)
    bootstrap_steps = min(scene.bootstrap_steps, scene.steps - start)  # counted from the first step run
    backgrounds = None
    if bootstrap_steps and scene.regions:
        backgrounds = background_latents(components, generator, bootstrap_steps, len(scene.regions))

    scheduler = make_scheduler(scene.scheduler, components.scheduler_config)
    scheduler.set_timesteps(scene.steps, device=device)
    weights = scene_weights(scene, scheduler, plan.few_step).to(device)
    unet = ChunkedUNet(components.unet, plan.samples_per_call, warn)
    unet = AdapterUNet(unet, components) if lora_files else unet
    stage(f"step 1/{scene.steps - start}")
    try:
        latents = multidiffusion(
            noise,
            scheduler,
            guided_denoiser(unet, embeddings, prompts),
            weights,
            views=plan.views,
            bootstrap_steps=bootstrap_steps,
            backgrounds=backgrounds,
            center_regions=plan.few_step,
            generator=generator,
            callback=finite_checked(callback, components),
            start_step=start,
            init_latents=image_latents if scene.init_image is not None and scene.strength < 1 else None,
            known_latents=None if changeable is None else image_latents,
            changeable=changeable,
        )
    except torch.cuda.OutOfMemoryError:
        raise RenderError(
            f"out of GPU memory with {unet.samples_per_call} UNet samples per call on a {scene.width}x{scene.height} "
            f"canvas ({components.dtype_name} on {device}): try --max-batch 1, a smaller canvas, or --dtype float16"
        ) from None
    stage("decoding")
    image = decode_scene(components, latents, plan)
    return RenderResult(image, latents, seed, time.perf_counter() - started, truncation_warnings(components, prompts.labelled_conds()))
