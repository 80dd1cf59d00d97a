"""PNG files with the metadata to render them again: atomic writes, and reading the metadata back."""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import platform
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, BinaryIO, Callable

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..errors import MetadataError, OutputError, one_line
from ..scene.schema import styled

METADATA_KEY = "multidiff"  # JSON: everything needed to render the picture again
PARAMETERS_KEY = "parameters"  # the A1111-style summary other tools (and image sites) read
_PACKAGES = ("multidiff", "torch", "diffusers", "transformers")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        with contextlib.suppress(importlib_metadata.PackageNotFoundError):
            versions[name] = importlib_metadata.version(name)
    return versions


def build_metadata(scene: dict[str, Any], *, family: str, revision: str | None, device: str, dtype: str,
                   seconds: float, scene_file: str | None = None, inputs: dict[str, str] | None = None,
                   init_image: dict[str, Any] | None = None, unet_batch: dict[str, Any] | None = None,
                   windows: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record stored in the PNG: the resolved scene (defaults, seed and model filled) and the run.

    Every local path in `scene` (masks, init image, LoRAs, a local model) is relative to the picture's
    own folder, where `multidiff render IMAGE.png` resolves it: a picture holds no absolute path, so
    sharing it shares no directory layout (A1111's infotext holds none either); hub ids are as given.
    scene_file: the scene file's name. inputs: each input file as written in the scene -> its sha256,
    so a re-render can tell it changed. family: the model's family (catalog.FAMILIES). init_image:
    the picture a render started from (path as given, size, sha256), recorded only where there is one.
    unet_batch: {"samples_per_call": N, "auto": whether `max_batch: auto` chose N}. windows: the region windows
    the render ran (run.batch.windows_record), where it had any: the scene's keys decide them, this shows them."""
    record = ({"init_image": init_image} if init_image else {}) | {
        "scene": scene,
        "scene_file": scene_file,
        "inputs": inputs or {},
        "model": scene.get("model"),
        "family": family,
        "revision": revision,
        "scheduler": scene["scheduler"],
        "device": device,
        "dtype": dtype,
        "versions": package_versions(),
        "render_seconds": round(seconds, 3),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if unet_batch is not None:
        record["unet_batch"] = unet_batch
    if windows is not None:
        record["windows"] = windows
    return record


def a1111_parameters(record: dict[str, Any]) -> str:
    """The `parameters` text A1111 writes, so image viewers and sites show the prompt and settings: the
    prompt as it was used (the scene's `style` appended, as it was to every prompt)."""
    scene = record["scene"]
    lines = [styled(scene["prompt"], str(scene.get("style") or ""))]
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
    if scene.get("strength") is not None:
        settings["Denoising strength"] = scene["strength"]
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
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {why_not_writable(path.parent, exc)}") from None
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
        raise OutputError(f"cannot write {path}: {why_not_writable(path.parent, exc)}") from None
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
        raise OutputError(f"cannot write to {folder}: {why_not_writable(folder, exc)}") from None


def why_not_writable(folder: Path, exc: OSError) -> str:
    """What is wrong with which path, rather than the bare errno text ("File exists" for a file where a
    folder should be, "No such file or directory" for a file system that creates no files)."""
    ancestor = Path(folder)
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a folder"
    if exc.errno == errno.EROFS:
        return f"{ancestor} is on a read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to create files in {ancestor}"
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device of {ancestor}"
    if ancestor == Path(folder):
        return f"{ancestor} does not take new files ({exc.strerror or exc}): a special or read-only file system?"
    return f"cannot create {folder} in {ancestor} ({exc.strerror or exc})"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_metadata(path: Path) -> dict[str, Any]:
    """The multidiff record of a PNG written by `write_png`. MetadataError (one line) when the file is
    missing or unreadable, or holds no record, or a corrupt or truncated one."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            text = image.text.get(METADATA_KEY) if hasattr(image, "text") else None
    except FileNotFoundError:
        raise MetadataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MetadataError(f"{path}: is a directory, not a PNG") from None
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow: not an image, truncated, bad chunk CRC
        raise MetadataError(f"{path}: not a PNG Pillow can read ({one_line(str(exc))[:200]})") from None
    if text is None:
        raise MetadataError(f"{path}: holds no multidiff metadata (only PNGs written by multidiff do)")
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise MetadataError(f"{path}: its multidiff record is corrupt or truncated ({one_line(str(exc))[:120]})") from None
    problem = _record_problem(record)
    if problem:
        raise MetadataError(f"{path}: its multidiff record is malformed: {problem}")
    return record


def _record_problem(record: Any) -> str | None:
    """Why a decoded record cannot be the one write_png stores, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if not isinstance(record.get("scene"), dict):
        return "no `scene` object"
    for key in ("scene_file", "scene_dir", "model", "model_given", "family", "revision"):
        if record.get(key) is not None and not isinstance(record[key], str):
            return f"`{key}` is not text"
    inputs = record.get("inputs", {})
    if not isinstance(inputs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in inputs.items()):
        return "`inputs` is not a map of file paths to hashes"
    return None


def record_base_dir(record: dict[str, Any], image: Path) -> Path:
    """The folder a PNG record's paths are relative to: the picture's own; for a record written before
    records held no absolute path, its `scene_dir` where that folder still exists."""
    old = record.get("scene_dir")
    if old and Path(old).is_dir():
        return Path(old)
    return Path(image).resolve().parent
