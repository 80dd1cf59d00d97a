"""The files the editor may touch: the scene file and files below its folder, nothing else.

Every name the page sends is checked here before it is read or written: no absolute path, no `~`, no
`..`, and once resolved (symlinks followed) still below the scene's folder. Uploads pass the checks
`render` applies to masks and init images (Pillow's decompression-bomb guard included) before they get
a name, and never replace a file."""
from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from ..errors import PictureError
from ..scene import grid, picture
from ..scene.paths import KEEP_WORDS, MODEL_KEYS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
UPLOAD_FOLDERS = {"mask": "masks", "init_image": "pictures"}  # where an upload of each kind goes
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
SHOWN_MAX_PX = 2048  # pictures sent to the page are at most this large a side


class Refused(ValueError):
    """A name or an upload the editor will not take; the message says why, in one line."""


def below(folder: Path, name: str) -> Path:
    """The file `name` (as a scene writes it) resolved below `folder`; Refused for an absolute path, `~`,
    `..`, or a symlink that leads out of the folder."""
    if not isinstance(name, str) or not name.strip():
        raise Refused("a file name is needed")
    if "\\" in name or "\0" in name:
        raise Refused(f"{name}: write paths with / and no control characters")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or name.startswith("~") or re.match(r"^[A-Za-z]:", name):
        raise Refused(f"{name}: the editor takes files below the scene's folder, not absolute paths")
    if ".." in parts:
        raise Refused(f"{name}: the editor takes files below the scene's folder: no `..`")
    root = folder.resolve()
    resolved = (root / name).resolve()
    if not resolved.is_relative_to(root):
        raise Refused(f"{name}: leads out of the scene's folder (a symlink): the editor does not follow it")
    return resolved


def path_problems(folder: Path, old: dict, new: dict) -> list[tuple[tuple, str]]:
    """Every file name the page changed (masks, init image, keep mask, LoRAs, local models) that is not
    below the scene's folder: (location, message). Names already in the file stay as they are."""
    problems = []
    for loc, value in _named_files(new):
        if value == _at(old, loc) or not isinstance(value, str):
            continue
        if loc[-1] in MODEL_KEYS and not _names_local_file(folder, value):
            continue  # a hub id or a built-in name: nothing here is read
        try:
            below(folder, value)
        except Refused as exc:
            problems.append((loc, str(exc)))
    return problems


def _names_local_file(folder: Path, name: str) -> bool:
    """Whether a model name is a path (absolute, ~, ..) or a file or folder that exists beside the scene."""
    if PurePosixPath(name).is_absolute() or name.startswith("~") or ".." in PurePosixPath(name).parts or "\\" in name:
        return True
    try:
        return (folder / name).exists()
    except (OSError, ValueError):
        return True


def _named_files(scene: dict) -> list[tuple[tuple, Any]]:
    found: list[tuple[tuple, Any]] = [((key,), scene[key]) for key in (*MODEL_KEYS, "init_image") if key in scene]
    if scene.get("keep") not in (None, *KEEP_WORDS):
        found.append((("keep",), scene["keep"]))

    def loras(owner: dict, loc: tuple) -> None:
        for k, lora in enumerate(owner.get("loras") if isinstance(owner.get("loras"), list) else []):
            found.append(((*loc, "loras", k, "path"), lora.get("path") if isinstance(lora, dict) else lora))
        for kind in ("control", "reference"):  # a model: a local path, or a hub id or a built-in name (as MODEL_KEYS)
            for k, item in enumerate(owner.get(kind) if isinstance(owner.get(kind), list) else []):
                if isinstance(item, dict):
                    found.extend(((*loc, kind, k, key), item[key]) for key in ("image", "model") if key in item)

    loras(scene, ())
    for i, region in enumerate(scene.get("regions") if isinstance(scene.get("regions"), list) else []):
        if isinstance(region, dict):
            if "mask" in region:
                found.append((("regions", i, "mask"), region["mask"]))
            loras(region, ("regions", i))
    return found


def _at(data: Any, loc: tuple) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def shown_picture(folder: Path, name: str) -> bytes:
    """A picture below the scene's folder as a PNG for the page (at most SHOWN_MAX_PX a side), read
    through the same checks as render's pictures."""
    path = below(folder, name)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise Refused(f"{name}: not a picture ({', '.join(IMAGE_SUFFIXES)})")
    with picture.open_image(path, "a picture") as image:
        image.thumbnail((SHOWN_MAX_PX, SHOWN_MAX_PX))
        return png_bytes(image.convert("RGBA"))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_upload(folder: Path, kind: str, filename: str, data: bytes) -> str:
    """Check an uploaded mask or init image as render would read it and save it under a free name in
    masks/ or pictures/ below the scene's folder; its name as the scene writes it."""
    if kind not in UPLOAD_FOLDERS:
        raise Refused(f"an upload is a {' or an '.join(UPLOAD_FOLDERS)}, not {kind!r}")
    if len(data) > MAX_UPLOAD_BYTES:
        raise Refused(f"{filename}: over {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB")
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(PurePosixPath(filename or "upload").name).stem).strip("-") or "upload"
    suffix = Path(filename or "").suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise Refused(f"{filename}: a {kind.replace('_', ' ')} is a {'/'.join(IMAGE_SUFFIXES)} picture")
    target_dir = below(folder, UPLOAD_FOLDERS[kind])
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=suffix, dir=target_dir)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        _check_upload(Path(tmp), kind, filename)
        name = _free_name(target_dir, stem, suffix)
        os.link(tmp, target_dir / name)  # fails rather than replace a file that appeared meanwhile
    finally:
        os.unlink(tmp)
    return f"{UPLOAD_FOLDERS[kind]}/{name}"


def _check_upload(path: Path, kind: str, filename: str) -> None:
    try:
        if kind == "mask":
            with picture.open_image(path, "a mask") as image:
                if not grid.pixel_mask(image).any():
                    raise Refused(f"{filename}: the mask is empty (no pixel is at least half-white; white = region)")
        else:
            picture.upright_size(path)
    except PictureError as exc:
        raise Refused(str(exc).replace(str(path), filename)) from None


def _free_name(folder: Path, stem: str, suffix: str) -> str:
    number = 1
    while True:
        name = f"{stem}{suffix}" if number == 1 else f"{stem}-{number}{suffix}"
        if not (folder / name).exists() and not (folder / name).is_symlink():
            return name
        number += 1
