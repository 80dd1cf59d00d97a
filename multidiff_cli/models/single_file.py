"""Single-file checkpoints (A1111/ComfyUI layout, SD 1.x / 2.x / 2.x-v) through diffusers' single-file
loading. The file holds weights only: the configs (UNet, VAE, text encoder, tokenizer, scheduler)
come from `model_config` (a diffusers folder or hub id), else from the Hugging Face cache copy of
the default repo diffusers picks for the checkpoint's family."""
from __future__ import annotations

from pathlib import Path

from ..errors import ModelError, ModelNotFound
from .components import Components

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
PICKLE_SUFFIXES = (".ckpt",)


def looks_like_hub_id(name: str) -> bool:
    """owner/name, not a path (no leading '.', '/' or '~')."""
    return not name.startswith((".", "/", "~")) and name.count("/") == 1


def is_single_file(model: str) -> bool:
    """A model given as a checkpoint file (not a folder, not a hub id)."""
    path = Path(model).expanduser()
    return path.suffix.lower() in SINGLE_FILE_SUFFIXES and path.is_file()


def load_single_file(path: Path, model_id: str, config: str | None = None, allow_pickle: bool = False) -> Components:
    """The components of a single-file checkpoint; ModelNotFound (with how to get them) without configs."""
    from diffusers import StableDiffusionPipeline
    from huggingface_hub import constants

    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelError(f"model {model_id!r}: {path.suffix} checkpoints are pickles, which can run code when "
                         "loaded; use the .safetensors one, or, for a model you trust, pass --allow-pickle")
    config_folder = Path(config).expanduser() if config else None
    if config_folder is not None and not config_folder.is_dir() and not looks_like_hub_id(config):
        raise ModelNotFound(f"model_config {config!r}: no such folder, and not a hub id of the form owner/name")
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config_folder) if config_folder is not None and config_folder.is_dir() else config,
            local_files_only=constants.HF_HUB_OFFLINE, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError, EnvironmentError) as exc:
        raise _no_config(path, model_id, config, exc) from None
    return Components(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, unet=pipe.unet, vae=pipe.vae,
        scheduler_config=dict(pipe.scheduler.config), model_id=model_id,
    )


def _no_config(path: Path, model_id: str, config: str | None, exc: Exception) -> ModelNotFound:
    """Why a single file did not load: most often, no configs for it here (offline, not in the cache)."""
    text = str(exc).strip()
    reason = text.splitlines()[0].split(". ")[0][:160] if text else type(exc).__name__
    if config:
        return ModelNotFound(f"model {model_id!r}: could not load it with the configs of model_config {config!r} "
                             f"({reason}). model_config must be a diffusers folder (or a cached hub id) of the "
                             "same family (model_index.json, unet/ vae/ text_encoder/ configs, tokenizer/, scheduler/)")
    family = _family(path)
    return ModelNotFound(
        f"model {model_id!r}: a single-file checkpoint holds no configs, and those of its family"
        f"{f' ({family})' if family else ''} are not in the local Hugging Face cache ({reason}). Either set "
        "`model_config:` in the scene to a diffusers folder or hub id of the same family (SD 1.x, 2.x or 2.x-v), "
        f"or fetch the configs where the hub is reachable: hf download {family or 'REPO'} --include "
        "'*.json' 'tokenizer/*'"
    )


def _family(path: Path) -> str | None:
    """The hub repo diffusers takes the configs from for this checkpoint, if it can tell."""
    try:
        from diffusers.loaders.single_file_utils import fetch_diffusers_config, load_single_file_checkpoint

        return fetch_diffusers_config(load_single_file_checkpoint(str(path)))["pretrained_model_name_or_path"]
    except Exception:  # unreadable: the message says so without a family
        return None
