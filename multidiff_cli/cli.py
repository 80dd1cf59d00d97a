"""The `multidiff` command: parse, call, and turn errors into messages and exit codes. No math here."""
from __future__ import annotations

import os
import random
import secrets
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from . import __version__
from .errors import MultidiffError, SceneError, UsageError

app = typer.Typer(
    help="Compose images from a YAML scene with MultiDiffusion (region prompts) on Stable Diffusion.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"multidiff {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Compose images from a YAML scene with MultiDiffusion (region prompts) on Stable Diffusion."""


def _say(lines: list[str], prefix: str = "") -> None:
    for line in lines:
        err.print(f"{prefix}{line}", markup=False)


def _error_lines(exc: MultidiffError) -> list[str]:
    lines = str(exc).splitlines() or [type(exc).__name__]
    return lines if isinstance(exc, SceneError) else [f"error: {line}" for line in lines]


@contextmanager
def _user_errors():
    """Domain errors -> one line each on stderr and their exit code (2 bad input, 1 runtime); Ctrl-C -> 130."""
    try:
        yield
    except MultidiffError as exc:
        _say(_error_lines(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted: no partial file was left", markup=False)
        raise typer.Exit(130) from None


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.2f} it/s" if task.speed else "-- it/s", style="progress.data.speed")


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(), TimeRemainingColumn(),
        console=err, disable=quiet,
    )


@app.command()
def render(
    sources: list[Path] = typer.Argument(..., metavar="SCENE|IMAGE.png...", help="Scene files, or PNGs to render again."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG to write, for a single render."),
    output_dir: Path = typer.Option(Path("outputs"), "--output-dir", help="Folder for <scene>-<seed>.png files."),
    model: Optional[str] = typer.Option(
        None, "--model", help="Hub id, local diffusers folder, or tiny-random [default: the scene's, else "
        "$MULTIDIFF_MODEL, else SD2-base]."
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="Overrides the scene's seed."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="One render per seed: 0-3,7."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Overrides the scene's steps."),
    bootstrap_steps: Optional[int] = typer.Option(None, "--bootstrap-steps", help="Overrides bootstrap_steps."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="Overrides guidance_scale."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Overrides the scheduler."),
    size: Optional[str] = typer.Option(None, "--size", help="Overrides the canvas: WIDTHxHEIGHT, e.g. 768x512."),
    device: Optional[str] = typer.Option(
        None, "--device", help="cuda, cuda:1, mps or cpu [default: $MULTIDIFF_DEVICE, else the best present]."
    ),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="float32, float16 or bfloat16 [default: float16 on CUDA, else float32]."
    ),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="At most this many UNet samples per call."),
    compile_unet: bool = typer.Option(False, "--compile", help="torch.compile the UNet (slow first step, faster after)."),
    grid: bool = typer.Option(False, "--grid", help="Also write a contact sheet of the batch, labelled with seeds."),
    preview_every: Optional[int] = typer.Option(
        None, "--preview-every", min=1, help="Write the decoded picture every N steps to <output>.steps/."
    ),
    animation: bool = typer.Option(False, "--animation", help="With --preview-every: also write <output>.gif."),
    skip_existing: bool = typer.Option(
        False, "--skip-existing", help="Skip outputs whose metadata already records this render (resume a batch)."
    ),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Also load pickle .bin weights (they can run code): trusted models only."
    ),
    no_memory_check: bool = typer.Option(
        False, "--no-memory-check", help="Render even when the memory estimate says it will not fit."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display; only errors and output paths."),
) -> None:
    """Render scenes (or PNGs made by multidiff, again) to PNGs whose metadata holds everything needed
    to render them again. A failing render does not stop the rest of a batch."""
    with _user_errors():
        from . import distributed
        from .batch import write_grid
        from .jobs import parse_seeds, parse_size, plan_jobs

        if seed is not None and seeds:
            raise UsageError("--seed and --seeds: give one of them")
        if animation and not preview_every:
            raise UsageError("--animation needs --preview-every N")
        overrides = {
            "seed": seed, "steps": steps, "bootstrap_steps": bootstrap_steps, "guidance_scale": guidance_scale,
            "scheduler": scheduler, "model": model, "max_batch": max_batch,
        }
        if size:
            overrides["width"], overrides["height"] = parse_size(size)
        world = distributed.world_from_env()
        distributed.start(world)
        try:
            # random seeds come from one draw on rank 0, so every rank plans the same batch
            rng = random.Random(distributed.share_from_main(world, secrets.randbits(64)))
            jobs, load_failures = plan_jobs(
                sources, overrides, parse_seeds(seeds) if seeds else None, output, output_dir, rng
            )
            if world.is_main:
                for failure in load_failures:
                    _say(failure.lines)
            mine = [jobs[i] for i in distributed.split_jobs(len(jobs), world.size, world.rank)]
            done, render_failures, skipped = [], [], []
            if mine:
                from .batch import Batch

                settings = {
                    "device": distributed.device_for(world, device or os.environ.get("MULTIDIFF_DEVICE")),
                    "dtype": dtype, "compile": compile_unet, "allow_pickle": allow_pickle,
                    "skip_existing": skip_existing, "memory_check": not no_memory_check,
                }
                with _progress(quiet or not world.is_main) as progress:
                    batch = Batch(mine, settings, progress, preview_every, animation,
                                  warn=lambda note: _say([note], "warning: "))
                    done, render_failures = batch.run(
                        on_written=lambda path: out.print(str(path), markup=False),
                        on_failed=lambda failure: _say(failure.lines),
                        on_skipped=lambda path: (skipped.append(path), _say([f"skipped {path}: already rendered"])),
                    )
            # every rank waits here for the others, then rank 0 reports the whole batch
            shares = distributed.gather(
                world, ([(job.target, job.contact_label) for job in done], render_failures, len(skipped))
            )
            written = [item for share_done, _, _ in shares for item in share_done]
            failures = load_failures + [failure for _, share_failures, _ in shares for failure in share_failures]
            skips = sum(count for _, _, count in shares)
            if world.is_main:
                if grid and written:
                    out.print(str(write_grid(written, output.parent if output else output_dir)), markup=False)
                total = len(jobs) + len(load_failures)
                if total > 1:
                    also = f" ({skips} already there, skipped)" if skips else ""
                    err.print(f"rendered {len(written) - skips} of {total}{also}", markup=False)
                    for failure in failures:
                        err.print(f"  failed: {failure.label}: {failure.lines[0]}", markup=False)
        finally:
            distributed.stop(world)
        code = (2 if all(f.exit_code == 2 for f in failures) else 1) if failures else 0
        if world.distributed:
            distributed.leave(code)
        if code:
            raise typer.Exit(code)


@app.command()
def validate(scenes: list[Path] = typer.Argument(..., metavar="SCENE...", help="Scene files.")) -> None:
    """Check scenes without loading a model: schema, mask files, sizes. Exit 0 if all are valid, else 2."""
    from .scene import load_scene, scene_warnings

    bad = False
    for path in scenes:
        try:
            scene = load_scene(path)
        except SceneError as exc:
            _say(exc.problems)
            bad = True
            continue
        _say(scene_warnings(scene), prefix=f"{path}: warning: ")
        count = len(scene.regions)
        out.print(f"{path}: ok ({count} region{'' if count == 1 else 's'}, {scene.width}x{scene.height})", markup=False)
    if bad:
        raise typer.Exit(2)


@app.command()
def preview(
    scene_path: Path = typer.Argument(..., metavar="SCENE", help="Scene file."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="[default: outputs/<scene>-layout.png]"),
) -> None:
    """Draw the scene's layout (regions in colour, labelled), without loading any model."""
    with _user_errors():
        from .output import write_png
        from .preview import draw_layout
        from .scene import load_scene, scene_warnings

        scene = load_scene(scene_path)
        _say(scene_warnings(scene), prefix="warning: ")
        target = output or Path("outputs") / f"{scene_path.stem}-layout.png"
        out.print(str(write_png(draw_layout(scene), target)), markup=False)


@app.command()
def init(
    path: Path = typer.Argument(Path("scene.yaml"), help="Where to write the starter scene."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented starter scene: every key, with its default."""
    with _user_errors():
        from .starter import STARTER_SCENE

        if path.is_dir():
            raise UsageError(f"{path} is a directory: name the scene file to write, e.g. {path / 'scene.yaml'}")
        if path.exists() and not force:
            raise UsageError(f"{path} exists: pass --force to overwrite it")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(STARTER_SCENE, encoding="utf-8")
        out.print(str(path), markup=False)


@app.command()
def inspect(
    image: Path = typer.Argument(..., metavar="IMAGE.png", help="A PNG written by multidiff."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw metadata record as JSON."),
) -> None:
    """Print what a PNG was rendered from: the resolved scene as YAML, then model, seed, versions."""
    with _user_errors():
        import json

        from .output import read_metadata
        from .report import metadata_text

        try:
            record = read_metadata(image)
        except FileNotFoundError:
            raise UsageError(f"{image}: no such file") from None
        except KeyError:
            raise UsageError(f"{image}: holds no multidiff metadata") from None
        except OSError as exc:
            raise UsageError(f"{image}: not a PNG Pillow can read ({exc})") from None
        out.print(json.dumps(record, indent=2, ensure_ascii=False) if as_json else metadata_text(record), markup=False)


@app.command()
def models(
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="[default: the Hugging Face cache, HF_HOME]"),
) -> None:
    """List the models in the local Hugging Face cache, and whether multidiff can load each."""
    with _user_errors():
        from .models import cached_models

        found = cached_models(cache_dir)
        for repo_id, revision, size_bytes, problem in found:
            status = "ok" if problem is None else f"cannot load: {problem}"
            typer.echo(f"{repo_id}\t{revision[:12]}\t{size_bytes / 2**30:.1f} GB\t{status}")  # tabs kept for cut/awk
        if not found:
            err.print("no diffusers models in the Hugging Face cache", markup=False)


@app.command()
def smoke(
    scenes_dir: Path = typer.Option(Path("scenes"), "--scenes", help="Folder of scenes to render."),
    steps: int = typer.Option(2, "--steps", min=1, max=50, help="Steps per scene."),
    model: Optional[str] = typer.Option(
        None, "--model", help="[default: $MULTIDIFF_MODEL if a folder, else SD2-base if cached, else tiny-random]"
    ),
    device: Optional[str] = typer.Option(None, "--device", help="[default: the best present]"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="[default: float16 on CUDA, else float32]"),
    output_dir: Path = typer.Option(Path("outputs/smoke"), "--output-dir", help="Where the pictures go."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """Render every scene in a few steps, check each picture (size, not black, metadata), print a table.
    Exit 1 if any scene fails. For CI on GPU runners."""
    with _user_errors():
        from rich.table import Table

        from .smoke import example_scenes, run_smoke, smoke_model

        scenes = example_scenes(scenes_dir)
        chosen = model or smoke_model()
        settings = {"device": device or os.environ.get("MULTIDIFF_DEVICE"), "dtype": dtype}
        with _progress(quiet) as progress:
            results = run_smoke(scenes, output_dir, steps, chosen, settings, progress)
        table = Table(title=f"smoke: {len(scenes)} scenes, {steps} steps, {chosen}")
        for column in ("scene", "size", "seconds", "result"):
            table.add_column(column, justify="right" if column == "seconds" else "left")
        for result in results:
            verdict = "ok" if result.problem is None else f"FAILED: {result.problem}"
            table.add_row(result.scene, result.size, f"{result.seconds:.1f}", verdict)
        out.print(table)
        if any(result.problem for result in results):
            raise typer.Exit(1)


@app.command()
def bench(
    model: str = typer.Option("sd2-random", "--model", help="sd2-random (full-size SD2-base shapes) or tiny-random."),
    size: Optional[int] = typer.Option(None, "--size", help="Square canvas in pixels [default: 512 on CUDA, 256 else]."),
    regions: int = typer.Option(3, "--regions", min=0, max=16, help="Regions besides the global prompt."),
    steps: Optional[int] = typer.Option(None, "--steps", min=2, help="Steps [default: 50 on CUDA, 4 else]."),
    bootstrap_steps: int = typer.Option(0, "--bootstrap-steps", min=0, help="Bootstrap steps (all prompts' passes differ)."),
    scheduler: str = typer.Option("ddim", "--scheduler", help="Scheduler name, as in scenes."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, mps or cpu [default: the best present]."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 [default: as render]."),
    compile_unet: bool = typer.Option(False, "--compile", help="torch.compile the UNet."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", min=1, help="UNet samples per call."),
    widths: Optional[str] = typer.Option(
        None, "--widths", help="Comma-separated canvas widths: time multidiff alone as views grow (panoramas)."
    ),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON here."),
) -> None:
    """Time multidiff's sampler against the authors' per-prompt loop on random SD2-shaped weights."""
    with _user_errors():
        import json
        from dataclasses import asdict

        from .bench import bench_config, parse_widths, run_bench, run_width_sweep
        from .report import bench_summary, bench_table, sweep_table

        config = bench_config(
            model=model, size=size, regions=regions, steps=steps, bootstrap_steps=bootstrap_steps, scheduler=scheduler,
            device=device or os.environ.get("MULTIDIFF_DEVICE"), dtype=dtype, compile=compile_unet, max_batch=max_batch,
        )
        torch_device = config.device
        if widths:
            sweep = parse_widths(widths)
            with err.status(f"benchmarking widths {widths} on {torch_device}", spinner="dots"):
                report = {"config": asdict(config), "widths": run_width_sweep(config, sweep)}
            out.print(sweep_table(report))
        else:
            with err.status(f"benchmarking on {torch_device}: two paths, each in its own process", spinner="dots"):
                report = run_bench(config)
            out.print(bench_table(report))
            out.print(bench_summary(report), markup=False)
        if json_path:
            json_path.write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="multidiff")


if __name__ == "__main__":
    sys.exit(main())
