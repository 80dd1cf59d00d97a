"""Load Stable Diffusion components: a hub id, a local diffusers folder, or the built-in `tiny-random`."""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError, ModelNotFound, UsageError

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-base"
TINY_RANDOM = "tiny-random"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What a render needs from a diffusers folder: configs, tokenizer and safetensors weights only.
# Hub repos also hold pickles and multi-GB .ckpt files that must not be downloaded.
_COMPONENT_WEIGHTS = {
    "text_encoder": "model.safetensors",
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
}
_ALLOW_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    *[f"{name}/config.json" for name in _COMPONENT_WEIGHTS],
    *[f"{name}/{weights}" for name, weights in _COMPONENT_WEIGHTS.items()],
]


@dataclass
class Components:
    """Everything a render needs from a model, already on its device."""

    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler_config: dict[str, Any]
    model_id: str
    revision: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (8 for every SD model)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size_px(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor


def pick_device(name: str | None = None) -> torch.device:
    """`name` if given, else CUDA, else Apple MPS, else CPU."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise UsageError(f"--device: {name!r} is not a torch device ({exc})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device: CUDA was asked for but torch sees no CUDA device")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UsageError("--device: MPS was asked for but is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """`name` if given, else float16 on CUDA and float32 elsewhere."""
    if name:
        if name not in DTYPES:
            raise UsageError(f"--dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
        return DTYPES[name]
    return torch.float16 if device.type == "cuda" else torch.float32


def load_components(
    model: str, device: torch.device, dtype: torch.dtype, compile: bool = False, allow_pickle: bool = False
) -> Components:
    """Load tokenizer, text encoder, UNet, VAE and scheduler config of `model` onto `device`.

    allow_pickle: also load pickle (.bin) weights, which can run code when loaded: only for
    models you trust, and only when asked for explicitly."""
    _quiet_libraries()
    if model == TINY_RANDOM:
        from .tiny import build_tiny_random

        components = build_tiny_random()
    else:
        folder, revision = resolve_model_folder(model, allow_pickle)
        components = load_folder(folder, model_id=model, revision=revision, allow_pickle=allow_pickle)
    return speed_up(to_device(components, device, dtype), compile=compile)


def speed_up(components: Components, compile: bool = False) -> Components:
    """On CUDA, channels-last convolutions (faster with tensor cores); optionally torch.compile the UNet.

    Attention already runs through PyTorch's scaled-dot-product attention (diffusers' default
    processor on torch 2). Compilation costs a minute or so on the first call and pays off over
    long batches.
    """
    if components.device.type == "cuda":
        components.unet.to(memory_format=torch.channels_last)
    if compile:
        components.unet = torch.compile(components.unet, mode="max-autotune-no-cudagraphs", fullgraph=False)
    return components


def resolve_model_folder(model: str, allow_pickle: bool = False) -> tuple[Path, str | None]:
    """A local folder as is; a hub id through the HF cache (honours HF_HOME and HF_HUB_OFFLINE)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path, None
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelNotFound(
            f"model {model!r}: no such folder, and not a hub id of the form owner/name. "
            "Point --model at a local diffusers folder (one with unet/, vae/, text_encoder/, "
            "tokenizer/ and scheduler/), or use --model tiny-random for a smoke test."
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
            "diffusers folder; --model tiny-random renders offline (random weights, for smoke tests)."
        ) from None
    return folder, folder.name if folder.parent.name == "snapshots" else None


def load_folder(folder: Path, model_id: str, revision: str | None = None, allow_pickle: bool = False) -> Components:
    """Load the components of a diffusers-format folder: safetensors weights only, no remote code."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _check_folder(folder, model_id, allow_pickle)

    def safetensors(name: str) -> bool:  # False only where --allow-pickle let a pickle-only folder through
        return any((folder / name).glob("*.safetensors"))

    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    try:
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
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {model_id!r}: could not load {folder}: {exc}") from None


def cached_models(cache_dir: Path | None = None) -> list[tuple[str, str, int, str | None]]:
    """(repo id, revision, size in bytes, why it cannot load or None) of every model revision in
    the Hugging Face cache that looks like a diffusers Stable Diffusion pipeline."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            folder = Path(revision.snapshot_path)
            if not (folder / "unet").is_dir() and not (folder / "model_index.json").exists():
                continue  # not a diffusers pipeline (a text model, a LoRA, ...)
            try:
                _check_folder(folder, repo.repo_id)
                problem = None
            except (ModelNotFound, ModelError) as exc:
                problem = str(exc).split(": ", 1)[-1]
            found.append((repo.repo_id, revision.commit_hash, revision.size_on_disk, problem))
    return found


def _check_folder(folder: Path, model_id: str, allow_pickle: bool = False) -> None:
    needed = ("tokenizer", "scheduler/scheduler_config.json", *(f"{name}/config.json" for name in _COMPONENT_WEIGHTS))
    missing = [name for name in needed if not (folder / name).exists()]
    if missing:
        raise ModelNotFound(
            f"model {model_id!r}: {folder} is not a diffusers Stable Diffusion folder "
            f"(missing {', '.join(missing)})"
        )
    for name in _COMPONENT_WEIGHTS:
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


def to_device(components: Components, device: torch.device, dtype: torch.dtype) -> Components:
    """Move to `device`: text encoder and UNet in `dtype`; the VAE stays float32 (fp16 decodes overflow)."""
    _quiet_libraries()
    for module, module_dtype in (
        (components.text_encoder, dtype),
        (components.unet, dtype),
        (components.vae, torch.float32),
    ):
        if module is None:  # the bench runs without a text encoder
            continue
        module.to(device=device, dtype=module_dtype).eval().requires_grad_(False)
    components.device, components.dtype = device, dtype
    return components


def _quiet_libraries() -> None:
    """Silence diffusers/transformers chatter (config-key notices, progress bars) unless debugging."""
    if os.environ.get("MULTIDIFF_DEBUG"):
        return
    with contextlib.suppress(Exception):
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
