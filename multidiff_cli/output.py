"""PNG files with the metadata to render them again: atomic writes, and reading the metadata back."""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, BinaryIO, Callable

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import OutputError

METADATA_KEY = "multidiff"  # JSON: everything needed to render the picture again
PARAMETERS_KEY = "parameters"  # the A1111-style summary other tools (and image sites) read
_PACKAGES = ("multidiff", "torch", "diffusers", "transformers")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        with contextlib.suppress(importlib_metadata.PackageNotFoundError):
            versions[name] = importlib_metadata.version(name)
    return versions


def build_metadata(scene: dict[str, Any], *, model: str, revision: str | None, device: str, dtype: str,
                   seconds: float, scene_file: str | None = None, scene_dir: str | None = None) -> dict[str, Any]:
    """The record stored in the PNG: the resolved scene (defaults, seed and model filled) and the run.

    scene_file and scene_dir say where the scene came from: mask paths in the scene are relative
    to scene_dir, which `multidiff render IMAGE.png` uses to render the picture again."""
    return {
        "scene": scene,
        "scene_file": scene_file,
        "scene_dir": scene_dir,
        "model": model,
        "revision": revision,
        "scheduler": scene["scheduler"],
        "device": device,
        "dtype": dtype,
        "versions": package_versions(),
        "render_seconds": round(seconds, 3),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def a1111_parameters(record: dict[str, Any]) -> str:
    """The `parameters` text A1111 writes, so image viewers and sites show the prompt and settings."""
    scene = record["scene"]
    lines = [scene["prompt"]]
    if scene.get("negative_prompt"):
        lines.append(f"Negative prompt: {scene['negative_prompt']}")
    settings = {
        "Steps": scene["steps"],
        "Sampler": scene["scheduler"],
        "CFG scale": scene["guidance_scale"],
        "Seed": scene["seed"],
        "Size": f"{scene['width']}x{scene['height']}",
        "Model": record["model"],
        "Regions": len(scene.get("regions", [])),
        "Bootstrap steps": scene["bootstrap_steps"],
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in settings.items()))
    return "\n".join(lines)


def write_png(image: Image.Image, path: Path, record: dict[str, Any] | None = None) -> Path:
    """Write `image` (with `record` as PNG text chunks) atomically: a reader never sees a partial file."""
    info = PngInfo()
    if record is not None:
        info.add_itxt(METADATA_KEY, json.dumps(record, ensure_ascii=False, sort_keys=True))
        info.add_itxt(PARAMETERS_KEY, a1111_parameters(record))
    return write_atomic(path, lambda handle: image.save(handle, format="PNG", pnginfo=info))


def write_gif(frames: list[Image.Image], path: Path, frame_ms: int = 120) -> Path:
    """An animation of `frames`, written atomically; the last frame lingers."""
    durations = [frame_ms] * (len(frames) - 1) + [frame_ms * 8]
    return write_atomic(
        path, lambda handle: frames[0].save(handle, format="GIF", save_all=True, append_images=frames[1:],
                                            duration=durations, loop=0)
    )


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a picture is as readable as any new file
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def check_writable(folder: Path) -> None:
    """Fail early, before any expensive work, if files cannot be created in `folder`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror or exc}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_metadata(path: Path) -> dict[str, Any]:
    """The multidiff record of a PNG written by `write_png`; KeyError if it has none."""
    with Image.open(path) as image:
        text = image.text.get(METADATA_KEY) if hasattr(image, "text") else None
    if text is None:
        raise KeyError(f"{path} holds no multidiff metadata")
    return json.loads(text)
