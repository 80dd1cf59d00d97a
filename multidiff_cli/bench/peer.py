"""`multidiff bench --batch-sizes`, `--window-sizes` and `--peer`: UNet samples per call swept, one sample's
time swept over region window sizes, and diffusers' panorama pipeline (the authors' MultiDiffusion, as
diffusers ships it) as a peer on the same canvas.

The sweep times single UNet calls of B samples over one view of the bench's canvas (after one
untimed call, each size `repeats` times; the best counts): the measurements `max_batch: auto` is
chosen from. The peer row renders one prompt over the canvas (no regions) from the same noise both ways,
each in a fresh process, and times the whole render: prompt encoding, sampling and decoding.
Both also give the process's CPU seconds (all its threads): on a CPU shared with other work, wall
time counts the others' turns too, CPU time much less so.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..catalog import SD2_RANDOM, TINY_RANDOM
from ..errors import UsageError
from ..models.device import quiet_libraries
from ..models.random_weights import build_sd2_random, build_tiny_random
from ..models.schedulers import make_scheduler
from ..run.render import plan_render, render
from ..scene import Scene
from .process import device_name, in_fresh_process, now
from .sampler import BenchConfig

PEER_PROMPT = "a mountain range at dawn, wide panorama"
PEER_MODELS = (TINY_RANDOM, SD2_RANDOM)  # SD-shaped: the panorama pipeline, and the sweep's UNet call, are SD's
PEER_STRIDE_PX = 64  # the panorama pipeline's stride: 8 latent cells


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(size) for size in text.split(",")]
    except ValueError:
        raise UsageError("--batch-sizes: comma-separated sample counts, e.g. 1,2,4,8,16") from None
    if not sizes or min(sizes) < 1:
        raise UsageError("--batch-sizes: each at least 1")
    return sizes


def _model(config: BenchConfig, text_encoder: bool = False, as_multidiff_loads: bool = True):
    """The bench's random model on its device, set up as multidiff's loader sets models up (speed_up:
    channels-last layouts, --compile), or as diffusers' from_pretrained leaves them."""
    quiet_libraries()
    built = build_tiny_random() if config.model == TINY_RANDOM else build_sd2_random(text_encoder=text_encoder)
    placed = built.to(torch.device(config.device), getattr(torch, config.dtype))
    return placed.speed_up(compile=config.compile) if as_multidiff_loads else placed


def batch_sweep(config: BenchConfig, sizes: list[int], repeats: int = 2) -> dict[str, Any]:
    """Seconds per sample of one UNet call of each size over one view of the canvas, and what auto picks."""
    model = _model(config)
    device, unet = model.device, model.unet
    window = unet.config.sample_size
    view_hw = min(config.size_px // 8, window), min(config.canvas_width // 8, window)
    x = torch.randn((max(sizes), unet.config.in_channels, *view_hw), generator=torch.Generator().manual_seed(0))
    texts = torch.randn((max(sizes), 77, unet.config.cross_attention_dim), generator=torch.Generator().manual_seed(1))
    x, texts, t = x.to(device, model.dtype), texts.to(device, model.dtype), torch.tensor(500, device=device)
    runs: dict[int, list[float]] = {size: [] for size in sizes}
    cpu_runs: dict[int, list[float]] = {size: [] for size in sizes}
    with torch.inference_mode():
        unet(x[:1], t, encoder_hidden_states=texts[:1])  # allocator and caches warm: untimed
        for _ in range(repeats):
            for size in sizes:
                start, cpu_start = now(device), time.process_time()
                unet(x[:size], t, encoder_hidden_states=texts[:size])
                runs[size].append((now(device) - start) / size)
                cpu_runs[size].append((time.process_time() - cpu_start) / size)
    rows = [{"batch_size": size, "seconds_per_sample": min(runs[size]), "runs": runs[size],
             "cpu_seconds_per_sample": min(cpu_runs[size]), "cpu_runs": cpu_runs[size]} for size in sizes]
    return {
        "config": asdict(config), "device_name": device_name(config.device), "torch_threads": torch.get_num_threads(),
        "view_hw": list(view_hw), "auto_samples_per_call": model.auto_samples_per_call(view_hw[0] * view_hw[1]),
        "rows": rows,
    }


def parse_window_sizes(text: str) -> list[int]:
    try:
        sides = [int(side) for side in text.split(",")]
    except ValueError:
        raise UsageError("--window-sizes: comma-separated window sides in pixels, e.g. 256,320,384,448") from None
    if not sides or any(side < 64 or side % 64 for side in sides):
        raise UsageError("--window-sizes: each a whole multiple of 64 px (what SD's UNet needs), at least 64")
    return sides


def window_sweep(config: BenchConfig, sides_px: list[int], repeats: int = 2) -> dict[str, Any]:
    """Seconds of one UNet sample on a square window of each side against one on the native view, each size
    warmed by one untimed call, then `repeats` timed (the best counts). A region window costs two samples (its
    conditional and its own unconditional) where on a view it costs one (the view's unconditional is shared):
    it pays where a window's sample takes under half a view's. `break_even_cells_share` is the window's share
    of the view's cells where that happens (linear between the sizes measured): what `region_windows: auto`
    compares a window against."""
    model = _model(config)
    device, unet, cell = model.device, model.unet, model.facts.cell_px
    native = unet.config.sample_size
    sides = sorted({side // cell for side in sides_px} | {native})
    texts = torch.randn((1, 77, unet.config.cross_attention_dim), generator=torch.Generator().manual_seed(1))
    texts, t = texts.to(device, model.dtype), torch.tensor(500, device=device)
    inputs = {side: torch.randn((1, unet.config.in_channels, side, side), generator=torch.Generator().manual_seed(0))
              .to(device, model.dtype) for side in sides}
    runs: dict[int, list[float]] = {side: [] for side in sides}
    with torch.inference_mode():
        for side in sides:
            unet(inputs[side], t, encoder_hidden_states=texts)  # this shape's kernels and caches warm: untimed
        for _ in range(repeats):
            for side in sides:
                start = now(device)
                unet(inputs[side], t, encoder_hidden_states=texts)
                runs[side].append(now(device) - start)
    view_seconds = min(runs[native])
    rows = [{"side_px": side * cell, "cells": side * side, "cells_share": side * side / native ** 2,
             "seconds_per_sample": min(runs[side]), "runs": runs[side],
             "time_share": min(runs[side]) / view_seconds} for side in sides]
    return {
        "config": asdict(config), "device_name": device_name(config.device), "torch_threads": torch.get_num_threads(),
        "view_px": native * cell, "rows": rows, "break_even_cells_share": break_even(rows),
    }


def break_even(rows: list[dict[str, Any]]) -> float | None:
    """The cells share where a window's sample takes half a view's: linear between the two rows around it
    (rows by size; None where no measured pair straddles the half)."""
    for a, b in zip(rows, rows[1:]):
        if a["time_share"] <= 0.5 <= b["time_share"] and b["time_share"] > a["time_share"]:
            return a["cells_share"] + (0.5 - a["time_share"]) / (b["time_share"] - a["time_share"]) * (
                b["cells_share"] - a["cells_share"])
    return None


def peer_scene(config: BenchConfig) -> Scene:
    """The peer row's scene: one prompt over the canvas, no regions, views 64 px apart."""
    return Scene.model_validate({
        "prompt": PEER_PROMPT, "width": config.canvas_width, "height": config.size_px, "steps": config.steps,
        "bootstrap_steps": 0, "guidance_scale": config.guidance_scale, "scheduler": config.scheduler,
        "view_stride": PEER_STRIDE_PX, "seed": config.seed, "max_batch": config.max_batch or "auto",
    })


def _render_multidiff(config: BenchConfig, model) -> np.ndarray:
    return np.asarray(render(peer_scene(config), model, config.seed).image)


def _render_panorama_pipeline(config: BenchConfig, model) -> np.ndarray:
    """diffusers' StableDiffusionPanoramaPipeline from the same model, scheduler config and noise."""
    from diffusers import StableDiffusionPanoramaPipeline

    scheduler = make_scheduler(config.scheduler, model.scheduler_config, model.facts.schedulers)
    pipe = StableDiffusionPanoramaPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
        unet=model.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    h, w = config.size_px // 8, config.canvas_width // 8
    # render() draws its noise first from a CPU generator seeded with the seed: the same numbers
    noise = torch.randn((1, model.latent_channels, h, w), generator=torch.Generator("cpu").manual_seed(config.seed))
    image = pipe(PEER_PROMPT, height=config.size_px, width=config.canvas_width, num_inference_steps=config.steps,
                 guidance_scale=config.guidance_scale, latents=noise.to(model.device, model.dtype)).images[0]
    return np.asarray(image)


PEER_PATHS: dict[str, Callable] = {"multidiff": _render_multidiff, "panorama pipeline": _render_panorama_pipeline}


def _peer_path(config: BenchConfig, path: str, image_file: str) -> dict[str, Any]:
    """One peer path in this process: build the model (untimed), then time the whole render. Each path
    runs the model as its tool sets it up: multidiff's as its loader does, the pipeline's as
    from_pretrained does (the pipeline gains what multidiff's setup gains where its user adds it)."""
    model = _model(config, text_encoder=True, as_multidiff_loads=path == "multidiff")
    plan = plan_render(peer_scene(config), model)  # as render plans it, before the render fills any cache
    parts = {"unet": _Timed(model.unet, model.device), "decode": _Timed(model.vae, model.device, "decode")}
    start, cpu_start = now(model.device), time.process_time()
    with torch.inference_mode():
        image = PEER_PATHS[path](config, model)
    seconds, cpu_seconds = now(model.device) - start, time.process_time() - cpu_start
    np.save(image_file, image)
    samples_per_call = plan.samples_per_call if path == "multidiff" else 2  # the pipeline: a view (cond + uncond) a call
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "views": len(plan.views), "samples_per_call": samples_per_call,
            "unet_seconds": parts["unet"].seconds(), "decode_seconds": parts["decode"].seconds()}


class _Timed:
    """Times every call of module.method from now on (this process's model only). On CUDA with events,
    read after the render: synchronising at each call would slow the path that makes more calls."""

    def __init__(self, module: torch.nn.Module, device: torch.device, method: str = "forward"):
        self.cuda, self.spans, call = device.type == "cuda", [], getattr(module, method)

        def timed(*args, **kwargs):
            start = torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter()
            if self.cuda:
                start.record()
            try:
                return call(*args, **kwargs)
            finally:
                if self.cuda:
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                    self.spans.append((start, end))
                else:
                    self.spans.append((start, time.perf_counter()))

        setattr(module, method, timed)

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in self.spans) / 1000
        return sum(end - start for start, end in self.spans)


def peer_row(config: BenchConfig, in_process: bool = False) -> dict[str, Any]:
    """multidiff against diffusers' panorama pipeline on the bench's canvas: times, ratio, pixel difference."""
    paths, images = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in PEER_PATHS:
            image_file = str(Path(tmp) / f"{path.replace(' ', '-')}.npy")
            paths[path] = (_peer_path if in_process else lambda *a: in_fresh_process(_peer_path, *a))(config, path, image_file)
            images[path] = np.load(image_file)
    ours, theirs = images["multidiff"].astype(int), images["panorama pipeline"].astype(int)
    return {
        "config": asdict(config), "device_name": device_name(config.device), "torch_threads": torch.get_num_threads(),
        "paths": paths, "time_ratio": paths["multidiff"]["seconds"] / paths["panorama pipeline"]["seconds"],
        "cpu_time_ratio": paths["multidiff"]["cpu_seconds"] / max(paths["panorama pipeline"]["cpu_seconds"], 1e-9),
        "max_pixel_difference": int(np.abs(ours - theirs).max()), "mean_pixel_difference": float(np.abs(ours - theirs).mean()),
    }
