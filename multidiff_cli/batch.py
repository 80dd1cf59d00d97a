"""Run a batch of render jobs: one model load per model, progress over the batch, failures collected."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from .errors import MultidiffError, SceneError
from .jobs import Failure, RenderJob
from .memory import check_memory
from .models import DEFAULT_MODEL, load_components, pick_device, pick_dtype
from .output import build_metadata, check_writable, read_metadata, write_gif, write_png
from .preview import contact_sheet
from .render import DEFAULT_MAX_BATCH, canvas_views, decode_scene, render, tiled_decode_on
from .scene import Scene


class Batch:
    """Renders jobs in order; a job that fails is recorded and the batch goes on."""

    def __init__(self, jobs: list[RenderJob], settings: dict[str, Any], progress, preview_every: int | None = None,
                 animation: bool = False, warn: Callable[[str], None] | None = None):
        self.jobs, self.progress = jobs, progress
        self.preview_every, self.animation = preview_every, animation
        self.warn = warn or (lambda _note: None)
        self.device = pick_device(settings.get("device"))
        self.dtype = pick_dtype(self.device, settings.get("dtype"))
        self.compile = settings.get("compile", False)
        self.allow_pickle = settings.get("allow_pickle", False)
        self.skip_existing = settings.get("skip_existing", False)
        self.memory_check = settings.get("memory_check", True)
        self._models: dict[str, Any] = {}
        for folder in sorted({job.target.parent for job in jobs}):
            check_writable(folder)  # before any model is loaded

    def run(self, on_written: Callable[[Path], None], on_failed: Callable[[Failure], None],
            on_skipped: Callable[[Path], None] = lambda _path: None):
        """Render every job; returns (done: the jobs whose file exists now, failures)."""
        done, failures = [], []
        total = len(self.jobs)
        task = self.progress.add_task("", total=None)
        for number, job in enumerate(self.jobs, 1):
            if self.skip_existing and already_rendered(job, _resolved(job.scene)):
                on_skipped(job.target)
                done.append(job)
                continue
            prefix = f"[{number}/{total}] " if total > 1 else ""
            self.progress.update(task, description=f"{prefix}{job.label}", completed=0, total=None)
            try:
                self._render(job, task)
            except MultidiffError as exc:
                lines = str(exc).splitlines() or [type(exc).__name__]
                if not isinstance(exc, SceneError):
                    lines = [f"error: {job.label}: {line}" if total > 1 else f"error: {line}" for line in lines]
                failure = Failure(job.label, lines, exc.exit_code)
                failures.append(failure)
                on_failed(failure)
                continue
            on_written(job.target)
            done.append(job)
        return done, failures

    def components(self, model: str):
        """Each model loads once per batch; a model that failed to load fails its other jobs at once."""
        if model not in self._models:
            try:
                self._models[model] = load_components(
                    model, self.device, self.dtype, compile=self.compile, allow_pickle=self.allow_pickle
                )
            except MultidiffError as exc:
                self._models[model] = exc
        found = self._models[model]
        if isinstance(found, MultidiffError):
            raise found
        return found

    def _render(self, job: RenderJob, task) -> None:
        scene = _resolved(job.scene)
        if scene.model not in self._models:
            self.progress.update(task, description=f"loading {scene.model}")
        components = self.components(scene.model)
        if self.memory_check:
            views = len(canvas_views(scene, components))
            check_memory(scene, components, scene.max_batch or DEFAULT_MAX_BATCH, views, tiled_decode_on(scene))
        frames: list[Image.Image] = []

        def on_step(i: int, n: int, latents, denoised) -> None:
            self.progress.update(task, description=job.label, completed=i + 1, total=n)
            if self.preview_every and ((i + 1) % self.preview_every == 0 or i + 1 == n):
                frame = decode_scene(components, denoised if denoised is not None else latents, scene)
                write_png(frame, job.target.with_suffix(".steps") / f"step-{i + 1:03d}.png")
                frames.append(frame)

        result = render(scene, components, job.seed, callback=on_step, warn=self.warn)
        for note in result.warnings:
            self.warn(note)
        record = build_metadata(
            scene.model_dump(mode="json", exclude_none=True),
            model=components.model_id, revision=components.revision, device=str(self.device),
            dtype=components.dtype_name, seconds=result.seconds,
            scene_file=job.scene_file,
            scene_dir=str(scene.base_dir),
        )
        write_png(result.image, job.target, record)
        if self.animation and frames:
            write_gif(frames + [result.image], job.target.with_suffix(".gif"))


def write_grid(written: list[tuple[Path, str]], folder: Path) -> Path:
    """A contact sheet of written pictures, each labelled (with its scene and seed)."""
    pictures = []
    for target, label in written:
        with Image.open(target) as image:
            pictures.append((image.convert("RGB"), label))
    stems = {Path(target).stem.rsplit("-", 1)[0] for target, _ in written}
    name = f"{stems.pop()}-grid.png" if len(stems) == 1 else "batch-grid.png"
    return write_png(contact_sheet(pictures), folder / name)


def _resolved(scene: Scene) -> Scene:
    """The scene with its model filled in: the scene's, else $MULTIDIFF_MODEL, else SD2-base."""
    if scene.model is None:
        scene.model = os.environ.get("MULTIDIFF_MODEL") or DEFAULT_MODEL
    return scene


def already_rendered(job: RenderJob, scene: Scene) -> bool:
    """Whether job.target exists and its metadata records this very render (scene, seed, model)."""
    try:
        record = read_metadata(job.target)
    except (OSError, KeyError, ValueError):
        return False
    return record.get("scene") == scene.model_dump(mode="json", exclude_none=True)
