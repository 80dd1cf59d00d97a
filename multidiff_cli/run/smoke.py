"""`multidiff smoke`: render every example scene in a few steps, each on a model of its family, and check
each picture (CI on GPU runners)."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..catalog import DEFAULT_MODEL, TINY_MODELS, cached_folder, detect_family, looks_like_hub_id
from ..errors import MultidiffError, SceneError
from ..output.console import problem_lines
from ..output.png import read_metadata
from .batch import Event, OnEvent, Renderer, RunSettings
from ..scene import Scene
from .plan import load_source, plan_jobs


@dataclass
class SmokeResult:
    scene: str
    size: str
    seconds: float
    problem: str | None  # None: passed
    model: str = ""
    skipped: str | None = None  # why the scene was not rendered (it needs files that are not there)


def smoke_model(named: str | None = None) -> str | None:
    """`named` ($MULTIDIFF_MODEL) if it names a folder; else None: each scene renders on a model of its
    own family that is here (scene_model). A smoke run never downloads."""
    if named and Path(named).expanduser().is_dir():
        return named
    return None


def scene_model(scene: Scene, models: dict[str, str] = TINY_MODELS) -> str:
    """The model a scene smokes on when none is chosen: its own (or the default) where it is a local folder
    or file or in the Hugging Face cache, else `models`' model of its family (tiny-random, tiny-sdxl-random)."""
    own = scene.model or DEFAULT_MODEL
    path = scene.path_of(own)
    if path.exists() or (looks_like_hub_id(own) and cached_folder(own) is not None):
        return str(path) if path.exists() else own
    family = scene.family or detect_family(DEFAULT_MODEL)
    return models[family.name]


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


def run_smoke(scenes: list[Path], output_dir: Path, steps: int, model: str | None, settings: RunSettings,
              on_event: OnEvent | None = None, family_models: dict[str, str] = TINY_MODELS) -> list[SmokeResult]:
    """Render each scene once in `steps` steps and check each picture. model: the one every scene renders
    on; None: each scene on `scene_model`'s (its family's tiny model where its own is not here). A scene
    whose LoRA files, ControlNets or IP-Adapters are not here (they are not shipped) is skipped, and the result
    says why."""
    jobs, results = [], []
    for path in scenes:
        try:
            scene = load_source(path).scene  # first: a scene whose LoRAs etc. are not here is skipped
            chosen = model or scene_model(scene, family_models)
        except SceneError as exc:
            missing = missing_adapter_lines(exc)
            if missing:
                results.append(SmokeResult(path.name, "-", 0.0, None, skipped=f"needs files that are not here: {missing}"))
                continue
            chosen = model or family_models[detect_family(DEFAULT_MODEL).name]  # the render reports the problem
        # a scene's bootstrap follows the steps, as in render
        planned, load_failures, notes = plan_jobs([path], {"steps": steps, "model": chosen}, None, None, output_dir,
                                                  overwrite=True)
        results += [SmokeResult(f.label, "-", 0.0, problem_lines(f.error)[0], chosen) for f in load_failures]
        jobs += [(job, chosen, notes) for job in planned]
    by_target = {job.target: (job, chosen) for job, chosen, _ in jobs}
    by_label = {job.label: (job, chosen) for job, chosen, _ in jobs}
    clock = [time.perf_counter()]

    def lap() -> float:
        now = time.perf_counter()
        elapsed, clock[0] = now - clock[0], now
        return elapsed

    def listen(event: Event) -> None:
        if event.kind == "written":
            job, chosen = by_target[event.path]
            problem = check_picture(event.path, job.scene.width, job.scene.height, job.seed)
            results.append(SmokeResult(job.source.name, f"{job.scene.width}x{job.scene.height}", lap(), problem, chosen))
        elif event.kind == "failed":
            job, chosen = by_label[event.failure.label]
            size = f"{job.scene.width}x{job.scene.height}"
            results.append(SmokeResult(job.source.name, size, lap(), problem_lines(event.failure.error)[0], chosen))
        if on_event is not None:
            on_event(event)

    for kind, text in dict.fromkeys(note for _, _, notes in jobs for note in notes):
        listen(Event(kind, text=text))
    if jobs:
        Renderer(settings, listen).run([job for job, _, _ in jobs])
    return results


_MISSING = re.compile(r"(loras|control|reference)\[\d+\]\.(path|model|weight): no such (?:file|folder|folder or "
                      r"file)(?: in)?: (\S+)")


def missing_adapter_lines(error: SceneError) -> str | None:
    """The missing LoRA files, ControlNets and IP-Adapters (not shipped) a scene's only problems are, as one text;
    None if it has other problems."""
    found = [_MISSING.search(line) for line in error.problems]
    if not found or not all(found):
        return None
    return ", ".join(match.group(3).rstrip(":") for match in found)


def example_scenes(folder: Path) -> list[Path]:
    """Every scene file under `folder`, its subfolders included."""
    scenes = sorted([*folder.rglob("*.yaml"), *folder.rglob("*.yml")])
    if not scenes:
        raise SceneError([f"{folder}: no scene files (*.yaml) to smoke-test"])
    return scenes
