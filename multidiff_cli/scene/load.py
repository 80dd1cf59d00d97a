"""Load a scene: parse YAML safely, apply command-line overrides, validate (scene/validation.py), check
the files, the canvas and what the model's family needs; every problem points at its line, and all of
a scene's problems come at once."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..catalog import DEFAULT_MODEL, detect_family, detect_few_step
from ..errors import SceneError
from . import picture
from .controls import with_fits
from .geometry import boxes_following_canvas, canvas_of, canvas_of_picture, is_int
from .paths import local_model
from .schema import Scene, family_steps
from .validation import check_canvas, check_valid_regions, file_problems, one_per_value, pydantic_message
from .warnings import scene_warnings
from .yamlpos import parse_yaml, report


def load_scene(path: Path, overrides: dict[str, Any] | None = None, default_model: str | None = DEFAULT_MODEL,
               allow_pickle: bool = False) -> Scene:
    """Read, parse and validate a scene file; SceneError lists the problems as `file:line: field: message`.

    `overrides` (command-line values) replace the file's keys before validation, so defaults
    that depend on them (bootstrap_steps on steps) follow. default_model: the model of a scene that
    names none (its family's defaults and checks apply). allow_pickle: pickle LoRAs pass (--allow-pickle)."""
    path = Path(path)
    data, root = parse_yaml(path)
    return scene_from_dict(data, path, overrides=overrides, root=root, default_model=default_model,
                           allow_pickle=allow_pickle)


def scene_from_dict(data: dict[str, Any], source: Path, base_dir: Path | None = None,
                    overrides: dict[str, Any] | None = None, root: Any = None,
                    default_model: str | None = DEFAULT_MODEL, allow_pickle: bool = False) -> Scene:
    """Validate a scene given as a dict (a parsed file, or a PNG's metadata); problems are reported
    against `source`, at the lines of the YAML node tree `root` when there is one. What the overrides
    changed beyond their own keys is in the scene's `notes`.

    Where the model's family can be told without loading it (catalog.detect_family), its checks (the
    canvas's alignment, its scheduler names) and defaults (scheduler, guidance) apply here; where not
    (a hub id not downloaded yet), the render applies them once the model is loaded."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    base_dir = base_dir or Path(source).resolve().parent
    try:
        data = {**data, **canvas_of_picture(data, base_dir)}
    except picture.PictureError as exc:  # an unusable init image is the scene's one problem
        raise SceneError(report(source, root, [(("init_image",), str(exc))])) from None
    model = _model(data | overrides, base_dir, from_cli="model" in overrides, default_model=default_model)
    family, few_step = (detect_family(model), detect_few_step(model)) if model else (None, False)
    merged, notes, hints = apply_overrides(data, overrides, family_steps(family, few_step) if family else None)
    try:
        scene = Scene.model_validate(merged)
    except ValidationError as exc:
        problems = [(err["loc"], pydantic_message(err)) for err in one_per_value(exc.errors())]
        problems += check_valid_regions(merged, base_dir)  # all at once: one bad box hides nothing else
        problems += file_problems(merged, base_dir, allow_pickle)  # nor one typo a missing file
        raise SceneError(report(source, root, _with_hints(problems, hints), from_cli=set(overrides))) from None
    scene._base_dir = base_dir
    scene._notes = notes
    scene._family, scene._few_step_model = family, few_step
    scene = with_fits(scene, canvas_of(data))  # before --size's scaling: where each region's control image goes
    problems = check_canvas(scene, allow_pickle)
    if problems:
        raise SceneError(report(source, root, _with_hints(problems, hints), from_cli=set(overrides)))
    scene._warnings = report(source, root, scene_warnings(scene), from_cli=set(overrides))
    return scene.for_family(family, few_step) if family is not None else scene


def _model(data: dict[str, Any], base_dir: Path, from_cli: bool, default_model: str | None) -> str | None:
    """The model the scene renders on (its own, --model's, or the default), resolved as a render resolves
    it, so its family can be told before it is loaded (catalog.detect_family)."""
    named = data.get("model")
    model = named if isinstance(named, str) and named.strip() else default_model
    if not model:
        return None
    return local_model(model, base_dir, from_cli=from_cli or model is default_model)[0]


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], default_steps: int | None = None
                    ) -> tuple[dict[str, Any], list[str], dict]:
    """The data with the overrides over it, and what follows from them: an explicit bootstrap_steps
    scaled with a lower --steps, boxes scaled with a new canvas. Returns (data, notes for the user,
    hints: loc -> text appended to a problem there, so an error says the command line caused it).
    default_steps: the steps of a scene that gives none (its model family's), where known."""
    notes: list[str] = []
    hints: dict[tuple, str] = {}
    merged = {**data, **overrides}
    merged.update(_bootstrap_following_steps(data, overrides, notes, hints, default_steps))
    merged.update(boxes_following_canvas(data, overrides, notes, hints))
    return merged, notes, hints


def _bootstrap_following_steps(data, overrides, notes, hints, default_steps) -> dict[str, Any]:
    """--steps below the scene's own bootstrap_steps scales it, keeping the scene's proportion
    (a default bootstrap_steps already follows steps; an explicit --bootstrap-steps wins)."""
    if "steps" not in overrides or "bootstrap_steps" in overrides or "bootstrap_steps" not in data:
        return {}
    new, bootstrap = overrides["steps"], data["bootstrap_steps"]
    old = data.get("steps", default_steps)
    if not (is_int(new, 1) and is_int(old, 1) and is_int(bootstrap, 0)) or bootstrap <= new:
        return {}
    if bootstrap > old:  # the scene contradicts itself: its own error, whatever --steps says
        hints[("bootstrap_steps",)] = f"steps {new} is from --steps"
        return {}
    scaled = min(new, max(1, round(bootstrap * new / old)))
    notes.append(f"bootstrap_steps {bootstrap} of {old} steps scaled to {scaled} of {new} "
                 f"(--steps {new} is below it; --bootstrap-steps N sets it)")
    return {"bootstrap_steps": scaled}


def _with_hints(problems: list[tuple[tuple, str]], hints: dict[tuple, str]) -> list[tuple[tuple, str]]:
    """Problems at a value the overrides changed say so (the deepest hinted part of each location)."""
    out = []
    for loc, message in problems:
        hint = next((hints[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in hints), None)
        out.append((loc, f"{message}; {hint}" if hint else message))
    return out
