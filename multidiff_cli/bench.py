"""`multidiff bench`: multidiff's sampler against the authors' per-prompt loop, on SD2-shaped random weights.

Both paths sample the same scene (a global prompt and N boxes in a row) from the same noise with
the same steps; each runs in a fresh process, so peak memory is its own. Random weights cost
exactly what the real model costs, so the timings are those of SD2-base.
"""
from __future__ import annotations

import copy
import inspect
import multiprocessing
import platform
import queue as queue_module
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import BenchError, UsageError
from .method.guidance import Prompts, guided_denoiser
from .method.sampler import bootstrap_inputs, multidiffusion, step_requests
from .method.schedulers import SCHEDULER_NAMES, make_scheduler
from .method.views import make_views
from .method.weights import region_weights
from .models.components import pick_device, pick_dtype, quiet_libraries, speed_up, to_device
from .models.random_weights import (SD2_RANDOM, SDXL_RANDOM, TINY_RANDOM, TINY_SDXL_RANDOM, build_sd2_random,
                                    build_sdxl_random, build_tiny_random, build_tiny_sdxl_random)
from .models.lora import AdapterUNet, Conditions, load_loras
from .models.sd import ChunkedUNet
from .models.sdxl import SDXLConditioning, time_ids
from .run.render import auto_batch_size, largest_view_cells
from .scene.grid import box_cells
VIEW_STRIDE_CELLS = 8  # the scenes' default view stride, 64 px
BENCH_MODELS = {SD2_RANDOM: build_sd2_random, SDXL_RANDOM: build_sdxl_random, TINY_RANDOM: build_tiny_random,
                TINY_SDXL_RANDOM: build_tiny_sdxl_random}


@dataclass
class BenchConfig:
    model: str = SD2_RANDOM  # sd2-random, sdxl-random (full size), tiny-random or tiny-sdxl-random
    size_px: int = 256  # canvas height, and width unless width_px is set
    width_px: int | None = None
    regions: int = 3
    steps: int = 4
    bootstrap_steps: int = 0
    scheduler: str = "ddim"
    guidance_scale: float = 7.5
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    max_batch: int | None = None
    seed: int = 0
    loras: int = 0  # regions with a LoRA of their own: then multidiff with them against multidiff without

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


def bench_config(model: str, size: int | None, regions: int, steps: int | None, bootstrap_steps: int, scheduler: str,
                 device: str | None, dtype: str | None, compile: bool, max_batch: int | None,
                 device_source: str = "--device", loras: int = 0) -> BenchConfig:
    """Check the command's options; defaults: 512 px and 50 steps on CUDA, 256 px and 4 steps elsewhere."""
    if model not in BENCH_MODELS:
        raise UsageError(f"--model: the bench builds its own random model: {', '.join(BENCH_MODELS)}, not {model!r}")
    if scheduler not in SCHEDULER_NAMES:
        raise UsageError(f"--scheduler: choose one of {', '.join(SCHEDULER_NAMES)}")
    torch_device = pick_device(device, source=device_source)
    on_cuda = torch_device.type == "cuda"
    size = size or (512 if on_cuda else 256)
    steps = steps or (50 if on_cuda else 4)
    if size % 8 or size < 64:
        raise UsageError("--size: a multiple of 8, at least 64")
    if bootstrap_steps > steps:
        raise UsageError("--bootstrap-steps: at most --steps")
    if loras > regions:
        raise UsageError(f"--loras: at most --regions ({regions}): each LoRA belongs to one region")
    return BenchConfig(
        model=model, size_px=size, regions=regions, steps=steps, bootstrap_steps=bootstrap_steps, scheduler=scheduler,
        device=str(torch_device), dtype=str(pick_dtype(torch_device, dtype)).removeprefix("torch."),
        compile=compile, max_batch=max_batch, loras=loras,
    )


def parse_widths(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        raise UsageError("--widths: comma-separated pixel widths, e.g. 512,1024,2048") from None
    if any(w % 8 or w < 64 for w in widths):
        raise UsageError("--widths: each a multiple of 8, at least 64")
    return widths


def bench_scene(config: BenchConfig, unet_config):
    """Weights, prompt table and text embeddings of a global prompt plus `regions` boxes in a row
    (for SDXL, with random pooled embeddings and the time ids of a whole picture of the view's size)."""
    latent_hw = config.size_px // 8, config.canvas_width // 8
    width = config.canvas_width // max(config.regions, 1)
    boxes = [(i * width, config.size_px // 4, (i + 1) * width, config.size_px * 3 // 4) for i in range(config.regions)]
    weights = region_weights([torch.from_numpy(box_cells(b, latent_hw)) for b in boxes], latent_hw)
    prompts = Prompts(
        texts=[f"text {i}" for i in range(config.regions + 2)],
        cond=list(range(config.regions + 1)),
        negative=[config.regions + 1] * (config.regions + 1),
        guidance=[config.guidance_scale] * (config.regions + 1),
    )
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn((len(prompts.texts), 77, unet_config.cross_attention_dim), generator=generator)
    if unet_config.get("addition_embed_type") == "text_time":
        pooled_dim = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
        window = unet_config.sample_size * 8
        view_px = (min(window, config.size_px), min(window, config.canvas_width))
        embeddings = SDXLConditioning(embeddings, torch.randn((len(prompts.texts), pooled_dim), generator=generator),
                                      torch.tensor([time_ids(view_px)] * len(prompts.texts), dtype=torch.float32))
    return weights, prompts, embeddings


def authors_loop(noise, scheduler, unet, weights, prompts, embeddings, bootstrap_steps, backgrounds, generator):
    """The authors' region_based.py, generalised: every prompt its own unconditional and conditional
    sample and its own scheduler step (a scheduler copy each, for multistep solvers), then the
    mask-weighted average of the stepped latents."""
    count = weights.shape[0]
    schedulers = [copy.deepcopy(scheduler) for _ in range(count)]
    texts = embeddings[prompts.negative + prompts.cond]
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        inputs = x.expand(count, *x.shape[1:])
        if i < bootstrap_steps:
            noised = scheduler.add_noise(backgrounds[i].expand(count - 1, *x.shape[1:]), noise, t.reshape(1))
            inputs = torch.cat([x, bootstrap_inputs(x, weights[1:], noised)])
        scaled = scheduler.scale_model_input(inputs, t)
        out = unet(torch.cat([scaled, scaled]), t, texts)
        uncond, cond = out.chunk(2)
        guidance = torch.tensor(prompts.guidance, device=x.device).reshape(-1, 1, 1, 1)
        eps = uncond + guidance * (cond - uncond)
        state = generator.get_state()
        stepped = []
        for p in range(count):
            generator.set_state(state)  # every prompt's stochastic step draws the same noise
            kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
            stepped.append(schedulers[p].step(eps[p : p + 1], t, inputs[p : p + 1], **kwargs).prev_sample)
        x = (weights * torch.cat(stepped)).sum(0, keepdim=True) / weights.sum(0, keepdim=True)
        yield x


def _run_path(config: BenchConfig, path: str, latents_file: str) -> dict[str, Any]:
    """One path in this process: build the model, sample, time every step, measure peak memory."""
    device, dtype = torch.device(config.device), getattr(torch, config.dtype)
    quiet_libraries()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point and dtype != torch.float16 else torch.float32)
    try:  # built in the bench's dtype: full-size SDXL in float32 first would take 10 GB more at its peak
        components = BENCH_MODELS[config.model]()
    finally:
        torch.set_default_dtype(default_dtype)
    components = speed_up(to_device(components, device, dtype), compile=config.compile)
    weights, prompts, embeddings = bench_scene(config, components.unet.config)
    weights, embeddings = weights.to(device), embeddings.to(device, dtype)
    latent_hw = (config.size_px // 8, config.canvas_width // 8)
    noise = torch.randn((1, 4, *latent_hw), generator=torch.Generator().manual_seed(config.seed))
    noise = noise.to(device)
    backgrounds = torch.randn((config.bootstrap_steps, config.regions, 4, 1, 1), generator=torch.Generator().manual_seed(2))
    backgrounds = backgrounds.to(device)
    scheduler = make_scheduler(config.scheduler, components.scheduler_config)
    scheduler.set_timesteps(config.steps, device=device)
    generator = torch.Generator().manual_seed(3)

    views = make_views(latent_hw, components.unet.config.sample_size, VIEW_STRIDE_CELLS)
    samples_per_call = config.max_batch or auto_batch_size(components, largest_view_cells(views))
    run = ChunkedUNet(components.unet, samples_per_call)
    lora_dir = tempfile.TemporaryDirectory()
    if path == LORA_PATH:
        prompts, embeddings = region_loras(components, prompts, embeddings, config.loras, Path(lora_dir.name))
        run = AdapterUNet(run, components)
        path = "multidiff"
    with torch.inference_mode():  # one untimed step's worth of UNet work: allocator, kernels, caches warm
        t0 = scheduler.timesteps[0]
        if path == "multidiff":
            inputs, requests, _, _ = step_requests(noise, weights, views)
            guided_denoiser(run, embeddings, prompts)(inputs, t0, requests)
        else:
            run(noise.expand(2 * weights.shape[0], *noise.shape[1:]), t0, embeddings[prompts.negative + prompts.cond])
    timer = _UNetTimer(run, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps = [_now(device)]
    with torch.inference_mode():
        if path == "multidiff":
            latents = multidiffusion(
                noise, scheduler, guided_denoiser(timer, embeddings, prompts), weights,
                views=views,
                bootstrap_steps=config.bootstrap_steps, backgrounds=backgrounds, generator=generator,
                callback=lambda *_: stamps.append(_now(device)),
            )
        else:
            for latents in authors_loop(noise, scheduler, timer, weights, prompts, embeddings,
                                        config.bootstrap_steps, backgrounds, generator):
                stamps.append(_now(device))
    torch.save(latents.float().cpu(), latents_file)
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    later = steps[1:] or steps
    unet_later = timer.seconds[1:] or timer.seconds
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda allocator peak"
    else:
        peak, kind = _max_rss_bytes(), "max RSS of the process"
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
    )
    lora_dir.cleanup()
    return asdict(result)


LORA_PATH = "multidiff+loras"
LORA_RANK = 16  # a common rank for character and style LoRAs (civitai's are mostly 8 to 128)


def region_loras(components, prompts: Prompts, embeddings: torch.Tensor, count: int, folder: Path):
    """The bench scene with regions 1..count each on a random LoRA of its own (rank LORA_RANK, every
    attention projection of the UNet): their conditional and negative texts become conditions of
    their own, as render's scene_prompts makes them."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(4)
    projections = [(name, module) for name, module in components.unet.named_modules()
                   if isinstance(module, torch.nn.Linear) and name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    files, sets = [], [()] * len(prompts.texts)
    texts, negative = list(prompts.texts), list(prompts.negative)
    rows = list(range(len(texts)))  # each condition's row of `embeddings` (SD's tensor or SDXL's conditioning)
    for region in range(1, count + 1):
        path = folder / f"region{region}.safetensors"
        save_file({f"unet.{name}.lora_{part}.weight": torch.randn(shape, generator=generator) * 0.01
                   for name, linear in projections
                   for part, shape in (("A", (LORA_RANK, linear.in_features)), ("B", (linear.out_features, LORA_RANK)))},
                  str(path))
        files.append(path)
        lora_set = ((str(path), 1.0),)
        sets[prompts.cond[region]] = lora_set
        texts.append(texts[prompts.negative[region]])
        rows.append(prompts.negative[region])
        sets.append(lora_set)
        negative[region] = len(texts) - 1
    load_loras(components, files)
    table = list(dict.fromkeys(sets))
    conditions = Conditions(embeddings[torch.tensor(rows)], torch.tensor([table.index(s) for s in sets]), table)
    return Prompts(texts, prompts.cond, negative, prompts.guidance), conditions


class _UNetTimer:
    """Wraps the batched UNet: counts samples and times each step's UNet work (synchronised on CUDA)."""

    def __init__(self, run: ChunkedUNet, device: torch.device):
        self.run, self.device, self.samples, self.seconds = run, device, 0, []

    def __call__(self, inputs, t, texts):
        start = _now(self.device)
        out = self.run(inputs, t, texts)
        self.seconds.append(_now(self.device) - start)  # both paths make one call per step
        self.samples += inputs.shape[0]
        return out


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _child(target: Callable, args: tuple, queue) -> None:
    try:
        queue.put(("ok", target(*args)))
    except BaseException as exc:  # reported by the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def in_fresh_process(target: Callable, *args, what: str | None = None) -> Any:
    """target(*args) in a fresh (spawned) process: its own memory and peak, no warm caches from another
    path. A child killed (for memory, by a signal) before it reports is a BenchError, never a hang."""
    what = what or f"bench {getattr(target, '__name__', target)}"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child, args=(target, args, queue))
    child.start()
    while True:
        try:
            status, payload = queue.get(timeout=1)
            break
        except queue_module.Empty:
            if not child.is_alive():
                try:  # it may have reported just as the wait timed out
                    status, payload = queue.get_nowait()
                    break
                except queue_module.Empty:
                    raise BenchError(f"{what} died with exit code {child.exitcode} "
                                     "(killed for memory? try a smaller --size or --dtype bfloat16)") from None
    child.join()
    if status != "ok":
        raise BenchError(f"{what} failed: {payload}")
    return payload


def _in_child(config: BenchConfig, path: str, latents_file: str) -> dict[str, Any]:
    """_run_path in a fresh process, so its peak memory is its own."""
    return in_fresh_process(_run_path, config, path, latents_file, what=f"bench path {path!r}")


def run_bench(config: BenchConfig, in_process: bool = False) -> dict[str, Any]:
    """Run both paths (each in a fresh process unless `in_process`) and compare them."""
    results, latents = {}, {}
    paths = ("multidiff", LORA_PATH) if config.loras else ("reference", "multidiff")
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            latents_file = str(Path(tmp) / f"{path}.pt")
            run = _run_path if in_process else _in_child
            results[path] = run(config, path, latents_file)
            latents[path] = torch.load(latents_file)
    ours, theirs = results[paths[1]], results[paths[0]]
    difference = (latents[paths[1]] - latents[paths[0]]).norm() / latents[paths[0]].norm()
    return {
        "config": asdict(config),
        "device_name": _device_name(config.device),
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "paths": results,
        "sampling_time_ratio": ours["sampling_seconds"] / theirs["sampling_seconds"],
        "step_time_ratio": ours["seconds_per_step"] / theirs["seconds_per_step"],
        "unet_samples_ratio": ours["unet_samples_per_step"] / theirs["unet_samples_per_step"],
        "relative_difference": float(difference),
    }


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


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
