"""Single-file checkpoints (A1111/ComfyUI layout: SD 1.x / 2.x / 2.x-v, SDXL; FLUX.1's and FLUX.2 klein's BFL files,
SD3.5's and Z-Image's own)
through diffusers' single-file loading. The file holds weights only: the configs (UNet, VAE, text encoder,
tokenizer, scheduler) come from `model_config` (a diffusers folder or hub id), else from the Hugging Face
cache copy of the default repo diffusers picks for the checkpoint's architecture."""
from __future__ import annotations

from pathlib import Path

from ..catalog import FLUX, PICKLE_SUFFIXES, family_of_checkpoint, looks_like_hub_id
from ..errors import ModelError, ModelNotFound
from .family import LoadedState, Model, family_class


def load_single_file(path: Path, model_id: str, config: str | None = None, allow_pickle: bool = False) -> Model:
    """The model of a single-file checkpoint, of the family its keys say; ModelNotFound (with how to get
    them) without configs."""
    import diffusers
    from huggingface_hub import constants

    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelError(f"model {model_id!r}: {path.suffix} checkpoints are pickles, which can run code when "
                         "loaded; use the .safetensors one, or, for a model you trust, pass --allow-pickle")
    config_folder = Path(config).expanduser() if config else None
    if config_folder is not None and not config_folder.is_dir() and not looks_like_hub_id(config):
        raise ModelNotFound(f"model_config {config!r}: no such folder, and not a hub id of the form owner/name")
    family = family_of_checkpoint(path)
    if family is None:
        raise ModelError(f"model {model_id!r}: its keys are FLUX.2 [dev]'s (a 15360-wide text input), which multidiff "
                         "does not render; FLUX.2 klein's files load")
    cls = family_class(family)
    configs = str(config_folder) if config_folder is not None and config_folder.is_dir() else config
    try:
        pipe = _pipeline(getattr(diffusers, cls.single_file_pipeline), cls, path, configs, constants.HF_HUB_OFFLINE)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise _no_config(path, model_id, config, exc) from None
    return cls.from_pipeline(pipe, LoadedState(model_id=model_id, scheduler_config=dict(pipe.scheduler.config)))


def _pipeline(pipeline, cls: type[Model], path: Path, configs: str | None, local_files_only: bool):
    """diffusers' pipeline of a single file. A file with the denoiser alone (BFL's flux1-dev.safetensors holds
    the transformer only) makes from_single_file refuse the parts it lacks: then the denoiser comes from the
    file and every other part from the configs' folder (model_config, else the cached repo of its architecture)."""
    import diffusers
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    if not hasattr(pipeline, "from_single_file"):  # Flux2KleinPipeline: its transformer reads single files, it does not
        if configs is None:
            raise ValueError(f"{pipeline.__name__} reads no single file itself: set model_config to a diffusers "
                             "folder or hub id of the same model for its other parts")
        source = configs
    else:
        try:
            return pipeline.from_single_file(str(path), config=configs, local_files_only=local_files_only,
                                             **cls.single_file_kwargs)
        except SingleFileComponentError as exc:
            source = configs or _config_repo(path)
            if source is None:
                raise ValueError(str(exc).strip().splitlines()[0]) from None
    _, class_name = pipeline.load_config(source, local_files_only=local_files_only)[cls.denoiser_part]
    denoiser = getattr(diffusers, class_name).from_single_file(str(path), config=source, subfolder=cls.denoiser_part,
                                                               local_files_only=local_files_only)
    return pipeline.from_pretrained(source, local_files_only=local_files_only, **{cls.denoiser_part: denoiser},
                                    **cls.single_file_kwargs)


def _no_config(path: Path, model_id: str, config: str | None, exc: Exception) -> ModelNotFound:
    """Why a single file did not load: most often, no configs for it here (offline, not in the cache)."""
    text = str(exc).strip()
    reason = text.splitlines()[0].split(". ")[0][:160] if text else type(exc).__name__
    if config:
        return ModelNotFound(f"model {model_id!r}: could not load it with the configs of model_config {config!r} "
                             f"({reason}). model_config must be a diffusers folder (or a cached hub id) of the "
                             "same family (model_index.json, unet/ vae/ text_encoder/ configs, tokenizer/, scheduler/)")
    repo = _config_repo(path)
    architecture, fetch = "SD 1.x, 2.x, 2.x-v or SDXL", "--include '*.json' 'tokenizer*/*'"
    if family_of_checkpoint(path) is FLUX:  # BFL's files hold the transformer alone: the other parts' weights too
        architecture, fetch = "FLUX.1, with its text encoders and VAE", "--exclude 'transformer/*'"
    return ModelNotFound(
        f"model {model_id!r}: a single-file checkpoint holds no configs, and those of its architecture"
        f"{f' ({repo})' if repo else ''} are not in the local Hugging Face cache ({reason}). Either set "
        f"`model_config:` in the scene to a diffusers folder or hub id of the same architecture ({architecture}), "
        f"or fetch the configs where the hub is reachable: hf download {repo or 'REPO'} {fetch}"
    )


def _config_repo(path: Path) -> str | None:
    """The hub repo diffusers takes the configs from for this checkpoint, if it can tell."""
    try:
        from diffusers.loaders.single_file_utils import fetch_diffusers_config, load_single_file_checkpoint

        return fetch_diffusers_config(load_single_file_checkpoint(str(path)))["pretrained_model_name_or_path"]
    except Exception:  # unreadable: the message says so without a family
        return None
