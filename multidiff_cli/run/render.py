"""One render: a validated scene and a loaded model -> a plan -> MultiDiffusion latents -> a picture."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ..errors import RenderError
from ..method.guidance import Prompts, guided_denoiser, shares_unconditional
from ..method.sampler import StepCallback, multidiffusion
from ..method.schedule import NoiseSchedule
from ..method.views import View, make_views
from ..method.weights import quantized_weights, region_weights
from ..models import (AdapterSet, Control, Model, ReferenceSpec, adapter_set, assemble, image_embeddings,
                      kept_timesteps, load_references, loaded_controlnets, reference_rows, set_rows)
from ..scene import Scene, changeable_cells, checked_for, region_cells
from ..scene.controls import (control_model_name, control_pixels, located, reference_encoder, reference_root,
                              reference_weight)
from ..scene.geometry import region_windows, views_cost
from ..scene.picture import load_picture
from ..scene.yamlpos import field_path

TILED_DECODE_PX = 1024 * 1024  # `tiled_decode: auto` tiles canvases larger than this


@dataclass(frozen=True)
class RenderPlan:
    """What a render of this scene on this model will do, decided once: the memory check and
    the sampler read the same numbers."""

    views: list[View]
    samples_per_call: int
    tiled_decode: bool
    wrap: bool
    few_step: bool  # StreamMultiDiffusion's quantized masks and mask-centering bootstrapping
    auto_batch: bool = False  # samples_per_call chosen by `max_batch: auto` for this device and view size
    windows: dict[int, View] = field(default_factory=dict)  # region windows: prompt index -> its window
    # latent cells the regions' prompts run on per step (each sample's area): with the windows, and with every
    # region on the canvas views it touches (what region_windows: false costs)
    region_cells: tuple[int, int] = (0, 0)

    @property
    def view_cells(self) -> int:
        """Latent cells of the largest view: what one network sample works on."""
        return largest_view_cells(self.views)

    @property
    def view_hw(self) -> tuple[int, int]:
        """(height, width) in cells of the first view (every view is this size)."""
        return self.views[0].height, self.views[0].width


def largest_view_cells(views: list[View]) -> int:
    return max(v.height * v.width for v in views)


@dataclass
class RenderResult:
    image: Image.Image
    latents: torch.Tensor
    seed: int
    seconds: float
    warnings: list[str]


def plan_render(scene: Scene, model: Model) -> RenderPlan:
    """Views of the model's native window over the canvas, samples per call, and tiled decoding."""
    stride = max(1, scene.view_stride // model.facts.cell_px)
    wrap = scene.wrap == "horizontal"
    tiled = scene.width * scene.height > TILED_DECODE_PX if scene.tiled_decode == "auto" else scene.tiled_decode
    views = make_views(scene.latent_hw, model.native_cells, stride, wrap=wrap)
    auto = scene.max_batch in (None, "auto")
    boxes = [(v.top, v.left, v.height, v.width) for v in views]
    windows = region_windows(scene, model.native_cells, model.facts.window_align_px, boxes)
    canvas_costs = [views_cost(region_cells(scene, i), boxes) for i in range(len(scene.regions))]
    windowed = sum(windows[i + 1][2] * windows[i + 1][3] if i + 1 in windows else cost
                   for i, cost in enumerate(canvas_costs))
    return RenderPlan(
        views=views,
        samples_per_call=model.auto_samples_per_call(largest_view_cells(views)) if auto else scene.max_batch,
        tiled_decode=tiled,
        wrap=wrap,
        few_step=model.few_step_model if scene.few_step == "auto" else scene.few_step,
        auto_batch=auto,
        windows={p: View(top, left, h, w, scene.latent_hw[1]) for p, (top, left, h, w) in windows.items()},
        region_cells=(windowed, sum(canvas_costs)),
    )


@dataclass
class ScenePrompts(Prompts):
    """Prompts whose conditions are (text, adapter set, embedded guidance) triples: texts[i] runs with the
    LoRAs adapters[i] and, on a model that embeds guidance, the guidance value embedded[i] (the sampler
    sees condition indices only, so LoRA sets never share a network sample)."""

    adapters: list[AdapterSet] = field(default_factory=list)
    embedded: list[float | None] = field(default_factory=list)
    controls: list[tuple[int, ...]] = field(default_factory=list)  # each condition's controls (Scene.controls order)
    references: list[tuple[int, ...]] = field(default_factory=list)  # each condition's references (Scene.references)
    unconditional: list[bool] = field(default_factory=list)  # a negative condition with references: their uncond embeds


def scene_prompts(scene: Scene, true_cfg: bool = False, embedded_guidance: bool = False,
                  cfg_offset: float = 0.0) -> ScenePrompts:
    """Global prompt plus one per region; each distinct (text, LoRA set, embedded guidance, control set, reference
    set) is one condition, encoded once. A prompt's conditional and negative text both run with its LoRAs,
    controls and references: the scene's, plus its region's (so an unconditional sample is shared only by
    prompts with the same sets); a negative one with references takes their unconditional image embeddings.
    true_cfg (the family's, FLUX.1): classifier-free guidance is the scene's true_cfg_scale (none unless above
    1), not guidance_scale; embedded_guidance (the model's, FLUX.1-dev, not schnell): a
    prompt's guidance_scale is embedded in its samples. cfg_offset (the family's, Z-Image: 1): the sampler's
    scale is guidance_scale + cfg_offset, for a family whose pipeline counts guidance from the conditional."""
    conditions: list[tuple[str, AdapterSet, float | None, tuple[int, ...], tuple[int, ...], bool]] = []

    def index(condition: tuple[str, AdapterSet, float | None, tuple[int, ...], tuple[int, ...], bool]) -> int:
        if condition not in conditions:
            conditions.append(condition)
        return conditions.index(condition)

    prompts = ScenePrompts([], [], [], [])
    numbered, referred = list(enumerate(scene.controls())), list(enumerate(scene.references()))
    entries = [("prompt", scene.prompt, None, None, [], None)] + [
        (f"regions[{i}].prompt", r.prompt, r.negative_prompt, r.guidance_scale, r.loras, i)
        for i, r in enumerate(scene.regions)
    ]
    for label, text, negative, guidance, loras, region in entries:
        controls = tuple(k for k, (owner, _) in numbered if owner is None or owner == region)
        references = tuple(k for k, (owner, _) in referred if owner is None or owner == region)
        adapters = adapter_set([(str(scene.lora_path(lora).resolve()), lora.scale) for lora in scene.loras + loras])
        guidance = scene.guidance_scale if guidance is None else guidance
        embedded = guidance if embedded_guidance else None
        prompts.labels.append(label)
        prompts.cond.append(index((scene.full_prompt(text), adapters, embedded, controls, references, False)))
        prompts.negative.append(index((scene.negative_prompt if negative is None else negative, adapters, embedded,
                                       controls, references, bool(references))))
        prompts.guidance.append((scene.true_cfg_scale or 1.0) if true_cfg else guidance + cfg_offset)
    prompts.texts[:] = [condition[0] for condition in conditions]
    prompts.adapters[:] = [condition[1] for condition in conditions]
    prompts.embedded[:] = [condition[2] for condition in conditions]
    prompts.controls[:] = [condition[3] for condition in conditions]
    prompts.references[:] = [condition[4] for condition in conditions]
    prompts.unconditional[:] = [condition[5] for condition in conditions]
    return prompts


def scene_weights(scene: Scene, schedule: NoiseSchedule | None = None, few_step: bool = False) -> torch.Tensor:
    """Fusion weights of the global prompt and every region: (N+1, 1, h, w), or with the few-step
    stabilisation on (and a schedule), quantized masks, one set per step (steps, N+1, 1, h, w)."""
    region_masks = [torch.from_numpy(region_cells(scene, i)).float() for i in range(len(scene.regions))]
    if not (few_step and region_masks and schedule is not None):
        return region_weights(region_masks, scene.latent_hw)
    return quantized_weights(region_masks, schedule.noise_levels())


def picture_latents(scene: Scene, model: Model, plan: RenderPlan) -> torch.Tensor:
    """The init image at the canvas's size, encoded (in tiles where the plan decodes in tiles)."""
    pixels = torch.from_numpy(load_picture(scene.init_image_path, (scene.width, scene.height)))
    return model.codec.encode(pixels.permute(2, 0, 1)[None], tiled=plan.tiled_decode)


def encode_conditioning(model: Model, prompts: ScenePrompts, plan: RenderPlan):
    """The conditioning of each distinct condition, as the model's family encodes it for views of the
    plan's size; conditions with LoRAs (prompts.adapters) with their text-encoder LoRAs on; with controls,
    each row's 0/1 row of them ("control")."""
    view_px = tuple(cells * model.facts.cell_px for cells in plan.view_hw)
    conditioning = model.encode_conditions(prompts.texts, prompts.adapters, prompts.cond, prompts.negative, view_px,
                                           prompts.embedded)
    count = 1 + max((k for ks in prompts.controls for k in ks), default=-1)
    if not count:
        return conditioning
    return conditioning.with_rows("control", set_rows(prompts.controls, count).to(model.device))


def scene_controls(scene: Scene, model: Model, schedule: NoiseSchedule, first: int,
                   allow_pickle: bool = False) -> tuple[tuple[Control, ...], torch.Tensor | None]:
    """The scene's controls for this render (Scene.controls order), their ControlNets loaded (ControlError
    before any sampling where one does not fit the model), each on at the evaluations its start and end
    keep (from evaluation `first`, the first run); and the sampler's guides: every control image on the
    canvas, as the family's ControlNet reads it on the latent grid (Model.control_guide). ((), None) without
    controls."""
    numbered = scene.controls()
    if not numbered:
        return (), None
    names = [control_model_name(scene, control) for _, control in numbered]
    nets = loaded_controlnets(model, names, allow_pickle)
    timesteps = schedule.timesteps[first:]
    specs = [(nets[name], c.scale, kept_timesteps(timesteps, c.start, c.end), label)
             for name, label, (_, c) in zip(names, control_labels(scene), numbered)]
    pictures = [torch.from_numpy(control_pixels(scene, region, c)).permute(2, 0, 1) for region, c in numbered]
    return assemble(model, specs, pictures)


def control_labels(scene: Scene) -> list[str]:
    """Where each control of the scene is written (`control[0]`, `regions[1].control[0]`), in Scene.controls order."""
    return [field_path(loc) for loc, _, _ in located(scene, "control")]


def idle_controls(scene: Scene, controls: tuple[Control, ...], steps: int) -> list[str]:
    """A warning for each control whose start and end leave none of the render's steps to it (diffusers' rule:
    evaluation i of n runs unless i/n < start or (i+1)/n > end, so 0.1 to 0.9 of 2 steps runs none)."""
    return [f"{control.label}: start {c.start:g} and end {c.end:g} leave it none of the {steps} steps run: it does "
            "nothing in this render (widen them, or render more steps)"
            for control, (_, c) in zip(controls, scene.controls()) if not control.on_at]


def scene_references(scene: Scene, model: Model, prompts: ScenePrompts, conditioning, allow_pickle: bool = False):
    """The scene's references for this render (Scene.references order): their IP-Adapters loaded into the
    model (ControlError before any sampling where one does not fit), and the conditioning with each row's
    references and image embeddings. (None, conditioning) without references."""
    numbered = scene.references()
    if not numbered:
        return None, conditioning
    specs = []
    for _, reference in numbered:
        weight = reference_weight(scene, reference, model.family)
        specs.append(ReferenceSpec(reference_root(scene, reference), weight, reference_encoder(reference, weight),
                                   scene.path_of(reference.image), reference.scale))
    references = load_references(model, specs, allow_pickle)
    embeddings = image_embeddings(model, references, specs)
    return references, reference_rows(conditioning, prompts.references, prompts.unconditional, embeddings)


def decode_scene(model: Model, latents: torch.Tensor, plan: RenderPlan) -> Image.Image:
    """The picture, decoded with the plan's wrap-around and tiling."""
    return model.codec.decode(latents, wrap=plan.wrap, tiled=plan.tiled_decode)


def finite_checked(callback: StepCallback | None, model: Model) -> StepCallback:
    """Stop at the step where the latents first hold NaN or inf, rather than decode a black picture."""

    def check(i: int, n: int, latents: torch.Tensor, denoised: torch.Tensor | None) -> None:
        if not torch.isfinite(latents).all():
            cause = ("float16 overflowed: try --dtype bfloat16 or float32" if model.dtype == torch.float16
                     else "the model's weights may be broken")
            raise RenderError(
                f"the latents hold NaN or inf values from step {i + 1} of {n} ({model.dtype_name} on "
                f"{model.device}): {cause}. Nothing was written."
            )
        if callback is not None:
            callback(i, n, latents, denoised)

    return check


@torch.inference_mode()
def render(
    scene: Scene,
    model: Model,
    seed: int,
    plan: RenderPlan | None = None,
    callback: StepCallback | None = None,
    warn: Callable[[str], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    allow_pickle: bool = False,
) -> RenderResult:
    """Render `scene` with `seed`: MultiDiffusion sampling, then decoding.

    `warn` hears recoveries (a halved batch); `on_stage` hears what is happening ("encoding
    prompts", "decoding") between the steps that `callback` reports."""
    started = time.perf_counter()
    scene = checked_for(scene, model.facts, few_step=model.few_step_model)  # its family's defaults where it has none
    plan = plan or plan_render(scene, model)
    stage = on_stage or (lambda _what: None)
    device = model.device
    generator = torch.Generator("cpu").manual_seed(seed)
    h, w = scene.latent_hw
    # Drawn on the CPU so every device starts from the same numbers.
    noise = torch.randn((1, model.latent_channels, h, w), generator=generator).to(device)

    stage("encoding prompts")
    prompts = scene_prompts(scene, model.facts.embedded_guidance, model.embedded_guidance, model.facts.cfg_offset)
    lora_files = sorted({Path(path) for adapters in prompts.adapters for path, _ in adapters})
    if lora_files:  # before any sampling: a LoRA that does not fit this model stops the render here
        model.load_loras(lora_files, allow_pickle)
    conditioning = encode_conditioning(model, prompts, plan)
    image_latents = changeable = None
    start = model.first_step(scene.steps, scene.strength) if scene.init_image is not None else 0
    if scene.init_image is not None:
        stage("encoding the init image")
        image_latents = picture_latents(scene, model, plan)
        cells = changeable_cells(scene)
        changeable = None if cells is None else torch.from_numpy(cells).float()[None, None].to(device)
    bootstrap_steps = min(scene.bootstrap_steps, scene.steps - start)  # counted from the first step run
    backgrounds = None
    if bootstrap_steps and scene.regions:
        backgrounds = model.codec.background_latents(generator, bootstrap_steps, len(scene.regions)).to(device)

    schedule = model.make_schedule(scene.scheduler, scene.steps, plan.view_hw)
    weights = scene_weights(scene, schedule, plan.few_step).to(device)
    controls, guides = scene_controls(scene, model, schedule, start * schedule.order, allow_pickle)
    references, conditioning = scene_references(scene, model, prompts, conditioning, allow_pickle)
    run = model.sample_run(plan.samples_per_call, warn, controls=controls, references=references)
    stage(f"step 1/{scene.steps - start}")
    try:
        latents = multidiffusion(
            noise,
            schedule,
            guided_denoiser(run, conditioning, prompts),
            weights,
            views=plan.views,
            windows={p: [window] for p, window in plan.windows.items()},
            bootstrap_steps=bootstrap_steps,
            backgrounds=backgrounds,
            center_regions=plan.few_step,
            generator=generator,
            callback=finite_checked(callback, model),
            start_step=start,
            init_latents=image_latents if scene.init_image is not None and scene.strength < 1 else None,
            known_latents=None if changeable is None else image_latents,
            changeable=changeable,
            guides=guides,
            shared_unconditional=scene.window_unconditional == "canvas" and shares_unconditional(prompts, plan.windows),
        )
    except torch.cuda.OutOfMemoryError:
        raise RenderError(
            f"out of GPU memory with {run.samples_per_call} {model.network_label} samples per call on a "
            f"{scene.width}x{scene.height} canvas ({model.dtype_name} on {device}): try --max-batch 1, a smaller "
            "canvas, or --dtype float16"
        ) from None
    stage("decoding")
    image = decode_scene(model, latents, plan)
    warnings = model.truncation_warnings(prompts.labelled_conds()) + idle_controls(scene, controls, scene.steps - start)
    return RenderResult(image, latents, seed, time.perf_counter() - started, warnings)
