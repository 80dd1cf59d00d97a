"""The `multidiff` command: parse, call, and turn errors into messages and exit codes. No math here."""
from __future__ import annotations

import os
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
from .errors import MultidiffError, SceneError

app = typer.Typer(
    help="Compose images from a YAML scene with MultiDiffusion (region prompts) on Stable Diffusion.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)

SEED_RANGE = 2**32  # random seeds are drawn below this, as A1111 and ComfyUI do: short enough to type


def _version(value: bool) -> None:
    if value:
        typer.echo(f"multidiff {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Compose images from a YAML scene with MultiDiffusion (region prompts) on Stable Diffusion."""


@contextmanager
def _user_errors():
    """Domain errors -> one line each on stderr and their exit code (2 bad input, 1 runtime); Ctrl-C -> 130."""
    try:
        yield
    except MultidiffError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            err.print(line if isinstance(exc, SceneError) else f"error: {line}", markup=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted: nothing was written", markup=False)
        raise typer.Exit(130) from None


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.2f} it/s" if task.speed else "-- it/s", style="progress.data.speed")


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=quiet,
        transient=False,
    )


@app.command()
def render(
    scene_path: Path = typer.Argument(..., metavar="SCENE", help="Scene YAML file."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="PNG to write [default: outputs/<scene>-<seed>.png]."
    ),
    model: Optional[str] = typer.Option(
        None, "--model", help="Hub id, local diffusers folder, or tiny-random [default: the scene's, else SD2-base]."
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="Overrides the scene's seed."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Overrides the scene's steps."),
    bootstrap_steps: Optional[int] = typer.Option(None, "--bootstrap-steps", help="Overrides the scene's bootstrap_steps."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:1, mps or cpu [default: the best present]."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="float32, float16 or bfloat16 [default: float16 on CUDA, else float32]."
    ),
    max_batch: Optional[int] = typer.Option(
        None, "--max-batch", help="At most this many UNet samples per call (less memory) [default: the scene's, else all]."
    ),
    compile_unet: bool = typer.Option(False, "--compile", help="torch.compile the UNet (slow first step, faster after)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; only errors and the output path."),
) -> None:
    """Render SCENE to a PNG whose metadata holds everything needed to render it again."""
    with _user_errors():
        from .models import DEFAULT_MODEL, load_components, pick_device, pick_dtype
        from .output import build_metadata, write_png
        from .render import render as render_scene
        from .scene import load_scene, scene_warnings

        scene = load_scene(scene_path, {"seed": seed, "steps": steps, "bootstrap_steps": bootstrap_steps, "model": model, "max_batch": max_batch})
        for note in scene_warnings(scene):
            err.print(f"warning: {note}", markup=False)
        scene.seed = secrets.randbelow(SEED_RANGE) if scene.seed is None else scene.seed
        scene.model = scene.model or os.environ.get("MULTIDIFF_MODEL") or DEFAULT_MODEL
        target = output or Path("outputs") / f"{scene_path.stem}-{scene.seed}.png"
        torch_device = pick_device(device or os.environ.get("MULTIDIFF_DEVICE"))
        torch_dtype = pick_dtype(torch_device, dtype)

        with err.status(f"loading {scene.model} on {torch_device}", spinner="dots") if not quiet else _nothing():
            components = load_components(scene.model, torch_device, torch_dtype, compile=compile_unet)
        with _progress(quiet) as progress:
            task = progress.add_task(f"{scene_path.stem} seed {scene.seed}", total=None)
            result = render_scene(
                scene,
                components,
                scene.seed,
                callback=lambda i, n, _x: progress.update(task, completed=i + 1, total=n),
                warn=lambda note: err.print(f"warning: {note}", markup=False),
            )
        for note in result.warnings:
            err.print(f"warning: {note}", markup=False)
        record = build_metadata(
            scene.model_dump(mode="json", exclude_none=True),
            model=components.model_id,
            revision=components.revision,
            device=str(torch_device),
            dtype=str(torch_dtype).removeprefix("torch."),
            seconds=result.seconds,
        )
        written = write_png(result.image, target, record)
        typer.echo(str(written))


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

        from .bench import BenchConfig, run_bench, run_width_sweep
        from .errors import UsageError
        from .models import pick_device, pick_dtype
        from .schedulers import SCHEDULER_NAMES

        if model not in ("sd2-random", "tiny-random"):
            raise UsageError(f"--model: the bench builds its own random model: sd2-random or tiny-random, not {model!r}")
        if scheduler not in SCHEDULER_NAMES:
            raise UsageError(f"--scheduler: choose one of {', '.join(SCHEDULER_NAMES)}")
        torch_device = pick_device(device or os.environ.get("MULTIDIFF_DEVICE"))
        torch_dtype = pick_dtype(torch_device, dtype)
        on_cuda = torch_device.type == "cuda"
        size = size or (512 if on_cuda else 256)
        steps = steps or (50 if on_cuda else 4)
        if size % 8 or size < 64:
            raise UsageError("--size: a multiple of 8, at least 64")
        if bootstrap_steps > steps:
            raise UsageError("--bootstrap-steps: at most --steps")
        config = BenchConfig(
            model=model, size_px=size, regions=regions, steps=steps, bootstrap_steps=bootstrap_steps,
            scheduler=scheduler, device=str(torch_device), dtype=str(torch_dtype).removeprefix("torch."),
            compile=compile_unet, max_batch=max_batch,
        )
        if widths:
            try:
                sweep = [int(w) for w in widths.split(",")]
            except ValueError:
                raise UsageError("--widths: comma-separated pixel widths, e.g. 512,1024,2048") from None
            if any(w % 8 or w < 64 for w in sweep):
                raise UsageError("--widths: each a multiple of 8, at least 64")
            with err.status(f"benchmarking widths {widths} on {torch_device}", spinner="dots"):
                report = {"config": asdict(config), "widths": run_width_sweep(config, sweep)}
            _print_sweep(report)
        else:
            with err.status(f"benchmarking on {torch_device}: two paths, each in its own process", spinner="dots"):
                report = run_bench(config)
            _print_bench(report)
        if json_path:
            json_path.write_text(json.dumps(report, indent=2) + "\n")


def _print_sweep(report: dict) -> None:
    from rich.table import Table

    config = report["config"]
    table = Table(title=f"multidiff, {config['model']}, height {config['size_px']}, {config['regions']} regions, "
                        f"{config['steps']} steps, {config['dtype']} on {config['device']}")
    for column in ("width px", "views", "UNet samples/step", "s/step", "peak memory"):
        table.add_column(column, justify="right")
    for row in report["widths"]:
        table.add_row(str(row["width_px"]), str(row["views"]), f"{row['unet_samples_per_step']:.1f}",
                      f"{row['seconds_per_step']:.3f}", f"{row['peak_memory_bytes'] / 2**30:.2f} GiB")
    Console().print(table)


def _print_bench(report: dict) -> None:
    from rich.table import Table

    config = report["config"]
    table = Table(title=(
        f"{config['model']} {config['size_px']}x{config['size_px']}, {config['regions']} regions, "
        f"{config['steps']} steps ({config['bootstrap_steps']} bootstrap), {config['scheduler']}, "
        f"{config['dtype']} on {config['device']} ({report['device_name']}, {report['torch_threads']} threads)"
    ))
    for column in ("path", "UNet samples/step", "s/step", "sampling s", "non-UNet share", "peak memory"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for name, label in (("reference", "authors' per-prompt loop"), ("multidiff", "multidiff")):
        p = report["paths"][name]
        table.add_row(
            label, f"{p['unet_samples_per_step']:.2f}", f"{p['seconds_per_step']:.3f}", f"{p['sampling_seconds']:.2f}",
            f"{p['non_unet_share']:.1%}", f"{p['peak_memory_bytes'] / 2**30:.2f} GiB",
        )
    Console().print(table)
    typer.echo(
        f"multidiff / reference: sampling time {report['sampling_time_ratio']:.3f}, step time "
        f"{report['step_time_ratio']:.3f}, UNet samples {report['unet_samples_ratio']:.3f}; "
        f"final latents' relative difference {report['relative_difference']:.2e}"
    )


@contextmanager
def _nothing():
    yield


def main() -> None:
    """Console-script entry point."""
    app(prog_name="multidiff")


if __name__ == "__main__":
    sys.exit(main())
