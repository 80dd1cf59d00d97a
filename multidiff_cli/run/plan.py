"""Plan a batch: which scene renders with which seed into which file (a RenderJob each). No rendering."""
from __future__ import annotations

import random
import re
import secrets
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MultidiffError, UsageError
from ..models.loading import DEFAULT_MODEL
from ..output.png import read_metadata
from ..scene import Scene, load_scene, scene_from_dict
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


def load_source(path: Path, overrides: dict[str, Any]) -> tuple[Scene, str]:
    """A scene file, or a PNG rendered by multidiff (its metadata holds the scene); and the name of
    the scene file (for a PNG, the one it was rendered from), which output files are named after."""
    if path.suffix.lower() != ".png":
        return load_scene(path, overrides), path.name
    record = read_metadata(path)
    scene_dir = Path(record.get("scene_dir") or path.resolve().parent)
    base_dir = scene_dir if scene_dir.is_dir() else path.resolve().parent
    data = dict(record["scene"])
    if "steps" in data and round(data["steps"] * BOOTSTRAP_FRACTION) == data.get("bootstrap_steps"):
        data.pop("bootstrap_steps")  # it was the default: let it follow a new --steps
    scene = scene_from_dict(data, source=path, base_dir=base_dir, overrides=overrides)
    return scene, record.get("scene_file") or path.name


def plan_jobs(
    sources: list[Path], overrides: dict[str, Any], seeds: list[int] | None, output: Path | None, output_dir: Path,
    rng: random.Random | None = None, default_model: str = DEFAULT_MODEL,
) -> tuple[list[RenderJob], list[Failure]]:
    """Every (scene, seed) to render, and the sources that failed to load (the rest go on).

    Scenes without a seed get a random one from `rng` (fresh randomness if None); scenes without
    a model get `default_model`."""
    draw = rng.randrange if rng is not None else secrets.randbelow
    if output is not None and (output.is_dir() or output.suffix.lower() != ".png"):
        raise UsageError(f"-o/--output: {output} must name a .png file (for a folder, use --output-dir)")
    jobs, failures = [], []
    for source in sources:
        try:
            scene, scene_file = load_source(source, overrides)
        except MultidiffError as exc:
            failures.append(Failure(source.name, exc))
            continue
        for seed in seeds or [scene.seed if scene.seed is not None else draw(SEED_RANGE)]:
            target = output or output_dir / f"{Path(scene_file).stem}-{seed}.png"
            if target.resolve() == source.resolve():  # rendering a PNG again never overwrites it
                target = target.with_name(f"{target.stem}-again.png")
            resolved = scene.model_copy(update={"seed": seed, "model": scene.model or default_model})
            jobs.append(RenderJob(source, resolved, seed, target, scene_file))
    if output is not None and len(jobs) > 1:
        raise UsageError("-o/--output names one file, but this renders several pictures: use --output-dir")
    clashes = sorted(str(target) for target, count in Counter(job.target for job in jobs).items() if count > 1)
    if clashes:
        raise UsageError(f"two renders would write the same file ({', '.join(clashes)}): scenes with the same "
                         "name need separate --output-dir runs")
    return jobs, failures
