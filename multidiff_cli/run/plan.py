"""Plan a batch: which scene renders with which seed into which file (a RenderJob each). No rendering."""
from __future__ import annotations

import functools
import hashlib
import random
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..catalog import DEFAULT_MODEL, control_model_file
from ..errors import MultidiffError, UsageError
from ..output.png import read_metadata, record_base_dir
from ..scene import Scene, load_scene, scene_from_dict
from ..scene.controls import control_image_path, control_model_name, reference_root, reference_weight
from ..scene.paths import local_model
from ..scene.schema import BOOTSTRAP_FRACTION, MAX_SEED

SEED_RANGE = 2**32  # random seeds are drawn below this, as A1111 and ComfyUI do: short enough to type
MAX_SEEDS = 10_000


@dataclass
class RenderJob:
    source: Path
    scene: Scene
    seed: int
    target: Path
    scene_file: str  # the scene file's name (for a PNG source: the one it was rendered from)
    model_given: str = ""  # the model as written (scene.model holds a local folder absolutely), for messages
    inputs: dict[str, str] = field(default_factory=dict)  # input file as written in the scene -> sha256
    earlier: list[Path] = field(default_factory=list)  # existing files of this render's name (--skip-existing)
    was_skipped: bool = False  # --skip-existing found it rendered already (target: that file)

    @property
    def label(self) -> str:
        return f"{self.source.name} seed {self.seed}"

    @property
    def contact_label(self) -> str:
        return f"{Path(self.scene_file).stem} · seed {self.seed}"


@dataclass
class Failure:
    """A source that did not load, or a job that did not render: the batch goes on without it."""

    label: str
    error: MultidiffError

    @property
    def exit_code(self) -> int:
        return self.error.exit_code


def parse_seeds(spec: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]: single seeds and inclusive ranges, in the order given, without repeats."""
    seeds: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UsageError(f"--seeds: {part.strip()!r} is not a seed or a range like 0-3 (in {spec!r})")
        first, last = int(match[1]), int(match[2] or match[1])
        if last > MAX_SEED:
            raise UsageError(f"--seeds: {last} is over the largest seed, {MAX_SEED}")
        if last < first:
            raise UsageError(f"--seeds: range {part.strip()} runs backwards")
        if len(seeds) + last - first + 1 > MAX_SEEDS:
            raise UsageError(f"--seeds: more than {MAX_SEEDS} seeds")
        seeds.extend(s for s in range(first, last + 1) if s not in seeds)
    return seeds


def parse_size(spec: str) -> tuple[int, int]:
    """'768x512' -> (768, 512), width first."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", spec)
    if not match:
        raise UsageError(f"--size: expected WIDTHxHEIGHT in pixels, like 768x512, got {spec!r}")
    return int(match[1]), int(match[2])


@dataclass
class Source:
    """A loaded source: the scene, the scene file's name (output files are named after it), and for
    a PNG its record's input hashes and notes (an input file that changed since)."""

    scene: Scene
    scene_file: str
    from_png: bool = False
    notes: list[str] = field(default_factory=list)
    hashed: dict[str, str] | None = None  # a PNG's inputs, hashed on loading to compare with its record

    @functools.cached_property
    def inputs(self) -> dict[str, str]:
        """input_hashes(scene), hashed when first asked: validate and preview never ask (a LoRA can be GBs)."""
        return self.hashed if self.hashed is not None else input_hashes(self.scene)


def load_source(path: Path, overrides: dict[str, Any] | None = None, default_model: str = DEFAULT_MODEL,
                allow_pickle: bool = False) -> Source:
    """A scene file, or a PNG rendered by multidiff (its metadata holds the scene; its paths are relative
    to the picture's folder). default_model: the model of a scene that names none. allow_pickle: pickle
    LoRAs pass (--allow-pickle)."""
    overrides = overrides or {}
    if path.suffix.lower() != ".png":
        scene = load_scene(path, overrides, default_model, allow_pickle)
        return Source(scene, path.name)
    record = read_metadata(path)
    base_dir = record_base_dir(record, path)
    data = dict(record["scene"])
    steps, bootstrap = data.get("steps"), data.get("bootstrap_steps")
    if isinstance(steps, int) and isinstance(bootstrap, int) and round(steps * BOOTSTRAP_FRACTION) == bootstrap:
        data.pop("bootstrap_steps")  # it was the default: let it follow a new --steps
    scene = scene_from_dict(data, source=path, base_dir=base_dir, overrides=overrides, default_model=default_model,
                            allow_pickle=allow_pickle)
    if overrides.get("width") is None and overrides.get("model") in (None, record.get("model")):
        scene = scene.with_window_pins(recorded_windows(scene, record))
    hashes = input_hashes(scene)
    notes = [
        f"{name} changed since {path.name} was rendered (its sha256 differs): this render will differ"
        if digest is not None else f"{name}: the file is gone since {path.name} was rendered"
        for name, digest in changed_inputs(record.get("inputs", {}), hashes)
    ]
    return Source(scene, record.get("scene_file") or path.name, True, notes, hashes)


def recorded_windows(scene: Scene, record: dict[str, Any]) -> dict[int, list[int] | None]:
    """What a PNG's render ran for each region that `auto` decided, by prompt index: its recorded window
    [x0, y0, x1, y1] in pixels, or None where it ran on the canvas (no window recorded for it). A malformed
    window is left out: auto decides that region again."""
    windows = record.get("windows")
    boxes = windows.get("boxes") if isinstance(windows, dict) else None
    boxes = boxes if isinstance(boxes, dict) else {}
    pins: dict[int, list[int] | None] = {}
    for i, region in enumerate(scene.regions):
        if scene.window_choice(region) != "auto":
            continue
        box = boxes.get(f"regions[{i}]")
        if box is None or (isinstance(box, list) and len(box) == 4 and all(type(v) is int for v in box)):
            pins[i + 1] = box
    return pins


def input_files(scene: Scene) -> dict[str, Path]:
    """Every file that shapes the picture (the regions' masks, the init image and its keep mask, the
    LoRAs, the control images and local ControlNets' weights, the reference pictures and local IP-Adapters'
    weights), as written in the scene -> its path."""
    files = {region.mask: scene.path_of(region.mask) for region in scene.regions if region.mask is not None}
    if scene.init_image is not None:
        files[scene.init_image] = scene.init_image_path
    if scene.keep_mask is not None:
        files[scene.keep_mask] = scene.keep_mask_path
    for lora in scene.loras + [lora for region in scene.regions for lora in region.loras]:
        files[lora.path] = scene.lora_path(lora)
    for _, control in scene.controls():
        files[control.image] = control_image_path(scene, control)
        weights = control_model_file(control_model_name(scene, control))
        if weights is not None:  # a local ControlNet: its weights file (a hub id is recorded by name)
            files[control.model] = weights
    for _, reference in scene.references():
        files[reference.image] = scene.path_of(reference.image)
        root = Path(reference_root(scene, reference))
        weight = root / reference_weight(scene, reference, scene.family.name if scene.family else None)
        if root.is_dir() and weight.is_file():  # a local IP-Adapter: its weight file
            files[f"{reference.model}/{reference.weight}"] = weight
    return files


def input_hashes(scene: Scene) -> dict[str, str]:
    """sha256 of every input file (absent when it cannot be read), recorded so a re-render can tell."""
    hashes = {}
    for name, path in input_files(scene).items():
        try:
            hashes[name] = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            continue
    return hashes


def changed_inputs(recorded: dict[str, str], current: dict[str, str]) -> list[tuple[str, str | None]]:
    """(name, current hash or None if the file is gone) of every recorded input that differs now."""
    return [(name, current.get(name)) for name, digest in sorted(recorded.items()) if current.get(name) != digest]


def free_path(base: Path, taken: set[Path]) -> tuple[Path, list[Path]]:
    """The first of base.png, base-2.png, base-3.png, ... that no file and no other job holds, and the
    existing ones before it: no render replaces a file the user did not name."""
    earlier, number = [], 1
    while True:
        candidate = base if number == 1 else base.with_name(f"{base.stem}-{number}{base.suffix}")
        if candidate.resolve() not in taken and not candidate.exists():
            return candidate, earlier
        if candidate.exists():
            earlier.append(candidate)
        number += 1


def model_paths(scene: Scene, overrides: dict[str, Any], default_model: str) -> tuple[dict[str, str | None], list[str]]:
    """The scene's model, vae and model_config with local paths made absolute (scene.paths.local_model:
    relative to the scene file; --model and the default model relative to the current folder), and
    the notes that resolving them gave."""
    resolved, notes = {}, []
    for key, value, from_cli in (("model", scene.model or default_model, overrides.get("model") is not None or not scene.model),
                                 ("vae", scene.vae, False), ("model_config_", scene.model_config_, False)):
        if value:
            resolved[key], note = local_model(value, scene.base_dir, from_cli)
            notes += [note] if note else []
    return resolved, notes


def plan_jobs(
    sources: list[Path], overrides: dict[str, Any], seeds: list[int] | None, output: Path | None, output_dir: Path,
    rng: random.Random | None = None, default_model: str = DEFAULT_MODEL, overwrite: bool = False,
    allow_pickle: bool = False,
) -> tuple[list[RenderJob], list[Failure], list[tuple[str, str]]]:
    """Every (scene, seed) to render, the sources that failed to load (the rest go on), and what the
    user should hear before rendering: ("note" | "warning", text).

    Scenes without a seed get a random one from `rng` (fresh randomness if None); scenes without
    a model get `default_model`. Files are named <scene>-<seed>.png (a PNG's re-render:
    <scene>-<seed>-again.png); where that exists, -2, -3, ... is appended, unless `overwrite`."""
    draw = rng.randrange if rng is not None else secrets.randbelow
    if output is not None and (output.is_dir() or output.suffix.lower() != ".png"):
        raise UsageError(f"-o/--output: {output} must name a .png file (for a folder, use --output-dir)")
    jobs, failures, notes, taken = [], [], [], set()
    for source in sources:
        try:
            loaded = load_source(source, overrides, default_model, allow_pickle)
        except MultidiffError as exc:
            failures.append(Failure(source.name, exc))
            continue
        scene = loaded.scene
        paths, path_notes = model_paths(scene, overrides, default_model)  # once, not per seed
        notes += [("note", f"{source.name}: {note}") for note in scene.notes + path_notes]
        notes += [("warning", f"{source.name}: {note}") for note in loaded.notes] + [("warning", w) for w in scene.warnings]
        model_given = scene.model or default_model
        for seed in seeds or [scene.seed if scene.seed is not None else draw(SEED_RANGE)]:
            base = output_dir / f"{Path(loaded.scene_file).stem}-{seed}{'-again' if loaded.from_png else ''}.png"
            if output is not None:
                target, earlier = output, [output] if output.exists() else []
            elif overwrite:
                target, earlier = base, [base] if base.exists() else []
            else:
                target, earlier = free_path(base, taken)
            if target.resolve() in taken:
                if output is not None:  # a second picture for the one file -o names
                    raise UsageError(f"-o/--output {output} is for one picture, but this renders several: use "
                                     "--output-dir for them")
                raise UsageError(f"two renders would write the same file ({target}): give them separate --output-dir")
            if target.resolve() == source.resolve():
                raise UsageError(f"{target}: would replace the PNG being rendered again; name another with -o")
            taken.add(target.resolve())
            resolved = scene.model_copy(update={"seed": seed, **paths})
            jobs.append(RenderJob(source, resolved, seed, target, loaded.scene_file, model_given, loaded.inputs, earlier))
    if output is not None and len(jobs) > 1:
        raise UsageError(f"-o/--output {output} is for one picture, but this renders several: use --output-dir for them")
    return jobs, failures, notes

