"""`multidiff smoke`: render every example scene in a few steps and check each picture (CI on GPU runners)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..catalog import DEFAULT_MODEL, TINY_RANDOM
from ..errors import MultidiffError, SceneError
from ..output.console import problem_lines
from ..output.png import read_metadata
from .batch import Event, OnEvent, Renderer, RunSettings
from .plan import plan_jobs


@dataclass
class SmokeResult:
    scene: str
    size: str
    seconds: float
    problem: str | None  # None: passed


def smoke_model(named: str | None = None) -> str:
    """`named` ($MULTIDIFF_MODEL) if it names a folder, else the default model if it is in the local HF
    cache, else tiny-random: a smoke run never downloads."""
    if named and Path(named).expanduser().is_dir():
        return named
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(DEFAULT_MODEL, "unet/diffusion_pytorch_model.safetensors")
    return DEFAULT_MODEL if isinstance(cached, str) else TINY_RANDOM


def check_picture(path: Path, width: int, height: int, seed: int) -> str | None:
    """Why the written picture is not a plausible render, or None."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        record = read_metadata(path)
    except (OSError, MultidiffError) as exc:
        return f"cannot read {path}: {exc}"
    if pixels.shape[:2] != (height, width):
        return f"{pixels.shape[1]}x{pixels.shape[0]} pixels, expected {width}x{height}"
    if pixels.max() < 8:
        return "the picture is black"
    if pixels.std() < 0.5:
        return "the picture is one flat colour"
    if record.get("scene", {}).get("seed") != seed:
        return "its metadata does not record the seed"
    return None


def run_smoke(scenes: list[Path], output_dir: Path, steps: int, model: str, settings: RunSettings,
              on_event: OnEvent | None = None) -> list[SmokeResult]:
    """Render each scene once in `steps` steps and check each picture."""
    overrides = {"steps": steps, "model": model}  # a scene's bootstrap follows the steps, as in render
    jobs, load_failures, notes = plan_jobs(scenes, overrides, None, None, output_dir, overwrite=True)
    results = [SmokeResult(f.label, "-", 0.0, problem_lines(f.error)[0]) for f in load_failures]
    by_target = {job.target: job for job in jobs}
    by_label = {job.label: job for job in jobs}
    clock = [time.perf_counter()]

    def lap() -> float:
        now = time.perf_counter()
        elapsed, clock[0] = now - clock[0], now
        return elapsed

    def listen(event: Event) -> None:
        if event.kind == "written":
            job = by_target[event.path]
            problem = check_picture(event.path, job.scene.width, job.scene.height, job.seed)
            results.append(SmokeResult(job.source.name, f"{job.scene.width}x{job.scene.height}", lap(), problem))
        elif event.kind == "failed":
            job = by_label[event.failure.label]
            size = f"{job.scene.width}x{job.scene.height}"
            results.append(SmokeResult(job.source.name, size, lap(), problem_lines(event.failure.error)[0]))
        if on_event is not None:
            on_event(event)

    for kind, text in notes:
        listen(Event(kind, text=text))
    if jobs:
        Renderer(settings, listen).run(jobs)
    return results


def example_scenes(folder: Path) -> list[Path]:
    scenes = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    if not scenes:
        raise SceneError([f"{folder}: no scene files (*.yaml) to smoke-test"])
    return scenes
