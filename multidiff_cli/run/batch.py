"""Run a batch of render jobs: one model load per model, events for progress, failures collected.

`run_batch` is the whole `render` command below the CLI: plan, share the work between the
processes of a distributed launch, render this process's share, gather what every process did.
"""
from __future__ import annotations

import random
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from .. import models
from ..catalog import DEFAULT_MODEL, detect_family, is_single_file
from ..errors import Interrupted, MultidiffError, RenderError, TooLarge
from ..output import OUTPUT_DIR
from ..output.report import size_text
from ..output.png import build_metadata, check_writable, read_metadata, write_gif, write_png
from ..output.preview import contact_sheet
from ..scene import Scene, checked_for
from ..scene.paths import rebase_name, rebase_paths
from ..scene.picture import upright_size
from . import distributed
from .memory import check_memory
from .plan import Failure, RenderJob, free_path, parse_seeds, plan_jobs
from .render import decode_scene, plan_render, render


@dataclass(frozen=True)
class RunSettings:
    """How to run renders, from the command line and the environment (read once, at the edge)."""

    device: str | None = None  # None: the best present
    device_source: str = "--device"  # where `device` came from, for messages ("$MULTIDIFF_DEVICE")
    dtype: str | None = None  # None: float16 on CUDA, else float32
    compile: bool = False
    allow_pickle: bool = False
    skip_existing: bool = False
    overwrite: bool = False  # replace <scene>-<seed>.png rather than pick a free name
    memory_check: bool = True
    offload: bool | None = None  # text encoders on the CPU between renders; None: where the weights need it
    preview_every: int | None = None
    animation: bool = False
    default_model: str = DEFAULT_MODEL  # for scenes that name none


@dataclass(frozen=True)
class BatchRequest:
    """What to render: sources (scenes or PNGs), command-line overrides, seeds, where to write."""

    sources: list[Path]
    overrides: dict[str, Any] = field(default_factory=dict)
    seeds: str | None = None  # "0-3,7"
    output: Path | None = None
    output_dir: Path = OUTPUT_DIR
    grid: bool = False


@dataclass(frozen=True)
class Event:
    """Something a batch reports while it runs. kind: stage (text says what), step (step/steps),
    written (path), skipped (path), failed (failure), warning (text)."""

    kind: str  # stage, step, written, skipped, failed, note, warning
    label: str = ""
    text: str = ""
    step: int = 0
    steps: int = 0
    path: Path | None = None
    failure: Failure | None = None


OnEvent = Callable[[Event], None]


@dataclass
class BatchReport:
    """What a batch did, over every process: written files (path, label), failures, skips, the grid."""

    total: int
    written: list[tuple[Path, str]]
    failures: list[Failure]
    skipped: int
    grid: Path | None
    is_main: bool = True
    distributed: bool = False

    @property
    def exit_code(self) -> int:
        if not self.failures:
            return 0
        return 2 if all(f.exit_code == 2 for f in self.failures) else 1


def run_batch(request: BatchRequest, settings: RunSettings, on_event: OnEvent | None = None) -> BatchReport:
    """Plan and render a batch; under torchrun/accelerate every process renders its share.

    Scene and file problems of single sources are failures in the report (the rest go on);
    problems of the whole request (bad --seeds, clashing outputs) raise."""
    emit = on_event or (lambda _event: None)
    world = distributed.world_from_env()
    distributed.start(world)
    try:
        # random seeds come from one draw on rank 0, so every rank plans the same batch
        rng = random.Random(distributed.share_from_main(world, secrets.randbits(64)))
        jobs, load_failures, notes = plan_jobs(
            request.sources, request.overrides, parse_seeds(request.seeds) if request.seeds else None,
            request.output, request.output_dir, rng, default_model=settings.default_model,
            overwrite=settings.overwrite, allow_pickle=settings.allow_pickle,
        )
        distributed.barrier(world)  # every rank has picked its file names before any is written
        if world.is_main:
            for kind, text in notes:
                emit(Event(kind, text=text))
            for failure in load_failures:
                emit(Event("failed", failure.label, failure=failure))
        mine = [jobs[i] for i in distributed.split_jobs(len(jobs), world.size, world.rank)]
        try:
            done, render_failures, skipped = Renderer(settings, emit).run(mine, contain=world.distributed)
        except Exception as exc:  # this rank cannot render at all (its folder is unwritable, say)
            if not world.distributed:
                raise
            # the other ranks wait in the gather below: report this rank's jobs as failed, never hang them
            error = exc if isinstance(exc, MultidiffError) else RenderError(f"{type(exc).__name__}: {exc}")
            done, render_failures, skipped = [], [Failure(job.label, error) for job in mine], 0
        # every rank waits here for the others, then rank 0 reports the whole batch
        shares = distributed.gather(world, ([(job.target, job.contact_label) for job in done], render_failures, skipped))
    finally:
        distributed.stop(world)
    written = [item for share_done, _, _ in shares for item in share_done]
    failures = load_failures + [failure for _, share_failures, _ in shares for failure in share_failures]
    grid = None
    if world.is_main and request.grid and written:
        grid = write_grid(written, request.output.parent if request.output else request.output_dir)
    return BatchReport(
        total=len(jobs) + len(load_failures), written=written, failures=failures,
        skipped=sum(count for _, _, count in shares), grid=grid, is_main=world.is_main, distributed=world.distributed,
    )


def end_process(report: BatchReport) -> None:
    """A launched process ends here, with the batch's exit code (see distributed.leave)."""
    if report.distributed:
        distributed.leave(report.exit_code)


class Renderer:
    """Renders jobs in order, each model loaded once; a job that fails is recorded and the rest go on."""

    def __init__(self, settings: RunSettings, emit: OnEvent):
        self.settings, self.emit = settings, emit
        self.device = models.pick_device(settings.device, source=settings.device_source)
        models.pick_dtype(self.device, settings.dtype)  # a wrong --dtype is refused before any work
        self._models: dict[tuple[str, str | None], Any] = {}

    def run(self, jobs: list[RenderJob], contain: bool = False) -> tuple[list[RenderJob], list[Failure], int]:
        """Render every job; returns (the jobs whose file exists now, failures, how many were skipped).

        contain: also record unexpected exceptions as the job's failure (in a distributed launch,
        where a rank that raised would leave the others waiting for it)."""
        for folder in sorted({job.target.parent for job in jobs}):
            check_writable(folder)  # before any model is loaded
        done: list[RenderJob] = []
        failures: list[Failure] = []
        try:
            self._run(jobs, done, failures, contain)
        except KeyboardInterrupt as exc:  # what the batch wrote before, and what the job at hand leaves
            written = [job.target for job in done if not job.was_skipped]
            raise Interrupted(getattr(exc, "left", []), written, getattr(exc, "picture", None)) from None
        return done, failures, sum(job.was_skipped for job in done)

    def _run(self, jobs: list[RenderJob], done: list[RenderJob], failures: list[Failure], contain: bool) -> None:
        for number, job in enumerate(jobs, 1):
            label = f"[{number}/{len(jobs)}] {job.label}" if len(jobs) > 1 else job.label
            if self.settings.skip_existing:
                done_as, other_inputs = already_rendered(job)
                if done_as is not None:
                    job.target, job.was_skipped = done_as, True
                    self.emit(Event("skipped", label, path=job.target))
                    done.append(job)
                    continue
                for earlier, changed in other_inputs:
                    self.emit(Event("note", label, text=f"{earlier.name} records this render from other input files "
                                    f"({', '.join(changed)} changed since): rendering it again as {job.target.name}"))
            try:
                self._render(job, label)
            except Exception as exc:
                if not isinstance(exc, MultidiffError) and not contain:
                    raise
                error = exc if isinstance(exc, MultidiffError) else RenderError(f"{type(exc).__name__}: {exc}")
                failure = Failure(job.label, error)
                failures.append(failure)
                self.emit(Event("failed", label, failure=failure))
                continue
            done.append(job)

    def model(self, model: str, config: str | None = None, vae: str | None = None, label: str = "") -> models.Model:
        """Each model (with its configs and `vae:`) loads once per batch; a model that failed to load fails
        its other jobs at once. config: a single-file model's configs (the scene's model_config)."""
        key = _model_key(model, config, vae)
        if key not in self._models:
            family = detect_family(model)
            dtype = models.pick_dtype(self.device, self.settings.dtype,
                                      cuda_default=family.cuda_dtype if family is not None else "float16")
            try:
                offload = self._offload(model, dtype, label)
                self._models[key] = models.load_model(
                    model, self.device, dtype, compile=self.settings.compile,
                    allow_pickle=self.settings.allow_pickle, config=config, vae=vae, offload=offload,
                )
            except MultidiffError as exc:
                self._models[key] = exc
        found = self._models[key]
        if isinstance(found, MultidiffError):
            raise found
        return found

    def _offload(self, model: str, dtype, label: str) -> bool:
        """Whether the text encoders wait on the CPU (--offload; auto: where the weights would not fit the
        device's free memory with them, and do without). A model whose weights cannot fit is refused
        here, before anything loads (TooLarge, exit 2), unless --no-memory-check."""
        asked = self.settings.offload
        sizes = models.weights_bytes(model, dtype) if self.settings.memory_check else None
        free = models.available_bytes(self.device) if sizes else None
        if not sizes or free is None:
            return bool(asked)
        text = sum(size for part, size in sizes.items() if part.startswith("text_encoder"))
        total = sum(sizes.values())
        offload = asked if asked is not None else (self.device.type != "cpu" and total > 0.9 * free and
                                                    total - text <= 0.9 * free)
        if offload and asked is None:
            self.emit(Event("note", label, text=f"the text encoders wait on the CPU between renders (--offload): "
                            f"with them the weights take {size_text(total)}, {size_text(free)} is free"))
        need = total - text if offload and self.device.type != "cpu" else total
        if need > 0.9 * free:
            dtype_name = str(dtype).removeprefix("torch.")
            advice = "--dtype bfloat16 (half of float32)" if dtype_name == "float32" else "a device with more memory"
            raise TooLarge(f"{model}'s weights take about {size_text(need)} in {dtype_name}, but {self.device} has "
                           f"{size_text(free)} free: use {advice}"
                           f"{'' if offload or not text or self.device.type == 'cpu' else ', or --offload'}; "
                           "--no-memory-check loads anyway")  # on the CPU, offloading to it saves nothing
        return offload

    def _render(self, job: RenderJob, label: str) -> None:
        scene = job.scene
        loading = _model_key(scene.model, scene.model_config_, scene.vae) not in self._models
        if loading:
            self.emit(Event("stage", label, text=f"loading {job.model_given or scene.model}"))
        model = self.model(scene.model, scene.model_config_, scene.vae, label)
        scene = checked_for(scene, model.facts, job.source.name, model.few_step_model)  # its family's, if not yet
        if loading and scene.model_config_ and not is_single_file(scene.model):
            self.emit(Event("note", label, text=f"model_config {scene.model_config_} is ignored: it gives the "
                            f"configs of a single-file checkpoint, and {job.model_given or scene.model} is not one"))
        plan = plan_render(scene, model)
        if plan.few_step and scene.few_step == "auto":
            self.emit(Event("note", label, text=f"few_step: auto is on, as {job.model_given or scene.model} is a "
                            "few-step distilled model (quantized masks, mask-centering bootstrapping)"))
        if self.settings.memory_check:
            check_memory(scene, model, plan)
        frames: list[Image.Image] = []
        previews: list[Path] = []
        every = self.settings.preview_every

        def on_step(i: int, n: int, latents: torch.Tensor, denoised: torch.Tensor | None) -> None:
            self.emit(Event("step", label, step=i + 1, steps=n))
            if every and ((i + 1) % every == 0 or i + 1 == n):
                frame = decode_scene(model, denoised if denoised is not None else latents, plan)
                previews.append(write_png(frame, job.target.with_suffix(".steps") / f"step-{i + 1:03d}.png"))
                frames.append(frame)

        try:
            result = render(
                scene, model, job.seed, plan=plan, callback=on_step,
                warn=lambda note: self.emit(Event("warning", label, text=note)),
                on_stage=lambda what: self.emit(Event("stage", label, text=what)),
                allow_pickle=self.settings.allow_pickle,
            )
        except KeyboardInterrupt:
            raise Interrupted(previews) from None
        for note in result.warnings:
            self.emit(Event("warning", label, text=note))
        recorded, inputs = recorded_scene(scene, job)
        record = build_metadata(
            recorded, family=model.family, revision=model.revision, device=str(self.device),
            dtype=model.dtype_name, seconds=result.seconds, scene_file=job.scene_file, inputs=inputs,
            init_image=init_image_record(scene, job.inputs, recorded),
            unet_batch={"samples_per_call": plan.samples_per_call, "auto": plan.auto_batch},
            windows=windows_record(plan, scene.cell_px),
        )
        write_png(result.image, job.target, record)
        self.emit(Event("written", label, path=job.target))  # its path printed the moment it is complete
        if self.settings.animation and frames:
            try:
                write_gif(frames + [result.image], job.target.with_suffix(".gif"))
            except KeyboardInterrupt:
                raise Interrupted(previews, picture=job.target) from None


def recorded_scene(scene: Scene, job: RenderJob) -> tuple[dict[str, Any], dict[str, str]]:
    """The scene as the job's PNG records it, and its input files' hashes: every local path (masks, init
    image, LoRAs, a local model) rewritten relative to the picture's folder, where a re-render resolves
    them (output.png.build_metadata)."""
    folder = job.target.parent
    dump = rebase_paths(scene.model_dump(mode="json", exclude_none=True), scene.base_dir, folder)
    return dump, {rebase_name(name, scene.base_dir, folder): digest for name, digest in job.inputs.items()}


def init_image_record(scene: Scene, inputs: dict[str, str], recorded: dict[str, Any]) -> dict[str, Any] | None:
    """The init image as the PNG records it: its path (as recorded), its size (upright) and sha256."""
    if scene.init_image is None:
        return None
    width, height = upright_size(scene.init_image_path)
    return {"path": recorded["init_image"], "width": width, "height": height, "sha256": inputs.get(scene.init_image)}


def _model_key(model: str, config: str | None, vae: str | None) -> tuple:
    """A loaded model is known by its name, for a single file also by the configs it was read with, and
    by the VAE that replaced its own."""
    return model, config, vae


def write_grid(written: list[tuple[Path, str]], folder: Path) -> Path:
    """A contact sheet of written pictures, each labelled (with its scene and seed)."""
    pictures = []
    for target, label in written:
        with Image.open(target) as image:
            pictures.append((image.convert("RGB"), label))
    stems = {Path(target).stem.rsplit("-", 1)[0] for target, _ in written}
    name = f"{stems.pop()}-grid.png" if len(stems) == 1 else "batch-grid.png"
    return write_png(contact_sheet(pictures), free_path(folder / name, set())[0])


def already_rendered(job: RenderJob) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """The existing file of this job's name whose metadata records this very render (scene, seed,
    model, and the same input files by hash), or None; and the files that record the same scene from
    input files that changed since, each with those files' names (why they are not this render)."""
    scene, inputs = recorded_scene(job.scene, job)
    other_inputs = []
    for path in job.earlier:
        try:
            record = read_metadata(path)
        except MultidiffError:
            continue
        if record.get("scene") != scene:
            continue
        recorded = record.get("inputs", {})
        if recorded == inputs:
            return path, []
        other_inputs.append((path, sorted(name for name in {*recorded, *inputs} if recorded.get(name) != inputs.get(name))))
    return None, other_inputs


def windows_record(plan, cell_px: int) -> dict | None:
    """The region windows a render ran, for its record: each windowed region's [x0, y0, x1, y1] in pixels, and the
    regions' latent cells per step with the windows and without (None without windows)."""
    if not plan.windows:
        return None
    boxes = {f"regions[{p - 1}]": [v.left * cell_px, v.top * cell_px, (v.left + v.width) * cell_px,
                                   (v.top + v.height) * cell_px] for p, v in sorted(plan.windows.items())}
    windowed, canvas = plan.region_cells
    return {"boxes": boxes, "region_cells_per_step": windowed, "without_windows": canvas}
