"""Load a model of any family: a hub id, a local diffusers folder, a single-file checkpoint, or a
built-in random model; and list the models in the Hugging Face cache."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..catalog import (BUILT_IN, FAMILIES, PICKLE_SUFFIXES, Family, cached_folder, family_of_folder,
                       is_few_step_model, is_single_file, looks_like_hub_id, read_json, safetensors_header)
from ..errors import ModelError, ModelNotFound, UsageError
from .allocator import keep_freed_memory
from .device import quiet_libraries
from .family import LoadedState, Model, family_class
from .single_file import load_single_file

# What a render needs from a diffusers folder: configs, tokenizers and safetensors weights only, of
# the subfolders any family reads. Hub repos also hold pickles, fp16 copies and multi-GB .ckpt files
# that must not be downloaded.
_SUBFOLDERS = sorted({name for family in FAMILIES.values() for name in family.weights})
_ALLOW_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    *sorted({f"{name}/*" for family in FAMILIES.values() for name in family.folders if name != "scheduler"}),
    *[f"{name}/config.json" for name in _SUBFOLDERS],
    *[f"{name}/*.safetensors.index.json" for name in _SUBFOLDERS],  # the shards' index (FLUX's T5 and transformer)
    *sorted({f"{name}/{weights}" for family in FAMILIES.values() for name, weights in family.weights.items()}),
]
_VAE_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]  # a VAE repo (`vae:`), e.g. an fp16 fix


def load_model(
    model: str, device: torch.device, dtype: torch.dtype, compile: bool = False, allow_pickle: bool = False,
    config: str | None = None,
    vae: str | None = None,
    offload: bool = False,
) -> Model:
    """Load `model` (its family detected from model_index.json or the checkpoint's keys) onto `device`.

    allow_pickle: also load pickle (.bin, .ckpt) weights, which can run code when loaded: only for
    models you trust, and only when asked for explicitly. config: for a single-file checkpoint, a
    diffusers folder or hub id with its configs (the scene's `model_config`).
    vae: a diffusers VAE (folder or hub id) to use instead of the model's own (the scene's `vae:`).
    offload: the text encoders wait on the CPU, on the device only while they encode (Model.to)."""
    quiet_libraries()
    if model in BUILT_IN:
        from .random_weights import build_random

        loaded = build_random(model)
    elif is_single_file(model):
        loaded = load_single_file(Path(model).expanduser(), model, config, allow_pickle)
        loaded.state.few_step_model = is_few_step_model(model)  # the file's name (a "...turbo.safetensors")
    else:
        folder, revision = resolve_model_folder(model, allow_pickle)
        loaded = load_folder(folder, model_id=model, revision=revision, allow_pickle=allow_pickle)
    if vae is not None:
        loaded.vae, loaded.state.vae_id = load_vae(vae, allow_pickle), vae
    if device.type == "cpu":
        keep_freed_memory()
    return loaded.to(device, dtype, offload).speed_up(compile)


_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I8": 1,
                  "U8": 1, "BOOL": 1}


def weights_bytes(model: str, dtype: torch.dtype) -> dict[str, int] | None:
    """What a model's weights take on the device in `dtype`, per part ("transformer", "text_encoder_2",
    ...; a single file: "checkpoint"), read from its safetensors headers before anything loads; None
    where that cannot be told (a hub id not downloaded, a built-in model, pickles)."""
    path = Path(model).expanduser()
    folder = path if path.is_dir() else cached_folder(model) if looks_like_hub_id(model) else None
    files = ({part: sorted((folder / part).glob("*.safetensors")) for part in _SUBFOLDERS if (folder / part).is_dir()}
             if folder is not None else {"checkpoint": [path]} if path.suffix == ".safetensors" and path.is_file() else {})
    element = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    sizes = {}
    for part, paths in files.items():
        total = 0
        for file in paths:
            header = safetensors_header(file) or {}
            for name, tensor in header.items():
                if name != "__metadata__" and isinstance(tensor, dict):
                    count = 1
                    for dim in tensor.get("shape", []):
                        count *= dim
                    total += count * (element if tensor.get("dtype", "F32").startswith(("F", "BF")) else
                                      _ELEMENT_BYTES.get(tensor.get("dtype"), 4))
        if total:
            sizes[part] = total
    return sizes or None


def load_vae(vae: str, allow_pickle: bool = False):
    """A diffusers AutoencoderKL from a folder holding its config.json, or a hub id (safetensors only)."""
    from diffusers import AutoencoderKL

    path = Path(vae).expanduser()
    if path.is_dir():
        folder = path
    else:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(vae, allow_patterns=_VAE_PATTERNS + (["*.bin"] if allow_pickle else [])))
        except Exception as exc:  # offline, not cached, not a hub id
            raise ModelNotFound(
                f"vae {vae!r}: no such folder, and not in the local Hugging Face cache or downloadable "
                f"({type(exc).__name__}). Point `vae:` at a folder with a diffusers VAE's config.json and "
                "weights, or leave it out to use the model's own VAE."
            ) from None
    if (folder / "vae" / "config.json").exists() and not (folder / "config.json").exists():
        folder = folder / "vae"  # a whole pipeline's folder: its VAE
    if not any(folder.glob("*.safetensors")) and not (allow_pickle and any(folder.glob("*.bin"))):
        raise ModelError(f"vae {vae!r}: {folder} has no .safetensors weights (multidiff loads safetensors only; "
                         "--allow-pickle for a VAE you trust)")
    try:
        return AutoencoderKL.from_pretrained(folder, use_safetensors=any(folder.glob("*.safetensors")))
    except (OSError, ValueError) as exc:
        raise ModelError(f"vae {vae!r}: could not load {folder}: {exc}") from None


def resolve_model_folder(model: str, allow_pickle: bool = False) -> tuple[Path, str | None]:
    """A local folder as is; a hub id through the HF cache (honours HF_HOME and HF_HUB_OFFLINE)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path, None
    if path.exists() or not looks_like_hub_id(model):
        raise ModelNotFound(
            f"model {model!r}: no such folder, and not a hub id of the form owner/name. "
            "Point --model at a local diffusers folder (one with unet/, vae/, text_encoder/, "
            "tokenizer/ and scheduler/), or use --model tiny-random (make render MODEL=tiny-random) for a smoke test."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        patterns = _ALLOW_PATTERNS + ([f"{name}/*.bin" for name in _SUBFOLDERS] if allow_pickle else [])
        folder = Path(snapshot_download(model, allow_patterns=patterns))
    except HFValidationError as exc:
        raise ModelNotFound(f"model {model!r} is not a valid hub id: {exc}") from None
    except Exception as exc:  # offline, not cached, unknown repo, gated, network down
        raise ModelNotFound(
            f"model {model!r} is not in the local Hugging Face cache and could not be downloaded "
            f"({type(exc).__name__}). Download it where the hub is reachable "
            f"(hf download {model}) and copy the cache (HF_HOME), or point --model at a local "
            "diffusers folder; --model tiny-random (make render MODEL=tiny-random) renders offline (random weights, "
            "for smoke tests)."
        ) from None
    return folder, folder.name if folder.parent.name == "snapshots" else None


def load_folder(folder: Path, model_id: str, revision: str | None = None, allow_pickle: bool = False) -> Model:
    """Load a diffusers-format folder of a family multidiff knows: safetensors weights only, no remote code."""
    family = _check_folder(folder, model_id, allow_pickle)
    try:
        state = LoadedState(
            model_id=model_id, revision=revision, few_step_model=is_few_step_model(model_id, folder),
            scheduler_config=json.loads((folder / "scheduler" / "scheduler_config.json").read_text()),
        )
        # False only where --allow-pickle let a pickle-only folder through
        return family_class(family).from_folder(folder, state, lambda part: any((folder / part).glob("*.safetensors")))
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise ModelError(f"model {model_id!r}: could not load {folder}: {exc}") from None


@dataclass(frozen=True)
class CachedModels:
    """What `multidiff models` lists: the hub cache folder searched, and one row per diffusers model
    revision in it: (repo id, revision, size in bytes, why it cannot load or None, family name or "?")."""

    folder: Path
    rows: list[tuple[str, str, int, str | None, str]]


def cached_models(cache_dir: Path | None = None) -> CachedModels:
    """Every model revision in the Hugging Face cache that is a diffusers pipeline.

    cache_dir: the hub cache (holding models--owner--name/ folders) or a folder holding one as
    hub/ (HF_HOME); default: huggingface_hub's (HF_HUB_CACHE, else $HF_HOME/hub)."""
    from huggingface_hub import constants, scan_cache_dir

    if cache_dir is None:
        folder = Path(constants.HF_HUB_CACHE)
        if not folder.is_dir():  # nothing downloaded yet
            return CachedModels(folder, [])
    else:
        folder = Path(cache_dir).expanduser()
        if not folder.is_dir():
            raise UsageError(f"--cache-dir: {folder} is not a folder" if folder.exists()
                             else f"--cache-dir: no such folder: {folder}")
        if (folder / "hub").is_dir():  # HF_HOME: the hub cache is its hub/ (no repo folder is named hub)
            folder = folder / "hub"
    found = []
    for repo in sorted(scan_cache_dir(folder).repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.commit_hash):
            snapshot = Path(revision.snapshot_path)
            if not (snapshot / "unet").is_dir() and not (snapshot / "model_index.json").exists():
                continue  # not a diffusers pipeline (a text model, a LoRA, ...)
            try:
                family = _check_folder(snapshot, repo.repo_id).name
                problem = None
            except (ModelNotFound, ModelError) as exc:
                family, problem = getattr(family_of_folder(snapshot), "name", "?"), str(exc).split(": ", 1)[-1]
            found.append((repo.repo_id, revision.commit_hash, revision.size_on_disk, problem, family))
    return CachedModels(folder, found)


def _check_folder(folder: Path, model_id: str, allow_pickle: bool = False) -> Family:
    """The folder's family, once every file its family loads is there (ModelNotFound, ModelError: why not)."""
    family = family_of_folder(folder)
    if family is None:
        pipeline = read_json(folder / "model_index.json").get("_class_name")
        known = ", ".join(f.label for f in FAMILIES.values())
        raise ModelNotFound(f"model {model_id!r}: {folder} is not a diffusers model of a family multidiff knows ({known})"
                            + (f": its model_index.json names {pipeline}" if pipeline else ""))
    needed = (*family.folders, "scheduler/scheduler_config.json", *(f"{name}/config.json" for name in family.weights))
    missing = [name for name in needed if not (folder / name).exists()]
    if missing:
        raise ModelNotFound(
            f"model {model_id!r}: {folder} is not a diffusers {family.label} folder "
            f"(missing {', '.join(missing)})"
        )
    for name in family.weights:
        if not any((folder / name).glob("*.safetensors")):
            pickles = [p.name for p in (folder / name).iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles and allow_pickle:
                continue
            found = f" (only pickle weights: {', '.join(pickles)})" if pickles else ""
            raise ModelError(
                f"model {model_id!r}: {folder / name} has no .safetensors weights{found}. multidiff "
                "loads safetensors only, since pickle files can run code; convert the folder "
                "(diffusers' pipe.save_pretrained(..., safe_serialization=True)), or, for a model you "
                "trust, pass --allow-pickle."
            )
    return family
