"""Paths in a scene: one rule. Every file a scene names — masks, the init image, keep masks, LoRAs, control
and reference pictures, ControlNets and IP-Adapters, and local `model:`, `vae:` and `model_config:` paths — is
relative to the scene file's folder (for a PNG's record, the picture's folder); on the command line (`--model`, $MULTIDIFF_MODEL), relative to
the current folder, as the shell has it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MODEL_KEYS = ("model", "vae", "model_config")  # a scene's keys that name a model: a local path, a hub id or a built-in name
KEEP_WORDS = ("none", "outside_regions")  # `keep:` values that are not a mask path


def scene_path(base_dir: Path, name: str) -> Path:
    """A file a scene names, as written there, relative to the scene file's folder (or absolute, or ~).

    `..` is taken lexically (os.path.normpath), so a path relative to a folder that does not exist yet
    (an upscale's scene, checked before its output folder is made) still names its file."""
    try:
        joined = base_dir / Path(name).expanduser()
    except RuntimeError:  # ~someone who does not exist: taken literally, reported as missing
        joined = base_dir / name
    return Path(os.path.normpath(joined))


def local_model(name: str, base_dir: Path, from_cli: bool = False) -> tuple[str, str | None]:
    """A model a scene names (`model:`, `vae:`, `model_config:`), resolved: a local folder or file as an
    absolute path; anything else (a hub id, a built-in name) as given. Also a note for the user, or None.

    A scene's path is relative to the scene file's folder; one given on the command line, to the
    current folder. A scene path that exists only relative to the current folder (how multidiff read
    it before paths had one rule) is still used, with a note saying how to write it."""
    if from_cli:
        path = Path(name).expanduser()
        return (str(path.resolve()), None) if path.exists() else (name, None)
    path = scene_path(base_dir, name)
    if path.exists():
        return str(path.resolve()), None
    old = Path(name).expanduser()
    if old.exists():
        relative = os.path.relpath(old.resolve(), Path(base_dir).resolve())
        return str(old.resolve()), (f"{name}: found in the current folder, not beside the scene file; paths in a scene "
                                    f"are relative to the scene file's folder: write {relative} (a later release will "
                                    "read it only that way)")
    return name, None


def rebase_paths(scene: dict[str, Any], from_dir: Path, to_dir: Path) -> dict[str, Any]:
    """A scene (as a dict) with every local path it names rewritten from `from_dir` to `to_dir`: the masks,
    init image, keep mask, LoRAs, control and reference pictures, and model, ControlNet and IP-Adapter paths that
    name a local folder or file (hub ids and built-in names stay as they are)."""
    from_dir, to_dir = Path(from_dir), Path(to_dir).resolve()

    def moved(value: Any, only_existing: bool = False) -> Any:
        if not isinstance(value, str):
            return value
        path = scene_path(from_dir, value)
        if only_existing and not path.exists():
            return value
        return os.path.relpath(path.resolve(), to_dir)

    def moved_adapters(owner: dict) -> dict:
        loras = owner.get("loras")
        if isinstance(loras, list):
            owner = {**owner, "loras": [{**lora, "path": moved(lora.get("path"))} if isinstance(lora, dict)
                                        else moved(lora) for lora in loras]}
        for key in ("control", "reference"):  # ControlNets and IP-Adapters: a picture, and a model that may be local
            if isinstance(owner.get(key), list):
                owner = {**owner, key: [{**c, "image": moved(c.get("image")), "model": moved(c.get("model"), True)}
                                        if isinstance(c, dict) else c for c in owner[key]]}
        return owner

    out = dict(scene)
    for key in MODEL_KEYS:
        if key in out:
            out[key] = moved(out[key], only_existing=True)
    if "init_image" in out:
        out["init_image"] = moved(out["init_image"])
    if isinstance(out.get("keep"), str) and out["keep"] not in KEEP_WORDS:
        out["keep"] = moved(out["keep"])
    if isinstance(out.get("regions"), list):
        out["regions"] = [moved_adapters({**r, "mask": moved(r["mask"])} if isinstance(r.get("mask"), str) else r)
                          if isinstance(r, dict) else r for r in out["regions"]]
    return moved_adapters(out)


def rebase_name(name: str, from_dir: Path, to_dir: Path) -> str:
    """One path as written in a scene, rewritten from `from_dir` to `to_dir` (the key of a record's input hash)."""
    return os.path.relpath(scene_path(Path(from_dir), name).resolve(), Path(to_dir).resolve())


def named_files(scene: dict[str, Any], base_dir: Path) -> list[tuple[str, Path]]:
    """Every local file a scene (as a dict) names, as written -> resolved from base_dir: masks, the init
    image and keep mask, LoRAs, and model paths that exist there."""
    found: list[tuple[str, Path]] = []

    def add(value: Any, only_existing: bool = False) -> None:
        if isinstance(value, str) and value.strip():
            path = scene_path(base_dir, value)
            if not only_existing or path.exists():
                found.append((value, path.resolve()))

    def add_adapters(owner: dict) -> None:
        for lora in owner.get("loras") or [] if isinstance(owner.get("loras"), list) else []:
            add(lora.get("path") if isinstance(lora, dict) else lora)
        for key in ("control", "reference"):
            for item in owner.get(key) if isinstance(owner.get(key), list) else []:
                if isinstance(item, dict):
                    add(item.get("image"))
                    add(item.get("model"), only_existing=True)

    for key in MODEL_KEYS:
        add(scene.get(key), only_existing=True)
    add(scene.get("init_image"))
    if scene.get("keep") not in (None, *KEEP_WORDS):
        add(scene.get("keep"))
    add_adapters(scene)
    for region in scene.get("regions") if isinstance(scene.get("regions"), list) else []:
        if isinstance(region, dict):
            add(region.get("mask"))
            add_adapters(region)
    return list(dict.fromkeys(found))
