"""The `multidiff` command: parse, call, print, and turn domain errors into lines and exit codes.

Exit codes: 0 done, 1 a runtime failure, 2 a user mistake (scene, option, input file), 130 Ctrl-C.
The environment ($MULTIDIFF_MODEL, $MULTIDIFF_DEVICE) is read here and nowhere else."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .. import __version__
from ..errors import UsageError
from ..output import OUTPUT_DIR
from ..output.console import ProgressDisplay, err, out, print_path, print_summary, say
from ..run import UPSCALE_SCALE, UPSCALE_STRENGTH
from .edge import PlainHelpCommand as _Command
from .edge import env_device as _env_device
from .edge import env_model, env_named_model, run_command
from .edge import user_errors as _user_errors

app = typer.Typer(
    help="Compose images from a YAML scene with MultiDiffusion (region prompts) on Stable Diffusion.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"multidiff {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Compose images from a YAML scene with MultiDiffusion (region prompts) on Stable Diffusion."""


@app.command(cls=_Command)
def render(
    sources: list[Path] = typer.Argument(..., metavar="SCENE|IMAGE.png", help="Scene files, or PNGs to render again."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG to write, for a single render."),
    output_dir: Path = typer.Option(OUTPUT_DIR, "--output-dir", help="Folder for <scene>-<seed>.png files."),
    model: Optional[str] = typer.Option(None, "--model", help="Hub id, diffusers folder, .safetensors file or "
                                        "tiny-random [default: the scene's, else $MULTIDIFF_MODEL, else SD2-base]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Overrides the scene's seed."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="One render per seed: 0-3,7."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Overrides the scene's steps."),
    bootstrap_steps: Optional[int] = typer.Option(None, "--bootstrap-steps", help="Overrides bootstrap_steps."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="Overrides guidance_scale."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Overrides the scheduler."),
    size: Optional[str] = typer.Option(None, "--size", help="Overrides the canvas: WIDTHxHEIGHT, e.g. 768x512."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:1, mps or cpu "
                                         "[default: $MULTIDIFF_DEVICE, else the best present]."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 "
                                        "[default: float16 on CUDA, else float32]."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="UNet samples per call, at most "
                                            "[default: auto, what this device runs fastest]."),
    compile_unet: bool = typer.Option(False, "--compile", help="torch.compile the UNet (slow first step, faster after)."),
    grid: bool = typer.Option(False, "--grid", help="Also write a contact sheet of the batch, labelled with seeds."),
    preview_every: Optional[int] = typer.Option(None, "--preview-every", min=1,
                                                help="Write the decoded picture every N steps to <output>.steps/."),
    animation: bool = typer.Option(False, "--animation", help="With --preview-every: also write <output>.gif."),
    skip_existing: bool = typer.Option(False, "--skip-existing",
                                       help="Skip outputs whose metadata already records this render (resume a batch)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace <scene>-<seed>.png where it exists "
                                   "[default: a free name, <scene>-<seed>-2.png]."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                      help="Also load pickle weights (.bin, .ckpt, .pt): they can run code."),
    offload: Optional[bool] = typer.Option(None, "--offload/--no-offload", help="Keep the text encoders on the CPU "
                                           "but while they encode [default: where the weights need it]."),
    no_memory_check: bool = typer.Option(False, "--no-memory-check",
                                         help="Render even when the memory estimate says it will not fit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display; only errors and output paths."),
) -> None:
    """Render scenes (or PNGs made by multidiff, again) to PNGs whose metadata holds everything needed
    to render them again. A failing render does not stop the rest of a batch."""
    with _user_errors():
        from ..run.batch import BatchRequest, RunSettings, end_process, run_batch
        from ..run.plan import parse_size

        if seed is not None and seeds:
            raise UsageError("--seed and --seeds: give one of them")
        if animation and not preview_every:
            raise UsageError("--animation needs --preview-every N")
        overrides = {"seed": seed, "steps": steps, "bootstrap_steps": bootstrap_steps, "guidance_scale": guidance_scale,
                     "scheduler": scheduler, "model": model, "max_batch": max_batch}
        if size:
            overrides["width"], overrides["height"] = parse_size(size)
        request = BatchRequest(sources, overrides, seeds, output, output_dir, grid)
        settings = RunSettings(
            **_env_device(device), dtype=dtype, compile=compile_unet, allow_pickle=allow_pickle,
            skip_existing=skip_existing, overwrite=overwrite, memory_check=not no_memory_check, offload=offload,
            preview_every=preview_every,
            animation=animation, default_model=env_model(),
        )
        batch = len(sources) > 1 or bool(seeds)
        with ProgressDisplay(quiet, labelled_failures=batch) as display:
            report = run_batch(request, settings, display)
        if report.is_main:
            print_summary(report)
    end_process(report)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


@app.command(cls=_Command)
def upscale(
    image: Path = typer.Argument(..., help="The picture to upscale (a PNG made by multidiff reuses its prompts)."),
    scale: float = typer.Option(UPSCALE_SCALE, "--scale", help="Times the picture's width and height."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="What it shows [default: a multidiff PNG's own]."),
    strength: float = typer.Option(UPSCALE_STRENGTH, "--strength", help="How far to re-noise it: more adds more new detail."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Steps, of which strength x steps run [default: 50]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="[default: random, written into the scene]"),
    model: Optional[str] = typer.Option(None, "--model", help="[default: the PNG's, else as render]"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG to write (the scene goes beside it)."),
    output_dir: Path = typer.Option(OUTPUT_DIR, "--output-dir", help="Folder for the scene and the picture."),
    device: Optional[str] = typer.Option(None, "--device", help="[default: $MULTIDIFF_DEVICE, else the best present]"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """Render IMAGE larger through a scene written beside the output (the picture as init image, views)."""
    with _user_errors():
        from ..run.batch import RunSettings
        from ..run.upscale import UpscaleRequest, run_upscale

        request = UpscaleRequest(image, scale, prompt, strength, steps, seed, model, output, output_dir)
        settings = RunSettings(**_env_device(device), default_model=env_model())
        with ProgressDisplay(quiet) as display:
            scene_path, report = run_upscale(request, settings, display)
        if report.written:
            print_path(scene_path)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


@app.command(cls=_Command)
def validate(
    scenes: list[Path] = typer.Argument(..., metavar="SCENE|IMAGE.png", help="Scene files, or PNGs made by "
                                        "multidiff (their recorded scene)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Pickle LoRAs pass, as render --allow-pickle loads them."),
    model: Optional[str] = typer.Option(None, "--model", help="Check for this model, as render --model renders "
                                        "(its family's checks) [default: the scene's]."),
) -> None:
    """Check scenes as render does before loading a model: schema, files (masks, pictures, LoRAs, control
    images), sizes, what the model's family needs. Exit 0 if all are valid, else 2."""
    from ..run.workflow import validate_sources

    lines = validate_sources(scenes, env_model(), allow_pickle, model)
    _print(lines)
    if lines.failed:
        raise typer.Exit(2)


@app.command(cls=_Command)
def preview(
    scene_path: Path = typer.Argument(..., metavar="SCENE|IMAGE.png", help="Scene file, or a PNG made by multidiff."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="[default: outputs/<scene>-layout.png, "
                                          "or -2, -3, ... where that exists]"),
) -> None:
    """Draw the scene's layout (regions in colour, labelled, a numbered legend), without loading any model."""
    with _user_errors():
        from ..run.workflow import write_layout

        written, warnings = write_layout(scene_path, output, env_model())
        say(warnings)
        print_path(written)


@app.command(cls=_Command)
def init(
    path: Path = typer.Argument(Path("scene.yaml"), help="Where to write the starter scene."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented starter scene: every key, with its default."""
    with _user_errors():
        from ..run.workflow import starter_scene

        print_path(starter_scene(path, force))


@app.command(cls=_Command)
def inspect(
    image: Path = typer.Argument(..., metavar="IMAGE.png", help="A PNG written by multidiff."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw metadata record as JSON."),
    save_scene: Optional[Path] = typer.Option(None, "--save-scene", help="Also write the scene as a YAML file "
                                              "here, its mask paths rewritten to work from that folder."),
) -> None:
    """Print what a PNG was rendered from: the resolved scene as YAML, the run, the files it names as
    found from the picture's folder."""
    with _user_errors():
        from ..run.workflow import inspect_picture

        _print(inspect_picture(image, as_json, save_scene))


@app.command(cls=_Command)
def models(
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="[default: the Hugging Face cache, HF_HOME]"),
) -> None:
    """List the models in the local Hugging Face cache, and whether multidiff can load each."""
    with _user_errors():
        from ..run.workflow import cached_model_lines

        _print(cached_model_lines(cache_dir), plain=True)


@app.command(cls=_Command)
def edit(
    scene: Path = typer.Argument(..., metavar="SCENE|NEW.yaml|IMAGE.png", help="The scene file to edit (a new one "
                                 "starts from the starter scene; a PNG's scene is written to a new file beside it)."),
    model: Optional[str] = typer.Option(None, "--model", help="The preview's model, loaded once [default: the "
                                        "scene's, else $MULTIDIFF_MODEL, else SD2-base]."),
    port: int = typer.Option(0, "--port", min=0, max=65535, help="Port on 127.0.0.1 [default: a free one]."),
    no_browser: bool = typer.Option(False, "--no-browser", help="Print the URL only; do not open a browser."),
    preview_steps: Optional[int] = typer.Option(None, "--preview-steps", min=1, max=1000, help="Steps of the live "
                                                "preview [default: the scene's on few-step models, else 4]."),
    device: Optional[str] = typer.Option(None, "--device", help="[default: $MULTIDIFF_DEVICE, else the best present]"),
) -> None:
    """Place regions with the mouse in the browser and watch a preview form; every valid change is written to
    the scene file at once (its comments kept). Needs the editor extra: pip install 'multidiff[edit]'."""
    with _user_errors():
        from ..run.batch import RunSettings

        try:
            from ..edit import EditRequest, run_editor
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in ("starlette", "uvicorn", "ruamel", "anyio", "h11"):
                raise
            raise UsageError("multidiff edit needs the editor extra: pip install 'multidiff[edit]'") from None
        settings = RunSettings(**_env_device(device), default_model=env_model())
        run_editor(EditRequest(scene, model, port, not no_browser, preview_steps), settings,
                   lambda line: say([line]))


def _print(lines, plain: bool = False) -> None:
    """A run.workflow.Lines: stdout's lines (plain: without rich, for cut and awk), then stderr's."""
    for line in lines.out:
        typer.echo(line) if plain else out.print(line, markup=False)
    say(lines.err)


@app.command(cls=_Command)
def smoke(
    scenes_dir: Path = typer.Option(Path("scenes"), "--scenes", help="Folder of scenes to render (its subfolders too)."),
    steps: int = typer.Option(2, "--steps", min=1, max=50, help="Steps per scene."),
    model: Optional[str] = typer.Option(None, "--model", help="[default: $MULTIDIFF_MODEL if a folder, else each "
                                        "scene's own model if it is here, else its family's tiny random one]"),
    device: Optional[str] = typer.Option(None, "--device", help="[default: $MULTIDIFF_DEVICE, else the best present]"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="[default: float16 on CUDA, else float32]"),
    compile_unet: bool = typer.Option(False, "--compile", help="torch.compile the UNet."),
    output_dir: Path = typer.Option(OUTPUT_DIR / "smoke", "--output-dir", help="Where the pictures go."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """Render every scene in a few steps, check each picture (size, not black, metadata), print a table.
    Exit 1 if any scene fails. For CI on GPU runners."""
    with _user_errors():
        from ..output.report import smoke_table
        from ..run.batch import RunSettings
        from ..run.smoke import example_scenes, run_smoke, smoke_model

        scenes = example_scenes(scenes_dir)
        chosen = model or smoke_model(env_named_model())
        settings = RunSettings(**_env_device(device), dtype=dtype, compile=compile_unet)
        with ProgressDisplay(quiet) as display:
            results = run_smoke(scenes, output_dir, steps, chosen, settings, display)
        on = chosen or "each scene's family's model"
        skipped = sum(bool(result.skipped) for result in results)
        out.print(smoke_table(results, f"smoke: {len(scenes)} scenes ({skipped} skipped), {steps} steps, {on}"))
        if any(result.problem for result in results):
            raise typer.Exit(1)


@app.command(cls=_Command)
def bench(
    model: str = typer.Option("sd2-random", "--model", help="sd2-random, sdxl-random (full size), flux-random (FLUX.1's "
                              "width, fewer blocks), tiny-random, tiny-sdxl-random, tiny-flux-random."),
    size: Optional[int] = typer.Option(None, "--size", help="Square canvas in pixels [default: 512 on CUDA, 256 else]."),
    width: Optional[int] = typer.Option(None, "--width", help="Canvas width in pixels, --size its height (a panorama)."),
    region_px: Optional[int] = typer.Option(None, "--region-px", help="Regions as squares of this side spread along "
                                            "the width [default: boxes in a row, each a share of the width]."),
    regions: int = typer.Option(3, "--regions", min=0, max=16, help="Regions besides the global prompt."),
    loras: int = typer.Option(0, "--loras", min=0, max=16, help="Regions with a LoRA: time with them against without."),
    controls: int = typer.Option(0, "--controls", min=0, max=16, help="Regions with a ControlNet (SD, SDXL, FLUX.1): time "
                                 "with them against without, and each ControlNet call."),
    windows: bool = typer.Option(False, "--windows", help="Also time region windows (region_windows: true), with their "
                                 "own unconditional and with the canvas's, against full-canvas regions and the authors' loop."),
    steps: Optional[int] = typer.Option(None, "--steps", min=2, help="Steps [default: 50 on CUDA, 4 else]."),
    bootstrap_steps: int = typer.Option(0, "--bootstrap-steps", min=0, help="Bootstrap steps (all prompts' passes differ)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Scheduler name, as in scenes "
                                            "[default: the model family's]."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, mps or cpu [default: the best present]."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 [default: as render]."),
    compile_unet: bool = typer.Option(False, "--compile", help="torch.compile the UNet."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", min=1, help="UNet samples per call."),
    widths: Optional[str] = typer.Option(None, "--widths", help="Comma-separated canvas widths: time multidiff "
                                         "alone as views grow (panoramas); with --peer, the peer's canvases."),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="Time UNet calls of these sizes: 1,2,4,8,16."),
    window_sizes: Optional[str] = typer.Option(None, "--window-sizes", help="Time one UNet sample on square region "
                                               "windows of these sides (px) against the model's native view (not "
                                               "--size): 256,320,384,448."),
    peer: bool = typer.Option(False, "--peer", help="Whole renders against diffusers' panorama pipeline (no regions)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON here."),
) -> None:
    """Time multidiff's sampler against the authors' per-prompt loop on random SD2- or SDXL-shaped weights."""
    with _user_errors():
        from ..bench.command import run_bench_command
        from ..bench.sampler import bench_config

        config = bench_config(model, size, regions, steps, bootstrap_steps, scheduler, **_env_device(device),
                              dtype=dtype, compile=compile_unet, max_batch=max_batch, loras=loras, windows=windows,
                              controls=controls, width=width, region_px=region_px)
        with err.status(f"benchmarking on {config.device}: each path in its own process", spinner="dots"):
            printed = run_bench_command(config, widths, json_path, batch_sizes, peer, window_sizes)
        for item in printed:
            out.print(item, markup=False)


def main() -> None:
    """Console-script entry point. A mistyped command line is one line too (not Click's usage box)."""
    sys.exit(run_command(typer.main.get_command(app)))


if __name__ == "__main__":
    main()
