"""The commands that render nothing, below the CLI: validate, preview, init, inspect and models. Each
returns what the CLI prints; none loads a model or imports torch."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import MultidiffError
from ..output import OUTPUT_DIR
from ..output.console import error_lines
from ..output.png import read_metadata, write_png
from ..output.preview import draw_layout
from ..output.report import metadata_text, model_lines, save_scene_file
from ..scene.starter import write_starter
from .plan import free_path, load_source


@dataclass
class Lines:
    """What a command prints: `out` on stdout (what scripts read), `err` on stderr (for people)."""

    out: list[str]
    err: list[str]
    failed: bool = False


def validate_sources(paths: list[Path], default_model: str, allow_pickle: bool = False, model: str | None = None) -> Lines:
    """Each scene or PNG checked as `render` would check it before loading the model (on `model` where given,
    as --model): an `ok` line each, or its problems; warnings and notes on stderr."""
    lines = Lines([], [])
    overrides = {"model": model} if model else {}
    for path in paths:
        try:
            loaded = load_source(path, overrides, default_model=default_model, allow_pickle=allow_pickle)
        except MultidiffError as exc:
            lines.err += error_lines(exc)
            lines.failed = True
            continue
        scene, count = loaded.scene, len(loaded.scene.regions)
        lines.err += [f"warning: {path}: {note}" for note in loaded.notes] + [f"warning: {w}" for w in scene.warnings]
        lines.out.append(f"{path}: ok ({count} region{'' if count == 1 else 's'}, {scene.width}x{scene.height})")
    return lines


def write_layout(path: Path, output: Path | None, default_model: str) -> tuple[Path, list[str]]:
    """Draw the scene's layout into `output` (default: a free name in the output folder); (the file,
    the scene's warnings)."""
    loaded = load_source(path, default_model=default_model)
    warnings = [f"warning: {path}: {note}" for note in loaded.notes] + [f"warning: {w}" for w in loaded.scene.warnings]
    target = output or free_path(OUTPUT_DIR / f"{Path(loaded.scene_file).stem}-layout.png", set())[0]
    return write_png(draw_layout(loaded.scene, layout_windows(loaded.scene)), target), warnings


def layout_windows(scene) -> dict[int, tuple[int, int, int, int]]:
    """The region windows a render would run, in pixels, for the scene's family's usual native window (a
    model whose own differs, SD 2.1's 768 px, may window differently: its PNG's record says what it ran)."""
    from ..catalog import DEFAULT_MODEL, detect_family
    from ..method.views import make_views
    from ..scene.geometry import region_windows

    family = scene.family or detect_family(DEFAULT_MODEL)
    cell = scene.cell_px
    native = family.native_px // cell
    views = make_views(scene.latent_hw, native, max(1, scene.view_stride // cell), wrap=scene.wrap == "horizontal")
    windows = region_windows(scene, native, family.window_align_px, [(v.top, v.left, v.height, v.width) for v in views])
    return {p - 1: (left * cell, top * cell, (left + w) * cell, (top + h) * cell) for p, (top, left, h, w) in windows.items()}


def starter_scene(path: Path, force: bool) -> Path:
    """Write the commented starter scene."""
    return write_starter(path, force)


def inspect_picture(image: Path, as_json: bool, save_scene: Path | None) -> Lines:
    """A PNG's record for people (or as JSON); with `save_scene`, its scene written there as a file."""
    record = read_metadata(image)
    text = json.dumps(record, indent=2, ensure_ascii=False) if as_json else metadata_text(record, image)
    saved = [f"scene written to {save_scene_file(record, image, save_scene)}"] if save_scene else []
    return Lines([text], saved)


def cached_model_lines(cache_dir: Path | None) -> Lines:
    """`models`: a tab-separated row per model revision in the Hugging Face cache, and where it looked."""
    from ..models import cached_models

    found = cached_models(cache_dir)
    return Lines(model_lines(found.rows), [f"searched {found.folder}" + ("" if found.rows else ": no diffusers models there")])
