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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; only errors and the output path."),
) -> None:
    """Render SCENE to a PNG whose metadata holds everything needed to render it again."""
    with _user_errors():
        from .models import DEFAULT_MODEL, load_components, pick_device, pick_dtype
        from .output import build_metadata, write_png
        from .render import render as render_scene
        from .scene import load_scene, scene_warnings

        scene = load_scene(scene_path, {"seed": seed, "steps": steps, "bootstrap_steps": bootstrap_steps, "model": model})
        for note in scene_warnings(scene):
            err.print(f"warning: {note}", markup=False)
        scene.seed = secrets.randbelow(SEED_RANGE) if scene.seed is None else scene.seed
        scene.model = scene.model or os.environ.get("MULTIDIFF_MODEL") or DEFAULT_MODEL
        target = output or Path("outputs") / f"{scene_path.stem}-{scene.seed}.png"
        torch_device = pick_device(device or os.environ.get("MULTIDIFF_DEVICE"))
        torch_dtype = pick_dtype(torch_device, dtype)

        with err.status(f"loading {scene.model} on {torch_device}", spinner="dots") if not quiet else _nothing():
            components = load_components(scene.model, torch_device, torch_dtype)
        with _progress(quiet) as progress:
            task = progress.add_task(f"{scene_path.stem} seed {scene.seed}", total=None)
            result = render_scene(
                scene, components, scene.seed, callback=lambda i, n, _x: progress.update(task, completed=i + 1, total=n)
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


@contextmanager
def _nothing():
    yield


def main() -> None:
    """Console-script entry point."""
    app(prog_name="multidiff")


if __name__ == "__main__":
    sys.exit(main())
