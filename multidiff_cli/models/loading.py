"""Load Stable Diffusion components: a hub id, a local diffusers folder, or the built-in `tiny-random`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError, ModelNotFound, UsageError
from .components import Components, quiet_libraries, speed_up, to_device
from .names import FEW_STEP_MARKERS
from .random_weights import (SD2_RANDOM, SDXL_RANDOM, TINY_RANDOM, TINY_SDXL_RANDOM, build_sd2_random,
                             build_sdxl_random, build_tiny_random, build_tiny_sdxl_random)
from .single_file import is_single_file, load_single_file, looks_like_hub_id

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-base"
# What a render needs from a diffusers folder: configs, tokenizer and safetensors weights only.
# Hub repos also hold pickles and multi-GB .ckpt files that must not be downloaded.
_COMPONENT_WEIGHTS = {
    "text_encoder": "model.safetensors",
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
}
_SDXL_WEIGHTS = {"text_encoder_2": "model.safetensors"}  # SDXL's second text encoder (and tokenizer_2/)
_ALLOW_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "tokenizer_2/*",
    *[f"{name}/config.json" for name in {**_COMPONENT_WEIGHTS, **_SDXL_WEIGHTS}],
    *[f"{name}/{weights}" for name, weights in {**_COMPONENT_WEIGHTS, **_SDXL_WEIGHTS}.items()],
]
_VAE_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]  # a VAE repo (`vae:`), e.g. an fp16 fix


BUILT_IN_MODELS = {  # random weights, built in code (looked up when called, so tests can stand in for them)
    TINY_RANDOM: lambda: build_tiny_random(),
    SD2_RANDOM: lambda: build_sd2_random(text_encoder=True),
    TINY_SDXL_RANDOM: lambda: build_tiny_sdxl_random(),
    SDXL_RANDOM: lambda: build_sdxl_random(text_encoder=True),
}


def load_components(
    model: str, device: torch.device, dtype: torch.dtype, compile: bool = False, allow_pickle: bool = False,
    config: str | None = None,
    vae: str | None = None,
) -> Components:
    """Load tokenizer(s), text encoder(s), UNet, VAE and scheduler config of `model` onto `device`.

    allow_pickle: also load pickle (.bin, .ckpt) weights, which can run code when loaded: only for
    models you trust, and only when asked for explicitly. config: for a single-file checkpoint, a
    diffusers folder or hub id with its configs (the scene's `model_config`).
    vae: a diffusers VAE (folder or hub id) to use instead of the model's own (the scene's `vae:`)."""
    quiet_libraries()
    if model in BUILT_IN_MODELS:
        components = BUILT_IN_MODELS[model]()
    elif is_single_file(model):
        components = load_single_file(Path(model).expanduser(), model, config, allow_pickle)
        components.few_step_model = is_few_step_model(model)  # the file's name (a "...turbo.safetensors")
    else:
        folder, revision = resolve_model_folder(model, allow_pickle)
        components = load_folder(folder, model_id=model, revision=revision, allow_pickle=allow_pickle)
    if vae is not None:
        components.vae, components.vae_id = load_vae(vae, allow_pickle), vae
    return speed_up(to_device(components, device, dtype), compile=compile)


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
        patterns = _ALLOW_PATTERNS + ([f"{name}/*.bin" for name in _COMPONENT_WEIGHTS] if allow_pickle else [])
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


def model_family(folder: Path) -> str:
    """"sdxl" for a folder with SDXL's UNet (an added `text_time` embedding: pooled text and time ids)
    and a second text encoder; else "sd". Read from the folder itself, never from its name."""
    return "sdxl" if _sdxl_unet(folder) and (folder / "text_encoder_2").is_dir() else "sd"


def _sdxl_unet(folder: Path) -> bool:
    """The folder's UNet adds SDXL's `text_time` embedding (pooled text and time ids)."""
    return _read_json(folder / "unet" / "config.json").get("addition_embed_type") == "text_time"


def load_folder(folder: Path, model_id: str, revision: str | None = None, allow_pickle: bool = False) -> Components:
    """Load the components of a diffusers-format folder: safetensors weights only, no remote code."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    _check_folder(folder, model_id, allow_pickle)
    family = model_family(folder)

    def safetensors(name: str) -> bool:  # False only where --allow-pickle let a pickle-only folder through
        return any((folder / name).glob("*.safetensors"))

    try:
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        sdxl = {}
        if family == "sdxl":
            sdxl = dict(
                family="sdxl",
                tokenizer_2=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
                text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                    folder, subfolder="text_encoder_2", use_safetensors=safetensors("text_encoder_2")
                ),
                # diffusers' StableDiffusionXLPipeline default where model_index.json does not say
                force_zeros_for_empty_prompt=bool(
                    _read_json(folder / "model_index.json").get("force_zeros_for_empty_prompt", True)
                ),
            )
        return Components(
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(
                folder, subfolder="text_encoder", use_safetensors=safetensors("text_encoder")
            ),
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=safetensors("unet")),
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=safetensors("vae")),
            scheduler_config=scheduler_config,
            model_id=model_id,
            revision=revision,
            few_step_model=is_few_step_model(model_id, folder),
            **sdxl,
        )
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise ModelError(f"model {model_id!r}: could not load {folder}: {exc}") from None


def is_few_step_model(model_id: str, folder: Path | None = None) -> bool:
    """Whether a model is distilled to sample in a few steps (SD-Turbo, SDXL-Turbo, LCM, SDXL-Lightning,
    Hyper-SD), where `few_step: auto` turns the few-step stabilisation on.

    Decided from names, since the weights do not say: the model's name (the id's last part), the
    folder's name (for a hub snapshot, its repo's), and the `_name_or_path` that model_index.json
    or the scheduler config may carry (a fine-tune saved from SD-Turbo keeps it), each searched for
    names.FEW_STEP_MARKERS (case-insensitive); or an LCMScheduler in the scheduler config.
    """
    names = [model_id.rstrip("/").rsplit("/", 1)[-1]]  # the name, not the owner or the folders above
    scheduler: dict = {}
    if folder is not None:
        names.append(folder.name)
        if folder.parent.name == "snapshots":  # models--owner--name/snapshots/<commit>
            names.append(folder.parent.parent.name.rsplit("--", 1)[-1])
        model_index, scheduler = (_read_json(folder / "model_index.json"),
                                  _read_json(folder / "scheduler" / "scheduler_config.json"))
        names += [str(config.get("_name_or_path", "")) for config in (model_index, scheduler)]
    named = any(marker in name.lower().replace("_", "-") for name in names for marker in FEW_STEP_MARKERS)
    return named or scheduler.get("_class_name") == "LCMScheduler"


def _read_json(path: Path) -> dict:
    """A JSON object from `path`; {} where there is none or it is not one (load_folder reports broken configs)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


@dataclass(frozen=True)
class CachedModels:
    """What `multidiff models` lists: the hub cache folder searched, and one row per diffusers model
    revision in it: (repo id, revision, size in bytes, why it cannot load or None, family: sd or sdxl)."""

    folder: Path
    rows: list[tuple[str, str, int, str | None, str]]


def cached_models(cache_dir: Path | None = None) -> CachedModels:
    """Every model revision in the Hugging Face cache that looks like a diffusers Stable Diffusion pipeline.

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
                _check_folder(snapshot, repo.repo_id)
                problem = None
            except (ModelNotFound, ModelError) as exc:
                problem = str(exc).split(": ", 1)[-1]
            found.append((repo.repo_id, revision.commit_hash, revision.size_on_disk, problem, model_family(snapshot)))
    return CachedModels(folder, found)


def _check_folder(folder: Path, model_id: str, allow_pickle: bool = False) -> None:
    needed = ("tokenizer", "scheduler/scheduler_config.json", *(f"{name}/config.json" for name in _COMPONENT_WEIGHTS))
    weights = dict(_COMPONENT_WEIGHTS)
    if _sdxl_unet(folder):
        needed += ("tokenizer_2", *(f"{name}/config.json" for name in _SDXL_WEIGHTS))
        weights.update(_SDXL_WEIGHTS)
    missing = [name for name in needed if not (folder / name).exists()]
    if missing:
        raise ModelNotFound(
            f"model {model_id!r}: {folder} is not a diffusers Stable Diffusion folder "
            f"(missing {', '.join(missing)})"
        )
    for name in weights:
        if not any((folder / name).glob("*.safetensors")):
            pickles = [p.name for p in (folder / name).glob("*.bin")]
            if pickles and allow_pickle:
                continue
            found = f" (only pickle weights: {', '.join(pickles)})" if pickles else ""
            raise ModelError(
                f"model {model_id!r}: {folder / name} has no .safetensors weights{found}. multidiff "
                "loads safetensors only, since pickle files can run code; convert the folder "
                "(diffusers' pipe.save_pretrained(..., safe_serialization=True)), or, for a model you "
                "trust, pass --allow-pickle."
            )


