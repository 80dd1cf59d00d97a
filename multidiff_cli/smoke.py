"""`multidiff smoke`: render every example scene in a few steps and check each picture (CI on GPU runners)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .batch import Batch
from .errors import SceneError
from .jobs import plan_jobs
from .models import DEFAULT_MODEL, TINY_RANDOM
from .output import read_metadata


@dataclass
class SmokeResult:
    scene: str
    size: str
    seconds: float
    problem: str | None  # None: passed


def smoke_model() -> str:
    """$MULTIDIFF_MODEL if it names a folder, else the default model if it is in the local HF cache,
    else tiny-random: a smoke run never downloads."""
    named = os.environ.get("MULTIDIFF_MODEL")
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
    except (OSError, KeyError, ValueError) as exc:
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


def run_smoke(scenes: list[Path], output_dir: Path, steps: int, model: str, settings: dict, progress
              ) -> list[SmokeResult]:
    """Render each scene once in `steps` steps (one bootstrap step) and check each picture."""
    overrides = {"steps": steps, "bootstrap_steps": min(1, steps), "model": model}
    jobs, load_failures = plan_jobs(scenes, overrides, None, None, output_dir)
    results = [SmokeResult(f.label, "-", 0.0, f.lines[0]) for f in load_failures]
    clock = [time.perf_counter()]

    def lap() -> float:
        now = time.perf_counter()
        elapsed, clock[0] = now - clock[0], now
        return elapsed

    def written(path: Path) -> None:
        job = next(j for j in jobs if j.target == path)
        problem = check_picture(path, job.scene.width, job.scene.height, job.seed)
        results.append(SmokeResult(job.source.name, f"{job.scene.width}x{job.scene.height}", lap(), problem))

    def failed(failure) -> None:
        job = next(j for j in jobs if j.label == failure.label)
        size = f"{job.scene.width}x{job.scene.height}"
        results.append(SmokeResult(job.source.name, size, lap(), failure.lines[0].removeprefix("error: ")))

    if jobs:
        Batch(jobs, settings, progress).run(on_written=written, on_failed=failed)
    return results


def example_scenes(folder: Path) -> list[Path]:
    scenes = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    if not scenes:
        raise SceneError([f"{folder}: no scene files (*.yaml) to smoke-test"])
    return scenes
