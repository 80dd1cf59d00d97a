"""`multidiff bench`: multidiff's sampler against the authors' per-prompt loop, on SD2-shaped random weights.

Both paths sample the same scene (a global prompt and N boxes in a row) from the same noise with
the same steps; each runs in a fresh process, so peak memory is its own. Random weights cost
exactly what the real model costs, so the timings are those of SD2-base.
"""
from __future__ import annotations

import contextlib
import copy
import platform
import statistics
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..catalog import BUILT_IN, FAMILIES, SD2_RANDOM
from ..errors import UsageError
from ..method.guidance import Prompts, guided_denoiser, shares_unconditional
from ..method.sampler import bootstrap_inputs, denoise_by_size, multidiffusion, step_requests
from ..method.views import make_views
from ..method.weights import region_weights
from ..models.control import CONTROL_CHANNELS, assemble, kept_timesteps, set_rows
from ..models.device import pick_device, pick_dtype, quiet_libraries
from ..models.family import Conditioning, Model
from ..models.random_weights import LORA_RANK, bench_model, random_lora
from ..run.render import largest_view_cells
from ..scene.grid import box_cells
from .process import device_name, in_fresh_process, max_rss_bytes, now

VIEW_STRIDE_CELLS = 8  # the scenes' default view stride, 64 px
BENCH_MODELS = tuple(BUILT_IN)  # the bench builds its own random models (without text encoders)


@dataclass
class BenchConfig:
    model: str = SD2_RANDOM  # sd2-random, sdxl-random (full size), tiny-random or tiny-sdxl-random
    size_px: int = 256  # canvas height, and width unless width_px is set
    width_px: int | None = None
    regions: int = 3
    steps: int = 4
    bootstrap_steps: int = 0
    scheduler: str = "ddim"  # bench_config sets the model family's
    guidance_scale: float = 7.5
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    max_batch: int | None = None
    seed: int = 0
    loras: int = 0  # regions with a LoRA of their own: then multidiff with them against multidiff without
    controls: int = 0  # regions with a ControlNet of their own: then multidiff with them against multidiff without
    windows: bool = False  # also multidiff with region windows (region_windows: true), against both
    region_px: int | None = None  # square regions of this side spread along the width; None: boxes in a row

    @property
    def canvas_width(self) -> int:
        return self.width_px or self.size_px


@dataclass
class PathResult:
    unet_samples_per_step: float
    seconds_per_step: float  # median of the steps after the first
    sampling_seconds: float
    non_unet_share: float  # of a step: fusion, guidance, masks and the scheduler step
    peak_memory_bytes: int
    peak_memory_kind: str
    step_seconds: list[float] = field(default_factory=list)
    views: int = 1
    lora_switch_seconds_per_step: float = 0.0  # switching peft adapters between sample groups
    unet_batch: dict[str, Any] = field(default_factory=dict)  # samples_per_call, and whether auto chose it
    cells_per_step: float = 0.0  # latent cells of every network sample of a step, summed
    controlnet_calls_per_step: float = 0.0
    controlnet_samples_per_step: float = 0.0
    controlnet_seconds_per_call: float = 0.0  # median of the calls after the first step


def bench_config(model: str, size: int | None, regions: int, steps: int | None, bootstrap_steps: int,
                 scheduler: str | None, device: str | None, dtype: str | None, compile: bool, max_batch: int | None,
                 device_source: str = "--device", loras: int = 0, windows: bool = False,
                 controls: int = 0, width: int | None = None, region_px: int | None = None) -> BenchConfig:
    """Check the command's options; defaults: 512 px and 50 steps on CUDA, 256 px and 4 steps elsewhere (the
    canvas square unless `width`); the model family's scheduler, guidance and CUDA dtype."""
    if model not in BENCH_MODELS:
        raise UsageError(f"--model: the bench builds its own random model: {', '.join(BENCH_MODELS)}, not {model!r}")
    family = FAMILIES[BUILT_IN[model]]
    scheduler = scheduler or family.default_scheduler
    if scheduler not in family.scheduler_names:
        raise UsageError(f"--scheduler: {family.label} models take {', '.join(family.scheduler_names)}, not {scheduler!r}")
    torch_device = pick_device(device, source=device_source)
    on_cuda = torch_device.type == "cuda"
    size = size or (512 if on_cuda else 256)
    steps = steps or (50 if on_cuda else 4)
    if size % 8 or size < 64:
        raise UsageError("--size: a multiple of 8, at least 64")
    if width is not None and (width % 8 or width < 64):
        raise UsageError("--width: a multiple of 8, at least 64")
    if region_px is not None and (region_px % 8 or region_px < 8 or region_px > size
                                  or region_px * regions > (width or size)):
        raise UsageError(f"--region-px: a multiple of 8 that fits --regions ({regions}) squares side by side on the "
                         f"{width or size}x{size} canvas")
    if bootstrap_steps > steps:
        raise UsageError("--bootstrap-steps: at most --steps")
    if loras > regions:
        raise UsageError(f"--loras: at most --regions ({regions}): each LoRA belongs to one region")
    if controls > regions:
        raise UsageError(f"--controls: at most --regions ({regions}): each ControlNet belongs to one region")
    if controls and loras:
        raise UsageError("--controls and --loras: one at a time, each timed against multidiff without it")
    if controls and not family.controlnets:
        takers = [name for name in BENCH_MODELS if FAMILIES[BUILT_IN[name]].controlnets]
        raise UsageError(f"--controls: {family.label} models take no ControlNets; {', '.join(takers)} do")
    return BenchConfig(
        model=model, size_px=size, regions=regions, steps=steps, bootstrap_steps=bootstrap_steps, scheduler=scheduler,
        guidance_scale=family.default_guidance, device=str(torch_device),
        dtype=str(pick_dtype(torch_device, dtype, cuda_default=family.cuda_dtype)).removeprefix("torch."),
        compile=compile, max_batch=max_batch, loras=loras, windows=windows, width_px=width, region_px=region_px, controls=controls,
    )


def parse_widths(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        raise UsageError("--widths: comma-separated pixel widths, e.g. 512,1024,2048") from None
    if any(w % 8 or w < 64 for w in widths):
        raise UsageError("--widths: each a multiple of 8, at least 64")
    return widths


def bench_scene(config: BenchConfig, model: Model, view_px: tuple[int, int]):
    """Weights, prompt table and random text conditioning (of the family's shapes, for views of view_px)
    of a global prompt plus `regions` boxes in a row (each a share of the width and half the height), or with
    region_px, squares of that side spread evenly along the width, centred in the height."""
    latent_hw = config.size_px // 8, config.canvas_width // 8
    width = config.canvas_width // max(config.regions, 1)
    boxes = [(i * width, config.size_px // 4, (i + 1) * width, config.size_px * 3 // 4) for i in range(config.regions)]
    if config.region_px:
        side, top = config.region_px, (config.size_px - config.region_px) // 16 * 8
        lefts = [(round((i + 0.5) * width) - side // 2) // 8 * 8 for i in range(config.regions)]
        boxes = [(left, top, left + side, top + side) for left in lefts]
    weights = region_weights([torch.from_numpy(box_cells(b, latent_hw)) for b in boxes], latent_hw)
    embedded = model.facts.embedded_guidance  # FLUX.1: guidance is an input of the network, no CFG pass
    prompts = Prompts(
        texts=[f"text {i}" for i in range(config.regions + 2)],
        cond=list(range(config.regions + 1)),
        negative=[config.regions + 1] * (config.regions + 1),
        guidance=[1.0 if embedded else config.guidance_scale] * (config.regions + 1),
    )
    conditioning = model.random_conditioning(len(prompts.texts), view_px, torch.Generator().manual_seed(1))
    if model.embedded_guidance:
        conditioning = model.with_guidance(conditioning, [config.guidance_scale] * len(prompts.texts))
    return weights, prompts, conditioning


def authors_loop(noise, schedule, run, weights, prompts, conditioning, bootstrap_steps, backgrounds, generator):
    """The authors' region_based.py, generalised: every prompt its own unconditional and conditional
    sample (conditional only, without guidance: FLUX.1-dev) and its own schedule step (a schedule copy
    each, for multistep solvers), then the mask-weighted average of the stepped latents."""
    count = weights.shape[0]
    schedules = [copy.deepcopy(schedule) for _ in range(count)]
    guided = max(prompts.guidance) > 1
    texts = conditioning[prompts.negative + prompts.cond] if guided else conditioning[prompts.cond]
    x = schedule.initial(noise)
    for i, t in enumerate(schedule.timesteps):
        inputs = x.expand(count, *x.shape[1:])
        if i < bootstrap_steps:
            noised = schedule.noised(backgrounds[i].expand(count - 1, *x.shape[1:]), noise, i)
            inputs = torch.cat([x, bootstrap_inputs(x, weights[1:], noised)])
        scaled = schedule.model_input(inputs, i)
        if guided:
            uncond, cond = run(torch.cat([scaled, scaled]), t, texts).chunk(2)
            guidance = torch.tensor(prompts.guidance, device=x.device).reshape(-1, 1, 1, 1)
            eps = uncond + guidance * (cond - uncond)
        else:
            eps = run(scaled, t, texts)
        state = generator.get_state()
        stepped = []
        for p in range(count):
            generator.set_state(state)  # every prompt's stochastic step draws the same noise
            stepped.append(schedules[p].step(eps[p : p + 1], i, inputs[p : p + 1], generator)[0])
        x = (weights * torch.cat(stepped)).sum(0, keepdim=True) / weights.sum(0, keepdim=True)
        yield x


def _run_path(config: BenchConfig, path: str, latents_file: str) -> dict[str, Any]:
    """One path in this process: build the model, sample, time every step, measure peak memory."""
    device, dtype = torch.device(config.device), getattr(torch, config.dtype)
    quiet_libraries()
    with built_in(dtype):
        model = bench_model(config.model)
    model = model.to(device, dtype).speed_up(compile=config.compile)
    latent_hw = (config.size_px // 8, config.canvas_width // 8)
    views = make_views(latent_hw, model.native_cells, VIEW_STRIDE_CELLS)
    view_px = (views[0].height * model.facts.cell_px, views[0].width * model.facts.cell_px)
    weights, prompts, conditioning = bench_scene(config, model, view_px)
    weights, conditioning = weights.to(device), conditioning.to(device, dtype)
    channels = model.latent_channels
    noise = torch.randn((1, channels, *latent_hw), generator=torch.Generator().manual_seed(config.seed))
    noise = noise.to(device)
    backgrounds = torch.randn((config.bootstrap_steps, config.regions, channels, 1, 1),
                              generator=torch.Generator().manual_seed(2))
    backgrounds = backgrounds.to(device)
    schedule = model.make_schedule(config.scheduler, config.steps, (views[0].height, views[0].width))
    generator = torch.Generator().manual_seed(3)

    samples_per_call = config.max_batch or model.auto_samples_per_call(largest_view_cells(views))
    windowed = path in (WINDOWS_PATH, SHARED_WINDOWS_PATH)
    windows = bench_windows(weights, model, views) if windowed else {}
    shared_unconditional = path == SHARED_WINDOWS_PATH and shares_unconditional(prompts, windows)
    path = "multidiff" if windowed else path
    lora_dir = tempfile.TemporaryDirectory()
    if path == LORA_PATH:
        prompts, conditioning = region_loras(model, prompts, conditioning, config.loras, Path(lora_dir.name))
        path = "multidiff"
    controls, guides = (), None
    if path == CONTROL_PATH:
        with built_in(dtype):
            controls, guides, prompts, conditioning = region_controls(
                model, prompts, conditioning, config.controls, schedule.timesteps, (config.size_px, config.canvas_width))
        path = "multidiff"
    run = model.sample_run(samples_per_call, controls=controls)
    with torch.inference_mode():  # one untimed step's worth of network work: allocator, kernels, caches warm
        t0 = schedule.timesteps[0]
        if path == "multidiff":
            inputs, requests, _, _, guide_inputs = step_requests(noise, weights, views, guides=guides)
            denoise_by_size(guided_denoiser(run, conditioning, prompts), lambda batch: batch, inputs, t0, requests,
                            guide_inputs)
        else:
            rows = prompts.negative + prompts.cond if max(prompts.guidance) > 1 else prompts.cond
            run(noise.expand(len(rows), *noise.shape[1:]), t0, conditioning[rows])
    for control in controls:
        control.net.calls.clear()  # the warm-up's
    timer = _UNetTimer(run, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps = [now(device)]
    with torch.inference_mode():
        if path == "multidiff":
            latents = multidiffusion(
                noise, schedule, guided_denoiser(timer, conditioning, prompts), weights,
                views=views, windows=windows, guides=guides, shared_unconditional=shared_unconditional,
                bootstrap_steps=config.bootstrap_steps, backgrounds=backgrounds, generator=generator,
                callback=lambda *_: stamps.append(now(device)),
            )
        else:
            for latents in authors_loop(noise, schedule, timer, weights, prompts, conditioning,
                                        config.bootstrap_steps, backgrounds, generator):
                stamps.append(now(device))
    torch.save(latents.float().cpu(), latents_file)
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    later = steps[1:] or steps
    unet_seconds = list(timer.seconds.values())
    unet_later = unet_seconds[1:] or unet_seconds
    calls = [call for control in controls for call in control.net.calls]  # (timestep, samples, seconds)
    calls_later = [s for t, _, s in calls if t != float(t0)] or [s for _, _, s in calls]
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda allocator peak"
    else:
        peak, kind = max_rss_bytes(), "max RSS of the process"
    result = PathResult(
        unet_samples_per_step=timer.samples / len(steps),
        seconds_per_step=statistics.median(later),
        sampling_seconds=stamps[-1] - stamps[0],
        non_unet_share=max(0.0, 1 - statistics.median(unet_later) / statistics.median(later)),
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
        step_seconds=steps,
        views=len(views) if path == "multidiff" else 1,
        lora_switch_seconds_per_step=getattr(run, "switch_seconds", 0.0) / len(steps),
        unet_batch={"samples_per_call": samples_per_call, "auto": not config.max_batch},
        cells_per_step=timer.cells / len(steps),
        controlnet_calls_per_step=len(calls) / len(steps),
        controlnet_samples_per_step=sum(samples for _, samples, _ in calls) / len(steps),
        controlnet_seconds_per_call=statistics.median(calls_later) if calls_later else 0.0,
    )
    lora_dir.cleanup()
    return asdict(result)


LORA_PATH = "multidiff+loras"
CONTROL_PATH = "multidiff+controls"
WINDOWS_PATH = "multidiff+windows"
SHARED_WINDOWS_PATH = "multidiff+windows+canvas-unconditional"  # window_unconditional: canvas


def bench_windows(weights: torch.Tensor, model: Model, views) -> dict[int, list]:
    """Each bench region's window as `region_windows: true` makes it (scene.geometry.region_windows' rule)."""
    import math

    from ..method.views import View
    from ..scene.geometry import MIN_CONTEXT_PX, cells_window
    from ..scene.schema import WINDOW_CONTEXT

    cell, native = model.facts.cell_px, model.native_cells
    windows = {}
    for p in range(1, weights.shape[0]):
        cells = (weights[p, 0] > 0).cpu().numpy()
        top, left, height, width = cells_window(cells, WINDOW_CONTEXT, math.ceil(MIN_CONTEXT_PX / cell), native // 2,
                                                max(1, model.facts.window_align_px // cell))
        if height <= native and width <= native:
            windows[p] = [View(top, left, height, width, cells.shape[1])]
    return windows


def region_loras(model: Model, prompts: Prompts, conditioning: Conditioning, count: int, folder: Path):
    """The bench scene with regions 1..count each on a random LoRA of its own (random_weights.random_lora):
    their conditional and negative texts become conditions of
    their own, as render's scene_prompts makes them."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(4)
    prompts, rows = own_negatives(prompts, count)
    files, sets = [], [()] * len(prompts.texts)
    for region in range(1, count + 1):
        path = folder / f"region{region}.safetensors"
        save_file(random_lora(model, generator, LORA_RANK), str(path))
        files.append(path)
        sets[prompts.cond[region]] = sets[prompts.negative[region]] = ((str(path), 1.0),)
    model.load_loras(files)
    table = list(dict.fromkeys(sets))
    rowed = conditioning[rows].with_adapters(torch.tensor([table.index(s) for s in sets]), table)
    return prompts, rowed


def region_controls(model: Model, prompts: Prompts, conditioning: Conditioning, count: int,
                    timesteps: torch.Tensor, canvas_px: tuple[int, int]):
    """The bench scene with regions 1..count each under a ControlNet of its own (random weights, seeded by its
    region) on a random canvas-sized control image, scale 1, on at every step; their conditional and negative
    texts become conditions of their own, as render's scene_prompts makes them. Returns the controls (each
    ControlNet timed), the sampler's guides, the prompts and the conditioning."""
    generator = torch.Generator().manual_seed(5)
    prompts, rows = own_negatives(prompts, count)
    sets: list[tuple[int, ...]] = [()] * len(prompts.texts)
    specs, pictures = [], []
    for region in range(1, count + 1):
        sets[prompts.cond[region]] = sets[prompts.negative[region]] = (region - 1,)
        net = model.random_controlnet(seed=region).to(device=model.device, dtype=model.dtype)
        specs.append((_ControlNetTimer(net), 1.0, kept_timesteps(timesteps, 0.0, 1.0), f"region {region}"))
        pictures.append(torch.rand((CONTROL_CHANNELS, *canvas_px), generator=generator))
    controls, guides = assemble(model, specs, pictures)
    rowed = conditioning[rows].with_rows("control", set_rows(sets, count).to(model.device))
    return tuple(controls), guides, prompts, rowed


def own_negatives(prompts: Prompts, count: int) -> tuple[Prompts, list[int]]:
    """Regions 1..count each with a negative condition of its own (the shared negative text again), as render's
    scene_prompts makes one for a region with LoRAs or controls of its own; and each condition's row of the
    conditioning so far."""
    texts, negative = list(prompts.texts), list(prompts.negative)
    rows = list(range(len(texts)))
    for region in range(1, count + 1):
        texts.append(texts[prompts.negative[region]])
        rows.append(prompts.negative[region])
        negative[region] = len(texts) - 1
    return Prompts(texts, prompts.cond, negative, prompts.guidance), rows


@contextlib.contextmanager
def built_in(dtype: torch.dtype):
    """Build networks in the bench's dtype (float16's in float32): full-size SDXL in float32 first would take
    10 GB more at its peak."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point and dtype != torch.float16 else torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(default_dtype)


class _UNetTimer:
    """Wraps the batched network: counts samples and times each step's network work (synchronised on CUDA)."""

    def __init__(self, run, device: torch.device):
        self.run, self.device, self.samples, self.cells = run, device, 0, 0
        self.seconds: dict[float, float] = {}  # per step (its timestep): the network's seconds, over its calls

    def __call__(self, inputs, t, texts):
        start = now(self.device)
        out = self.run(inputs, t, texts)
        key = float(t)  # one call a step, or one per input size with region windows
        self.seconds[key] = self.seconds.get(key, 0.0) + now(self.device) - start
        self.samples += inputs.shape[0]
        self.cells += inputs.shape[0] * inputs.shape[-2] * inputs.shape[-1]
        return out


class _ControlNetTimer:
    """Wraps a ControlNet: times each call (synchronised on CUDA) and counts its samples; passes through the
    dtype, device, config and the rest that the families' forward and the loader read."""

    def __init__(self, net):
        self.net = net
        self.calls: list[tuple[float, int, float]] = []  # (timestep, samples, seconds) of every call

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    @property
    def device(self) -> torch.device:
        return self.net.device

    def __getattr__(self, name: str):  # config, input_hint_block, ...: the ControlNet's own
        return getattr(self.__dict__["net"], name)

    def __call__(self, *args, **kwargs):
        """A UNet ControlNet's call (sample, timestep, ...) or a FLUX one's (hidden_states=, timestep=, ...)."""
        sample = args[0] if args else kwargs["hidden_states"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        start = now(self.device)
        out = self.net(*args, **kwargs)
        self.calls.append((float(timestep.flatten()[0]), sample.shape[0], now(self.device) - start))
        return out


def _in_child(config: BenchConfig, path: str, latents_file: str) -> dict[str, Any]:
    """_run_path in a fresh process, so its peak memory is its own."""
    return in_fresh_process(_run_path, config, path, latents_file, what=f"bench path {path!r}")


def run_bench(config: BenchConfig, in_process: bool = False) -> dict[str, Any]:
    """Run both paths (each in a fresh process unless `in_process`) and compare them."""
    results, latents = {}, {}
    paths = (("multidiff", LORA_PATH) if config.loras else ("multidiff", CONTROL_PATH) if config.controls
             else ("reference", "multidiff"))
    if config.windows:
        paths += (WINDOWS_PATH, SHARED_WINDOWS_PATH)
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            latents_file = str(Path(tmp) / f"{path}.pt")
            run = _run_path if in_process else _in_child
            results[path] = run(config, path, latents_file)
            latents[path] = torch.load(latents_file)
    ours, theirs = results[paths[1]], results[paths[0]]
    difference = (latents[paths[1]] - latents[paths[0]]).norm() / latents[paths[0]].norm()
    windowed = {}
    if config.windows:
        windowed = {key: {
            "step_time_ratio": results[path]["seconds_per_step"] / ours["seconds_per_step"],
            "step_time_ratio_to_reference": results[path]["seconds_per_step"] / theirs["seconds_per_step"],
            "cells_ratio": results[path]["cells_per_step"] / ours["cells_per_step"],
        } for key, path in (("windows", WINDOWS_PATH), ("windows_canvas_unconditional", SHARED_WINDOWS_PATH))}
    return windowed | {
        "config": asdict(config),
        "device_name": device_name(config.device),
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "paths": results,
        "sampling_time_ratio": ours["sampling_seconds"] / theirs["sampling_seconds"],
        "step_time_ratio": ours["seconds_per_step"] / theirs["seconds_per_step"],
        "unet_samples_ratio": ours["unet_samples_per_step"] / theirs["unet_samples_per_step"],
        "relative_difference": float(difference),
    }


def run_width_sweep(config: BenchConfig, widths: list[int]) -> list[dict[str, Any]]:
    """multidiff's sampler alone at each canvas width (height `size_px`): how time grows with views.

    The authors' region script has no views, so there is no reference path here."""
    rows = []
    for width in widths:
        wide = replace(config, width_px=width)
        with tempfile.TemporaryDirectory() as tmp:
            result = _in_child(wide, "multidiff", str(Path(tmp) / "latents.pt"))
        rows.append({"width_px": width, "height_px": wide.size_px, **result})
    return rows
